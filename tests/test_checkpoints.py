"""kill -9 loses at most a few steps: atomic checkpoint files, step checkpoints, exact resume inside an epoch."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_workspace
from lightning.fabric.plugins.io import torch_io

from vitlora import read_adapter
from vitlora.cli import main
from vitlora.training.checkpoints import AtomicCheckpointIO
from vitlora.training.export import export_adapter

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smoke.yaml"
EVERY_RANDOMNESS = [  # augmentation, mixup, LoRA dropout and drop-path: all must replay exactly
    "--data.auto_augment", "rand-m9-mstd0.5-inc1", "--data.mixup", "0.8",
    "--model.lora.dropout", "0.2", "--model.drop_path_rate", "0.1",
]  # fmt: skip


def fit(workspace: Path, name: str, *args: str) -> list[str]:
    """Two epochs of 6 steps (24 images, batch 4), last.ckpt refreshed every 2 steps."""
    return [
        "fit", "--config", str(RECIPE), "--data.root", str(workspace / "data"),
        "--model.weights", str(workspace / "base.safetensors"), "--trainer.max_epochs", "2",
        "--trainer.limit_train_batches", "null", "--checkpoint_every_n_steps", "2", *EVERY_RANDOMNESS,
        "--trainer.logger.init_args.save_dir", str(workspace / "runs"),
        "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "0", *args,
    ]  # fmt: skip


def last_checkpoint(workspace: Path, name: str) -> Path:
    return workspace / "runs" / name / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The workspace and the uninterrupted run every killed run must end up equal to."""
    root = make_workspace(tmp_path_factory.mktemp("kill"))
    main(fit(root, "whole"))
    return root


@pytest.mark.parametrize(
    ("kill_at", "resume_from"),
    [(9, (8, 1)), (7, (6, 0))],
    ids=["inside-epoch-1", "after-epoch-0-checkpoint"],
)
def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_uninterrupted_adapter(workspace, kill_at, resume_from):
    """Killed at step 9: resumes from the step-8 checkpoint, 2 of epoch 1's 6 batches done. Killed
    at step 7: from epoch 0's end-of-epoch checkpoint (step 6, written after validation)."""
    kill_and_resume(workspace, f"killed_at_{kill_at}", kill_at, resume_from, "whole")


def test_a_killed_run_with_weight_averaging_resumes_to_the_uninterrupted_average(workspace):
    """The step-8 checkpoint holds the average of steps 1-8 and the trained weights of step 8."""
    main(fit(workspace, "whole_ema", "--model.ema_decay", "0.9"))
    kill_and_resume(workspace, "killed_ema", 9, (8, 1), "whole_ema", "--model.ema_decay", "0.9")


def kill_and_resume(workspace: Path, name: str, kill_at: int, resume_from: tuple[int, int], whole: str, *args: str):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    killed = subprocess.run(
        [sys.executable, "-m", "vitlora.cli", *fit(workspace, name, *args),
         "--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step", str(kill_at)],
        cwd=workspace, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoint = torch.load(last_checkpoint(workspace, name), weights_only=True)
    assert (checkpoint["global_step"], checkpoint["epoch"]) == resume_from

    main(fit(workspace, name, *args, "--ckpt_path", str(last_checkpoint(workspace, name))))
    assert torch.load(last_checkpoint(workspace, name), weights_only=True)["global_step"] == 12
    adapters = {
        run: read_adapter(export_adapter(last_checkpoint(workspace, run), workspace / f"{run}.safetensors"))
        for run in (name, whole)
    }
    assert any("lora_B" in key for key in adapters[whole].tensors)
    torch.testing.assert_close(adapters[name].tensors, adapters[whole].tensors, atol=1e-6, rtol=0)


def test_last_checkpoint_holds_the_final_step_when_the_last_validation_did_not_improve(workspace):
    """Steps saved every 5 (5, 10) and on epoch 0's better val (6); with lr 0 epoch 1's val is no
    better, so Lightning alone leaves last.ckpt at step 10 of 12."""
    main(fit(workspace, "no_gain", "--checkpoint_every_n_steps", "5", "--model.lr", "0"))
    folder = last_checkpoint(workspace, "no_gain").parent
    assert sorted(path.name for path in folder.iterdir()) == ["best-epoch=0-step=6.ckpt", "last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 12


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def dies_midway(checkpoint, target):
        Path(target).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # what a kill looks like from inside: the write never finishes

    monkeypatch.setattr(torch_io, "_atomic_save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
