"""Compare configs: named methods on one recipe, checked for a fair setup before anything trains."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

SHARED_SETTINGS = (
    "seed_everything", "trainer", "data",
    "model.backbone", "model.weights", "model.pretrained", "model.img_size", "model.model_kwargs",
)  # fmt: skip
METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9_.-]+")
CONFIG_KEYS = ("recipe", "methods", "grid", "vary", "folds")


@dataclass(frozen=True)
class MethodSpec:
    """One row of a comparison: a recipe, and the `vitlora fit` options that change it."""

    name: str
    recipe: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    swept: tuple[str, ...] = ()  # options a grid sweeps or `vary:` frees: these may differ between methods

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


@dataclass(frozen=True)
class CompareConfig:
    """What a compare config asks for: the methods (grid expanded) and the folds (None: not set)."""

    methods: list[MethodSpec]
    folds: int | None = None


def load_compare_config(
    path: str | os.PathLike, only: Sequence[str] | None = None, grid: Mapping[str, Sequence[Any]] | None = None
) -> CompareConfig:
    """The methods of a compare config, grid expanded and checked for a fair setup, and its folds.

    ``only``: these entries of ``methods:``, in this order (each with all its grid combinations);
    ``grid``: more options to sweep, replacing the file's values for the same option (``--grid``)."""
    path = Path(path)
    config = read_yaml(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a compare config is a mapping with the keys {', '.join(CONFIG_KEYS)}.")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; a compare config has {', '.join(CONFIG_KEYS)}.")
    methods = config.get("methods")
    file_grid = config.get("grid") or {}
    if not isinstance(file_grid, dict):
        raise ValueError(f"{path}: `grid:` must map dotted `vitlora fit` options to lists of values.")
    grid = file_grid | dict(grid or {})
    vary = config.get("vary") or []
    if not isinstance(vary, list) or not all(isinstance(key, str) and "." in key for key in vary):
        raise ValueError(f"{path}: `vary:` must list dotted `vitlora fit` options the methods may differ in.")
    if methods is None and grid:
        methods = {"": {}}  # a sweep of the recipe alone: methods named by their values
    if not isinstance(methods, dict) or not methods:
        raise ValueError(
            f"{path}: a compare config needs `methods:`, a mapping of method names to options, or a `grid:`."
        )
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
        specs.append(MethodSpec(str(name), (path.parent / recipe).resolve(), options, swept=tuple(vary)))
    if only:
        by_name = {spec.name: spec for spec in specs}
        missing = [name for name in only if name not in by_name]
        if missing:
            raise ValueError(f"{path}: no methods named {missing}; it has {list(by_name)}.")
        specs = [by_name[name] for name in only]
    try:
        specs = expand_grid(specs, grid)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    check_same_setup(specs)
    return CompareConfig(specs, _folds(config.get("folds"), path))


def methods_from_recipes(
    paths: Sequence[str | os.PathLike], grid: Mapping[str, Sequence[Any]] | None = None
) -> list[MethodSpec]:
    """One method per recipe file, named after it, grid expanded; checked for a fair setup."""
    specs = expand_grid([MethodSpec(Path(path).stem, Path(path).resolve()) for path in paths], grid or {})
    check_same_setup(specs)
    return specs


def expand_grid(methods: Sequence[MethodSpec], grid: Mapping[str, Sequence[Any]]) -> list[MethodSpec]:
    """Each method once per combination of the grid's values (cartesian product, in grid order).

    A combination is named ``<method>.<option>-<value>...``: the option by its last dotted part
    (more parts when two swept options share it), the value as written, with characters a folder
    name cannot hold replaced by ``_``: ``lora`` with ``model.img_size: [224, 288]`` gives
    ``lora.img_size-224`` and ``lora.img_size-288``; without a method name, ``img_size-224``."""
    if not grid:
        return list(methods)
    for key, values in grid.items():
        if "." not in str(key):
            raise ValueError(f"grid option {key!r} is not a dotted `vitlora fit` option (model.lr).")
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid option {key!r} needs a non-empty list of values, got {values!r}.")
    keys = list(grid)
    labels = _short_labels(keys)
    expanded = []
    for method in methods:
        fixed = [key for key in keys if key in method.overrides]
        if fixed:
            raise ValueError(f"method {method.name!r} sets {fixed}, which the grid sweeps: set it in one place.")
        for values in itertools.product(*grid.values()):
            parts = [f"{labels[key]}-{_value_label(value)}" for key, value in zip(keys, values, strict=True)]
            name = ".".join([method.name, *parts] if method.name else parts)
            overrides = method.overrides | dict(zip(keys, values, strict=True))
            expanded.append(replace(method, name=name, overrides=overrides, swept=(*method.swept, *keys)))
    return expanded


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2`` of ``--grid``: each value read as YAML (``0.1`` a number, ``true`` a boolean)."""
    key, equals, values = text.partition("=")
    if not equals or "." not in key or not values:
        raise ValueError(f"--grid {text}: expected a dotted option and values, e.g. --grid model.lr=0.001,0.0003.")
    return key, [yaml.safe_load(value) for value in values.split(",")]


def check_same_setup(methods: Sequence[MethodSpec]) -> None:
    """Raises unless the methods have distinct names and share every setting in SHARED_SETTINGS
    that no grid sweeps (swept_options)."""
    names = [method.name for method in methods]
    bad = [name for name in names if not METHOD_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"Method names {bad} must be letters, digits, '_', '.' or '-' (they name folders).")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"Method names must be distinct, but {repeated} occur more than once.")
    swept = swept_options(methods)
    views = {}
    for method in methods:
        recipe = read_yaml(method.recipe)
        if not isinstance(recipe, dict):
            raise ValueError(
                f"{method.recipe}: a recipe is a mapping of settings (seed_everything, trainer, model, data)."
            )
        settings = _flatten(recipe) | _flatten(method.overrides)
        views[method.name] = {
            key: value
            for key, value in settings.items()
            if _is_under(key, SHARED_SETTINGS) and not _is_under(key, swept)
        }
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


def swept_options(methods: Sequence[MethodSpec]) -> list[str]:
    """The options some grid sweeps across these methods, in the order first met."""
    return list(dict.fromkeys(key for method in methods for key in method.swept))


def _folds(value: Any, path: Path) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{path}: `folds:` must be 2 or more for cross-validation (1: none), got {value!r}.")
    return value


def _short_labels(keys: Sequence[str]) -> dict[str, str]:
    """Each option by as few of its last dotted parts as keep the labels distinct."""
    for depth in itertools.count(1):  # ends: at full depth the labels are the (distinct) options themselves
        labels = {key: ".".join(key.split(".")[-depth:]) for key in keys}
        if len(set(labels.values())) == len(keys):
            return labels


def _value_label(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return NOT_IN_NAMES.sub("_", text).strip("_") or "_"


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a missing or malformed file is a ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file.")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error}).") from error


def recipe_fingerprint(recipe: Path) -> str:
    """SHA-256 of a recipe's settings, comments and layout aside: what tells --resume the recipe was edited."""
    settings = json.dumps(read_yaml(Path(recipe)), sort_keys=True, default=str)
    return hashlib.sha256(settings.encode()).hexdigest()


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_under(key: str, options: Sequence[str]) -> bool:
    return any(key == option or key.startswith(option + ".") for option in options)
