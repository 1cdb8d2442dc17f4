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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise

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
            projection as a single update, as PEFT does), proj, fc1 (both SwiGLU inputs), fc2.
        blocks: Block indices to adapt (negative ones count from the end); null for all.
        use_rslora: Rank-stabilised scaling alpha / sqrt(rank).
        use_dora: Weight-decomposed LoRA (Liu et al. 2024), see LoRALinear.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] = ("q", "v")
    blocks: Sequence[int] | None = None
    use_rslora: bool = False
    use_dora: bool = False

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

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoRAConfig:
        return cls(**json.loads(text))


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
    linear: nn.Linear,
    config: LoRAConfig,
    slices: Sequence[tuple[int, int]] | None = None,
) -> None:
    """Gives ``layer`` the low-rank update of ``linear``'s chosen output slices: the one place LoRA tensors are made.

    Sets ``slices``, ``slice_widths``, ``out_features``, ``scaling``, ``lora_A`` (``n*r x in``,
    Kaiming-uniform), ``lora_B`` (``sum(widths) x r``, zero, so the update starts at exactly 0)
    and ``lora_dropout`` on ``layer``: LoRALinear and each adapter of a MultiAdapter layer share
    these names, so their tensors load from the same adapter-file keys.
    """
    out_features = linear.out_features
    layer.slices = tuple(sorted(slices or ((0, out_features),)))
    if any(a[1] > b[0] for a, b in pairwise(layer.slices)) or layer.slices[-1][1] > out_features:
        raise ValueError(f"LoRA slices {layer.slices} overlap or exceed {out_features} outputs.")
    layer.slice_widths = [stop - start for start, stop in layer.slices]
    layer.out_features = out_features
    layer.scaling = config.scaling
    like = {"dtype": linear.weight.dtype, "device": linear.weight.device}
    layer.lora_A = nn.Parameter(torch.empty(len(layer.slices) * config.rank, linear.in_features, **like))
    layer.lora_B = nn.Parameter(torch.zeros(sum(layer.slice_widths), config.rank, **like))
    nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
    layer.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()


def lora_forward(layer: nn.Module, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``base + scaling * (dropout(x) A^T) B_expanded^T`` in one fused addmm: the low-rank path, never a dense dW.

    ``layer`` holds the tensors :func:`add_lora_parameters` made; ``base`` is the frozen layer's output for ``x``.
    """
    low_rank = F.linear(layer.lora_dropout(x), layer.lora_A)
    updated = torch.addmm(
        base.reshape(-1, base.shape[-1]),
        low_rank.reshape(-1, low_rank.shape[-1]),
        expand_lora_B(layer.lora_B, layer.slices, layer.out_features).t(),
        alpha=layer.scaling,
    )
    return updated.view(base.shape)


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
    ) -> None:
        super().__init__(base.in_features, base.out_features, base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.config = config
        self.parts = tuple(parts)
        add_lora_parameters(self, base, config, slices)
        if config.use_dora:
            self.lora_magnitude = nn.Parameter(torch.linalg.vector_norm(self.chosen_rows(self.weight.detach()), dim=1))

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
        """At least float32 (a bf16 merge would round the small update away); float64 weights stay float64."""
        return torch.promote_types(self.weight.dtype, torch.float32)

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
        return f"{super().extra_repr()}, rank={self.config.rank}, scaling={self.scaling:g}{parts}{dora}"


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


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_config(model: nn.Module) -> LoRAConfig:
    """The config a model was injected with; raises if it carries no LoRA."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: call inject_lora first.")
    return modules[0][1].config


def inject_lora(model: nn.Module, config: LoRAConfig, *, verify: bool = True) -> nn.Module:
    """Wraps the targeted projections in place and freezes all but the adapter (LoRA, heads, prompts, biases).

    With ``verify`` a single no-grad forward pass on a dummy image checks that every LoRA
    layer is really called, so an attention that reads ``qkv.weight`` directly can never
    silently ignore its update. On any error the model is left as it was.
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
    """Drops every LoRA layer without merging: the base model back (prompt tokens stay), all trainable."""
    return _replace_lora_layers(model, merge=False)


def _wrap(site: LoRASite, config: LoRAConfig) -> LoRALinear:
    layer = LoRALinear(site.linear, config, site.slices, site.parts)
    return layer.train(site.linear.training)  # an eval model must not get active LoRA dropout


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every update into its base weight, leaving a plain timm model (plus any prompt tokens), all trainable."""
    if not lora_modules(model):
        raise ValueError(f"{type(model).__name__} has no LoRA layers to merge.")
    return _replace_lora_layers(model, merge=True)


def _replace_lora_layers(model: nn.Module, merge: bool) -> nn.Module:
    for name, module in lora_modules(model):
        model.set_submodule(name, module.to_linear(merge))
    restore_fused_qkv_routing(model)
    model.requires_grad_(True)
    return model


@torch.no_grad()
def check_lora_in_forward(model: nn.Module, layer_type: type[nn.Module] = LoRALinear) -> None:
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
