"""Serving adapters over HTTP: `vitlora serve` (LitServe), its web page, limits and the shared adapter set."""

from vitlora.serving.limits import Limits, RequestError
from vitlora.serving.registry import AdapterRegistry, BaseSpec, SharedCatalog, adapter_files

__all__ = ["AdapterRegistry", "BaseSpec", "Limits", "RequestError", "SharedCatalog", "adapter_files"]
