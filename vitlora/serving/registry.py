"""The adapters a server holds: one base model, many adapter files, changed while requests run.

:class:`AdapterRegistry` is one process's model: a :class:`~vitlora.multi.MultiAdapter` behind a
lock, so that adding or removing an adapter never lands in the middle of a forward pass.
:class:`SharedCatalog` keeps every inference worker's registry on the same set of files:
the admin endpoint (in an HTTP process) changes the wanted set, each worker applies it and
reports back what it loaded or the :class:`~vitlora.AdapterError` that refused a file.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vitlora.adapter import Adapter, AdapterError
from vitlora.backbone import create_backbone
from vitlora.multi import MultiAdapter
from vitlora.serving.limits import RequestError

SYNC_INTERVAL_S = 0.05

Prediction = list[tuple[str, float]]


def adapter_name(path: str | os.PathLike) -> str:
    """An adapter's name on the server: its file's stem (``shoes.safetensors`` is ``shoes``)."""
    return Path(path).stem


def adapter_files(sources: Sequence[str | os.PathLike]) -> dict[str, str]:
    """Name -> absolute path of every ``.safetensors`` file given, folders read one level deep.

    Raises:
        ValueError: a source that does not exist, none found, or two files with one name.
    """
    files: dict[str, str] = {}
    for source in map(Path, sources):
        if not source.exists():
            raise ValueError(f"{source}: no such file or folder")
        found = sorted(source.glob("*.safetensors")) if source.is_dir() else [source]
        for path in found:
            name = adapter_name(path)
            if name in files:
                raise ValueError(f"{path}: another adapter is already named {name!r} ({files[name]})")
            files[name] = str(path.resolve())
    if not files:
        raise ValueError(f"no .safetensors adapter files in {', '.join(map(str, sources))}")
    return files


@dataclass(frozen=True)
class BaseSpec:
    """The base model every adapter on a server shares: timm name, model kwargs and weights file."""

    model_name: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None

    @classmethod
    def of(cls, adapter: Adapter, weights: str | os.PathLike | None = None) -> BaseSpec:
        """The base ``adapter`` was trained on (weights from the timm hub unless given)."""
        if not adapter.model_name:
            raise AdapterError(adapter.path, "records no timm model name to build the base model from.")
        return cls(adapter.model_name, adapter.model_kwargs, None if weights is None else str(weights))

    def build(self) -> torch.nn.Module:
        """The plain base model; raises ValueError/WeightsUnavailable when its weights are unusable."""
        return create_backbone(self.model_name, 1, weights=self.weights, **self.model_kwargs)


@dataclass
class BatchStats:
    """How the worker's forward passes went: the serving test reads them to see batches being mixed."""

    forward_passes: int = 0
    images: int = 0
    largest_batch: int = 0
    most_adapters_in_a_batch: int = 0

    def count(self, names: Sequence[str]) -> None:
        self.forward_passes += 1
        self.images += len(names)
        self.largest_batch = max(self.largest_batch, len(names))
        self.most_adapters_in_a_batch = max(self.most_adapters_in_a_batch, len(set(names)))


class AdapterRegistry:
    """A thread-safe set of named adapters on one base: classify mixed batches while files come and go."""

    def __init__(self, base: BaseSpec, device: str | torch.device = "cpu") -> None:
        self.base = base
        self.device = torch.device(device)
        self.stats = BatchStats()
        self._multi = MultiAdapter(base.build()).to(self.device).eval()
        self._files: dict[str, str] = {}
        self._refused: dict[str, tuple[str, str]] = {}  # name -> (file, AdapterError message)
        self._explainers: dict[str, tuple[str, torch.nn.Module, Adapter]] = {}  # name -> (file, model, adapter)
        self._lock = threading.Lock()

    @property
    def multi(self) -> MultiAdapter:
        return self._multi

    def add(self, name: str, path: str | os.PathLike) -> dict[str, Any]:
        """Loads ``path`` as ``name``; its :meth:`describe` entry.

        Raises:
            AdapterError: the file is unreadable or does not fit the base (nothing changes).
            ValueError: a bad or taken name.
        """
        with self._lock:
            self._multi.add(name, path)
            self._files[name] = str(path)
            return self._describe(name)

    def remove(self, name: str) -> None:
        """Unloads ``name``; requests already waiting for it get a 404, the others are untouched."""
        with self._lock:
            self._multi.remove(name)
            del self._files[name]
            self._explainers.pop(name, None)

    def apply(self, wanted: dict[str, str]) -> dict[str, str]:
        """Loads and unloads until the registry holds ``wanted`` (name -> file); a file refused once is
        not retried until its path changes. Returns name -> error message of the files refused."""
        for name, path in list(self._files.items()):
            if wanted.get(name) != path:
                self.remove(name)
        self._refused = {name: refusal for name, refusal in self._refused.items() if wanted.get(name) == refusal[0]}
        for name, path in wanted.items():
            if name in self._files or name in self._refused:
                continue
            try:
                self.add(name, path)
            except (ValueError, OSError) as error:  # AdapterError is a ValueError
                self._refused[name] = (path, str(error))
        return {name: message for name, (_, message) in self._refused.items()}

    def describe(self) -> dict[str, dict[str, Any]]:
        """Name -> ``{"file", "classes"}`` of every loaded adapter."""
        with self._lock:
            return {name: self._describe(name) for name in self._files}

    def classify(self, images: Sequence[torch.Tensor], names: Sequence[str], top_k: Sequence[int]) -> list:
        """Top-k predictions of each image under its own adapter, in ONE forward pass of the shared trunk.

        Returns per image its ``[(label, probability), ...]``, or a 404 :class:`RequestError`
        when its adapter is not loaded (unknown, or removed while the request waited).
        """
        with self._lock:
            known = [i for i, name in enumerate(names) if name in self._files]
            results: list = [self._unknown(name) for name in names]
            if not known:
                return results
            batch = torch.stack([images[i] for i in known]).to(self.device)
            routes = [names[i] for i in known]
            with torch.inference_mode():
                predictions = self._multi.predict(batch, routes, k=max(top_k[i] for i in known))
            self.stats.count(routes)
        for i, prediction in zip(known, predictions, strict=True):
            results[i] = prediction[: top_k[i]]
        return results

    def explain(self, name: str, picture: Image.Image) -> bytes:
        """The explanation sheet of ``picture`` under adapter ``name`` as PNG bytes (``vitlora explain``'s).

        Attribution needs the adapter on a model of its own (a routed mixed batch has no single
        adapter to switch off), so each explained adapter gets one, built on first use and kept.
        """
        from vitlora.apply import build_model_with_adapter
        from vitlora.explain import explain_image_png

        with self._lock:
            path = self._files.get(name)
        if path is None:
            raise self._unknown(name)
        if self._explainers.get(name, (None,))[0] != path:
            model, adapter = build_model_with_adapter(path, self.base.weights)
            self._explainers[name] = (path, model.to(self.device), adapter)
        _, model, adapter = self._explainers[name]
        with torch.inference_mode(False), torch.enable_grad():  # attributions need gradients
            return explain_image_png(model, adapter, picture, name=name)

    def _unknown(self, name: str) -> RequestError:
        return RequestError(404, f"unknown adapter {name!r}: loaded are {sorted(self._files)}")

    def _describe(self, name: str) -> dict[str, Any]:
        adapter = self._multi.adapters[name]
        classes = adapter.labels
        return {"name": name, "file": self._files[name], "classes": classes}


class SharedCatalog:
    """The adapter set all processes of one server share, through a multiprocessing manager.

    ``wanted`` (name -> file) is what the server should hold; every change bumps ``version``.
    Each inference worker runs :meth:`follow` in a thread: it applies new versions to its
    registry and publishes a report (the version applied, the adapters loaded, the files
    refused and its batch statistics). HTTP processes read the reports.
    """

    def __init__(self, manager: SyncManager, files: dict[str, str], workers: int) -> None:
        self.workers = workers
        self._wanted = manager.dict(files)
        self._version = manager.Value("i", 1)
        self._reports = manager.dict()
        self._lock = manager.Lock()

    # --- the HTTP side ---

    def wanted(self) -> dict[str, str]:
        return dict(self._wanted)

    def change(self, name: str, path: str | None) -> int:
        """Wants ``name`` loaded from ``path`` (None: removed); the new version."""
        with self._lock:
            if path is None:
                self._wanted.pop(name, None)
            else:
                self._wanted[name] = path
            self._version.value += 1
            return self._version.value

    def reports(self, version: int = 0) -> list[dict[str, Any]] | None:
        """Every worker's report once each has applied ``version``; None while some have not."""
        reports = [report for report in self._reports.values() if report["version"] >= version]
        return reports if len(reports) >= self.workers else None

    def loaded(self) -> dict[str, dict[str, Any]]:
        """The adapters every worker holds now (name -> file and classes)."""
        reports = self.reports() or [{"adapters": {}}]
        names = set.intersection(*(set(report["adapters"]) for report in reports))
        return {name: reports[0]["adapters"][name] for name in sorted(names)}

    # --- the worker side ---

    def follow(self, registry: AdapterRegistry, stop: threading.Event | None = None) -> None:
        """Applies every change of the wanted set to ``registry`` and reports, until ``stop`` is set."""
        applied, refused, published = 0, {}, None
        while not (stop and stop.is_set()):
            try:
                version = self._version.value
                if version != applied:
                    refused, applied = registry.apply(self.wanted()), version
                report = {
                    "version": applied,
                    "adapters": registry.describe(),
                    "refused": refused,
                    "stats": vars(registry.stats).copy(),
                }
                if report != published:
                    self._reports[str(os.getpid())] = published = report
            except (EOFError, OSError):  # the manager is gone: the server is shutting down
                return
            time.sleep(SYNC_INTERVAL_S)
