"""DDP on CPU: 2 processes (gloo) through the `vitlora` command train exactly what one process trains.

The DDP runs are `python -m vitlora.cli ... --trainer.strategy ddp --trainer.devices 2` in a
subprocess (Lightning relaunches that command for rank 1, so pytest itself is never re-run);
each rank saves its trainable weights through tests/rank_weights.py. The one-process runs use
the same command in-process with the same global batch.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_grocery_folder, make_workspace
from safetensors.torch import load_file

from vitlora import read_adapter
from vitlora.cli import main
from vitlora.training.export import export_adapter

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smoke.yaml"
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
TOLERANCE = {"atol": 1e-6, "rtol": 1e-4}  # measured differences are ~2e-7: summation order only


def command(workspace: Path, stage: str, name: str, *args: str) -> list[str]:
    return [
        stage, "--config", str(RECIPE), "--data.root", str(workspace / "data"),
        "--model.weights", str(workspace / "base.safetensors"),
        "--trainer.logger.init_args.save_dir", str(workspace / "runs"),
        "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "0", *args,
    ]  # fmt: skip


def fit(workspace: Path, name: str, batch: int, *args: str) -> list[str]:
    """Two epochs of 24 images: 6 optimizer steps each at a global batch of 4."""
    return command(
        workspace, "fit", name, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "null",
        "--data.batch_size", str(batch), "--trainer.callbacks+=rank_weights.SaveTrainableWeightsPerRank",
        "--trainer.callbacks.folder", str(workspace / "weights" / name), *args,
    )  # fmt: skip


def in_subprocess(workspace: Path, argv: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("MASTER_PORT", None)  # Lightning picks a free port
    done = subprocess.run(
        [sys.executable, "-m", "vitlora.cli", *argv],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode:
        pytest.fail(f"vitlora {' '.join(argv[:1])} under DDP failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    make_workspace(root)
    # the same 3 classes' images in the Grocery layout, two of them in one coarse class
    apples = (("Granny-Smith", "Apple"), ("Pink-Lady", "Apple"), ("Banana", "Banana"))
    make_grocery_folder(root / "grocery", apples, per_split={"train": 2, "val": 3, "test": 3})
    in_subprocess(root, fit(root, "ddp", 2, *DDP))  # 2 ranks x batch 2
    main(fit(root, "single", 4))  # the same global batch in one process
    main(fit(root, "rank_batch", 2))  # one process with only one rank's batch: must differ
    return root


def weights(workspace: Path, name: str, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(workspace / "weights" / name / f"rank{rank}.safetensors")


def test_ddp_trains_the_same_weights_on_every_rank_as_one_process_with_the_global_batch(workspace):
    rank0, rank1 = weights(workspace, "ddp", 0), weights(workspace, "ddp", 1)
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    single = weights(workspace, "single")
    assert rank0.keys() == single.keys() and any("lora_B" in key for key in rank0)
    torch.testing.assert_close(rank0, single, **TOLERANCE)
    rank_batch = weights(workspace, "rank_batch")
    assert max((rank_batch[k] - single[k]).abs().max() for k in single) > 1000 * TOLERANCE["atol"]


def test_rank_zero_alone_writes_the_run_and_its_checkpoint_exports_the_same_adapter(workspace):
    run = workspace / "runs" / "ddp"
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert [f for f in files if not f.startswith("version_0/events.out.tfevents")] == [
        "version_0/checkpoints/best-epoch=0-step=6.ckpt",
        "version_0/checkpoints/last.ckpt",
        "version_0/config.yaml",
        "version_0/hparams.yaml",
        "version_0/metrics.csv",
        "version_0/training_curves.png",
    ]
    assert len(files) == 7  # one events file: rank 1 logs nothing
    adapters = {
        name: read_adapter(
            export_adapter(
                workspace / "runs" / name / "version_0" / "checkpoints" / "last.ckpt",
                workspace / f"{name}.safetensors",
            )
        )
        for name in ("ddp", "single")
    }
    torch.testing.assert_close(adapters["ddp"].tensors, adapters["single"].tensors, **TOLERANCE)
    assert adapters["ddp"].base_fingerprint == adapters["single"].base_fingerprint


def test_ddp_predict_writes_one_file_in_loader_order(workspace):
    checkpoint = str(workspace / "runs" / "single" / "version_0" / "checkpoints" / "last.ckpt")
    in_subprocess(workspace, command(workspace, "predict", "predict_ddp", "--ckpt_path", checkpoint, *DDP))
    main(command(workspace, "predict", "predict_single", "--ckpt_path", checkpoint))
    rows = {
        name: list(csv.DictReader((workspace / "runs" / name / "version_0" / "predictions.csv").open()))
        for name in ("predict_ddp", "predict_single")
    }
    assert len(rows["predict_single"]) == 9
    assert [r["path"] for r in rows["predict_ddp"]] == [r["path"] for r in rows["predict_single"]]
    for ddp_row, single_row in zip(rows["predict_ddp"], rows["predict_single"], strict=True):
        assert ddp_row["label_1"] == single_row["label_1"]
        assert float(ddp_row["prob_1"]) == pytest.approx(float(single_row["prob_1"]), abs=1e-5)


def logged_metrics(workspace: Path, name: str) -> dict[str, float]:
    rows = csv.DictReader((workspace / "runs" / name / "version_0" / "metrics.csv").open())
    return {key: float(value) for row in rows for key, value in row.items() if value and key != "step"}


@pytest.mark.parametrize("data", ["data", "grocery"])
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_ddp_evaluation_counts_every_image_once_like_one_process(workspace, stage, data):
    """9 images on 2 ranks in batches of 2: shares of 5 and 4 images, 3 and 2 batches, no padded repeats.
    On the Grocery layout the coarse-class metrics too."""
    checkpoint = str(workspace / "runs" / "single" / "version_0" / "checkpoints" / "last.ckpt")
    args = ("--ckpt_path", checkpoint, "--data.batch_size", "2", "--trainer.limit_val_batches", "null")
    args += ("--data.root", str(workspace / data))
    name = f"{stage}_{data}"
    in_subprocess(workspace, command(workspace, stage, f"{name}_ddp", *args, *DDP))
    main(command(workspace, stage, f"{name}_single", *args))
    ddp, single = logged_metrics(workspace, f"{name}_ddp"), logged_metrics(workspace, f"{name}_single")
    split = "val" if stage == "validate" else "test"
    assert {f"{split}/top1", f"{split}/macro_f1"} <= single.keys() == ddp.keys()
    assert (f"{split}/coarse_top1" in single) == (data == "grocery")
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, abs=1e-6, rel=0), key
    if stage == "test":
        for report in ("per_class_accuracy.csv", "coarse_per_class_accuracy.csv")[: 1 + (data == "grocery")]:
            rows = {
                run: list(csv.DictReader((workspace / "runs" / f"{name}_{run}" / "version_0" / report).open()))
                for run in ("ddp", "single")
            }
            assert sum(int(row["support"]) for row in rows["single"]) == 9
            assert rows["ddp"] == rows["single"]
