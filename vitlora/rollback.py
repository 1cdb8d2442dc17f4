"""All-or-nothing changes to a model: on any error it is put back exactly as it was.

Injecting LoRA, loading an adapter and adding one to a :class:`~vitlora.multi.MultiAdapter`
each rewrite parts of a model (wrapped modules, new heads, prompt tokens, flags, trainable
parameters). They share this one mechanism: a snapshot of every module's own attributes
(its children, parameters and buffers by name included, one container level deep) and of
every parameter's ``requires_grad``, restored on failure, so the very same module and
parameter objects come back. Tensor values are kept only where asked (``values``): the
copies an in-place write could damage, such as tuned biases.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

_CONTAINERS = (dict, list, set)


class ModelSnapshot:
    """A model's structure, flags and trainable set, plus the values of the named parameters."""

    def __init__(self, model: nn.Module, values: Iterable[str] = ()) -> None:
        self.modules = {module: _own_state(module) for module in model.modules()}
        self.requires_grad = {parameter: parameter.requires_grad for parameter in model.parameters()}
        self.values = {model.get_parameter(name): model.get_parameter(name).detach().clone() for name in values}

    def restore(self) -> None:
        for module, state in self.modules.items():
            module.__dict__.clear()
            module.__dict__.update(_copied(state))
        for parameter, requires_grad in self.requires_grad.items():
            parameter.requires_grad_(requires_grad)
        with torch.no_grad():
            for parameter, value in self.values.items():
                parameter.copy_(value)


@contextmanager
def rollback_on_error(model: nn.Module, values: Iterable[str] = ()) -> Iterator[ModelSnapshot]:
    """Runs the block; if it raises (KeyboardInterrupt included), ``model`` is restored, then the error goes on.

    Args:
        model: the module the block may change (its submodules included).
        values: parameter names whose values the block may overwrite in place.
    """
    snapshot = ModelSnapshot(model, values)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise


def _own_state(module: nn.Module) -> dict:
    return _copied(module.__dict__)


def _copied(state: dict) -> dict:
    """The attributes with their containers (``_modules``, ``_parameters``, dicts of names...) copied one level."""
    return {key: copy.copy(value) if isinstance(value, _CONTAINERS) else value for key, value in state.items()}
