"""What an adapter trains and ships: LoRA tensors, prompt tokens, tuned biases and the classifier heads.

One definition, by state-dict key, shared by freezing, parameter counts, trainable-only
checkpoints, base fingerprints and adapter files, so no two of them can disagree. Bias tuning
(BitFit) lives here because it adds no tensors: it only moves the existing biases from the
frozen base into the adapter. Every other adaptation module imports this one, never the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vitlora.targets import classifier_prefixes, unwrap

PROMPT_MODULE = "prompt"  # blocks.<i>.prompt.tokens: where vitlora.prompts keeps each block's tokens
_BIAS_TUNING = "_vitlora_bias_tuning"


def is_lora_name(name: str) -> bool:
    return "lora_" in name.rsplit(".", 1)[-1]


def is_prompt_name(name: str) -> bool:
    return name.rsplit(".", 2)[-2:] == [PROMPT_MODULE, "tokens"]


def is_bias_name(name: str) -> bool:
    """Every bias BitFit tunes: ``*.bias`` of linears, norms and the patch embedding, EVA's ``q_bias``/``v_bias``."""
    return name.rsplit(".", 1)[-1].endswith("bias")


def enable_bias_tuning(model: nn.Module) -> nn.Module:
    """BitFit: every bias of the backbone joins the adapter (trainable and shipped), weights stay frozen.

    Combines with LoRA, prompt tokens or a linear probe in any order; ``LoRALinear`` keeps the
    base ``bias`` parameter, so merging carries the tuned biases into the plain model.

    Args:
        model: a timm model, plain or adapted.

    Returns:
        ``model``, with every bias (linears, norms, patch embedding, EVA's q/v biases) trainable.
    """
    model = unwrap(model)
    setattr(model, _BIAS_TUNING, True)
    return freeze_base(model)


def disable_bias_tuning(model: nn.Module) -> nn.Module:
    """The biases rejoin the frozen base, keeping whatever values they were tuned to."""
    model = unwrap(model)
    model.__dict__.pop(_BIAS_TUNING, None)
    return freeze_base(model)


def bias_tuning_enabled(model: nn.Module) -> bool:
    return bool(getattr(unwrap(model), _BIAS_TUNING, False))


def is_adapter_key(model: nn.Module, key: str) -> bool:
    """Whether the state-dict ``key`` belongs to the adapter rather than to the frozen base."""
    if is_lora_name(key) or is_prompt_name(key) or key.startswith(classifier_prefixes(model)):
        return True
    return bias_tuning_enabled(model) and is_bias_name(key)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything an adapter ships, by state-dict key: LoRA, prompt tokens, tuned biases, the head(s).

    The one definition behind freezing, trainable-only checkpoints, base fingerprints and adapter files.

    Args:
        model: an adapted model (or a plain one: its heads, a linear probe).

    Returns:
        Detached tensors by state-dict key (no ``_orig_mod.`` prefix for a compiled model).
    """
    model = unwrap(model)
    return {key: tensor.detach() for key, tensor in model.state_dict().items() if is_adapter_key(model, key)}


def freeze_base(model: nn.Module) -> nn.Module:
    """Trains exactly the adapter's parameters: on a plain model, the head(s) alone (a linear probe).

    Args:
        model: a timm model, plain or adapted.

    Returns:
        ``model``, with ``requires_grad`` set on the adapter's parameters alone.
    """
    model = unwrap(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_adapter_key(model, name))
    return model


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
    """Trainable vs total parameters in groups lora / prompt / bias / head / other-trainable / frozen.

    Args:
        model: any model; ``print()`` the result for a table.

    Returns:
        A :class:`ParameterCount`.
    """
    model = unwrap(model)
    heads = classifier_prefixes(model)
    tuned_biases = bias_tuning_enabled(model)
    groups = {"lora": 0, "prompt": 0, "bias": 0, "head": 0, "other": 0, "frozen": 0}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            group = "frozen"
        elif is_lora_name(name):
            group = "lora"
        elif is_prompt_name(name):
            group = "prompt"
        elif name.startswith(heads):
            group = "head"
        elif tuned_biases and is_bias_name(name):
            group = "bias"
        else:
            group = "other"
        groups[group] += parameter.numel()
    total = sum(groups.values())
    shown = {k: v for k, v in groups.items() if v or k in ("head", "frozen")}  # the methods in use, always head/frozen
    return ParameterCount(total - groups["frozen"], total, shown)
