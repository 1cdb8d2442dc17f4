"""End to end through the `vitlora` command on a tiny generated image folder (CPU, seconds)."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import TINY, make_grocery_folder, make_image_folder, make_workspace
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from vitlora import LoRAConfig, load_adapter, read_adapter
from vitlora.backbone import create_backbone
from vitlora.cli import COMMANDS, main
from vitlora.datasets import eval_transform
from vitlora.images import load_rgb
from vitlora.training.module import ImageClassifier

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_workspace(root)
    return root


def run(workspace, *args, method="lora", name="lora", options=()):
    """``options`` come after the recipe, so they override it."""
    main([
        *args, "--config", str(RECIPE), "--data.root", str(workspace / "data"),
        "--model.method", method, "--model.weights", str(workspace / "base.safetensors"),
        "--trainer.logger.init_args.save_dir", str(workspace / "runs"),
        "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "0", *options,
    ])  # fmt: skip
    return workspace / "runs" / name / "version_0"


@pytest.fixture(scope="module")
def lora_run(workspace):
    return run(workspace, "fit")


@pytest.mark.parametrize("method", ["full", "linear"])
def test_fit_other_methods(workspace, method):
    folder = run(workspace, "fit", method=method, name=method)
    assert (folder / "checkpoints" / "last.ckpt").is_file()


def test_fit_saves_config_logs_and_a_small_checkpoint(lora_run):
    assert (lora_run / "config.yaml").is_file()
    assert "model.lora.rank" in (lora_run / "config.yaml").read_text().replace("\n    rank", " model.lora.rank")
    assert list(lora_run.glob("events.out.tfevents.*"))
    rows = list(csv.DictReader((lora_run / "metrics.csv").read_text().splitlines()))
    assert any(row.get("val/top1") for row in rows)
    checkpoint = torch.load(lora_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all("lora_" in key or key.startswith("model.head.") for key in checkpoint["state_dict"])


def test_validate_and_test_from_the_checkpoint(workspace, lora_run):
    ckpt = str(lora_run / "checkpoints" / "last.ckpt")
    run(workspace, "validate", "--ckpt_path", ckpt, name="validate")
    folder = run(workspace, "test", "--ckpt_path", ckpt, name="test")
    assert (folder / "confusion_matrix.png").is_file() and (folder / "per_class_accuracy.csv").is_file()


def test_a_checkpoint_keeps_its_model_settings_and_says_which_asked_ones_it_ignores(workspace, lora_run, capsys):
    """Lightning applies the checkpoint's hyperparameters over the command line; vitlora names the casualties."""
    ckpt = str(lora_run / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    same_file = ("--model.weights", os.path.relpath(workspace / "base.safetensors"))  # the checkpoint's is absolute
    run(workspace, "validate", "--ckpt_path", ckpt, name="validate_same", options=same_file)
    assert "ignored" not in capsys.readouterr().err  # the recipe's own settings: nothing overridden
    run(workspace, "validate", "--ckpt_path", ckpt, name="validate_other", options=("--model.lr", "0.5"))
    notes = [line for line in capsys.readouterr().err.splitlines() if "keeps the model settings" in line]
    trained_lr = torch.load(ckpt, weights_only=True)["hyper_parameters"]["lr"]
    assert notes == [
        f"note: {ckpt} keeps the model settings it was trained with; ignored: model.lr=0.5 (checkpoint: {trained_lr})"
    ]


def test_how_a_checkpoint_is_scored_is_the_users_choice(workspace, lora_run, capsys):
    """--model.tta and --model.explain_worst change no weight: on `vitlora test --ckpt_path` they win."""
    ckpt = str(lora_run / "checkpoints" / "last.ckpt")
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["explain_worst"] == 0
    scoring = ("--model.explain_worst", "2", "--model.tta", "flip")
    folder = run(workspace, "test", "--ckpt_path", ckpt, name="test_explained", options=scoring)
    assert "ignored" not in capsys.readouterr().err
    assert len(list((folder / "explanations").glob("*.png"))) == 2
    assert yaml.safe_load((folder / "hparams.yaml").read_text())["tta"] == "flip"


def logged_metrics(folder: Path) -> dict[str, float]:
    """Every metric a run folder's metrics.csv holds (the last value of each)."""
    return {k: float(v) for row in csv.DictReader((folder / "metrics.csv").open()) for k, v in row.items() if v}


def grocery_test_by_hand(ckpt: Path, grocery: Path) -> tuple[ImageClassifier, torch.Tensor, torch.Tensor]:
    """The checkpoint's model, the Grocery folder's test images as the model sees them, and their coarse labels."""
    module = ImageClassifier.load_from_checkpoint(ckpt, weights_only=True).eval()
    transform = eval_transform("vit_tiny_patch16_224", 32)
    lines = [line.split(", ") for line in (grocery / "test.txt").read_text().splitlines()]
    images = torch.stack([transform(load_rgb(grocery / path)) for path, _, _ in lines])
    return module, images, torch.tensor([int(coarse) for _, _, coarse in lines])


def test_grocery_layout_test_reports_coarse_top1_from_the_fine_model(workspace, capsys):
    """Fit and `vitlora test --ckpt_path` on a tiny Grocery-layout folder: 4 fine classes, 3 coarse."""
    grocery = make_grocery_folder(workspace / "grocery")
    fit = run(workspace, "fit", name="grocery", options=("--data.root", str(grocery)))
    assert "val/coarse_top1" in capsys.readouterr().out  # the epoch line
    ckpt = fit / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["fine_to_coarse"] == [0, 0, 1, 2]
    assert "fine_to_coarse" not in (fit / "config.yaml").read_text()  # linked from the data, like class_names
    folder = run(
        workspace, "test", "--ckpt_path", str(ckpt), name="grocery_test", options=("--data.root", str(grocery))
    )
    assert "test/coarse_top1" in capsys.readouterr().out
    logged = logged_metrics(folder)

    # by hand: the checkpoint's fine prediction of each test image, mapped to its coarse class
    module, images, truth = grocery_test_by_hand(ckpt, grocery)
    with torch.no_grad():
        predicted = module(images).argmax(-1)
    right = torch.tensor([0, 0, 1, 2])[predicted] == truth
    assert logged["test/coarse_top1"] == pytest.approx(right.float().mean().item(), abs=1e-6)
    rows = list(csv.DictReader((folder / "coarse_per_class_accuracy.csv").open()))
    assert [(row["class"], int(row["support"])) for row in rows] == [("Apple", 6), ("Banana", 3), ("Milk", 3)]


def test_a_coarse_head_trains_beside_the_fine_one_and_test_scores_it(workspace, capsys, tmp_path):
    grocery = make_grocery_folder(workspace / "grocery_coarse_head")
    head = ("--data.root", str(grocery), "--model.coarse_head_weight", "0.5")
    fit = run(workspace, "fit", name="coarse_head", options=head)
    assert "+ coarse" in capsys.readouterr().out  # the parameter table counts the training head
    ckpt = fit / "checkpoints" / "last.ckpt"
    assert {"coarse_head.weight", "coarse_head.bias"} <= set(torch.load(ckpt, weights_only=True)["state_dict"])
    folder = run(workspace, "test", "--ckpt_path", str(ckpt), name="coarse_head_test", options=head[:2])
    logged = logged_metrics(folder)

    module, images, truth = grocery_test_by_hand(ckpt, grocery)
    with torch.no_grad():
        fine, coarse = module.fine_and_coarse_logits(images)
    assert logged["test/coarse_head_top1"] == pytest.approx(
        (coarse.argmax(-1) == truth).float().mean().item(), abs=1e-6
    )
    mapped = torch.tensor([0, 0, 1, 2])[fine.argmax(-1)]
    assert logged["test/coarse_top1"] == pytest.approx((mapped == truth).float().mean().item(), abs=1e-6)

    adapter = tmp_path / "adapter.safetensors"  # the adapter serves the fine head alone
    main(["export", "--ckpt_path", str(ckpt), "--output", str(adapter)])
    assert not [key for key in load_file(adapter) if "coarse" in key]
    plain = create_backbone("vit_tiny_patch16_224", 1000, weights=workspace / "base.safetensors", img_size=32, **TINY)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_adapter(plain, adapter).eval()(x), module(x))  # the fine head, as trained


def test_a_coarse_head_without_coarse_classes_is_refused_in_one_line(workspace):
    with pytest.raises(SystemExit, match=r"^vitlora fit: [^\n]*coarse_head_weight needs coarse classes[^\n]*$"):
        run(workspace, "fit", name="no_coarse", options=("--model.coarse_head_weight", "0.5"))


@pytest.fixture(scope="module")
def fruit_adapter(workspace, lora_run):
    adapter_path = workspace / "fruit.safetensors"
    main(["export", "--ckpt_path", str(lora_run / "checkpoints" / "last.ckpt"), "--output", str(adapter_path)])
    return adapter_path


def test_export_gives_an_adapter_that_reproduces_the_module(workspace, lora_run, fruit_adapter):
    ckpt = lora_run / "checkpoints" / "last.ckpt"
    adapter_path = fruit_adapter
    adapter = read_adapter(adapter_path)
    assert adapter.class_names == ["apple", "banana", "cherry"] and adapter.config.rank == 4
    module = ImageClassifier.load_from_checkpoint(ckpt, weights_only=True).eval()
    plain = create_backbone("vit_tiny_patch16_224", 1000, weights=workspace / "base.safetensors", img_size=32, **TINY)
    model = load_adapter(plain, adapter_path).eval()
    x = val_images(workspace)
    assert torch.equal(model(x), module(x))


def test_dora_and_lora_plus_options_fit_and_export(workspace):
    options = ("--model.lora.use_dora", "true", "--model.lora_plus_ratio", "4")
    folder = run(workspace, "fit", name="dora", options=options)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"]["lora"]["use_dora"] is True and config["model"]["lora_plus_ratio"] == 4.0
    ckpt = folder / "checkpoints" / "last.ckpt"
    adapter_path = workspace / "dora.safetensors"
    main(["export", "--ckpt-path", str(ckpt), "--output", str(adapter_path)])  # either spelling
    assert read_adapter(adapter_path).config.use_dora is True
    module = ImageClassifier.load_from_checkpoint(ckpt, weights_only=True).eval()
    plain = create_backbone("vit_tiny_patch16_224", 1000, weights=workspace / "base.safetensors", img_size=32, **TINY)
    model = load_adapter(plain, adapter_path).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(x), module(x))


def val_images(workspace):
    transform = eval_transform("vit_tiny_patch16_224", 32)
    return torch.stack([transform(load_rgb(p)) for p in sorted((workspace / "data" / "val").rglob("*.png"))])


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("lora", ["--model.prompt.num_tokens", "4", "--model.prompt.deep", "true", "--model.bias_tuning", "true"]),
        ("linear", ["--model.prompt.num_tokens", "2"]),
    ],
    ids=["lora+deep_prompt+bias", "linear+prompt"],
)
def test_prompt_and_bias_options_train_export_and_reload(workspace, method, options):
    name = f"{method}_prompt"
    folder = run(workspace, "fit", method=method, name=name, options=options)
    ckpt = folder / "checkpoints" / "last.ckpt"
    assert any(".prompt.tokens" in key for key in torch.load(ckpt, weights_only=True)["state_dict"])
    adapter_path = workspace / f"{name}.safetensors"
    main(["export", "--ckpt_path", str(ckpt), "--output", str(adapter_path)])
    adapter = read_adapter(adapter_path)
    assert adapter.prompt.num_tokens == int(options[1]) and adapter.bias_tuning == ("--model.bias_tuning" in options)
    assert (adapter.config is None) == (method == "linear")
    module = ImageClassifier.load_from_checkpoint(ckpt, weights_only=True).eval()
    plain = create_backbone("vit_tiny_patch16_224", 1000, weights=workspace / "base.safetensors", img_size=32, **TINY)
    model = load_adapter(plain, adapter_path).eval()
    assert torch.equal(model(val_images(workspace)), module(val_images(workspace)))


def test_a_full_run_has_no_adapter_to_export(workspace):
    ckpt = workspace / "runs" / "full" / "version_0" / "checkpoints" / "last.ckpt"
    if not ckpt.exists():  # test_fit_other_methods made it already
        run(workspace, "fit", method="full", name="full")
    with pytest.raises(SystemExit, match="'full' run trains every weight"):
        main(["export", "--ckpt_path", str(ckpt), "--output", str(workspace / "full.safetensors")])


def test_classify_writes_top_k_and_reports_unreadable_images(workspace, fruit_adapter, capsys):
    adapter_path = fruit_adapter
    broken = workspace / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    for suffix, top_k in (("csv", "--top-k"), ("json", "--top_k")):  # both spellings
        out = workspace / f"preds.{suffix}"
        main(["classify", str(adapter_path), str(workspace / "data" / "test"), str(broken),
              "--output", str(out), "--weights", str(workspace / "base.safetensors"), top_k, "2"])  # fmt: skip
        captured = capsys.readouterr()
        assert captured.err.splitlines() == [f"vitlora classify: skipped {broken}: not a recognised image format"]
        assert captured.out.strip() == f"wrote {out}: 9 of 10 images classified, 1 unreadable"
        rows = json.loads(out.read_text()) if suffix == "json" else list(csv.DictReader(out.read_text().splitlines()))
        assert len(rows) == 10
        good = [r for r in rows if not r["error"]]
        assert len(good) == 9 and "broken.jpg" in rows[-1]["path"] and rows[-1]["error"]
        first = good[0]
        labels = first["labels"] if suffix == "json" else [first["label_1"], first["label_2"]]
        assert set(labels) <= {"apple", "banana", "cherry"} and len(set(labels)) == 2


def test_merge_writes_a_plain_timm_model_that_matches_the_adapter(workspace, fruit_adapter, capsys):
    out = workspace / "deploy" / "fruit-model.safetensors"
    out.parent.mkdir()
    main(["merge", str(fruit_adapter), "--output", str(out), "--weights", str(workspace / "base.safetensors")])
    assert f"wrote {out}" in capsys.readouterr().out
    with safe_open(out, "pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["class_names"]) == ["apple", "banana", "cherry"]
    deployed = timm.create_model(meta["model_name"], num_classes=3, **json.loads(meta["model_kwargs"]))
    deployed.load_state_dict(load_file(out), strict=True)
    plain = create_backbone("vit_tiny_patch16_224", 1000, weights=workspace / "base.safetensors", img_size=32, **TINY)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(deployed.eval()(x), load_adapter(plain, fruit_adapter).eval()(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["merge", "{w}/nope.safetensors", "--output", "{w}/m.safetensors"],
            r"nope\.safetensors: no such adapter file",
        ),
        (["merge", "{w}/fruit.safetensors", "--output", "{w}/no/m.safetensors"], r"output folder .*no does not exist"),
        (["merge", "{w}/fruit.safetensors", "--output", "{w}/m.safetensors", "--format", "onnx"], r"end in \.onnx"),
        (["inspect", "{w}/base.safetensors"], r"base\.safetensors: not a vitlora adapter"),
        (["inspect", "{w}/fruit.safetensors", "--plot", "{w}/no/u.png"], r"output folder .*no does not exist"),
    ],
)
def test_merge_and_inspect_exit_with_the_file_and_the_problem(workspace, fruit_adapter, args, message):
    before = sorted(workspace.iterdir())
    with pytest.raises(SystemExit, match=f"vitlora {args[0]}: .*{message}"):
        main([arg.format(w=workspace) for arg in args])
    assert sorted(workspace.iterdir()) == before


def test_merge_rejects_an_unknown_format(workspace, fruit_adapter):
    with pytest.raises(SystemExit, match=r"^vitlora merge: .*m\.tflite: unknown format 'tflite'; choose one of"):
        main(["merge", str(fruit_adapter), "--output", str(workspace / "m.tflite"), "--format", "tflite"])


def test_merge_takes_the_format_from_the_output_suffix(workspace, fruit_adapter, monkeypatch):
    import vitlora.merge

    calls = []

    def merge_adapter(adapter, output, **options):
        calls.append(options["format"])
        return fruit_adapter  # stands in for the written file

    monkeypatch.setattr(vitlora.merge, "merge_adapter", merge_adapter)
    for suffix in ("onnx", "safetensors"):
        main(["merge", str(fruit_adapter), "--output", str(workspace / f"m.{suffix}")])
    assert calls == ["onnx", "safetensors"]


def test_inspect_prints_the_summary_and_writes_the_heatmap(workspace, fruit_adapter, capsys):
    main(["inspect", str(fruit_adapter), "--plot", str(workspace / "updates.png")])
    out = capsys.readouterr().out
    assert "classes    3: apple, banana, cherry" in out and "rank 4, alpha 8, scaling 2, targets q,v" in out
    assert [line.split()[:2] for line in out.splitlines() if line[:5].strip().isdigit()] == [
        ["0", "q"], ["0", "v"], ["1", "q"], ["1", "v"],
    ]  # fmt: skip
    assert Image.open(workspace / "updates.png").size[1] >= 360


def test_convert_to_peft_and_back(workspace, lora_run, tmp_path):
    """A trained adapter -> PEFT folder (PEFT gives its logits) -> vitlora file with the same tensors and classes."""
    peft = pytest.importorskip("peft")
    adapter_path, base = tmp_path / "fruit.safetensors", str(workspace / "base.safetensors")
    main(["export", "--ckpt_path", str(lora_run / "checkpoints" / "last.ckpt"), "--output", str(adapter_path)])
    main(["convert", str(adapter_path), str(tmp_path / "fruit-peft"), "--weights", base])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = create_backbone("vit_tiny_patch16_224", 3, weights=base, img_size=32, **TINY).eval()
    expected = load_adapter(plain, adapter_path)(x)
    timm_model = create_backbone("vit_tiny_patch16_224", 3, weights=base, img_size=32, **TINY)
    logits = peft.PeftModel.from_pretrained(timm_model, tmp_path / "fruit-peft").eval()(x)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    main(["convert", str(tmp_path / "fruit-peft"), str(tmp_path / "back.safetensors"), "--weights", base])
    original, back = read_adapter(adapter_path), read_adapter(tmp_path / "back.safetensors")
    assert (back.config, back.class_names, back.model_name) == (
        original.config,
        original.class_names,
        original.model_name,
    )
    assert back.metadata["model_kwargs"] == original.metadata["model_kwargs"]
    assert back.tensors.keys() == original.tensors.keys()
    assert all(torch.equal(back.tensors[key], tensor) for key, tensor in original.tensors.items())


def test_convert_names_what_is_missing(workspace, tmp_path):
    peft = pytest.importorskip("peft")
    model = create_backbone("vit_tiny_patch16_224", 3, weights=workspace / "base.safetensors", img_size=32, **TINY)
    config = peft.LoraConfig(r=2, target_modules=["blocks.0.attn.qkv"], modules_to_save=["head"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "peft")
    with pytest.raises(SystemExit, match=r"peft: records no timm model name: pass --model NAME"):
        main(["convert", str(tmp_path / "peft"), str(tmp_path / "out.safetensors")])
    with pytest.raises(SystemExit, match=r"one must be a \.safetensors file, the other a PEFT folder"):
        main(["convert", str(tmp_path / "peft"), str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


def test_predict_runs(workspace, lora_run):
    run(
        workspace,
        "predict",
        "--ckpt_path",
        str(lora_run / "checkpoints" / "last.ckpt"),
        name="predict",
    )


FIT_RECIPES = sorted(  # compare configs (methods or a grid on a recipe) are test_compare's
    p for p in RECIPE.parent.glob("*.yaml") if not {"methods", "grid"} & set(yaml.safe_load(p.read_text()))
)


@pytest.mark.parametrize("recipe", FIT_RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_.value.code in (0, None)
    assert "backbone:" in capsys.readouterr().out


GROCERY = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery-store"
WEIGHTS = (
    Path(__file__).resolve().parents[2] / "shared" / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
)


@pytest.mark.skipif(not (GROCERY.is_dir() and WEIGHTS.is_file()), reason="../shared data or weights absent")
def test_short_real_run_on_a_few_grocery_photos(tmp_path):
    """The real backbone on real product photos: 3 classes x 4 photos through a manifest."""
    lines = ["path,label,split"]
    for fine in ("Granny-Smith", "Banana", "Oatly-Oat-Milk"):
        photos = sorted(GROCERY.rglob(f"train/**/{fine}/*.jpg"))
        assert photos, fine
        lines += [f"{p},{fine},{'val' if i == 3 else 'train'}" for i, p in enumerate(photos[:4])]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    main([
        "fit", "--config", str(RECIPE.parent / "grocery_lora.yaml"), "--data.root", str(tmp_path),
        "--data.layout", "csv", "--data.download", "false", "--data.batch_size", "3", "--data.num_workers", "0",
        "--model.weights", str(WEIGHTS), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.logger.init_args.version", "0",
    ])  # fmt: skip
    run = tmp_path / "runs" / "vitlora" / "version_0"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["class_names"] == [
        "Banana",
        "Granny-Smith",
        "Oatly-Oat-Milk",
    ]
    assert sum(t.numel() for t in checkpoint["state_dict"].values()) < 0.02 * 5.7e6


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="../shared weights absent")
def test_convert_a_peft_adapter_of_the_real_vit_ti(tmp_path):
    """PEFT's own adapter on the real ViT-Ti, named with --model: the vitlora file gives PEFT's logits."""
    peft = pytest.importorskip("peft")
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    torch.manual_seed(0)
    model = create_backbone(name, 3, weights=WEIGHTS)
    targets = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc2)"
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, modules_to_save=["head"], init_lora_weights=False
    )
    peft_model = peft.get_peft_model(model, config).eval()
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0.0, 0.05)  # a trained-looking head and LoRA
    peft_model.save_pretrained(tmp_path / "peft")
    main(
        [
            "convert",
            str(tmp_path / "peft"),
            str(tmp_path / "out.safetensors"),
            "--model",
            name,
            "--weights",
            str(WEIGHTS),
        ]
    )
    adapter = read_adapter(tmp_path / "out.safetensors")
    assert adapter.model_name == name and adapter.config == LoRAConfig(
        rank=4, alpha=8, targets=("qkv", "proj", "fc2"), blocks=tuple(range(12))
    )
    vitlora_model = load_adapter(create_backbone(name, 3, weights=WEIGHTS), tmp_path / "out.safetensors").eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vitlora_model(x), peft_model(x), atol=1e-4, rtol=1e-4)


# --- the command line: help, one-line errors, no traceback ---------------------------------------------

ROOT = RECIPE.parents[1]


def cli_in_subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VITLORA_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "vitlora.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_help_lists_every_command_in_one_line_and_loads_no_torch(capsys):
    main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    for name in COMMANDS:
        assert len([line for line in lines if line.split()[:1] == [name]]) == 1, name
    assert {"fit", "validate", "test", "predict", "export", "classify", "merge", "inspect"} <= COMMANDS.keys()
    code = (
        "import sys; from vitlora.cli import main\n"
        "for argv in (['--help'], ['inspect', '--help'], ['classify', '--help']):\n"
        "    try: main(argv)\n"
        "    except SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'timm', 'lightning') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.splitlines()[-1] == "[]"


def test_an_unknown_command_is_named_with_the_closest_one():
    with pytest.raises(SystemExit, match=r"^vitlora: unknown command 'fitt' \(did you mean 'fit'\?\)"):
        main(["fitt", "--config", "x.yaml"])


def exits_with_one_line(argv: list[str], message: str, capsys) -> None:
    """In-process the line is the SystemExit's message (the interpreter prints it as the one line of ours)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    text = exit_.value.code
    assert isinstance(text, str) and "\n" not in text, text
    assert re.match(f"vitlora {argv[0]}: .*{message}", text), text
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not [line for line in err.splitlines() if line.startswith("vitlora")], err  # Lightning's logs aside


def fit_options(workspace: Path, name: str, *options: str) -> list[str]:
    return [
        "--config", str(RECIPE), "--data.root", str(workspace / "data"),
        "--model.weights", str(workspace / "base.safetensors"),
        "--trainer.logger.init_args.save_dir", str(workspace / "runs"),
        "--trainer.logger.init_args.name", name, *options,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    """Datasets with one problem each: no test split, an empty class folder, a broken image."""
    root = tmp_path_factory.mktemp("bad")
    make_image_folder(root / "no_test", per_split={"train": 2, "val": 1})
    make_image_folder(root / "empty_class", per_split={"train": 2, "val": 1})
    for image in (root / "empty_class" / "train" / "banana").iterdir():
        image.unlink()
    make_image_folder(root / "broken", per_split={"train": 2, "val": 1})
    (root / "broken" / "train" / "apple" / "apple_9.png").write_bytes(b"\x89PNG truncated")
    return root


@pytest.mark.parametrize(
    ("stage", "options", "message"),
    [
        ("fit", ["--model.lora.targets", "[q,vv]"], r"Invalid LoRA targets \['q', 'vv'\]"),
        ("fit", ["--model.weights", "{w}/nope.safetensors"], r"nope\.safetensors: no such weights file"),
        ("fit", ["--data.root", "{b}/empty_class"], r"banana: empty class folder \(no images\)"),
        (
            "fit",
            ["--data.root", "{b}/broken", "--data.fail_on_bad_images", "true"],
            r"apple_9\.png: (not a recognised image format|corrupt or truncated)",
        ),
        ("fit", ["--checkpoint_every_n_steps", "0"], r"checkpoint_every_n_steps must be a positive"),
        ("test", ["--data.root", "{b}/no_test"], r"no_test: no test split in this dataset"),
        ("validate", ["--ckpt_path", "{w}/nope.ckpt"], r"nope\.ckpt"),
        ("predict", ["--data.predict_paths", "[{w}/nope.jpg]"], r"nope\.jpg: no such file or folder"),
    ],
    ids=["targets", "weights", "empty-class", "bad-image", "every-n-steps", "no-test-split", "no-ckpt", "no-image"],
)
def test_lightning_commands_exit_with_one_line_and_leave_no_run_folder(
    workspace, bad_data, stage, options, message, capsys
):
    options = [option.format(w=workspace, b=bad_data) for option in options]
    exits_with_one_line([stage, *fit_options(workspace, f"failed_{stage}", *options)], message, capsys)
    assert not (workspace / "runs" / f"failed_{stage}").exists()


def test_unavailable_pretrained_weights_are_one_line(workspace, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, no retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # vitlora's own check says so before any connection
    argv = ["fit", *fit_options(workspace, "offline"), "--model.weights", "null", "--model.pretrained", "true"]
    exits_with_one_line(argv, r"No pretrained weights for .* --model\.weights path/to/", capsys)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["export", "--ckpt_path", "{w}/nope.ckpt", "--output", "{w}/a.safetensors"],
            r"nope\.ckpt: no such checkpoint",
        ),
        (["classify", "{w}/fruit.safetensors", "{w}/nope.jpg", "--output", "{w}/p.csv"], r"nope\.jpg: no such file"),
        (
            ["classify", "{w}/fruit.safetensors", "{w}/data/test", "--output", "{w}/p.txt"],
            r"must end in \.csv or \.json",
        ),
        (["classify", "{w}/last.ckpt", "{w}/data/test"], r"last\.ckpt: a training checkpoint.*run `vitlora export"),
        (["convert", "{w}/nope.safetensors", "{w}/peft"], r"nope\.safetensors"),
        (["inspect", "{w}/nope.safetensors"], r"nope\.safetensors"),
    ],
    ids=["export", "classify-missing", "classify-suffix", "classify-ckpt", "convert", "inspect"],
)
def test_commands_exit_with_one_line_and_write_nothing(workspace, fruit_adapter, args, message, capsys):
    before = sorted(workspace.iterdir())
    exits_with_one_line([arg.format(w=workspace) for arg in args], message, capsys)
    assert sorted(workspace.iterdir()) == before


def test_classify_without_output_prints_a_table(workspace, fruit_adapter, capsys):
    images = sorted((workspace / "data" / "test" / "apple").iterdir())
    main(["classify", str(fruit_adapter), *map(str, images), "--weights", str(workspace / "base.safetensors"),
          "--top_k", "2"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["path", "top-1", "top-2"] and lines[-1] == "3 of 3 images classified"
    for image, line in zip(images, lines[1:-1], strict=True):
        path, first, p1, second, p2 = line.split()
        assert path == str(image) and {first, second} <= {"apple", "banana", "cherry"} and float(p1) >= float(p2)


def test_the_command_line_shows_one_line_for_a_mistake_and_the_traceback_with_debug(workspace, fruit_adapter):
    missing = cli_in_subprocess("classify", str(fruit_adapter), "nope.jpg", "--output", "p.csv", cwd=workspace)
    assert (missing.returncode, missing.stderr) == (1, "vitlora classify: nope.jpg: no such file or folder.\n")
    assert not (workspace / "p.csv").exists()
    argv = ["fit", *fit_options(workspace, "cli_targets"), "--model.lora.targets", "[q,vv]"]
    for debug in (False, True):
        done = cli_in_subprocess(*argv, *(["--debug"] if debug else []), cwd=workspace)
        vitlora_lines = [line for line in done.stderr.splitlines() if line.startswith("vitlora")]
        assert done.returncode == 1 and ("Traceback" in done.stderr) == debug
        assert vitlora_lines == ([] if debug else [f"vitlora fit: {INVALID_TARGETS}"])
    assert not (workspace / "runs" / "cli_targets").exists()


@pytest.mark.parametrize(("setting", "shows_traceback"), [("1", True), ("0", False)])
def test_vitlora_debug_in_the_environment_re_raises_the_error(workspace, monkeypatch, setting, shows_traceback):
    monkeypatch.setenv("VITLORA_DEBUG", setting)
    expected = FileNotFoundError if shows_traceback else SystemExit
    with pytest.raises(expected, match=r"nope\.jpg: no such file or folder"):
        main(["classify", str(workspace / "fruit.safetensors"), str(workspace / "nope.jpg")])


INVALID_TARGETS = (
    "Invalid LoRA targets ['q', 'vv']: choose one or more distinct of "
    "['q', 'k', 'v', 'qkv', 'proj', 'fc1', 'fc2', 'patch_embed']."
)


def test_an_adapter_finds_its_recorded_local_base_and_names_it_when_moved(workspace, fruit_adapter, tmp_path):
    source = read_adapter(fruit_adapter).metadata["base_weights"]
    assert source["path"] == str(workspace / "base.safetensors") and len(source["sha256"]) == 64
    main(["merge", str(fruit_adapter), "--output", str(tmp_path / "merged.safetensors")])  # no --weights needed
    moved = tmp_path / "base-moved.safetensors"
    (workspace / "base.safetensors").rename(moved)
    try:
        with pytest.raises(SystemExit, match=r"base\.safetensors .*no longer at .*: pass --weights"):
            main(["merge", str(fruit_adapter), "--output", str(tmp_path / "again.safetensors")])
    finally:
        moved.rename(workspace / "base.safetensors")


def test_runs_follow_default_root_dir_and_evaluations_go_into_the_run(tmp_path, workspace):
    common = ["--config", str(RECIPE), "--data.root", str(workspace / "data")]
    common += ["--model.weights", str(workspace / "base.safetensors")]
    main(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "mine")])
    run_dir = tmp_path / "mine" / "vitlora" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "training_curves.png").is_file()
    rows = list(csv.DictReader((run_dir / "metrics.csv").read_text().splitlines()))
    assert any(row.get("train/loss") for row in rows)  # 2 steps < log_every_n_steps: still logged
    for command in ("validate", "test"):
        main([command, *common, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
        assert (run_dir / command / "metrics.csv").is_file()
    assert (run_dir / "test" / "confusion_matrix.png").is_file()
    assert sorted(p.name for p in (tmp_path / "mine" / "vitlora").iterdir()) == ["version_0"]


def test_checkpoints_keep_the_weights_path_absolute_for_export_from_anywhere(tmp_path, workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    folder = run(workspace, "fit", name="relative", options=("--model.weights", "base.safetensors"))
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["weights"] == str(workspace / "base.safetensors")
    monkeypatch.chdir(tmp_path)
    main(["export", "--ckpt_path", str(folder / "checkpoints" / "last.ckpt"), "--output", "a.safetensors"])
    assert read_adapter(tmp_path / "a.safetensors").metadata["base_weights"]["file"] == "base.safetensors"
