"""report.md, report.json and the charts of a comparison."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from vitlora._version import __version__
from vitlora.charts import bar_chart, line_chart, scatter_chart
from vitlora.compare.paired import BOOTSTRAP_ROUNDS, PairedComparison
from vitlora.compare.reading import Standing, comparison_reading, paired_with_best, standings
from vitlora.compare.result import MethodResult, megabytes
from vitlora.files import atomic_write

# The accuracy chart's y axis spans at least this many points: two methods 0.2 apart, closer than the
# noise of a few hundred photos, should look close, not fill the chart's height.
MIN_TOP1_SPAN = 2.0


def write_report(output: Path, results: Sequence[MethodResult], settings: Mapping[str, Any]) -> None:
    """report.md, report.json and the charts, each written atomically."""
    ranked = standings(results)  # reads the prediction files once, for the reading and the tables
    best, pairs = (ranked[0].result.name if ranked else ""), paired_with_best(ranked)
    reading = comparison_reading(results, ranked=ranked, pairs=pairs)
    environment = {"machine": machine_summary(results), "versions": versions()}
    for name, image in report_charts(results).items():
        with atomic_write(output / name) as tmp:
            image.save(tmp, format="PNG")
    paired = [{"method": name, "against": best, **asdict(pair)} for name, pair in pairs.items()]
    finished = {"finished_folds": finished_folds(results)} if settings.get("folds") else {}
    report = {**settings, **finished, **environment, "reading": reading, "paired": paired}
    report["methods"] = [asdict(r) for r in results]
    with atomic_write(output / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    with atomic_write(output / "report.md") as tmp:
        tmp.write_text("\n".join(_markdown(output, results, settings, environment, reading, ranked, pairs)) + "\n")


def report_charts(results: Sequence[MethodResult]) -> dict[str, Image.Image]:
    done = [r for r in results if r.ok]
    names = [r.name for r in done]
    scored = [r for r in done if "top1" in r.val and r.trainable]
    spreads = [100 * r.val_sd.get("top1", 0.0) for r in scored]  # over the folds; none for one run each
    memory_kind = next((r.memory_kind for r in done if r.memory_kind), "peak memory")
    return {
        "accuracy_vs_parameters.png": scatter_chart(
            "Val top-1 vs trainable parameters",
            [(r.name, r.trainable, 100 * r.val["top1"]) for r in scored],
            x_label="trainable parameters (log scale)",
            y_label="val top-1 (%), bars: ±1 sd over folds" if any(spreads) else "val top-1 (%)",
            log_x=True,
            y_errors=spreads,
            min_y_span=MIN_TOP1_SPAN,
        ),
        "throughput.png": bar_chart("Training throughput", names, [r.images_per_s for r in done], "images/s"),
        "memory.png": bar_chart(f"Training memory ({memory_kind})", names, [r.peak_memory_mb for r in done], "MB"),
        "validation_curves.png": line_chart(
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
    ranked: Sequence[Standing],
    pairs: Mapping[str, PairedComparison],
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
    if settings.get("folds") or settings.get("grid"):
        yield ""
    if settings.get("folds"):
        yield f"Folds: {settings['folds']}-fold cross-validation over train+val, one run per method and fold.  "
        finished = finished_folds(results)
        if len(finished) < settings["folds"]:
            which = f" (fold{'s' if len(finished) > 1 else ''} {', '.join(map(str, finished))})" if finished else ""
            yield (
                f"**Partial: {len(finished)} of {settings['folds']} folds have finished for every method{which}**, "
                "and every score below is over those folds only (the comparison is still running, or was stopped: "
                "`--resume` continues it).  "
            )
    if settings.get("grid"):
        yield f"Grid: the methods sweep {', '.join(f'`{key}`' for key in settings['grid'])}; all else is shared."
    yield ""
    yield "## Reading"
    yield ""
    yield from (f"- {line}" for line in reading)
    yield ""
    yield "## Accuracy"
    yield ""
    metrics = {"top1": "top-1", "top5": "top-5", "macro_f1": "macro-F1"}
    if any("coarse_top1" in r.val for r in done):  # a layout with coarse classes (Grocery Store)
        metrics["coarse_top1"] = "coarse top-1"
    columns = ["method", *(f"val {name}" for name in metrics.values())]
    columns += [f"test {name}" for name in metrics.values()] if with_test else []
    yield from _table([*columns, "trainable", "trainable %"])
    for r in done:
        splits = [(r.val, r.val_sd), (r.test, r.test_sd)] if with_test else [(r.val, r.val_sd)]
        scores = [_percent(split.get(key), sd.get(key)) for split, sd in splits for key in metrics]
        yield _row([r.name, *scores, f"{r.trainable:,}", f"{100 * r.trainable_fraction:.3g}"])
    images = {f"{r.val_images} val" + (f", {r.test_images} test" if r.test else "") for r in done}
    yield ""
    if settings.get("folds"):
        pooled = " / ".join(f"{n:,}" for n in sorted({r.val_images for r in done}))
        tested = " / ".join(f"{n:,}" for n in sorted({r.test_images for r in done if r.test}))
        yield (
            f"Scores in %, mean ± sd over the folds: {settings['folds']}-fold cross-validation over train+val "
            f"({pooled} images), each image scored once, by the fold run that did not train on it"
            + (f"; test: every fold run on the same {tested} test images" if tested else "")
            + ". For the weights at the end of training."
        )
    else:
        yield f"Scores in %, on {' / '.join(sorted(images))} images, for the weights at the end of training."
    if pairs:
        yield ""
        yield from _paired_table(ranked[0].result.name, pairs)
    weakest = list(weakest_classes(results, ranked))
    if weakest:
        yield ""
        yield from weakest
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
            megabytes(r.checkpoint_bytes), megabytes(r.adapter_bytes), *latency, _number(r.fit_s), _number(r.wall_s),
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
    if settings.get("folds"):
        yield "Over folds: step, images/s, memory, sizes and latency are the fold runs' median; fit and wall their sum."
    yield ""
    yield "![val top-1 vs trainable parameters](accuracy_vs_parameters.png)"
    yield "![training throughput](throughput.png) ![training memory](memory.png)"
    yield "![val top-1 during training](validation_curves.png)"
    failed = [r for r in results if not r.ok]
    if failed:
        yield ""
        yield "## Failures"
        yield ""
        for r in failed:
            run_dir = next((run["run_dir"] for run in r.runs if run["error"]), r.run_dir)  # the failed fold's
            yield f"- **{r.name}**: {r.error} (log: `{_relative(run_dir, output)}/train.log`)"
    yield ""
    yield "## Methods"
    yield ""
    for r in results:
        notes = "".join(f" Note: {note}." for note in r.notes)
        yield f"- **{r.name}** (`{_relative(r.run_dir, output)}`):{notes}" + ("" if r.folds else f" `{r.fit_command}`")
        for run in r.runs if r.folds else []:
            yield f"  - fold {run['fold']} (`{_relative(run['run_dir'], output)}`): `{run['fit_command']}`"
    if settings["shared_args"]:
        yield f"- every method: `{shlex.join(settings['shared_args'])}`"
    yield ""
    yield "## Machine"
    yield ""
    yield from (f"- {key}: {value}" for key, value in environment["machine"].items())
    yield "- versions: " + ", ".join(f"{name} {version}" for name, version in environment["versions"].items())


def weakest_classes(results: Sequence[MethodResult], ranked: Sequence[Standing], count: int = 10) -> Iterator[str]:
    """The ``count`` classes the most accurate method gets wrong most often, with every method's accuracy on them.

    Args:
        results: the methods, in the order of the report's columns.
        ranked: standings(results), most accurate first; methods without per-image predictions are left out.
        count: how many classes.

    Returns:
        The report.md lines, none when the most accurate method has no per-image predictions.
    """
    if not ranked or ranked[0].predictions is None:
        return
    scored = {s.result.name: s.predictions for s in ranked if s.predictions is not None}
    per_class = {r.name: _class_accuracy(scored[r.name]) for r in results if r.name in scored}
    best = ranked[0].result.name
    names = ranked[0].result.class_names
    worst = sorted(per_class[best], key=lambda label: (per_class[best][label][0], label))[:count]
    yield f"## Weakest classes of {best}"
    yield ""
    yield from _table(["class", "images", *(f"{name} (%)" for name in per_class)])
    for label in worst:
        cells = [_percent(per_class[name].get(label, (None, 0))[0]) for name in per_class]
        yield _row([names[label] if label < len(names) else str(label), str(per_class[best][label][1]), *cells])
    yield ""
    yield f"Top-1 per true class on the val images (pooled over folds), for the {len(worst)} lowest of {best}."


def _class_accuracy(predictions: Mapping[str, tuple[int, int]]) -> dict[int, tuple[float, int]]:
    """class -> (accuracy, images) over the images of that true class."""
    right: dict[int, int] = {}
    seen: dict[int, int] = {}
    for label, predicted in predictions.values():
        seen[label] = seen.get(label, 0) + 1
        right[label] = right.get(label, 0) + (label == predicted)
    return {label: (right[label] / seen[label], seen[label]) for label in seen}


def _paired_table(best: str, pairs: Mapping[str, PairedComparison]) -> Iterator[str]:
    yield "## Paired comparisons"
    yield ""
    yield from _table([
        "method", "images", "val top-1", f"{best} val top-1", f"{best} ahead by (points)", "95% interval (points)",
        "McNemar p", f"only {best} right", "only method right",
    ])  # fmt: skip
    for name, pair in pairs.items():
        low, high = pair.interval
        yield _row([
            name, f"{pair.images:,}", _percent(pair.second_accuracy), _percent(pair.first_accuracy),
            f"{100 * pair.difference:.1f}", f"{100 * low:.1f} to {100 * high:.1f}", f"{pair.p_value:.3g}",
            f"{pair.first_only:,}", f"{pair.second_only:,}",
        ])  # fmt: skip
    yield ""
    yield (
        f"Each method against {best}, the most accurate, on the val images both scored (their prediction files, "
        f"pooled over folds). The interval is a paired bootstrap ({BOOTSTRAP_ROUNDS:,} resamples of the images); "
        "McNemar's exact test weighs the images exactly one of the two gets right, and p < 0.05 is a real gap."
    )


def _table(columns: list[str]) -> Iterator[str]:
    yield _row(columns)
    yield _row(["---"] * len(columns))


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _latency(result: MethodResult, kind: str) -> str:
    ratio = result.latency_ratio(kind)
    return _ms(result.latency_s.get(kind)) + ("" if ratio is None else f" ({ratio:.2f}x)")


def finished_folds(results: Sequence[MethodResult]) -> list[int]:
    """The folds the report covers: all K once the cross-validation is done, fewer while it runs."""
    return sorted({fold for r in results if r.ok for fold in r.finished_folds})


def _percent(value: float | None, sd: float | None = None) -> str:
    """A score in %, with its standard deviation over folds when there is one."""
    return "-" if value is None else f"{100 * value:.1f}" + ("" if sd is None else f" ± {100 * sd:.1f}")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


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
