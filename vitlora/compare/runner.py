"""Runs each method of a comparison in a fresh process (vitlora.compare.measure) and gathers its numbers."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vitlora.compare.config import Budget, MethodSpec, check_same_setup
from vitlora.compare.report import write_report
from vitlora.compare.result import MethodResult
from vitlora.files import atomic_write

RESULT_FILE = "measurements.json"
PROGRESS_LINES = ("epoch ", "best checkpoint:")  # what vitlora.training.run_summary prints as a fit goes
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the child process imports this very vitlora


def compare_methods(
    methods: Sequence[MethodSpec],
    output: str | os.PathLike,
    *,
    shared_args: Sequence[str] = (),
    budget: Budget | None = None,
    latency_rounds: int = 10,
    command: str | None = None,
) -> list[MethodResult]:
    """Trains each method in turn, each in its own process, and writes the report into ``output``.

    ``shared_args``: `vitlora fit` options for every method (``--data.root``, ``--model.weights``);
    a method's own options come after them. A failing method is recorded and the others still
    run; the report is rewritten after each method, so an interrupted comparison keeps what finished.
    """
    output, budget = Path(output), budget or Budget()
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
    command = [sys.executable, "-m", "vitlora.compare.measure", str(result_path), str(latency_rounds), *fit_args]
    python_path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = os.environ | {"PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1"}
    with atomic_write(run_dir / "train.log") as tmp, open(tmp, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in process.stdout:  # the whole log to train.log, its progress lines to the screen as they come
            log.write(line)
            if line.startswith(PROGRESS_LINES):
                print(f"    {method.name}: {line.rstrip()}", flush=True)
        process.wait()
    described = {
        "name": method.name,
        "recipe": str(method.recipe),
        "overrides": method.overrides,
        "fit_command": shlex.join(["vitlora", "fit", *fit_args]),
        "run_dir": str(run_dir),
        "wall_s": time.perf_counter() - start,
    }
    if process.returncode == 0 and result_path.is_file():
        predictions = [str(run_dir / "val_predictions.csv")] if (run_dir / "val_predictions.csv").is_file() else []
        return MethodResult(**described, **json.loads(result_path.read_text()), prediction_files=predictions)
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
