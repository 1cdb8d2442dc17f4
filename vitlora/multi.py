"""Many adapters on one shared base model, with each sample of a batch routed through its own.

Multi-tenant serving and training: every adapter file brings its LoRA updates, its own head
and its own classes, while the frozen base weights are held once and never copied. In a
mixed batch the shared trunk runs once, on the batch sorted by adapter; each adapted
nn.Linear adds every adapter's low-rank update to that adapter's rows only (one contiguous
block of rows each, read and written as views: a loop over the adapters present, never over
samples, and never a dense delta-W), then each adapter's head reads its own rows. Gradients
reach each adapter only from its own samples.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import accumulate, pairwise

import torch
import torch.nn.functional as F
from torch import nn

from vitlora.adapter import Adapter, AdapterError, class_labels, read_adapter
from vitlora.apply import (
    callers_rng_kept,
    check_compatible,
    copy_adapter_tensors,
    lora_sites_for,
    reset_classifier_like,
)
from vitlora.lora import LoRAConfig, add_lora_parameters, check_lora_in_forward, lora_forward, lora_modules
from vitlora.rollback import rollback_on_error
from vitlora.targets import classifier_names, restore_fused_qkv_routing, route_fused_qkv_through_module

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class Routing:
    """The rows of the current batch that each adapter owns, read by every routed layer.

    The batch is sorted by adapter, so ``rows`` is one contiguous ``slice`` of it (a view,
    never a copy); None when one adapter takes the whole batch.
    """

    groups: tuple[tuple[str, slice | None], ...] = ()
    batch_size: int = 0


@dataclass
class MixedLogits:
    """A mixed batch's logits: row i scores sample i over the classes of its own adapter.

    Rows are padded to the largest class count with ``-inf``, so softmax, argmax, topk and
    ``F.cross_entropy`` (without label smoothing) work on ``logits`` directly.
    """

    logits: torch.Tensor
    adapters: list[str | None]
    num_classes: list[int]

    def per_sample(self) -> list[torch.Tensor]:
        """Each sample's logits without padding."""
        return [row[:n] for row, n in zip(self.logits, self.num_classes, strict=True)]


class LoRAUpdate(nn.Module):
    """One adapter's low-rank update of one shared nn.Linear: LoRALinear's tensors and math, without the base.

    Its tensors are made by the same :func:`~vitlora.lora.add_lora_parameters` as LoRALinear's,
    so they load straight from an adapter file; :meth:`MultiAdapter.add` always fills them.
    """

    def __init__(self, linear: nn.Linear, config: LoRAConfig, slices: Sequence[tuple[int, int]], path: str) -> None:
        super().__init__()
        add_lora_parameters(self, linear, config, slices, path)

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``base`` (the frozen layer's output for ``x``) plus this adapter's update."""
        return lora_forward(self, x, base)

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Adds the update to ``out`` (the frozen layer's output for ``x``, contiguous) in place: no copy of it."""
        lora_forward(self, x, out, inplace=True)


class RoutedLoRALinear(nn.Linear):
    """A frozen nn.Linear shared by several adapters, each updating only the batch rows routed to it.

    Like LoRALinear it keeps the base ``weight``/``bias`` under their own names (the very
    same Parameters, never copies). ``adapters`` holds a LoRAUpdate per adapter that targets
    this layer; the rows each one gets come from the shared :class:`Routing` at call time.
    """

    def __init__(self, base: nn.Linear, routing: Routing) -> None:
        super().__init__(base.in_features, base.out_features, base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.routing = routing
        self.adapters = nn.ModuleDict()
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        groups = [(self.adapters[name], rows) for name, rows in self.routing.groups if name in self.adapters]
        if not groups:
            return out
        if groups[0][1] is None:
            return groups[0][0](x, out)
        if x.shape[0] != self.routing.batch_size:
            raise RuntimeError(
                f"Per-sample routing expects the batch ({self.routing.batch_size}) on dim 0, got input {tuple(x.shape)}."
            )
        for update, rows in groups:  # in place on views: F.linear and addmm keep no output for backward
            update.add_to(x[rows], out[rows])
        return out


class MultiAdapter(nn.Module):
    """One frozen timm base serving many adapter files, one at a time or per sample in a mixed batch.

    ``add(name, path)`` loads an adapter (checked like :func:`vitlora.load_adapter`: the
    architecture and the base-weight fingerprint); ``model(images)`` runs the active adapter
    (``set_active``); ``model(images, adapters=[...])`` gives each image its own adapter and
    returns :class:`MixedLogits`. The adapter name None means the base model as given, with
    its own head. Only the adapters' LoRA tensors and heads are trainable.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if lora_modules(base) or any(isinstance(m, RoutedLoRALinear) for m in base.modules()):
            raise ValueError("This model already has LoRA layers: give MultiAdapter a plain timm model.")
        self.model = base.requires_grad_(False)
        self.heads = nn.ModuleDict()
        self._routing = Routing()
        self._adapters: dict[str, Adapter] = {}
        self._plain_linears: dict[str, nn.Linear] = {}  # what each routed layer wrapped, put back on removal
        self._active: str | None = None

    @property
    def adapters(self) -> dict[str, Adapter]:
        """The loaded adapters' files, configs, classes and metadata (their tensors live in the model)."""
        return dict(self._adapters)

    @property
    def active(self) -> str | None:
        return self._active

    def set_active(self, name: str | None) -> None:
        """The adapter a plain ``model(images)`` uses; None for the base model."""
        self._check_known([name])
        self._active = name

    def add(self, name: str, path: str | os.PathLike, *, check_base: bool = True) -> Adapter:
        """Loads an adapter file under ``name``; on any error nothing is changed.

        Raises :class:`~vitlora.AdapterError` (naming the file) for another architecture,
        other base weights (``check_base=False`` skips that check), a config that does not fit
        the model, or missing / unexpected / misshapen tensors.
        """
        if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
            raise ValueError(f"Adapter names are letters, digits, '_' and '-'; got {name!r}.")
        if name in self._adapters:
            raise ValueError(f"An adapter named {name!r} is already loaded: remove it first or pick another name.")
        adapter = read_adapter(path)
        shared_trunk_changes = [
            label
            for label, present in (
                ("DoRA magnitudes", adapter.config is not None and adapter.config.use_dora),
                ("prompt tokens", adapter.prompt is not None),
                ("tuned biases", adapter.bias_tuning),
                ("LoRA on the patch embedding", adapter.config is not None and "patch_embed" in adapter.config.targets),
            )
            if present
        ]
        if shared_trunk_changes:  # they change the shared trunk's own output, which routing cannot split
            raise AdapterError(
                adapter.path,
                f"adapters with {' and '.join(shared_trunk_changes)} cannot be routed per sample yet; "
                "load it alone with load_adapter.",
            )
        check_compatible(self.model, adapter, check_base)
        sites = lora_sites_for(self.model, adapter)
        with rollback_on_error(self), callers_rng_kept(self.model):  # initial values the file overwrites
            route_fused_qkv_through_module(self.model)
            for site in sites:
                layer = site.linear if isinstance(site.linear, RoutedLoRALinear) else self._route(site.path)
                layer.adapters[name] = LoRAUpdate(layer, adapter.config, site.slices, site.path).train(layer.training)
            self.heads[name] = self._new_heads(adapter.num_classes).train(self.training)
            self._adapters[name] = replace(adapter, tensors={})
            copy_adapter_tensors(self.adapter_parameters(name), adapter)
            check_lora_in_forward(self.model, RoutedLoRALinear)
        return self._adapters[name]

    def remove(self, name: str) -> None:
        """Drops an adapter; layers no other adapter uses become the base's own nn.Linear again."""
        self._check_known([name], base_allowed=False)
        for path, layer in self._routed_layers():
            if name in layer.adapters:
                del layer.adapters[name]
            if not layer.adapters:
                self.model.set_submodule(path, self._plain_linears.pop(path))
        if not self._plain_linears:
            restore_fused_qkv_routing(self.model)
        del self.heads[name]
        del self._adapters[name]
        if self._active == name:
            self._active = None

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The adapter's trainable tensors, keyed as in its file (``blocks.0.attn.qkv.lora_A``, ``head.weight``)."""
        self._check_known([name], base_allowed=False)
        parameters = {
            f"{path}.{key}": parameter
            for path, layer in self._routed_layers()
            if name in layer.adapters
            for key, parameter in layer.adapters[name].named_parameters()
        }
        parameters.update(self.heads[name].named_parameters())
        return parameters

    def forward(self, images: torch.Tensor, adapters: Sequence[str | None] | None = None) -> torch.Tensor | MixedLogits:
        """Logits of the active adapter, or with ``adapters`` (one name per image) :class:`MixedLogits`."""
        if getattr(self.model, "grad_checkpointing", False) and torch.is_grad_enabled():
            raise RuntimeError(
                "MultiAdapter does not support gradient checkpointing: the backward pass would recompute the "
                "blocks without this batch's routing. Call model.set_grad_checkpointing(False)."
            )
        if adapters is None:
            name = self._active
            with self._routed(((name, None),) if name else (), len(images)), self._heads_of(name):
                return self.model(images)
        adapters = list(adapters)
        if len(adapters) != len(images):
            raise ValueError(f"Got {len(adapters)} adapter names for a batch of {len(images)} images.")
        self._check_known(adapters)
        order, groups = _group_rows(adapters, images.device)
        if order is not None:
            images = images.index_select(0, order)
        with self._routed(tuple(g for g in groups if g[0] is not None), len(images)):
            features = self.model.forward_features(images)
        logits = {}
        for name, rows in groups:  # forward_head per adapter: DeiT's two heads read two tokens
            with self._heads_of(name):
                logits[name] = self.model.forward_head(features if rows is None else features[rows])
        width = max(scores.shape[-1] for scores in logits.values())
        padded = [F.pad(logits[name], (0, width - logits[name].shape[-1]), value=float("-inf")) for name, _ in groups]
        merged = torch.cat(padded)
        if order is not None:
            merged = merged.index_select(0, torch.argsort(order))
        return MixedLogits(merged, adapters, [logits[name].shape[-1] for name in adapters])

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, adapters: Sequence[str | None] | None = None, k: int = 5
    ) -> list[list[tuple[str, float]]]:
        """Top-k ``(label, probability)`` per image over its own adapter's classes (default: the active one).

        Labels are the adapter's class names, or class indices as strings when it has none.
        Runs in the current train/eval mode: call ``.eval()`` for inference.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        if adapters is None:
            adapters = [self._active] * len(images)
        mixed = self(images, adapters)
        top_logits, indices = mixed.logits.topk(min(k, mixed.logits.shape[-1]), dim=-1)  # padding ranks last
        probabilities = (top_logits.float() - mixed.logits.float().logsumexp(-1, keepdim=True)).exp()
        predictions = []
        for name, n, idx, probs in zip(
            adapters, mixed.num_classes, indices.tolist(), probabilities.tolist(), strict=True
        ):
            labels = self._class_names(name, n)
            predictions.append([(labels[i], p) for i, p in zip(idx[: min(k, n)], probs[: min(k, n)], strict=True)])
        return predictions

    def _class_names(self, name: str | None, num_classes: int) -> list[str]:
        return self._adapters[name].labels if name is not None else class_labels(None, num_classes)

    def _check_known(self, names: Sequence[str | None], base_allowed: bool = True) -> None:
        unknown = sorted({repr(n) for n in names if (n is not None or not base_allowed) and n not in self._adapters})
        if unknown:
            raise KeyError(
                f"Unknown adapter {', '.join(unknown)}: loaded are {sorted(self._adapters)} (None is the base model)."
            )

    def _route(self, path: str) -> RoutedLoRALinear:
        linear = self.model.get_submodule(path)
        layer = RoutedLoRALinear(linear, self._routing)
        self.model.set_submodule(path, layer)
        self._plain_linears[path] = linear
        return layer

    def _routed_layers(self) -> list[tuple[str, RoutedLoRALinear]]:
        return [(path, self.model.get_submodule(path)) for path in self._plain_linears]

    def _new_heads(self, num_classes: int) -> nn.ModuleDict:
        """Heads for ``num_classes`` made by timm's own reset_classifier, while the base keeps its heads."""
        names = classifier_names(self.model)
        base_heads, base_classes = {n: getattr(self.model, n) for n in names}, self.model.num_classes
        try:
            reset_classifier_like(self.model, num_classes)
            return nn.ModuleDict({n: getattr(self.model, n) for n in names})
        finally:
            for n, head in base_heads.items():
                setattr(self.model, n, head)
            self.model.num_classes = base_classes

    @contextmanager
    def _routed(self, groups: tuple[tuple[str, torch.Tensor | None], ...], batch_size: int) -> Iterator[None]:
        self._routing.groups, self._routing.batch_size = groups, batch_size
        try:
            yield
        finally:
            self._routing.groups, self._routing.batch_size = (), 0

    @contextmanager
    def _heads_of(self, name: str | None) -> Iterator[None]:
        """Puts the adapter's heads in the base's place for one call, so timm's forward_head pools as usual."""
        heads = self.heads[name] if name is not None else {}
        base_heads = {n: getattr(self.model, n) for n in heads}
        try:
            for n, head in heads.items():
                setattr(self.model, n, head)
            yield
        finally:
            for n, head in base_heads.items():
                setattr(self.model, n, head)


def _group_rows(
    adapters: list[str | None], device: torch.device
) -> tuple[torch.Tensor | None, list[tuple[str | None, slice | None]]]:
    """The order that sorts the batch by adapter (None: already sorted), and each adapter present with
    its contiguous rows of the sorted batch (None: all of them), in order of first appearance."""
    present = list(dict.fromkeys(adapters))
    if len(present) == 1:
        return None, [(present[0], None)]
    rank = {name: i for i, name in enumerate(present)}
    order = sorted(range(len(adapters)), key=lambda row: rank[adapters[row]])  # stable: rows keep their order
    counts = Counter(adapters)
    starts = [0, *accumulate(counts[name] for name in present)]
    groups = [(name, slice(start, stop)) for name, (start, stop) in zip(present, pairwise(starts), strict=True)]
    return (None if order == list(range(len(order))) else torch.tensor(order, device=device)), groups
