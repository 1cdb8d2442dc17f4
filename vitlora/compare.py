"""`vitlora compare`: ways to adapt one backbone, trained on equal terms and reported side by side.

A compare config is the recipes users already know plus named sets of `vitlora fit` options::

    recipe: grocery_lora.yaml              # where every method starts (relative to this file)
    methods:
      lora: {}
      full: {recipe: grocery_full.yaml}    # a method may start from another recipe
      lora_r16: {model.lora.rank: 16}      # and change dotted options

Methods may differ only in how the model adapts: seed, trainer, data and backbone settings must
be equal, or loading fails. Each method trains in a fresh process (vitlora.measure), so its peak
memory is its own; this module gathers what those processes wrote into report.md, report.json
and charts, with a reading derived from the numbers.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from vitlora import charts
from vitlora.files import atomic_write

RESULT_FILE = "measurements.json"
SHARED_SETTINGS = (
    "seed_everything", "trainer", "data",
    "model.backbone", "model.weights", "model.pretrained", "model.img_size", "model.model_kwargs",
)  # fmt: skip
METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the child process imports this very vitlora
NOISY_GAP = 0.05  # a close call noisier than 5 points: the reading asks for more evaluation images


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


@dataclass
class MethodResult:
    """One method's numbers: accuracies as fractions, files in bytes, times in seconds."""

    name: str
    recipe: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    fit_command: str = ""
    run_dir: str = ""
    error: str | None = None
    method: str = ""
    val: dict[str, float] = field(default_factory=dict)
    val_images: int = 0
    test: dict[str, float] = field(default_factory=dict)
    test_images: int = 0
    trainable: int = 0
    total: int = 0
    step_time_s: float | None = None
    images_per_s: float | None = None
    steps: int = 0
    peak_memory_mb: float | None = None
    memory_kind: str = ""
    checkpoint: str | None = None
    checkpoint_bytes: int | None = None
    adapter: str | None = None
    adapter_bytes: int | None = None
    latency_s: dict[str, float] = field(default_factory=dict)
    latency_batch: int = 0
    fit_s: float | None = None
    wall_s: float | None = None
    device: str = ""
    curve: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def latency_ratio(self, kind: str) -> float | None:
        """Latency of ``unmerged`` or ``merged`` relative to the base model."""
        if kind not in self.latency_s or not self.latency_s.get("base"):
            return None
        return self.latency_s[kind] / self.latency_s["base"]

    @property
    def shipped(self) -> tuple[str, int | None]:
        """What a deployment stores per task: the adapter when there is one, else the checkpoint."""
        return ("adapter", self.adapter_bytes) if self.adapter_bytes else ("checkpoint", self.checkpoint_bytes)


# --- configuration ------------------------------------------------------------------------------


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


# --- running ------------------------------------------------------------------------------------


def compare_methods(
    methods: Sequence[MethodSpec],
    output: str | os.PathLike,
    *,
    shared_args: Sequence[str] = (),
    budget: Budget = Budget(),
    latency_rounds: int = 10,
    command: str | None = None,
) -> list[MethodResult]:
    """Trains each method in turn, each in its own process, and writes the report into ``output``.

    ``shared_args``: `vitlora fit` options for every method (``--data.root``, ``--model.weights``);
    a method's own options come after them. A failing method is recorded and the others still
    run; the report is rewritten after each method, so an interrupted comparison keeps what finished.
    """
    output = Path(output)
    if not methods:
        raise ValueError("Nothing to compare: no methods given.")
    check_same_setup(methods)
    if output.is_file() or (output.is_dir() and any(output.iterdir())):
        raise ValueError(f"{output}: already holds files; choose a new --output so that runs never mix.")
    settings = {
        "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "budget": str(budget),
        "shared_args": list(shared_args),
        "latency_rounds": latency_rounds,
    }
    results: list[MethodResult] = []
    for number, method in enumerate(methods, 1):
        run_dir = output / "runs" / method.name
        print(f"[{number}/{len(methods)}] {method.name}: training (log: {run_dir / 'train.log'})", flush=True)
        args = [*shared_args, *method.override_args(), *budget.trainer_args()]
        results.append(run_method(method, run_dir, args, latency_rounds))
        print(f"[{number}/{len(methods)}] {method.name}: {results[-1].error or 'done'}", flush=True)
        write_report(output, results, settings)
    return results


def run_method(method: MethodSpec, run_dir: Path, args: Sequence[str], latency_rounds: int = 10) -> MethodResult:
    """Trains and measures one method in a fresh process; its logs, checkpoints and numbers go to ``run_dir``."""
    fit_args = ["--config", str(method.recipe), *args, *_run_folder_args(run_dir)]
    result_path = run_dir / RESULT_FILE
    command = [sys.executable, "-m", "vitlora.measure", str(result_path), str(latency_rounds), *fit_args]
    python_path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with atomic_write(run_dir / "train.log") as tmp, open(tmp, "w") as log:
        process = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONPATH": python_path}
        )
    described = {
        "name": method.name,
        "recipe": str(method.recipe),
        "overrides": method.overrides,
        "fit_command": shlex.join(["vitlora", "fit", *fit_args]),
        "run_dir": str(run_dir),
        "wall_s": time.perf_counter() - start,
    }
    if process.returncode == 0 and result_path.is_file():
        return MethodResult(**described, **json.loads(result_path.read_text()))
    return MethodResult(**described, error=f"exit code {process.returncode}: {_last_words(run_dir / 'train.log')}")


def _run_folder_args(run_dir: Path) -> list[str]:
    """The run logger (save_dir/name/version) and checkpoints write into ``run_dir`` itself."""
    return [
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger.init_args.save_dir", str(run_dir.parent.parent),
        "--trainer.logger.init_args.name", run_dir.parent.name,
        "--trainer.logger.init_args.version", run_dir.name,
    ]  # fmt: skip


def _last_words(log: Path, lines: int = 3) -> str:
    """The end of a failed run's log, where Python and the CLI put the reason."""
    text = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return " | ".join(line.strip() for line in text[-lines:]) or "no output"


# --- the reading --------------------------------------------------------------------------------


def standard_error(accuracy: float, images: int) -> float:
    """Binomial standard error of an accuracy, Agresti-Coull style so that 100% on few images still has one."""
    adjusted = (accuracy * images + 2) / (images + 4)
    return math.sqrt(adjusted * (1 - adjusted) / (images + 4))


def comparison_reading(results: Sequence[MethodResult]) -> list[str]:
    """Plain-language conclusions from the numbers: which method to pick and why.

    Two val top-1 accuracies count as equal when they differ by at most two standard errors of
    their difference; among the methods within that noise of the most accurate, the one that
    trains the fewest parameters is recommended (then the faster step)."""
    done = sorted((r for r in results if r.ok and "top1" in r.val), key=lambda r: (-r.val["top1"], r.trainable))
    failed = [r.name for r in results if not r.ok]
    failures = [f"Not compared: {', '.join(failed)} failed (see Failures)."] if failed else []
    if not done:
        return ["No method finished, so there is nothing to compare.", *failures]
    best = done[0]
    error = standard_error(best.val["top1"], best.val_images)
    lines = [
        f"**{best.name}** is the most accurate on val: top-1 {100 * best.val['top1']:.1f}% on {best.val_images} "
        f"images (standard error {100 * error:.1f} points)."
    ]
    close, close_call_noise = [best], 0.0
    for other in done[1:]:
        gap = best.val["top1"] - other.val["top1"]
        noise = 2 * math.hypot(error, standard_error(other.val["top1"], other.val_images))
        verdict = "within noise" if gap <= noise else "a real gap"
        if gap <= noise:
            close.append(other)
            close_call_noise = max(close_call_noise, noise)
        lines.append(
            f"{other.name} is {100 * gap:.1f} points lower: {verdict} (two standard errors of the difference: "
            f"{100 * noise:.1f} points)."
        )
    if len(done) > 1:
        lines.append("Trainable parameters: " + ", ".join(f"{r.name} {_fraction(r)}" for r in done) + ".")
    pick = min(close, key=lambda r: (r.trainable, r.step_time_s or math.inf))
    lines.append(_recommendation(pick, best, close, done))
    merged = pick.latency_ratio("merged")
    if merged is not None:
        lines.append(f"Served merged, {pick.name} takes {merged:.2f}x the base model's inference time.")
    if close_call_noise > NOISY_GAP:
        lines.append(
            f"With {best.val_images} val images, gaps up to {100 * close_call_noise:.0f} points are noise: "
            "evaluate on more images before a close call."
        )
    return lines + failures


def _recommendation(pick: MethodResult, best: MethodResult, close: list[MethodResult], done: list[MethodResult]) -> str:
    if len(done) == 1:
        return f"Only {best.name} finished, so there is nothing to weigh it against."
    if pick is not best:
        return f"Pick **{pick.name}**: as accurate as {best.name} within noise, {_costs(pick, best)}."
    if len(close) > 1:
        return f"Pick **{best.name}**: the most accurate, and nothing within noise of it trains fewer parameters."
    cheapest = min(done[1:], key=lambda r: r.trainable)
    return (
        f"Pick **{best.name}**: nothing comes within noise of its accuracy. "
        f"Against {cheapest.name}, the cheapest alternative, it costs {_costs(best, cheapest)}."
    )


def _costs(a: MethodResult, b: MethodResult) -> str:
    """What ``a`` costs next to ``b``: parameters, stored bytes per task, step time, peak memory."""
    parts = [f"training {_fraction(a)} of the parameters instead of {_fraction(b)}"]
    (a_kind, a_bytes), (b_kind, b_bytes) = a.shipped, b.shipped
    if a_bytes and b_bytes:
        parts.append(f"storing a {_mb(a_bytes)} MB {a_kind} per task instead of a {_mb(b_bytes)} MB {b_kind}")
    if a.step_time_s and b.step_time_s:
        parts.append(f"at {a.step_time_s / b.step_time_s:.2f}x the training step time")
    if a.peak_memory_mb and b.peak_memory_mb:
        parts.append(f"{a.peak_memory_mb / b.peak_memory_mb:.2f}x the peak memory")
    return ", ".join(parts)


def _fraction(result: MethodResult) -> str:
    percent = 100 * result.trainable_fraction
    return f"{percent:.3g}%" if percent < 10 else f"{percent:.0f}%"


# --- the report ---------------------------------------------------------------------------------


def write_report(output: Path, results: Sequence[MethodResult], settings: Mapping[str, Any]) -> None:
    """report.md, report.json and the charts, each written atomically."""
    reading = comparison_reading(results)
    environment = {"machine": machine_summary(results), "versions": versions()}
    for name, image in report_charts(results).items():
        with atomic_write(output / name) as tmp:
            image.save(tmp, format="PNG")
    report = {**settings, **environment, "reading": reading, "methods": [asdict(r) for r in results]}
    with atomic_write(output / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    with atomic_write(output / "report.md") as tmp:
        tmp.write_text("\n".join(_markdown(output, results, settings, environment, reading)) + "\n")


def report_charts(results: Sequence[MethodResult]) -> dict[str, Image.Image]:
    done = [r for r in results if r.ok]
    names = [r.name for r in done]
    memory_kind = next((r.memory_kind for r in done if r.memory_kind), "peak memory")
    return {
        "accuracy_vs_parameters.png": charts.scatter_chart(
            "Val top-1 vs trainable parameters",
            [(r.name, r.trainable, 100 * r.val["top1"]) for r in done if "top1" in r.val and r.trainable],
            x_label="trainable parameters (log scale)",
            y_label="val top-1 (%)",
            log_x=True,
        ),
        "throughput.png": charts.bar_chart("Training throughput", names, [r.images_per_s for r in done], "images/s"),
        "memory.png": charts.bar_chart(
            f"Training memory ({memory_kind})", names, [r.peak_memory_mb for r in done], "MB"
        ),
        "validation_curves.png": charts.line_chart(
            "Val top-1 during training",
            {r.name: [(p["step"], 100 * p["top1"]) for p in r.curve if "top1" in p] for r in done},
            x_label="training step",
            y_label="val top-1 (%)",
        ),
    }


def _markdown(
    output: Path,
    results: Sequence[MethodResult],
    settings: Mapping[str, Any],
    environment: Mapping[str, Any],
    reading: list[str],
) -> Iterator[str]:
    done = [r for r in results if r.ok]
    with_test = any(r.test for r in done)
    yield f"# Comparison: {' vs '.join(r.name for r in results)}"
    yield ""
    yield f"Command: `{settings['command']}`  "
    budget = settings["budget"]
    yield f"Budget: {budget}" + (
        " (a shortened run: for checking the set-up, not for choosing)" if budget != "none" else ""
    )
    yield ""
    yield "## Reading"
    yield ""
    yield from (f"- {line}" for line in reading)
    yield ""
    yield "## Accuracy"
    yield ""
    columns = ["method", "val top-1", "val top-5", "val macro-F1"]
    columns += ["test top-1", "test top-5", "test macro-F1"] if with_test else []
    yield from _table([*columns, "trainable", "trainable %"])
    for r in done:
        splits = [r.val, r.test] if with_test else [r.val]
        scores = [_percent(split.get(key)) for split in splits for key in ("top1", "top5", "macro_f1")]
        yield _row([r.name, *scores, f"{r.trainable:,}", f"{100 * r.trainable_fraction:.3g}"])
    images = {f"{r.val_images} val" + (f", {r.test_images} test" if r.test else "") for r in done}
    yield ""
    yield f"Scores in %, on {' / '.join(sorted(images))} images, for the weights at the end of training."
    yield ""
    yield "## Cost"
    yield ""
    yield from _table([
        "method", "step (ms)", "images/s", "peak memory (MB)", "checkpoint (MB)", "adapter (MB)",
        "base latency (ms)", "unmerged (ms)", "merged (ms)", "fit (s)", "wall (s)",
    ])  # fmt: skip
    for r in done:
        latency = [_ms(r.latency_s.get("base")), *(_latency(r, kind) for kind in ("unmerged", "merged"))]
        yield _row([
            r.name, _ms(r.step_time_s), _number(r.images_per_s), _number(r.peak_memory_mb),
            _mb(r.checkpoint_bytes), _mb(r.adapter_bytes), *latency, _number(r.fit_s), _number(r.wall_s),
        ])  # fmt: skip
    kinds = sorted({r.memory_kind for r in done if r.memory_kind}) or ["-"]
    batches = sorted({r.latency_batch for r in done})
    yield ""
    yield (
        "Step: one training batch (forward, backward, optimizer), median after warm-up; images/s includes "
        f"data loading. Peak memory: {' / '.join(kinds)} of the training process (not its data-loading "
        "workers). Checkpoint: last.ckpt "
        "(trainable tensors and optimizer state). Latency: one forward pass on a batch of "
        f"{' / '.join(map(str, batches))} val images, median of {settings['latency_rounds']} interleaved rounds "
        "with the base model (the backbone without any adapter), in eval mode and the training precision; "
        "ratios to the base in parentheses. Wall: the whole process (training, evaluation, export, latency)."
    )
    yield ""
    yield "![val top-1 vs trainable parameters](accuracy_vs_parameters.png)"
    yield "![training throughput](throughput.png) ![training memory](memory.png)"
    yield "![val top-1 during training](validation_curves.png)"
    failed = [r for r in results if not r.ok]
    if failed:
        yield ""
        yield "## Failures"
        yield ""
        yield from (f"- **{r.name}**: {r.error} (log: `{_relative(r.run_dir, output)}/train.log`)" for r in failed)
    yield ""
    yield "## Methods"
    yield ""
    for r in results:
        notes = "".join(f" Note: {note}." for note in r.notes)
        yield f"- **{r.name}** (`{_relative(r.run_dir, output)}`):{notes} `{r.fit_command}`"
    if settings["shared_args"]:
        yield f"- every method: `{shlex.join(settings['shared_args'])}`"
    yield ""
    yield "## Machine"
    yield ""
    yield from (f"- {key}: {value}" for key, value in environment["machine"].items())
    yield "- versions: " + ", ".join(f"{name} {version}" for name, version in environment["versions"].items())


def _table(columns: list[str]) -> Iterator[str]:
    yield _row(columns)
    yield _row(["---"] * len(columns))


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _latency(result: MethodResult, kind: str) -> str:
    ratio = result.latency_ratio(kind)
    return _ms(result.latency_s.get(kind)) + ("" if ratio is None else f" ({ratio:.2f}x)")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.2f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def machine_summary(results: Sequence[MethodResult] = ()) -> dict[str, str]:
    """Where the numbers were taken: OS, CPU, memory, and the training device of the runs."""
    summary = {"platform": platform.platform(), "python": platform.python_version()}
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown"
    summary["cpu"] = f"{cpu}, {os.cpu_count()} cores"
    memory_kb = _proc_field("/proc/meminfo", "MemTotal")
    if memory_kb:
        summary["memory"] = f"{int(memory_kb.split()[0]) / 2**20:.0f} GiB"
    summary["training device"] = ", ".join(sorted({r.device for r in results if r.device})) or "unknown"
    return summary


def versions() -> dict[str, str]:
    from vitlora import __version__

    found = {"vitlora": __version__}
    for package in ("torch", "timm", "lightning", "torchmetrics", "safetensors"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _proc_field(path: str, name: str) -> str | None:
    try:
        with open(path) as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith(name)), None)
    except OSError:
        return None
