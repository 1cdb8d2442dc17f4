"""LoRA for timm Vision Transformers: the layer, injection and exact merging.

``W x + (alpha / r) * B A x`` with the pretrained ``W`` frozen. A fused ``qkv`` projection
updating only some of q/k/v keeps one wrapper with one ``A`` for all chosen parts and an
independent rank-r ``B`` per part (the pattern of loralib's MergedLinear and LitGPT's
LoRAQKVLinear). This module knows nothing of files or training loops.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from vitlora.targets import (
    VALID_TARGETS,
    LoRASite,
    classifier_names,
    classifier_prefixes,
    find_lora_sites,
    restore_fused_qkv_routing,
    route_fused_qkv_through_module,
)


@dataclass
class LoRAConfig:
    """What to adapt and how strongly.

    ``targets``: any of ``q k v`` (one update per projection, fused or not), ``qkv`` (the
    fused projection as a single update, as PEFT does; on separate projections it means
    q, k and v), ``proj``, ``fc1`` (both SwiGLU inputs), ``fc2``. ``blocks``: None for all,
    or block indices, negative ones counting from the end.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] = ("q", "v")
    blocks: Sequence[int] | None = None
    use_rslora: bool = False

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

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoRAConfig:
        return cls(**json.loads(text))


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus trainable low-rank updates on chosen slices of its output.

    It subclasses nn.Linear and keeps the base ``weight``/``bias`` under their own names, so
    state-dict keys of the pretrained model are unchanged. ``lora_A`` stacks one rank-r
    block per slice (``n*r x in``) so the input is multiplied once for all slices;
    ``lora_B`` stacks their ``B`` blocks (``sum(slice widths) x r``). The forward pass never
    builds a dense delta-W: it adds ``scaling * (A x) @ B_expanded^T`` in one fused addmm,
    where ``B_expanded`` is the block-diagonal ``B`` placed on the chosen output rows.
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
        self.slices = tuple(sorted(slices or ((0, base.out_features),)))
        if any(a[1] > b[0] for a, b in pairwise(self.slices)) or self.slices[-1][1] > self.out_features:
            raise ValueError(f"LoRA slices {self.slices} overlap or exceed {self.out_features} outputs.")
        self.slice_widths = [stop - start for start, stop in self.slices]
        self.scaling = config.scaling
        rank, like = config.rank, {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(len(self.slices) * rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(sum(self.slice_widths), rank, **like))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform, B zero: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def expanded_lora_B(self) -> torch.Tensor:
        """``out x n*r``: each slice's B on its own rows and its own rank columns, zeros elsewhere.

        Built from static slice bounds (no index buffer), so it survives meta-device init and
        compiles to fixed shapes."""
        blocks = torch.block_diag(*self.lora_B.split(self.slice_widths)).split(self.slice_widths)
        pieces, row = [], 0
        for (start, stop), block in zip(self.slices, blocks, strict=True):
            if start > row:
                pieces.append(block.new_zeros(start - row, block.shape[1]))
            pieces.append(block)
            row = stop
        if row < self.out_features:
            pieces.append(blocks[0].new_zeros(self.out_features - row, blocks[0].shape[1]))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if frozen and torch.is_grad_enabled():
            base = _FrozenLinear.apply(x, self.weight, self.bias)
        else:
            base = F.linear(x, self.weight, self.bias)
        low_rank = F.linear(self.lora_dropout(x), self.lora_A)
        updated = torch.addmm(
            base.reshape(-1, self.out_features),
            low_rank.reshape(-1, low_rank.shape[-1]),
            self.expanded_lora_B().t(),
            alpha=self.scaling,
        )
        return updated.view(base.shape)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * B A`` in float32 (for merging and inspection only)."""
        return self.scaling * (self.expanded_lora_B().float() @ self.lora_A.float())

    @torch.no_grad()
    def to_linear(self, merge: bool = True) -> nn.Linear:
        """A plain nn.Linear with the update folded into its weight, or the base alone (``merge=False``)."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        if merge:
            linear.weight = nn.Parameter((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        else:
            linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        parts = f", parts={self.parts}" if self.parts else ""
        return f"{super().extra_repr()}, rank={self.config.rank}, scaling={self.scaling:g}{parts}"


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
    """Wraps the targeted projections in place, freezing all but LoRA and the classifier head.

    With ``verify`` a single no-grad forward pass on a dummy image checks that every LoRA
    layer is really called, so an attention that reads ``qkv.weight`` directly can never
    silently ignore its update. On any error the model is left as it was.
    """
    if lora_modules(model):
        raise ValueError("This model already has LoRA layers: merge_lora it or start from a fresh model.")
    sites = find_lora_sites(model, config.targets, config.blocks)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for site in sites:
            model.set_submodule(site.path, _wrap(site, config))
        for head in classifier_names(model):
            getattr(model, head).requires_grad_(True)
        route_fused_qkv_through_module(model)
        if verify:
            check_lora_in_forward(model)
    except BaseException:
        for site in sites:
            model.set_submodule(site.path, site.linear)
        restore_fused_qkv_routing(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad[name])
        raise
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Drops every LoRA layer without merging: the base model back, all trainable as timm makes it."""
    return _replace_lora_layers(model, merge=False)


def _wrap(site: LoRASite, config: LoRAConfig) -> LoRALinear:
    layer = LoRALinear(site.linear, config, site.slices, site.parts)
    return layer.train(site.linear.training)  # an eval model must not get active LoRA dropout


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every update into its base weight, leaving a plain timm model, all trainable."""
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
def check_lora_in_forward(model: nn.Module) -> None:
    """Raises if a forward pass does not call every LoRA layer (skipped when the input size is unknown)."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)  # hybrid ViTs: the CNN's
    if img_size is None or stem is None or stem.weight.device.type == "meta":
        return
    called: set[str] = set()
    names = {module: name for name, module in lora_modules(model)}
    handles = [m.register_forward_hook(lambda m, *_: called.add(names[m])) for m in names]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        model(stem.weight.new_zeros(1, stem.in_channels, *img_size))
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


def is_lora_name(name: str) -> bool:
    return "lora_" in name.rsplit(".", 1)[-1]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything an adapter ships: the LoRA tensors and the classifier head(s), by state-dict key."""
    heads = classifier_prefixes(model)
    return {
        key: tensor.detach() for key, tensor in model.state_dict().items() if is_lora_name(key) or key.startswith(heads)
    }


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int
    by_group: dict[str, int] = field(default_factory=dict)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        width = max(len(f"{self.total:,}"), 11)
        lines = [f"{'group':<10} {'parameters':>{width}}"]
        lines += [f"{group:<10} {count:>{width},}" for group, count in self.by_group.items()]
        lines.append(f"{'trainable':<10} {self.trainable:>{width},}  ({100 * self.trainable_fraction:.3f}%)")
        lines.append(f"{'total':<10} {self.total:>{width},}")
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable vs total parameters, split into lora / head / frozen / other-trainable groups."""
    heads = classifier_prefixes(model)
    groups = {"lora": 0, "head": 0, "other": 0, "frozen": 0}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            group = "frozen"
        elif is_lora_name(name):
            group = "lora"
        elif name.startswith(heads):
            group = "head"
        else:
            group = "other"
        groups[group] += parameter.numel()
    total = sum(groups.values())
    return ParameterCount(total - groups["frozen"], total, {k: v for k, v in groups.items() if v or k != "other"})
