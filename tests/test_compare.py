"""`vitlora compare`: one tiny CPU comparison end to end, then the config checks and the reading."""

import csv
import importlib.metadata
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import make_workspace
from PIL import Image

from vitlora import count_parameters, read_adapter
from vitlora.charts import SIZE
from vitlora.cli import main
from vitlora.compare import (
    Budget,
    MethodResult,
    MethodSpec,
    compare_methods,
    comparison_reading,
    load_compare_config,
    methods_from_recipes,
)
from vitlora.compare.config import check_same_setup
from vitlora.compare.reading import standard_error
from vitlora.training.module import ImageClassifier

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CHARTS = ("accuracy_vs_parameters.png", "throughput.png", "memory.png", "validation_curves.png")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """lora, full and a method that cannot start, 1 epoch of 2 batches each, through the CLI."""
    root = tmp_path_factory.mktemp("compare")
    make_workspace(root)
    config = root / "compare.yaml"
    methods = {"lora": {}, "full": {"model.method": "full"}, "broken": {"model.lora.rank": 0}}
    config.write_text(yaml.safe_dump({"recipe": str(RECIPES / "smoke.yaml"), "methods": methods}, sort_keys=False))
    output = root / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # a shared 2-core machine: no thread oversubscription
        with pytest.raises(SystemExit, match="1 of 3 methods failed"):
            main([
                "compare", "--config", str(config), "--output", str(output),
                "--data.root", str(root / "data"), "--model.weights", str(root / "base.safetensors"),
                "--budget.max_epochs", "1", "--budget.limit_train_batches", "2", "--budget.limit_val_batches", "3",
                "--latency-rounds", "2",
            ])  # fmt: skip
    report = json.loads((output / "report.json").read_text())
    return output, {method["name"]: MethodResult(**method) for method in report["methods"]}, report


def test_writes_the_report_json_and_charts_and_nothing_half_written(comparison):
    output, results, report = comparison
    assert list(results) == ["lora", "full", "broken"]
    for name in CHARTS:
        with Image.open(output / name) as image:
            assert image.format == "PNG" and image.size == SIZE
            assert len(image.getcolors(2**16)) > 8  # drawn on, not blank
    text = (output / "report.md").read_text()
    assert all(f"]({name})" in text for name in CHARTS)
    assert not list(output.rglob(".*.tmp"))
    assert report["budget"] == "max_epochs=1, limit_train_batches=2, limit_val_batches=3"
    assert report["versions"]["torch"] == importlib.metadata.version("torch")
    assert report["machine"]["training device"] == "cpu, torch threads: 1"


def test_sizes_are_those_of_the_files_on_disk(comparison):
    output, results, _ = comparison
    lora, full = results["lora"], results["full"]
    adapter = output / "runs" / "lora" / "adapter.safetensors"
    assert lora.adapter == str(adapter) and lora.adapter_bytes == adapter.stat().st_size
    assert read_adapter(adapter).config.rank == 4  # smoke.yaml's LoRA, exported from the checkpoint
    for result in (lora, full):
        checkpoint = output / "runs" / result.name / "checkpoints" / "last.ckpt"
        assert result.checkpoint == str(checkpoint) and result.checkpoint_bytes == checkpoint.stat().st_size
    assert full.adapter is None and full.adapter_bytes is None
    assert lora.checkpoint_bytes < full.checkpoint_bytes / 5  # trainable-only vs every weight + AdamW state
    cost_table = (output / "report.md").read_text().split("## Cost")[1]
    row = next(line for line in cost_table.splitlines() if line.startswith("| lora | "))
    assert f"| {lora.checkpoint_bytes / 1e6:.2f} | {lora.adapter_bytes / 1e6:.2f} |" in row


def test_parameter_counts_are_those_of_the_trained_models(comparison):
    _, results, _ = comparison
    for result in (results["lora"], results["full"]):
        module = ImageClassifier.load_from_checkpoint(result.checkpoint, weights_only=True)
        counted = count_parameters(module)
        assert (result.trainable, result.total) == (counted.trainable, counted.total)
    rank, width, classes, blocks = 4, 64, 3, 2
    lora_per_block = (2 * rank) * width + (2 * width) * rank  # A for q and v stacked, B for q and v
    assert results["lora"].trainable == blocks * lora_per_block + width * classes + classes
    assert results["full"].trainable == results["full"].total == results["lora"].total - blocks * lora_per_block


def test_accuracies_are_those_the_run_logged(comparison):
    output, results, report = comparison
    for result in (results["lora"], results["full"]):
        rows = list(csv.DictReader((output / "runs" / result.name / "metrics.csv").read_text().splitlines()))
        logged = [float(row["val/top1"]) for row in rows if row.get("val/top1")]
        assert result.val["top1"] == pytest.approx(logged[-1])
        assert result.val_images == result.test_images == 9  # 3 classes x 3 images, all within 3 batches of 4
        assert result.curve[-1]["step"] == result.steps == 2 and result.curve[-1]["top1"] == result.val["top1"]
        assert set(result.test) >= {"top1", "macro_f1"}
        row = next(
            line for line in (output / "report.md").read_text().splitlines() if line.startswith(f"| {result.name} |")
        )
        assert row.startswith(
            f"| {result.name} | {100 * result.val['top1']:.1f} | - | {100 * result.val['macro_f1']:.1f} |"
        )
    assert report["reading"] == comparison_reading(list(results.values()))
    assert [(p["method"], p["images"]) for p in report["paired"]] in ([("full", 9)], [("lora", 9)])


def test_speed_memory_and_latency_are_measured(comparison):
    _, results, _ = comparison
    for result in (results["lora"], results["full"]):
        assert result.step_time_s > 0 and result.images_per_s > 0 and result.fit_s > 0
        assert result.wall_s > result.fit_s
        assert result.memory_kind == "peak RSS" and result.peak_memory_mb > 50
        assert set(result.latency_s) == {"base", "unmerged", "merged"} and min(result.latency_s.values()) > 0
    full = results["full"]
    assert full.latency_s["merged"] == full.latency_s["unmerged"]  # nothing to merge: the model itself
    assert results["lora"].latency_s["merged"] != results["lora"].latency_s["unmerged"]  # timed separately


def test_a_failing_method_is_reported_and_the_others_kept(comparison):
    output, results, _ = comparison
    broken = results["broken"]
    assert not broken.ok and "LoRA rank must be a positive integer" in broken.error
    assert results["lora"].ok and results["full"].ok
    assert "rank must be a positive integer" in (output / "runs" / "broken" / "train.log").read_text()
    text = (output / "report.md").read_text()
    assert "## Failures" in text and "**broken**: exit code 1" in text
    assert "Not compared: broken failed" in text


# --- configuration --------------------------------------------------------------------------


def test_grocery_compare_config_reuses_the_grocery_recipes():
    methods = load_compare_config(RECIPES / "grocery_compare.yaml")
    assert [(m.name, m.recipe.name, m.overrides) for m in methods] == [
        ("lora", "grocery_lora.yaml", {}),
        ("full", "grocery_full.yaml", {}),
        ("linear", "grocery_linear.yaml", {}),
        ("dora", "grocery_lora.yaml", {"model.lora.use_dora": True}),
        ("lora_plus", "grocery_lora.yaml", {"model.lora_plus_ratio": 4.0}),
        ("lora_bitfit", "grocery_lora.yaml", {"model.bias_tuning": True}),
        ("vpt_deep", "grocery_linear.yaml", {"model.prompt.num_tokens": 8, "model.prompt.deep": True}),
        ("bitfit", "grocery_linear.yaml", {"model.bias_tuning": True}),
    ]
    assert [m.name for m in load_compare_config(RECIPES / "grocery_compare.yaml", only=["linear", "lora"])] == [
        "linear",
        "lora",
    ]


@pytest.mark.parametrize("method", load_compare_config(RECIPES / "grocery_compare.yaml"), ids=lambda m: m.name)
def test_every_method_parses_as_a_fit_config(method, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(method.recipe), *method.override_args(), "--print_config"])
    assert exit_.value.code in (0, None)
    assert "backbone:" in capsys.readouterr().out


def test_overrides_become_fit_options():
    spec = MethodSpec("r16", RECIPES / "smoke.yaml", {"model.lora.rank": 16, "model.lora.targets": ["q", "v"]})
    assert spec.override_args() == ["--model.lora.rank", "16", "--model.lora.targets", '["q", "v"]']
    assert Budget(1, 4, 0.5).trainer_args() == [
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
        "--trainer.limit_val_batches", "0.5", "--trainer.limit_test_batches", "0.5",
    ]  # fmt: skip
    assert str(Budget()) == "none" and Budget().trainer_args() == []


def test_methods_must_share_seed_trainer_data_and_backbone(tmp_path):
    smoke = RECIPES / "smoke.yaml"
    check_same_setup([MethodSpec("lora", smoke), MethodSpec("full", smoke, {"model.method": "full"})])
    with pytest.raises(ValueError, match=r"data\.batch_size \(lora: 4, big: 8\)"):
        check_same_setup([MethodSpec("lora", smoke), MethodSpec("big", smoke, {"data.batch_size": 8})])
    other = tmp_path / "other_seed.yaml"
    other.write_text(smoke.read_text().replace("seed_everything: 0", "seed_everything: 1"))
    with pytest.raises(ValueError, match=r"seed_everything \(smoke: 0, other_seed: 1\)"):
        methods_from_recipes([smoke, other])
    with pytest.raises(ValueError, match="distinct"):
        check_same_setup([MethodSpec("a", smoke), MethodSpec("a", smoke)])
    with pytest.raises(ValueError, match="name folders"):
        check_same_setup([MethodSpec("../a", smoke)])


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("recipe: smoke.yaml\n", "needs `methods:`"),
        ("recipe: smoke.yaml\nmethods: {a: {}}\nepochs: 3\n", r"unknown keys \['epochs'\]"),
        ("methods: {a: {}}\n", "has no recipe"),
        ("recipe: smoke.yaml\nmethods: {a: {lr: 0.1}}\n", r"\['lr'\] are not dotted"),
        ("recipe: missing.yaml\nmethods: {a: {}}\n", "missing.yaml: no such file"),
        ("recipe: smoke.yaml\nmethods: [a, b\n", "not valid YAML"),
    ],
)
def test_bad_compare_configs_name_the_file_and_the_problem(tmp_path, text, problem):
    config = tmp_path / "bad_compare.yaml"
    config.write_text(text)
    (tmp_path / "smoke.yaml").write_text((RECIPES / "smoke.yaml").read_text())
    with pytest.raises(ValueError, match=problem) as error:
        load_compare_config(config)
    assert str(tmp_path) in str(error.value)


def test_unknown_method_names_and_used_output_folders_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no methods named \['no_such_method'\]"):
        load_compare_config(RECIPES / "grocery_compare.yaml", only=["no_such_method"])
    (tmp_path / "old.txt").write_text("a previous comparison")
    with pytest.raises(ValueError, match="already holds files"):
        compare_methods([MethodSpec("lora", RECIPES / "smoke.yaml")], tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]


def test_cli_refuses_ambiguous_or_unknown_arguments(tmp_path, capsys):
    for argv in (
        ["compare", "--output", str(tmp_path / "a")],
        ["compare", "--recipes", str(RECIPES / "smoke.yaml"), "--methods", "lora", "--output", str(tmp_path / "b")],
        ["compare", "--recipes", str(RECIPES / "smoke.yaml"), "--output", str(tmp_path / "c"), "--epochs", "3"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert "unrecognized arguments: --epochs" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# --- the reading ----------------------------------------------------------------------------


def result(name, top1, trainable, images=300, total=1_000_000, **kwargs) -> MethodResult:
    defaults = {"step_time_s": 0.1, "peak_memory_mb": 1000.0, "checkpoint_bytes": 12 * trainable}
    return MethodResult(
        name, val={"top1": top1}, val_images=images, trainable=trainable, total=total, **defaults | kwargs
    )


def three_methods(lora_top1, full_top1, images=300):
    return [
        result("lora", lora_top1, 10_000, images, adapter_bytes=40_000, step_time_s=0.07, peak_memory_mb=600.0),
        result("full", full_top1, 1_000_000, images, latency_s={"base": 1.0, "unmerged": 1.0, "merged": 1.0}),
        result("linear", 0.60, 1_000, images),
    ]


def test_standard_error_is_binomial_and_never_zero():
    assert standard_error(0.9, 10_000) == pytest.approx(math.sqrt(0.9 * 0.1 / 10_000), rel=1e-3)
    assert standard_error(1.0, 4) > 0.1  # four right answers prove little


def test_reading_picks_the_cheapest_method_within_noise_of_the_best():
    lines = comparison_reading(three_methods(lora_top1=0.90, full_top1=0.91, images=2000))
    assert lines[0].startswith("**full** is the most accurate on val: top-1 91.0% on 2,000 images")
    assert "lora is 1.0 points lower: within noise (unpaired: no per-image predictions;" in lines[1]
    assert "linear is 31.0 points lower: a real gap" in lines[2]
    pick = next(line for line in lines if line.startswith("Pick"))
    assert pick.startswith("Pick **lora**: as accurate as full within noise, training 1% of the parameters")
    assert "storing a 0.04 MB adapter per task instead of a 12.00 MB checkpoint" in pick
    assert "0.70x the training step time" in pick and "0.60x the peak memory" in pick
    assert not any("evaluate on more images" in line for line in lines)


def test_reading_changes_when_the_gap_is_real():
    lines = comparison_reading(three_methods(lora_top1=0.80, full_top1=0.90))
    assert "lora is 10.0 points lower: a real gap" in lines[1]
    pick = next(line for line in lines if line.startswith("Pick"))
    assert pick.startswith("Pick **full**: nothing comes within noise of its accuracy. Against linear")
    assert "Served merged, full takes 1.00x the base model's inference time." in lines


def test_reading_with_few_val_images_calls_the_same_gap_noise():
    lines = comparison_reading(three_methods(lora_top1=0.80, full_top1=0.90, images=40))
    assert "lora is 10.0 points lower: within noise" in lines[1]
    assert next(line for line in lines if line.startswith("Pick")).startswith("Pick **lora**")
    width = 4 * math.hypot(standard_error(0.9, 40), standard_error(0.8, 40))  # the gap +- two standard errors
    assert f"{100 * width:.1f}" == "32.7"
    assert lines[-1].startswith("A close call's 95% interval of the difference spans 33 points with 40 val images")


def test_reading_without_finished_methods():
    failed = MethodResult("full", error="exit code 1: out of memory")
    assert comparison_reading([failed]) == [
        "No method finished, so there is nothing to compare.",
        "Not compared: full failed (see Failures).",
    ]
    only = comparison_reading([result("lora", 0.9, 10), failed])
    assert "Only lora finished, so there is nothing to weigh it against." in only
