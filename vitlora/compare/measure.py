"""One method trained and measured in its own process, for `vitlora compare`.

    python -m vitlora.compare.measure RESULT.json LATENCY_ROUNDS [--resume_from CKPT] --config recipe.yaml [--model.lr ...]

trains with the same configuration machinery as ``vitlora fit``, validates the final weights,
tests them when the data has a test split, exports the adapter of a LoRA run, times inference
of the base model against this one (unmerged and merged) and writes RESULT.json. A process of
its own per method is what makes the peak memory this method's alone. ``--resume_from``: an
interrupted run's checkpoint, continued in the same folder.
"""

from __future__ import annotations

import copy
import csv
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from vitlora.adapter import AdapterError
from vitlora.backbone import WeightsUnavailable
from vitlora.compare.result import PREDICTIONS_FILE
from vitlora.files import atomic_write
from vitlora.lora import lora_modules, merge_lora, remove_lora
from vitlora.prompts import prompt_config, remove_prompt_tokens
from vitlora.trainable import count_parameters
from vitlora.training.export import export_adapter
from vitlora.training.lightning_cli import build_cli
from vitlora.training.logging import RunLogger

WARMUP_STEPS = 5
WARMUP_ROUNDS = 2


class TrainingMeasurements(Callback):
    """Step times, throughput, peak memory and every validation of one fit.

    A step is one training batch (forward, backward, optimizer step) without loading it; the
    throughput counts loading too. The first steps (allocator growth, caches, autotuning) are
    left out of both. Validations and the test keep their metrics and how many images they saw,
    which is what a standard error needs.
    """

    def __init__(self, warmup_steps: int = WARMUP_STEPS) -> None:
        self.warmup_steps = warmup_steps
        self.step_seconds: list[float] = []
        self.batch_seconds: list[float] = []  # since the previous batch ended: loading included
        self.batch_sizes: list[int] = []
        self.validations: list[dict[str, float]] = []
        self.test: dict[str, float] = {}
        self.fit_seconds = 0.0
        self.peak_memory_mb = 0.0
        self.memory_kind = ""
        self._fit_start = self._batch_end = self._step_start = 0.0
        self._eval_images = 0
        self.resumed_at_step = 0  # where a fit resumed from a checkpoint took over; 0: from the start
        self.restored = False  # whether that checkpoint kept the measurements of the steps before it
        self._fit_seconds_before = 0.0  # of the part before a resume, as its checkpoint kept them
        self._device = torch.device("cpu")

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that a run resumed from it reports all of its steps and validations."""
        return {
            "step_seconds": self.step_seconds,
            "batch_seconds": self.batch_seconds,
            "batch_sizes": self.batch_sizes,
            "validations": self.validations,
            "fit_seconds": self._fit_seconds_before + time.perf_counter() - self._fit_start,
            "peak_memory_mb": max(self.peak_memory_mb, peak_memory(self._device)[0]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_seconds, self.batch_seconds = list(state["step_seconds"]), list(state["batch_seconds"])
        self.batch_sizes, self.validations = list(state["batch_sizes"]), list(state["validations"])
        self._fit_seconds_before, self.peak_memory_mb = state["fit_seconds"], state["peak_memory_mb"]
        self.restored = True

    def on_fit_start(self, trainer, pl_module) -> None:  # after a checkpoint's callback states are loaded
        if self.resumed_at_step and isinstance(trainer.logger, RunLogger):
            trainer.logger.continue_at(self.resumed_at_step)
        self._device = trainer.strategy.root_device
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_seconds = self._fit_seconds_before + time.perf_counter() - self._fit_start
        peak, self.memory_kind = peak_memory(trainer.strategy.root_device)
        self.peak_memory_mb = max(self.peak_memory_mb, peak)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._batch_end = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        synchronize(trainer.strategy.root_device)
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        synchronize(trainer.strategy.root_device)
        now = time.perf_counter()
        self.step_seconds.append(now - self._step_start)
        self.batch_seconds.append(now - self._batch_end)
        self.batch_sizes.append(len(batch[0]))
        self._batch_end = now

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._eval_images = 0

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._eval_images = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx=0) -> None:
        self._eval_images += len(batch[0])

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx=0) -> None:
        self._eval_images += len(batch[0])

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        point = {"step": trainer.global_step, "epoch": trainer.current_epoch, "images": self._eval_images}
        self.validations.append(point | logged_metrics(trainer.callback_metrics, "val/"))

    def on_test_end(self, trainer, pl_module) -> None:
        self.test = {"images": self._eval_images} | logged_metrics(trainer.callback_metrics, "test/")

    def training_speed(self) -> tuple[float | None, float | None]:
        """Median seconds per step and images per second, after the warm-up steps."""
        skip = min(self.warmup_steps, len(self.step_seconds) // 2)
        steps, seconds = self.step_seconds[skip:], sum(self.batch_seconds[skip:])
        if not steps or seconds <= 0:
            return None, None
        return statistics.median(steps), sum(self.batch_sizes[skip:]) / seconds


def logged_metrics(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {key.removeprefix(prefix): float(value) for key, value in metrics.items() if key.startswith(prefix)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's thread count (oversubscribed threads slow small models by 10-100x)."""
    return (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, torch threads: {torch.get_num_threads()}"
    )


def peak_memory(device: torch.device) -> tuple[float, str]:
    """MB and what they are: CUDA's max allocated on a GPU, else this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    return peak_rss_mb(), "peak RSS"


def peak_rss_mb() -> float:
    """VmHWM, the peak of this process's own pages: ru_maxrss would start at the parent's after fork + exec."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@torch.inference_mode()
def inference_latency(
    models: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    images: torch.Tensor,
    rounds: int = 10,
    context: Callable[[], AbstractContextManager] = nullcontext,
    min_round_seconds: float = 0.05,
) -> dict[str, float]:
    """Median seconds per forward pass of each model on the same images.

    The models take turns round by round, so that machine noise hits all of them alike; within
    a round a model runs for at least ``min_round_seconds``, so that small models are timed over
    many calls rather than one."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(WARMUP_ROUNDS + max(rounds, 1)):
        for name, model in models.items():
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < min_round_seconds:
                with context():
                    model(images)
                synchronize(images.device)
                calls += 1
            if round_ >= WARMUP_ROUNDS:
                times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def serving_models(module: nn.Module, model: nn.Module) -> dict[str, nn.Module]:
    """The base (LoRA and prompt tokens removed), the trained module as it runs, and its merged form when it
    has LoRA (prompt tokens stay in a merged model)."""
    base = copy.deepcopy(model)
    if lora_modules(base):
        remove_lora(base)
    if prompt_config(base) is not None:
        remove_prompt_tokens(base)
    models = {"base": base, "unmerged": module}
    if lora_modules(model):
        models["merged"] = merge_lora(copy.deepcopy(model))
    return models


@torch.inference_mode()
def split_predictions(
    module: nn.Module, loader, context: Callable[[], AbstractContextManager] = nullcontext
) -> torch.Tensor:
    """The top-1 class of every image the loader yields, in its order, as the module evaluates them."""
    device = next(module.parameters()).device
    predicted = []
    for images, _ in loader:
        with context():
            predicted.append(module.evaluation_logits(images.to(device)).argmax(-1).cpu())
    return torch.cat(predicted)


def write_predictions(path: Path, samples: Sequence[tuple[Path, int]], predicted: torch.Tensor) -> None:
    """path,label,predicted per image: what paired statistics compare between methods, image by image."""
    if len(samples) != len(predicted):
        raise ValueError(f"{path}: {len(predicted)} predictions for {len(samples)} images.")
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "predicted"])
        writer.writerows((str(image), label, int(p)) for (image, label), p in zip(samples, predicted, strict=True))


def measure_method(
    result_path: Path, fit_args: list[str], latency_rounds: int = 10, resume_from: Path | None = None
) -> dict[str, Any]:
    """Trains one method as ``vitlora fit`` would with ``fit_args``, measures it, writes ``result_path``.

    ``resume_from``: the run's own last checkpoint, after an interruption; the fit goes on from there
    exactly, and the measurements the checkpoint kept (step times, validations, fit time, peak memory)
    carry on with it."""
    meter = TrainingMeasurements()
    if resume_from:  # from the checkpoint itself: also one that kept no measurements (an older vitlora's)
        meter.resumed_at_step = torch.load(resume_from, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    cli = build_cli(fit_args, run=False, callbacks=[meter])
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
    checkpoint = Path(last) if last else None
    if not meter.validations or meter.validations[-1]["step"] != trainer.global_step:
        trainer.validate(module, datamodule=data)  # training stopped between two validations
        if checkpoint:
            trainer.save_checkpoint(checkpoint)
    if not meter.validations:
        raise ValueError("No validation ran (is limit_val_batches 0?): a comparison scores every method on val.")
    if data.index.splits.get("test"):
        trainer.test(module, datamodule=data)
    device = trainer.strategy.root_device
    module.to(device).eval()
    for split in ("val", "test") if data.index.splits.get("test") else ("val",):
        loader = data.val_dataloader() if split == "val" else data.test_dataloader()
        predictions = split_predictions(module, loader, trainer.precision_plugin.forward_context)
        write_predictions(
            result_path.parent / PREDICTIONS_FILE.format(split=split), data.split_samples(split), predictions
        )

    notes, adapter = [], None
    if resume_from:
        notes.append(
            f"continued from {resume_from} at step {meter.resumed_at_step} after an interruption "
            + (
                "(its wall time counts the continuation only)"
                if meter.restored
                else "(its checkpoint kept no measurements: timings and the curve cover the continuation only)"
            )
        )
    if checkpoint and module.hparams.method != "full":  # LoRA, prompts, tuned biases, or a probe's head
        try:
            adapter = export_adapter(checkpoint, result_path.parent / "adapter.safetensors")
        except AdapterError as error:  # export refuses this kind of run: report it, keep the measurements
            notes.append(f"no adapter exported: {error}")

    images = next(iter(data.val_dataloader()))[0].to(device)
    latency = inference_latency(
        serving_models(module, module.model), images, latency_rounds, trainer.precision_plugin.forward_context
    )
    latency.setdefault("merged", latency["unmerged"])  # without LoRA the model is its own merged form

    parameters = count_parameters(module)
    final = meter.validations[-1]
    step_time, images_per_s = meter.training_speed()
    record = {
        "method": str(module.hparams.get("method", "")),
        "val": {k: v for k, v in final.items() if k not in ("step", "epoch", "images")},
        "val_images": int(final["images"]),
        "test": {k: v for k, v in meter.test.items() if k != "images"},
        "test_images": int(meter.test.get("images", 0)),
        "trainable": parameters.trainable,
        "total": parameters.total,
        "step_time_s": step_time,
        "images_per_s": images_per_s,
        "steps": len(meter.step_seconds),
        "peak_memory_mb": meter.peak_memory_mb,
        "memory_kind": meter.memory_kind,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_bytes": checkpoint.stat().st_size if checkpoint else None,
        "adapter": str(adapter) if adapter else None,
        "adapter_bytes": adapter.stat().st_size if adapter else None,
        "latency_s": latency,
        "latency_batch": len(images),
        "fit_s": meter.fit_seconds,
        "device": device_name(device),
        "curve": meter.validations,
        "notes": notes,
        "class_names": list(module.class_names),
    }
    with atomic_write(result_path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    result, rounds, *options = sys.argv[1:]
    del sys.argv[1:]  # LightningCLI takes its options from `options` alone
    resume_from = Path(options[1]) if options[:1] == ["--resume_from"] else None
    options = options[2:] if resume_from else options
    try:
        measure_method(Path(result), options, int(rounds), resume_from)
    except (ValueError, OSError, WeightsUnavailable) as error:  # vitlora's own checks: one line in the log
        raise SystemExit(f"vitlora compare: {error}") from error
