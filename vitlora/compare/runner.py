"""Runs each method of a comparison (or each of its folds) in a fresh process and gathers its numbers.

Every run is one `vitlora fit` in a process of its own (vitlora.compare.measure), in its own folder:
``runs/<method>/``, or ``runs/<method>/fold<k>/`` under K-fold cross-validation. Up to ``parallel``
runs go at once, each on its own GPU; a method's result combines its runs (result.combine_runs),
so a plain comparison is the one-run case of a cross-validated one.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from vitlora.compare.config import Budget, MethodSpec, check_same_setup, recipe_fingerprint, swept_options
from vitlora.compare.report import write_report
from vitlora.compare.result import PREDICTIONS_FILE, MethodResult, combine_runs
from vitlora.files import atomic_write

RESULT_FILE = "measurements.json"
SETTINGS_FILE = "comparison.json"  # what the comparison was started with: --resume checks it
PROGRESS_LINES = ("epoch ", "best checkpoint:")  # what vitlora.training.run_summary prints as a fit goes
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the child process imports this very vitlora
T = TypeVar("T")


@dataclass(frozen=True)
class PlannedRun:
    """One `vitlora fit` of a comparison: a method, the fold it holds out (None without folds), its folder."""

    method: MethodSpec
    fold: int | None
    run_dir: Path
    fit_args: tuple[str, ...]  # everything after `vitlora fit`, save the GPU pinning

    @property
    def label(self) -> str:
        return self.method.name + ("" if self.fold is None else f" fold {self.fold}")

    @property
    def finished(self) -> bool:
        return (self.run_dir / RESULT_FILE).is_file()


def compare_methods(
    methods: Sequence[MethodSpec],
    output: str | os.PathLike,
    *,
    shared_args: Sequence[str] = (),
    budget: Budget | None = None,
    latency_rounds: int = 10,
    folds: int = 1,
    parallel: int | str = "auto",
    resume: bool = False,
    command: str | None = None,
) -> list[MethodResult]:
    """Trains each method (each of its ``folds`` folds) in its own process and writes the report into ``output``.

    ``shared_args``: `vitlora fit` options for every method (``--data.root``, ``--model.weights``);
    a method's own options come after them. ``folds`` >= 2: K-fold cross-validation over train+val,
    K runs per method. ``parallel``: runs at once, each pinned to its own GPU ("auto": one per
    visible GPU, 1 without). ``resume``: continue ``output``, skipping runs that finished. A failing
    run is recorded and the others still run; the report is rewritten after each run, so an
    interrupted comparison keeps what finished. Results come in the order of ``methods``.
    """
    output, budget = Path(output), budget or Budget()
    if not methods:
        raise ValueError("Nothing to compare: no methods given.")
    if folds < 1:
        raise ValueError(f"folds must be at least 2 for cross-validation (1: none), got {folds}.")
    check_same_setup(methods)
    slots = run_slots(parallel)
    saved = {
        "methods": [
            {
                "name": m.name,
                "recipe": str(m.recipe),
                "recipe_sha256": recipe_fingerprint(m.recipe),
                "overrides": m.overrides,
            }
            for m in methods
        ],
        "shared_args": list(shared_args),
        "budget": asdict(budget),
        "folds": folds,
        "latency_rounds": latency_rounds,
    }
    saved = json.loads(json.dumps(saved))  # as --resume will read it back
    runs = plan_runs(methods, output, folds, shared_args, budget)
    check_output(output, runs, saved, resume)
    with atomic_write(output / SETTINGS_FILE) as tmp:
        tmp.write_text(json.dumps(saved, indent=1))
    settings = {
        "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "budget": str(budget),
        "shared_args": list(shared_args),
        "latency_rounds": latency_rounds,
        "folds": folds if folds > 1 else 0,
        "grid": swept_options(methods),
    }
    done, pending, interrupted = take_stock(runs, output, resume)

    def launch(index: int, gpu: str | None) -> MethodResult:
        run, number = runs[index], f"[{index + 1}/{len(runs)}]"
        where = "" if gpu is None else f" on GPU {gpu}"
        doing = f"continuing from {interrupted[index]}" if index in interrupted else "training"
        print(f"{number} {run.label}: {doing}{where} (log: {run.run_dir / 'train.log'})", flush=True)
        result = measure_run(run, latency_rounds, gpu, interrupted.get(index))
        print(f"{number} {run.label}: {result.error or 'done'}", flush=True)
        return result

    for index, result in run_concurrently(pending, slots, launch):
        done[index] = result
        write_report(output, method_results(methods, runs, done), settings)
    results = method_results(methods, runs, done)
    if not pending:
        write_report(output, results, settings)
    return results


def take_stock(
    runs: Sequence[PlannedRun], output: Path, resume: bool
) -> tuple[dict[int, MethodResult], list[int], dict[int, Path]]:
    """What is left to do (by index in ``runs``): the finished runs' results, the runs to go, and of
    those the ones to continue from their last checkpoint (``resume`` only). The other runs to go start
    over in a clean folder."""
    done = {index: read_run(run) for index, run in enumerate(runs) if run.finished}
    pending = [index for index in range(len(runs)) if index not in done]
    interrupted = {index: last for index in pending if resume and (last := resumable_checkpoint(runs[index]))}
    if done or interrupted:
        print(
            f"resuming {output}: {len(done)} of {len(runs)} runs finished, {len(pending)} to go"
            + (f" ({len(interrupted)} continued from their last checkpoint)" if interrupted else ""),
            flush=True,
        )
    for index in pending:
        if index not in interrupted:
            shutil.rmtree(runs[index].run_dir, ignore_errors=True)
    return done, pending, interrupted


def plan_runs(
    methods: Sequence[MethodSpec],
    output: Path,
    folds: int = 1,
    shared_args: Sequence[str] = (),
    budget: Budget | None = None,
) -> list[PlannedRun]:
    """Every run of the comparison: one per method, or one per method and fold when ``folds`` >= 2.

    Folds come outermost (every method's fold 0, then every method's fold 1, ...), so a cross-validation
    stopped partway has the same folds finished for every method, and what landed can be paired.
    A run's options: its recipe, the shared options, its method's, the budget, its fold, then its folder
    (the run logger's save_dir/name/version and the checkpoints all in it)."""
    budget_args = (budget or Budget()).trainer_args()
    runs = []
    for fold in range(folds) if folds > 1 else [None]:
        for method in methods:
            run_dir, fold_args = output / "runs" / method.name, []
            if fold is not None:
                run_dir, fold_args = run_dir / f"fold{fold}", ["--data.folds", str(folds), "--data.fold", str(fold)]
            fit_args = [
                "--config", str(method.recipe), *shared_args, *method.override_args(), *budget_args, *fold_args,
                "--trainer.default_root_dir", str(run_dir),
                "--trainer.logger.init_args.save_dir", str(run_dir.parent.parent),
                "--trainer.logger.init_args.name", run_dir.parent.name,
                "--trainer.logger.init_args.version", run_dir.name,
            ]  # fmt: skip
            runs.append(PlannedRun(method, fold, run_dir, tuple(fit_args)))
    return runs


def finished_fold_predictions(method_dir: Path) -> dict[int, Path]:
    """Fold number -> val predictions file, for each fold run of a method (``runs/<method>``) that finished."""
    if not method_dir.is_dir():
        raise ValueError(f"{method_dir}: no such folder (a method's fold runs are in <output>/runs/<method>).")
    predictions = PREDICTIONS_FILE.format(split="val")
    return {
        int(run.name.removeprefix("fold")): run / predictions
        for run in method_dir.iterdir()
        if re.fullmatch(r"fold\d+", run.name) and (run / RESULT_FILE).is_file() and (run / predictions).is_file()
    }


def method_results(
    methods: Sequence[MethodSpec], runs: Sequence[PlannedRun], done: Mapping[int, MethodResult]
) -> list[MethodResult]:
    """A result for each method that has one yet (``done``: finished runs by index in ``runs``), in method order.

    Without folds, a method's result is its run once it finished. Under cross-validation every method is
    combined over the same folds, those every method has finished, so that a report written partway
    (or left by a stopped comparison) compares the methods on the same images; a failed fold run fails
    its method as soon as it lands."""
    folds = sorted({run.fold for run in runs if run.fold is not None})
    common = [fold for fold in folds if all(i in done for i, run in enumerate(runs) if run.fold == fold)]
    results = []
    for method in methods:
        own = [index for index, run in enumerate(runs) if run.method.name == method.name]
        described = {"name": method.name, "recipe": str(method.recipe), "overrides": method.overrides}
        if not folds:
            results += [combine_runs([done[i]], 0, **described, run_dir=str(runs[i].run_dir)) for i in own if i in done]
            continue
        shown = [i for i in own if runs[i].fold in common or (i in done and done[i].error)]  # a failure shows at once
        if shown:
            numbers = [runs[i].fold for i in shown]
            folder = str(runs[own[0]].run_dir.parent)
            results.append(combine_runs([done[i] for i in shown], len(folds), numbers, **described, run_dir=folder))
    return results


def check_output(output: Path, runs: Sequence[PlannedRun], saved: dict[str, Any], resume: bool) -> None:
    """Refuses an output that a new comparison would mix with, or that --resume cannot continue as asked."""
    if output.is_file():
        raise ValueError(f"{output}: is a file; --output names a folder.")
    used = output.is_dir() and any(output.iterdir())
    if not resume:
        if used:
            raise ValueError(f"{output}: already holds files; choose a new --output (or --resume to continue it).")
        return
    finished = sorted(output.glob(f"runs/**/{RESULT_FILE}"))
    settings_path = output / SETTINGS_FILE
    if settings_path.is_file():
        before = _read_json(settings_path)
        if any("recipe_sha256" not in method for method in before.get("methods", [])):
            print(
                f"vitlora compare: warning: {settings_path} predates recipe fingerprints: an edit to a recipe "
                "made before this resume is not noticed (later ones are).",
                file=sys.stderr,
            )
        differences = settings_differences(before, saved)
        if differences:
            raise ValueError(
                f"{output}: --resume with other settings than {SETTINGS_FILE} records: {'; '.join(differences)}."
            )
    elif finished:
        print(
            f"vitlora compare: warning: {output} has no {SETTINGS_FILE}: its finished runs are taken to have "
            "this command's settings.",
            file=sys.stderr,
        )
    elif used:
        raise ValueError(f"{output}: nothing to resume (no {SETTINGS_FILE}, no finished run); choose a new --output.")
    planned = {run.run_dir / RESULT_FILE for run in runs}
    strays = [path for path in finished if path not in planned]
    if strays:
        raise ValueError(
            f"{output}: holds finished runs this comparison does not plan ({', '.join(map(str, strays))}): "
            "other methods or folds; resume with the settings that made them."
        )


def settings_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two saved comparison settings, one phrase per setting."""
    differences = []
    for key in dict.fromkeys([*before, *now]):
        if key == "methods":
            old = {m["name"]: m for m in before.get(key, [])}
            new = {m["name"]: m for m in now.get(key, [])}
            for name, method in old.items():  # saved before recipes were fingerprinted: nothing to check
                if "recipe_sha256" not in method and name in new:
                    new[name] = {k: v for k, v in new[name].items() if k != "recipe_sha256"}
            added, gone = [n for n in new if n not in old], [n for n in old if n not in new]
            changed = [n for n in new if n in old and old[n] != new[n]]
            phrases = [f"{label} {names}" for label, names in (("new", added), ("gone", gone)) if names]
            phrases += [f"{name} changed ({_difference(old[name], new[name])})" for name in changed]
            if not phrases and list(old) != list(new):
                phrases = [f"order {list(old)} -> {list(new)}"]
            differences += [f"methods: {', '.join(phrases)}"] if phrases else []
        elif before.get(key) != now.get(key):
            differences.append(f"{key}: {before.get(key)!r} -> {now.get(key)!r}")
    return differences


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    return ", ".join(
        f"its recipe {Path(new['recipe']).name} was edited since" if key == "recipe_sha256"
        else f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in new if old.get(key) != new.get(key)
    )  # fmt: skip


def visible_gpus() -> list[str]:
    """The CUDA devices a child may be pinned to, as CUDA_VISIBLE_DEVICES names them (its entries, else 0..n-1)."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(index) for index in range(count)]
    return [entry.strip() for entry in listed.split(",") if entry.strip()][:count]


def run_slots(parallel: int | str) -> list[str | None]:
    """One slot per run that may go at once: a GPU id each when GPUs are visible, else None (CPU).

    ``parallel``: a count, or "auto" (one per visible GPU, 1 without)."""
    gpus = visible_gpus()
    if parallel == "auto":
        return list(gpus) or [None]
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be a positive number of runs or 'auto', got {parallel!r}.")
    if gpus and parallel > len(gpus):
        raise ValueError(
            f"parallel {parallel}: only {len(gpus)} GPUs are visible ({','.join(gpus)}) and each run needs its own."
        )
    return gpus[:parallel] if gpus else [None] * parallel


def run_concurrently(
    indices: Sequence[int], slots: Sequence[T], work: Callable[[int, T], MethodResult]
) -> Iterator[tuple[int, MethodResult]]:
    """``work(index, slot)`` for each index, started in order, at most one per slot at a time;
    yields (index, result) as each finishes. A slot (a GPU) is never held by two at once."""
    free: queue.SimpleQueue = queue.SimpleQueue()
    for slot in slots:
        free.put(slot)

    def hold_a_slot(index: int) -> tuple[int, MethodResult]:
        slot = free.get()
        try:
            return index, work(index, slot)
        finally:
            free.put(slot)

    pool = ThreadPoolExecutor(max_workers=max(1, len(slots)))
    try:
        futures = [pool.submit(hold_a_slot, index) for index in indices]
        for future in as_completed(futures):
            yield future.result()
    finally:  # interrupted or failed: start nothing more, wait for what runs
        pool.shutdown(wait=True, cancel_futures=True)


def measure_run(
    run: PlannedRun, latency_rounds: int = 10, gpu: str | None = None, resume_from: Path | None = None
) -> MethodResult:
    """Trains and measures one run in a fresh process, pinned to ``gpu`` when given; it writes into its folder.

    ``resume_from``: the run's last checkpoint; training goes on from it and train.log goes on after the old lines."""
    fit_args, env = list(run.fit_args), {"PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    if gpu is not None:
        fit_args += ["--trainer.devices", "1"]
        env["CUDA_VISIBLE_DEVICES"] = gpu
    fit_command = fit_command_line(fit_args, gpu)
    result_path, log_path = run.run_dir / RESULT_FILE, run.run_dir / "train.log"
    resuming = ["--resume_from", str(resume_from)] if resume_from else []
    command = [sys.executable, "-m", "vitlora.compare.measure", str(result_path), str(latency_rounds), *resuming]
    command += fit_args
    run.run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # train.log is written line by line as the run goes: one can follow it, and a kill keeps it
    with open(log_path, "a" if resume_from else "w", buffering=1) as log:
        if resume_from:
            log.write(f"--- interrupted; continued from {resume_from} ---\n")
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ | env
        )
        for line in process.stdout:  # the whole log to train.log, its progress lines to the screen as they come
            log.write(line)
            if line.startswith(PROGRESS_LINES):
                print(f"    {run.label}: {line.rstrip()}", flush=True)
        process.wait()
    wall_s = time.perf_counter() - start
    if process.returncode == 0 and result_path.is_file():
        record = _read_json(result_path) | {"wall_s": wall_s, "fit_command": fit_command}
        with atomic_write(result_path) as tmp:  # the runner's part of the record, for --resume to read back
            tmp.write_text(json.dumps(record, indent=1))
        return read_run(run)
    error = f"exit code {process.returncode}: {_last_words(run.run_dir / 'train.log')}"
    return MethodResult(**_described(run, fit_command), wall_s=wall_s, error=error)


def resumable_checkpoint(run: PlannedRun) -> Path | None:
    """An unfinished run's ``checkpoints/last.ckpt``, when it is whole (a zip archive to its end), else None.

    vitlora writes checkpoints atomically, so an interrupted run's last one is whole; the check guards
    against a copied or truncated file, which would only make the run start over."""
    last = run.run_dir / "checkpoints" / "last.ckpt"
    return last if last.is_file() and zipfile.is_zipfile(last) else None


def read_run(run: PlannedRun) -> MethodResult:
    """A finished run's result from its measurements.json, with the wall time and command the runner recorded
    there (a run started by hand has neither: no wall time, the command as this comparison would give it)."""
    path = run.run_dir / RESULT_FILE
    predictions = run.run_dir / PREDICTIONS_FILE.format(split="val")
    fields = _described(run, fit_command_line(run.fit_args)) | _read_json(path)
    try:
        return MethodResult(**fields, prediction_files=[str(predictions)] if predictions.is_file() else [])
    except TypeError as error:
        raise ValueError(f"{path}: not a measurements file of this vitlora ({error}).") from None


def fit_command_line(fit_args: Sequence[str], gpu: str | None = None) -> str:
    """The `vitlora fit` command a run amounts to, for the report."""
    command = shlex.join(["vitlora", "fit", *fit_args])
    return command if gpu is None else f"CUDA_VISIBLE_DEVICES={shlex.quote(gpu)} {command}"


def _described(run: PlannedRun, fit_command: str) -> dict[str, Any]:
    method = run.method
    return {
        "name": method.name,
        "recipe": str(method.recipe),
        "overrides": method.overrides,
        "fit_command": fit_command,
        "run_dir": str(run.run_dir),
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable ({error}).") from None


def _last_words(log: Path, lines: int = 3) -> str:
    """The end of a failed run's log, where Python and the CLI put the reason."""
    text = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return " | ".join(line.strip() for line in text[-lines:]) or "no output"
