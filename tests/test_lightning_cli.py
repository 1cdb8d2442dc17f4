import pytest
import torch
from conftest import TINY, make_workspace

from vitlora.training import lightning_cli
from vitlora.training.lightning_cli import build_cli, native_precision


@pytest.mark.parametrize(
    ("precision", "accelerator", "cpu_bf16", "cuda", "expected"),
    [
        ("bf16-mixed", "cpu", False, False, "32-true"),  # emulated bf16: ~20x slower, so float32
        ("bf16-true", "auto", False, False, "32-true"),
        ("bf16-mixed", "cpu", True, False, "bf16-mixed"),  # AVX512-BF16 / AMX: native, kept
        ("bf16-mixed", "auto", False, True, "bf16-mixed"),  # auto picks the GPU
        ("bf16-mixed", "gpu", False, False, "bf16-mixed"),  # not ours to second-guess
        ("16-mixed", "cpu", False, False, "16-mixed"),
        ("32-true", "cpu", False, False, "32-true"),
    ],
)
def test_bf16_falls_back_to_float32_only_on_a_cpu_that_would_emulate_it(
    monkeypatch, precision, accelerator, cpu_bf16, cuda, expected
):
    monkeypatch.setattr(lightning_cli, "cpu_has_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert native_precision(precision, accelerator) == expected


def test_the_trainer_gets_the_fallback_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lightning_cli, "cpu_has_bf16", lambda: False)
    workspace = make_workspace(tmp_path)
    model_kwargs = "{" + ", ".join(f"{key}: {value}" for key, value in TINY.items()) + "}"
    args = [
        "--data.root", str(workspace / "data"), "--model.backbone", "vit_tiny_patch16_224",
        "--model.pretrained", "false", "--model.img_size", "32", "--model.model_kwargs", model_kwargs,
        "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed", "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    cli = build_cli(args, run=False)
    assert cli.trainer.precision == "32-true"
    assert "no bf16 instructions" in capsys.readouterr().err
