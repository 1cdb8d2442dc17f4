"""What a training forward pass keeps for backward: activation memory, exactly and by module.

Peak memory is noisy to measure (allocator caching, other processes, no CUDA on CPU); the
tensors autograd saves are not. ``saved_for_backward`` lists them with the module whose
forward saved them, so a test or benchmark can check, e.g., that a frozen weight is never
copied and a LoRA input is kept only once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class SavedTensor:
    """One tensor saved for backward. Views of one tensor share ``storage`` (its data pointer)
    and ``nbytes`` (the whole storage's size); ``parameter`` names the parameter it is stored in."""

    module: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    storage: int
    nbytes: int
    parameter: str | None


def saved_for_backward(model: nn.Module, *inputs: Any, **kwargs: Any) -> list[SavedTensor]:
    """Runs ``model(*inputs, **kwargs)`` once and lists every tensor autograd saves for backward.

    Run it under the autocast (or checkpointing) settings to inspect.

    Args:
        model: the model to run (in training mode for the step you want to measure).
        *inputs: its positional inputs.
        **kwargs: its keyword inputs.

    Returns:
        One :class:`SavedTensor` per saved tensor; ``module`` is the innermost submodule running
        when it was saved ("" for the model itself), ``parameter`` names it when it is one.
    """
    parameters = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters()}
    running = [""]

    def enter(name: str) -> None:
        running.append(name)

    def leave(*_: Any) -> None:
        running.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(lambda *_, name=name: enter(name)))
            handles.append(module.register_forward_hook(leave, always_call=True))
    saved: list[SavedTensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        saved.append(
            SavedTensor(
                running[-1], tuple(tensor.shape), tensor.dtype, pointer, storage.nbytes(), parameters.get(pointer)
            )
        )
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return saved


def activation_bytes(saved: Iterable[SavedTensor]) -> int:
    """Bytes of the unique non-parameter storages: what a step holds from forward to backward.

    Args:
        saved: what :func:`saved_for_backward` listed.

    Returns:
        The activation bytes, each storage counted once.
    """
    unique = {t.storage: t.nbytes for t in saved if t.parameter is None}
    return sum(unique.values())
