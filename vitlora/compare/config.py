"""Compare configs: named methods on one recipe, checked for a fair setup before anything trains."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

SHARED_SETTINGS = (
    "seed_everything", "trainer", "data",
    "model.backbone", "model.weights", "model.pretrained", "model.img_size", "model.model_kwargs",
)  # fmt: skip
METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class MethodSpec:
    """One row of a comparison: a recipe, and the `vitlora fit` options that change it."""

    name: str
    recipe: Path
    overrides: dict[str, Any] = field(default_factory=dict)

    def override_args(self) -> list[str]:
        """``--key value`` pairs; non-strings as JSON, which the fit parser reads as YAML."""
        args = []
        for key, value in self.overrides.items():
            args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        return args


@dataclass(frozen=True)
class Budget:
    """A shorter run, the same for every method: epochs, and batches per epoch (int) or a fraction (float).

    ``limit_val_batches`` limits the test split as well."""

    max_epochs: int | None = None
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None

    def trainer_args(self) -> list[str]:
        settings = asdict(self) | {"limit_test_batches": self.limit_val_batches}
        return [arg for key, value in settings.items() if value is not None for arg in (f"--trainer.{key}", str(value))]

    def __str__(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in asdict(self).items() if value is not None) or "none"


def load_compare_config(path: str | os.PathLike, only: Sequence[str] | None = None) -> list[MethodSpec]:
    """The methods of a compare config (``only``: these names, in this order), checked for a fair setup."""
    path = Path(path)
    config = _read_yaml(path)
    methods = config.get("methods") if isinstance(config, dict) else None
    if not isinstance(methods, dict) or not methods:
        raise ValueError(f"{path}: a compare config needs `methods:`, a mapping of method names to options.")
    unknown = sorted(set(config) - {"recipe", "methods"})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; a compare config has `recipe` and `methods`.")
    specs = []
    for name, entry in methods.items():
        if entry is not None and not isinstance(entry, dict):
            raise ValueError(f"{path}: method {name!r} must map options to values, got {entry!r}.")
        options = dict(entry or {})
        recipe = options.pop("recipe", config.get("recipe"))
        if not recipe:
            raise ValueError(f"{path}: method {name!r} has no recipe: set `recipe:` at the top or in the method.")
        not_dotted = [key for key in options if "." not in str(key)]
        if not_dotted:
            raise ValueError(f"{path}: method {name!r}: {not_dotted} are not dotted `vitlora fit` options (model.lr).")
        specs.append(MethodSpec(str(name), (path.parent / recipe).resolve(), options))
    if only:
        by_name = {spec.name: spec for spec in specs}
        missing = [name for name in only if name not in by_name]
        if missing:
            raise ValueError(f"{path}: no methods named {missing}; it has {list(by_name)}.")
        specs = [by_name[name] for name in only]
    check_same_setup(specs)
    return specs


def methods_from_recipes(paths: Sequence[str | os.PathLike]) -> list[MethodSpec]:
    """One method per recipe file, named after it; checked for a fair setup."""
    specs = [MethodSpec(Path(path).stem, Path(path).resolve()) for path in paths]
    check_same_setup(specs)
    return specs


def check_same_setup(methods: Sequence[MethodSpec]) -> None:
    """Raises unless the methods have distinct names and share every setting in SHARED_SETTINGS."""
    names = [method.name for method in methods]
    bad = [name for name in names if not METHOD_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"Method names {bad} must be letters, digits, '_', '.' or '-' (they name folders).")
    if len(set(names)) != len(names):
        raise ValueError(f"Method names must be distinct, got {names}.")
    views = {}
    for method in methods:
        recipe = _read_yaml(method.recipe)
        if not isinstance(recipe, dict):
            raise ValueError(
                f"{method.recipe}: a recipe is a mapping of settings (seed_everything, trainer, model, data)."
            )
        settings = _flatten(recipe) | _flatten(method.overrides)
        views[method.name] = {key: value for key, value in settings.items() if _is_shared(key)}
    keys = sorted({key for view in views.values() for key in view})
    unset = "(unset)"
    differing = [
        f"{key} ({', '.join(f'{name}: {view.get(key, unset)!r}' for name, view in views.items())})"
        for key in keys
        if len({json.dumps(view.get(key, unset), sort_keys=True) for view in views.values()}) > 1
    ]
    if differing:
        raise ValueError(
            "A fair comparison trains every method with the same seed, trainer, data and backbone, "
            "but these settings differ: " + "; ".join(differing)
        )


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"{path}: no such file.")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error}).") from error


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_shared(key: str) -> bool:
    return any(key == shared or key.startswith(shared + ".") for shared in SHARED_SETTINGS)
