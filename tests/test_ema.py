from pathlib import Path

import pytest
import torch
from conftest import make_workspace
from lightning.pytorch.callbacks import Callback

from vitlora.training.ema import TrainableAverage, ema_decay_at
from vitlora.training.lightning_cli import build_cli

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"


def test_the_decay_ramps_up_from_a_tenth_then_holds():
    assert ema_decay_at(0.998, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.998, 90) == pytest.approx(0.91)
    assert ema_decay_at(0.998, 100_000) == 0.998


def test_the_average_follows_the_recursion_and_swapping_twice_restores_both():
    weight = torch.nn.Parameter(torch.zeros(3))
    average = TrainableAverage([("w", weight)], decay=0.5)
    expected = torch.zeros(3)
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        with torch.no_grad():
            weight.fill_(value)
        average.update(step)
        expected += (1 - ema_decay_at(0.5, step - 1)) * (value - expected)
        torch.testing.assert_close(average.averages()["w"], expected)
    average.swap()
    torch.testing.assert_close(weight.detach(), expected)
    assert torch.equal(average.averages()["w"], torch.full((3,), 8.0))
    average.swap()
    assert torch.equal(weight.detach(), torch.full((3,), 8.0))


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_a_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match="ema_decay must lie strictly between 0 and 1"):
        TrainableAverage([("w", torch.nn.Parameter(torch.zeros(1)))], decay)


class TrainedWeights(Callback):
    """The trained tensors after every optimizer step (callbacks run after the module's step)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []  # [0]: before the first step

    def record(self, pl_module) -> None:
        trained = {f"model.{n}": p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad}
        self.steps.append(trained)

    def on_train_start(self, trainer, pl_module) -> None:
        self.record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record(pl_module)


class StopAfterFirstEpoch(Callback):
    """Ends fit after epoch 0 on the two-epoch schedule, as an interrupted run would."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def fit_with_ema(root: Path, *args: str, stop_early: bool = False):
    recorder = TrainedWeights()
    cli = build_cli(
        [
            "fit", "--config", str(RECIPE), "--data.root", str(root / "data"),
            "--model.weights", str(root / "base.safetensors"), "--model.ema_decay", "0.8",
            "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "null",
            "--trainer.logger.init_args.save_dir", str(root / "runs"), *args,
        ],
        callbacks=[recorder, *([StopAfterFirstEpoch()] if stop_early else [])],
    )  # fmt: skip
    return cli, recorder.steps


def test_training_ends_validates_and_checkpoints_with_the_average_of_the_trained_weights(tmp_path):
    root = make_workspace(tmp_path)
    cli, steps = fit_with_ema(root)
    assert len(steps) == 1 + 12  # two epochs of 6 batches
    average = steps[0]
    for step, trained in enumerate(steps[1:], start=1):
        weight = 1 - ema_decay_at(0.8, step - 1)
        average = {key: value + weight * (trained[key] - value) for key, value in average.items()}
    swapped_out = cli.model.ema.averages()  # at the end the buffers hold the last trained weights
    assert torch.equal(swapped_out["model.head.weight"], steps[-1]["model.head.weight"])
    model = dict(cli.model.state_dict())
    for key in average:
        torch.testing.assert_close(model[key], average[key], atol=1e-6, rtol=0)
    assert not torch.allclose(model["model.head.weight"], steps[-1]["model.head.weight"])  # not a no-op

    last = cli.trainer.checkpoint_callback.last_model_path
    checkpoint = torch.load(last, weights_only=True)
    for key in average:
        torch.testing.assert_close(checkpoint["state_dict"][key], average[key], atol=1e-6, rtol=0)
        torch.testing.assert_close(checkpoint["vitlora"]["trained_weights"][key], steps[-1][key], atol=0, rtol=0)
    after = tmp_path / "after_fit.ckpt"  # saved once fit has swapped the average in (vitlora compare does)
    cli.trainer.save_checkpoint(after)
    for key, tensor in torch.load(after, weights_only=True)["state_dict"].items():
        assert torch.equal(tensor, checkpoint["state_dict"][key]), key
    for key, tensor in torch.load(after, weights_only=True)["vitlora"]["trained_weights"].items():
        assert torch.equal(tensor, checkpoint["vitlora"]["trained_weights"][key]), key
    logged = cli.trainer.callback_metrics["val/loss"].item()
    again = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=last, verbose=False)[0]
    assert again["val/loss"] == pytest.approx(logged, abs=1e-6)  # what fit validated is what the checkpoint holds


def test_resuming_trains_on_from_the_trained_weights_and_keeps_averaging(tmp_path):
    root = make_workspace(tmp_path)
    whole, _ = fit_with_ema(root, "--trainer.logger.init_args.name", "whole")
    first, _ = fit_with_ema(root, "--trainer.logger.init_args.name", "half", stop_early=True)
    half = first.trainer.checkpoint_callback.last_model_path
    resumed, steps = fit_with_ema(root, "--trainer.logger.init_args.name", "half", "--ckpt_path", half)
    assert len(steps) == 1 + 6
    end = {key: whole.model.state_dict()[key] for key in steps[0]}
    for key, tensor in end.items():
        torch.testing.assert_close(resumed.model.state_dict()[key], tensor, atol=1e-6, rtol=0)


def resume_as(cli, checkpoint: str, **changes):
    """Resumes ``cli``'s run from ``checkpoint`` with a module whose options differ by ``changes``
    (through the Python API: on the command line, LightningCLI restores the checkpoint's options)."""
    import lightning as L

    from vitlora.training.module import ImageClassifier

    recorder = TrainedWeights()
    options = {key: value for key, value in cli.model.hparams.items() if not key.startswith("_")}
    module = ImageClassifier(**{**options, **changes})
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[recorder], default_root_dir=Path(checkpoint).parent,
    )  # fmt: skip
    trainer.fit(module, datamodule=cli.datamodule, ckpt_path=checkpoint)
    return module, recorder.steps


def test_resuming_with_the_average_turned_off_trains_on_from_the_trained_weights(tmp_path):
    root = make_workspace(tmp_path)
    first, _ = fit_with_ema(root, stop_early=True)
    half = first.trainer.checkpoint_callback.last_model_path
    checkpoint = torch.load(half, weights_only=True)
    trained, averaged = checkpoint["vitlora"]["trained_weights"], checkpoint["state_dict"]
    assert not torch.equal(averaged["model.head.weight"], trained["model.head.weight"])
    resumed, steps = resume_as(first, half, ema_decay=0.0)
    assert resumed.ema is None and len(steps) == 1 + 6
    for key, tensor in trained.items():
        assert torch.equal(steps[0][key], tensor), key  # not the average the checkpoint's state_dict holds


def test_turning_the_average_on_when_resuming_starts_it_at_the_checkpoints_weights(tmp_path):
    root = make_workspace(tmp_path)
    plain, _ = fit_with_ema(root, "--model.ema_decay", "0", stop_early=True)
    half = plain.trainer.checkpoint_callback.last_model_path
    saved = torch.load(half, weights_only=True)["state_dict"]
    resumed, steps = resume_as(plain, half, ema_decay=0.8)
    average = {key: saved[key] for key in steps[0]}
    for key in average:
        assert torch.equal(steps[0][key], saved[key])
    for step, trained in enumerate(steps[1:], start=7):  # steps 7..12 fold into an average that starts there
        weight = 1 - ema_decay_at(0.8, step - 1)
        average = {key: value + weight * (trained[key] - value) for key, value in average.items()}
    for key, tensor in average.items():
        torch.testing.assert_close(resumed.state_dict()[key], tensor, atol=1e-6, rtol=0)
