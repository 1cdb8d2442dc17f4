"""LoRA for timm Vision Transformers: the layer, injection and exact merging.

``W x + (alpha / r) * B A x`` with the pretrained ``W`` frozen. A fused ``qkv`` projection
updating only some of q/k/v keeps one wrapper with one ``A`` for all chosen parts and an
independent rank-r ``B`` per part (the pattern of loralib's MergedLinear and LitGPT's
LoRAQKVLinear). DoRA (``use_dora``) adds a learned magnitude per updated output row. This
module knows nothing of files or training loops.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitlora.rollback import rollback_on_error
from vitlora.targets import (
    VALID_TARGETS,
    LoRASite,
    find_lora_sites,
    input_shape,
    restore_fused_qkv_routing,
    route_fused_qkv_through_module,
)
from vitlora.trainable import freeze_base


@dataclass
class LoRAConfig:
    """What to adapt and how strongly.

    Attributes:
        rank: Rank r of each update B·A.
        alpha: Scale: updates are multiplied by alpha / rank (alpha / sqrt(rank) with use_rslora).
        dropout: Dropout on the LoRA path's input.
        targets: Any of q k v (one update per projection, fused or not), qkv (the fused
            projection as a single update, as PEFT does), proj, fc1 (both SwiGLU inputs), fc2,
            patch_embed (the patch-embedding convolution, outside the blocks: blocks do not limit it).
        blocks: Block indices to adapt (negative ones count from the end); null for all.
        use_rslora: Rank-stabilised scaling alpha / sqrt(rank).
        use_dora: Weight-decomposed LoRA (Liu et al. 2024), see LoRALinear.
        rank_pattern: Per-layer ranks keyed as PEFT keys them: the first key that fully matches
            the module path (blocks.0.attn.qkv) as a regex, or a dot-separated suffix of it, wins.
        alpha_pattern: Per-layer alphas, keyed like rank_pattern.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] = ("q", "v")
    blocks: Sequence[int] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if self.blocks is not None:
            self.blocks = tuple(self.blocks)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}.")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}.")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}.")
        unknown = [t for t in self.targets if t not in VALID_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"Invalid LoRA targets {list(self.targets)}: choose one or more distinct of {list(VALID_TARGETS)}."
            )
        if "qkv" in self.targets and set(self.targets) & {"q", "k", "v"}:
            raise ValueError("LoRA target 'qkv' already covers q, k and v: use either 'qkv' or any of 'q', 'k', 'v'.")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be true or false, got {self.use_dora!r}.")
        self.rank_pattern = _checked_pattern("rank_pattern", self.rank_pattern, _is_rank)
        self.alpha_pattern = _checked_pattern("alpha_pattern", self.alpha_pattern, _is_alpha)

    @property
    def scaling(self) -> float:
        """The scaling of layers that no pattern names."""
        return self.scaling_for("")

    def rank_for(self, path: str) -> int:
        """The rank of the layer at module path ``path`` (``rank_pattern``, else ``rank``)."""
        return self.rank_pattern.get(pattern_key(self.rank_pattern, path), self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha of the layer at module path ``path`` (``alpha_pattern``, else ``alpha``)."""
        return self.alpha_pattern.get(pattern_key(self.alpha_pattern, path), self.alpha)

    def scaling_for(self, path: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) of the layer at module path ``path``."""
        rank = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(rank) if self.use_rslora else rank)

    def to_json(self) -> str:
        """The config as JSON; empty patterns are left out, so files without them stay readable by vitlora 0.1."""
        fields = asdict(self)
        for name in ("rank_pattern", "alpha_pattern"):
            if not fields[name]:
                del fields[name]
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str) -> LoRAConfig:
        return cls(**json.loads(text))


def pattern_key(patterns: dict[str, Any], path: str) -> str | None:
    """The first key of ``patterns`` naming module ``path``, as PEFT's ``get_pattern_key`` finds it, else None."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", path)), None)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_alpha(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _checked_pattern(name: str, pattern: Any, valid: Any) -> dict[str, Any]:
    """A copy of a rank/alpha pattern whose keys are valid regexes and whose values are valid."""
    if not isinstance(pattern, dict):
        raise ValueError(f"LoRA {name} must be a mapping from module pattern to value, got {pattern!r}.")
    for key, value in pattern.items():
        try:
            re.compile(key)
        except (re.error, TypeError) as error:
            raise ValueError(f"LoRA {name} key {key!r} is not a regular expression ({error}).") from error
        if not valid(value):
            kind = "a positive integer" if name == "rank_pattern" else "a positive number"
            raise ValueError(f"LoRA {name}[{key!r}] must be {kind}, got {value!r}.")
    return dict(pattern)


def place_rows(rows: torch.Tensor, slices: Sequence[tuple[int, int]], out_features: int, fill: float) -> torch.Tensor:
    """Each slice's stacked rows at its own output rows, ``fill`` on the others.

    Built from static slice bounds (no index buffer), so it survives meta-device init and
    compiles to fixed shapes."""
    widths = [stop - start for start, stop in slices]
    pieces, row = [], 0
    for (start, stop), block in zip(slices, rows.split(widths), strict=True):
        if start > row:
            pieces.append(rows.new_full((start - row, *rows.shape[1:]), fill))
        pieces.append(block)
        row = stop
    if row < out_features:
        pieces.append(rows.new_full((out_features - row, *rows.shape[1:]), fill))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def expand_lora_B(lora_B: torch.Tensor, slices: Sequence[tuple[int, int]], out_features: int) -> torch.Tensor:
    """``out x n*r``: each slice's B (stacked in ``lora_B``) on its own rows and rank columns, zeros elsewhere."""
    widths = [stop - start for start, stop in slices]
    return place_rows(torch.block_diag(*lora_B.split(widths)), slices, out_features, 0.0)


def add_lora_parameters(
    layer: nn.Module,
    linear: nn.Linear | nn.Conv2d,
    config: LoRAConfig,
    slices: Sequence[tuple[int, int]] | None = None,
    path: str = "",
) -> None:
    """Gives ``layer`` the low-rank update of ``linear``'s chosen output slices: the one place LoRA tensors are made.

    Sets ``slices``, ``slice_widths``, ``out_features``, ``rank`` and ``scaling`` (the config's
    for module ``path``), ``lora_A`` (``n*r x in``, Kaiming-uniform), ``lora_B`` (``sum(widths) x r``,
    zero, so the update starts at exactly 0) and ``lora_dropout`` on ``layer``: LoRALinear,
    LoRAConv2d and each adapter of a MultiAdapter layer share these names, so their tensors load
    from the same adapter-file keys. A patch-embedding nn.Conv2d is the linear map of a
    flattened patch: ``in`` is ``channels * kernel height * kernel width``.
    """
    in_features, out_features = _matrix_shape(linear)
    layer.slices = tuple(sorted(slices or ((0, out_features),)))
    if any(a[1] > b[0] for a, b in pairwise(layer.slices)) or layer.slices[-1][1] > out_features:
        raise ValueError(f"LoRA slices {layer.slices} overlap or exceed {out_features} outputs.")
    layer.slice_widths = [stop - start for start, stop in layer.slices]
    layer.out_features = out_features
    layer.rank, layer.scaling = config.rank_for(path), config.scaling_for(path)
    like = {"dtype": linear.weight.dtype, "device": linear.weight.device}
    layer.lora_A = nn.Parameter(torch.empty(len(layer.slices) * layer.rank, in_features, **like))
    layer.lora_B = nn.Parameter(torch.zeros(sum(layer.slice_widths), layer.rank, **like))
    nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
    layer.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()


def _matrix_shape(layer: nn.Linear | nn.Conv2d) -> tuple[int, int]:
    """``(in, out)`` of the matrix a layer applies (to each flattened patch, for a convolution)."""
    if isinstance(layer, nn.Conv2d):
        return layer.weight[0].numel(), layer.out_channels
    return layer.in_features, layer.out_features


def lora_forward(layer: nn.Module, x: torch.Tensor, base: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``base + scaling * (dropout(x) A^T) B_expanded^T`` in one fused addmm: the low-rank path, never a dense dW.

    ``layer`` holds the tensors :func:`add_lora_parameters` made; ``base`` is the frozen layer's output for
    ``x``. ``inplace`` adds into ``base`` itself (a contiguous view of a larger output, as MultiAdapter's
    rows of a mixed batch are), which autograd allows because a linear layer keeps no output for backward.
    """
    low_rank = F.linear(layer.lora_dropout(x), layer.lora_A)
    low_rank, expanded_B = (
        low_rank.reshape(-1, low_rank.shape[-1]),
        expand_lora_B(layer.lora_B, layer.slices, layer.out_features),
    )
    if inplace:
        base.view(-1, base.shape[-1]).addmm_(low_rank, expanded_B.t(), alpha=layer.scaling)
        return base
    return torch.addmm(base.reshape(-1, base.shape[-1]), low_rank, expanded_B.t(), alpha=layer.scaling).view(base.shape)


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus trainable low-rank updates on chosen slices of its output.

    It subclasses nn.Linear and keeps the base ``weight``/``bias`` under their own names, so
    state-dict keys of the pretrained model are unchanged. ``lora_A`` stacks one rank-r
    block per slice (``n*r x in``) so the input is multiplied once for all slices;
    ``lora_B`` stacks their ``B`` blocks (``sum(slice widths) x r``). The forward pass never
    builds a dense delta-W: it adds ``scaling * (A x) @ B_expanded^T`` in one fused addmm,
    where ``B_expanded`` is the block-diagonal ``B`` placed on the chosen output rows.

    With ``use_dora`` each updated row becomes ``m * (W + dW) / ||W + dW||``: LoRA then
    learns the direction and ``lora_magnitude`` (initialised to ``||W||``, so the model starts
    as the base) the length of each row, which DoRA found closer to full fine-tuning. As in
    the paper (section 4.3) and HF PEFT, the norm is a constant for autograd, so it needs only
    the dense chosen rows of ``W + dW`` and no graph; the output is the LoRA one rescaled per
    row, bias excluded. Rows without an update keep scale 1, so they stay exact.
    """

    def __init__(
        self,
        base: nn.Linear,
        config: LoRAConfig,
        slices: Sequence[tuple[int, int]] | None = None,
        parts: Sequence[str] = (),
        path: str = "",
    ) -> None:
        super().__init__(base.in_features, base.out_features, base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.config = config
        self.parts = tuple(parts)
        add_lora_parameters(self, base, config, slices, path)
        if config.use_dora:
            self.lora_magnitude = nn.Parameter(torch.linalg.vector_norm(self.chosen_rows(self.weight.detach()), dim=1))
        self.lora_enabled = True  # False (lora_disabled): the frozen base layer alone

    def chosen_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of an ``out x ...`` tensor that the slices update, stacked."""
        if self.slice_widths == [self.out_features]:
            return tensor
        return torch.cat([tensor[start:stop] for start, stop in self.slices])

    def on_all_rows(self, rows: torch.Tensor, fill: float) -> torch.Tensor:
        """Inverse of :meth:`chosen_rows`: each slice's rows in place, ``fill`` on the others."""
        return place_rows(rows, self.slices, self.out_features, fill)

    def magnitude_scale(self, updated_rows: torch.Tensor) -> torch.Tensor:
        """DoRA's per-row factor ``m / ||W + dW||`` over all outputs (1 off the slices); the norm is detached."""
        norm = torch.linalg.vector_norm(updated_rows.detach(), dim=1)
        return self.on_all_rows(self.lora_magnitude / norm, fill=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if frozen and torch.is_grad_enabled():
            base = _FrozenLinear.apply(x, self.weight, self.bias)
        else:
            base = F.linear(x, self.weight, self.bias)
        if not self.lora_enabled:
            return base
        updated = lora_forward(self, x, base)
        if not self.config.use_dora:
            return updated
        with torch.no_grad():
            chosen_B = self.chosen_rows(expand_lora_B(self.lora_B, self.slices, self.out_features))
            updated_rows = self.chosen_rows(self.weight) + self.scaling * (chosen_B @ self.lora_A)
        scale = self.magnitude_scale(updated_rows).to(updated.dtype)
        unbiased = updated if self.bias is None else updated - self.bias.to(updated.dtype)
        # scale * unbiased + bias, written so that rows with scale 1 return the LoRA output bit for bit
        return torch.addcmul(updated, scale - 1, unbiased)

    @property
    def merge_dtype(self) -> torch.dtype:
        return merge_dtype(self.weight)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * B A`` in ``merge_dtype`` (for merging and inspection only)."""
        dtype = self.merge_dtype
        return self.scaling * (
            expand_lora_B(self.lora_B, self.slices, self.out_features).to(dtype) @ self.lora_A.to(dtype)
        )

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + dW``, with DoRA's magnitude applied per row, in ``merge_dtype``: what the forward pass computes."""
        weight = self.weight.to(self.merge_dtype) + self.delta_weight()
        if self.config.use_dora:
            weight *= self.magnitude_scale(self.chosen_rows(weight)).to(weight.dtype)[:, None]
        return weight

    @torch.no_grad()
    def to_linear(self, merge: bool = True) -> nn.Linear:
        """A plain nn.Linear with the update folded into its weight, or the base alone (``merge=False``)."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        if merge:
            linear.weight = nn.Parameter(self.merged_weight().to(self.weight.dtype))
        else:
            linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        parts = f", parts={self.parts}" if self.parts else ""
        dora = ", dora" if self.config.use_dora else ""
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}{parts}{dora}"


def merge_dtype(weight: torch.Tensor) -> torch.dtype:
    """At least float32 (a bf16 merge would round the small update away); float64 weights stay float64."""
    return torch.promote_types(weight.dtype, torch.float32)


class LoRAConv2d(nn.Conv2d):
    """A frozen patch-embedding nn.Conv2d plus a trainable low-rank update: LoRALinear for the patch embedding.

    With kernel = stride and no padding the convolution is one linear map of each flattened
    patch (``out x C*kh*kw``), and this is the LoRA of that map (for any one-group convolution), with the tensors
    :func:`add_lora_parameters` makes: ``lora_A`` (``r x C*kh*kw``) runs as a convolution with the
    base's kernel and stride, ``lora_B`` (``out x r``) as a 1x1 convolution, as PEFT's Conv2d LoRA
    does, and the merge folds ``scaling * B A`` reshaped to the kernel into the weight, exactly.
    The base ``weight``/``bias`` keep their names. ``use_dora`` rescales each output channel as
    LoRALinear rescales each row.
    """

    def __init__(self, base: nn.Conv2d, config: LoRAConfig, path: str = "") -> None:
        if base.groups != 1:
            raise ValueError(f"LoRA on {path or 'a convolution'} needs one group, found {base.groups}.")
        super().__init__(
            base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=base.bias is not None, padding_mode=base.padding_mode, device="meta",
        )  # fmt: skip
        self.weight = base.weight
        self.bias = base.bias
        self.config = config
        self.parts = ("patch_embed",)
        add_lora_parameters(self, base, config, path=path)
        if config.use_dora:
            self.lora_magnitude = nn.Parameter(torch.linalg.vector_norm(self.weight.detach().flatten(1), dim=1))
        self.lora_enabled = True  # False (lora_disabled): the frozen base convolution alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._conv_forward(x, self.weight, self.bias)
        if not self.lora_enabled:
            return base
        low_rank = self._conv_forward(self.lora_dropout(x), self.lora_A.view(-1, *self.weight.shape[1:]), None)
        updated = base + self.scaling * F.conv2d(low_rank, self.lora_B[:, :, None, None])
        if not self.config.use_dora:
            return updated
        with torch.no_grad():
            norm = torch.linalg.vector_norm(self.weight.flatten(1) + self.scaling * self.lora_B @ self.lora_A, dim=1)
        scale = (self.lora_magnitude / norm).to(updated.dtype)[:, None, None]
        unbiased = updated if self.bias is None else updated - self.bias.to(updated.dtype)[:, None, None]
        return torch.addcmul(updated, scale - 1, unbiased)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * B A`` as an ``out x C*kh*kw`` matrix in ``merge_dtype``."""
        dtype = merge_dtype(self.weight)
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The kernel ``W + dW`` (DoRA's magnitude applied per channel) in ``merge_dtype``: what forward computes."""
        weight = self.weight.flatten(1).to(merge_dtype(self.weight)) + self.delta_weight()
        if self.config.use_dora:
            weight *= (self.lora_magnitude.to(weight.dtype) / torch.linalg.vector_norm(weight, dim=1))[:, None]
        return weight.view(self.weight.shape)

    @torch.no_grad()
    def to_conv(self, merge: bool = True) -> nn.Conv2d:
        """A plain nn.Conv2d with the update folded into its kernel, or the base alone (``merge=False``)."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            bias=self.bias is not None, padding_mode=self.padding_mode, device="meta",
        )  # fmt: skip
        conv.weight = nn.Parameter(self.merged_weight().to(self.weight.dtype)) if merge else self.weight
        conv.bias = self.bias
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        dora = ", dora" if self.config.use_dora else ""
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}{dora}"


LoRALayer = LoRALinear | LoRAConv2d


class _FrozenLinear(torch.autograd.Function):
    """``F.linear`` for a frozen weight that keeps only the weight itself for backward.

    Under autocast a plain ``F.linear`` saves its low-precision copy of the weight until
    backward (2 bytes per frozen parameter); this casts again in backward instead, which
    costs one cheap element-wise pass and no memory.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))]


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Switches every LoRA (and DoRA) update of ``model`` off for the duration: each layer computes its frozen base.

    Outputs equal the base model's (with whatever else the model carries: heads, prompt tokens,
    tuned biases) exactly, without a second copy of the weights; nested uses restore what they found.
    """
    layers = [module for _, module in lora_modules(model)]
    found = [layer.lora_enabled for layer in layers]
    for layer in layers:
        layer.lora_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, found, strict=True):
            layer.lora_enabled = enabled


def lora_config(model: nn.Module) -> LoRAConfig:
    """The config a model was injected with.

    Args:
        model: a model :func:`inject_lora` adapted.

    Returns:
        Its :class:`LoRAConfig`.

    Raises:
        ValueError: the model carries no LoRA layers.
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: call inject_lora first.")
    return modules[0][1].config


def inject_lora(model: nn.Module, config: LoRAConfig, *, verify: bool = True) -> nn.Module:
    """Wraps the targeted projections in place and freezes all but the adapter (LoRA, heads, prompts, biases).

    With ``verify`` a single no-grad forward pass on a dummy image checks that every LoRA
    layer is really called, so an attention that reads ``qkv.weight`` directly can never
    silently ignore its update. On any error the model is left as it was.

    Args:
        model: a plain timm ViT (no LoRA yet); its head should already have the task's classes.
        config: what to adapt and how strongly.
        verify: run the dummy forward pass check.

    Returns:
        ``model``, adapted in place: outputs unchanged until training moves ``B`` from zero.

    Raises:
        ValueError: the model has LoRA already, or the targets/blocks do not exist in it.
        RuntimeError: a LoRA layer would never be called by the model's forward pass.
    """
    if lora_modules(model):
        raise ValueError("This model already has LoRA layers: merge_lora it or start from a fresh model.")
    sites = find_lora_sites(model, config.targets, config.blocks)
    with rollback_on_error(model):
        for site in sites:
            model.set_submodule(site.path, _wrap(site, config))
        freeze_base(model)
        route_fused_qkv_through_module(model)
        if verify:
            check_lora_in_forward(model)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Drops every LoRA layer without merging: the base model back (prompt tokens stay), all trainable.

    Args:
        model: a model with LoRA layers (none is fine: nothing changes).

    Returns:
        ``model``, with each LoRA layer replaced by its own frozen base module.
    """
    return _replace_lora_layers(model, merge=False)


def _wrap(site: LoRASite, config: LoRAConfig) -> LoRALayer:
    if isinstance(site.linear, nn.Conv2d):
        layer = LoRAConv2d(site.linear, config, site.path)
    else:
        layer = LoRALinear(site.linear, config, site.slices, site.parts, site.path)
    return layer.train(site.linear.training)  # an eval model must not get active LoRA dropout


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every update into its base weight, leaving a plain timm model (plus any prompt tokens), all trainable.

    The merge runs in at least float32 (a bf16 merge would round the small update away) and is
    exact: the merged model's outputs equal the adapted model's.

    Args:
        model: a model with LoRA (or DoRA) layers.

    Returns:
        ``model``, with the same module types and state-dict keys as a fresh timm model.

    Raises:
        ValueError: the model has no LoRA layers.
    """
    if not lora_modules(model):
        raise ValueError(f"{type(model).__name__} has no LoRA layers to merge.")
    return _replace_lora_layers(model, merge=True)


def _replace_lora_layers(model: nn.Module, merge: bool) -> nn.Module:
    for name, module in lora_modules(model):
        model.set_submodule(name, module.to_conv(merge) if isinstance(module, LoRAConv2d) else module.to_linear(merge))
    restore_fused_qkv_routing(model)
    model.requires_grad_(True)
    return model


@torch.no_grad()
def check_lora_in_forward(
    model: nn.Module, layer_type: type[nn.Module] | tuple[type[nn.Module], ...] = (LoRALinear, LoRAConv2d)
) -> None:
    """Raises if a forward pass does not call every ``layer_type`` layer (skipped when the input size is unknown)."""
    shape = input_shape(model)
    like = next(model.parameters(), None)
    if shape is None or like is None or like.device.type == "meta":
        return
    called: set[str] = set()
    names = {module: name for name, module in model.named_modules() if isinstance(module, layer_type)}
    handles = [m.register_forward_hook(lambda m, *_: called.add(names[m])) for m in names]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        model(like.new_zeros(1, *shape))
    finally:
        for module, training in modes.items():
            module.training = training
        for handle in handles:
            handle.remove()
    skipped = sorted(set(names.values()) - called)
    if skipped:
        raise RuntimeError(
            f"LoRA would have no effect on {skipped}: the model's forward pass never calls these "
            "modules (its attention reads their weights directly). Please report this model."
        )
