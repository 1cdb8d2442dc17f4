"""`vitlora compare`: one tiny CPU comparison end to end, the config checks and the reading; then
cross-validation (a second tiny run, resumed), grids and one run per GPU."""

import csv
import importlib.metadata
import json
import math
import os
import re
import statistics
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_workspace
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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
    runner,
)
from vitlora.compare import report as compare_report
from vitlora.compare.config import check_same_setup, expand_grid, parse_grid_option, swept_options
from vitlora.compare.paired import paired_by_fold
from vitlora.compare.reading import standard_error, standings
from vitlora.compare.result import combine_runs
from vitlora.compare.runner import visible_gpus
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
    methods = load_compare_config(RECIPES / "grocery_compare.yaml").methods
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
    assert [m.name for m in load_compare_config(RECIPES / "grocery_compare.yaml", only=["linear", "lora"]).methods] == [
        "linear",
        "lora",
    ]


@pytest.mark.parametrize("method", load_compare_config(RECIPES / "grocery_compare.yaml").methods, ids=lambda m: m.name)
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


# --- cross-validation, resuming, grids, one run per GPU --------------------------------------


@pytest.fixture(scope="module")
def cross_validated(tmp_path_factory):
    """lora with --folds 2 through the CLI; then fold 1's measurements.json deleted and --resume: every
    `vitlora fit` process started, per phase."""
    root = tmp_path_factory.mktemp("folds")
    make_workspace(root)
    config = root / "compare.yaml"
    config.write_text(yaml.safe_dump({"recipe": str(RECIPES / "smoke.yaml"), "methods": {"lora": {}}}))
    output = root / "out"
    argv = [
        "compare", "--config", str(config), "--output", str(output), "--folds", "2",
        "--data.root", str(root / "data"), "--model.weights", str(root / "base.safetensors"),
        "--budget.max_epochs", "1", "--budget.limit_train_batches", "2", "--budget.limit_val_batches", "1.0",
        "--latency-rounds", "1",
    ]  # fmt: skip
    started = {"first": [], "resumed": []}
    popen = runner.subprocess.Popen

    def counting_popen(command, *args, **kwargs):
        if "vitlora.compare.measure" in command:  # a run, not platform.processor()'s `uname -p`
            started[phase].append(command)
        return popen(command, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setattr(runner.subprocess, "Popen", counting_popen)
        phase = "first"
        main(argv)
        first_report = json.loads((output / "report.json").read_text())
        kept = (output / "runs" / "lora" / "fold0" / "measurements.json").read_text()
        (output / "runs" / "lora" / "fold1" / "measurements.json").unlink()
        phase = "resumed"
        main([*argv, "--resume"])
    report = json.loads((output / "report.json").read_text())
    return output, first_report, report, started, kept


def fold_records(output: Path, method: str = "lora", folds: int = 2) -> list[dict]:
    return [json.loads((output / "runs" / method / f"fold{k}" / "measurements.json").read_text()) for k in range(folds)]


def test_folds_run_in_their_own_folders_each_holding_out_its_fold(cross_validated):
    output, first, _, started, _ = cross_validated
    assert len(started["first"]) == 2
    for fold, command in enumerate(started["first"]):
        assert command[command.index("--data.folds") + 1] == "2" and command[command.index("--data.fold") + 1] == str(
            fold
        )
        run_dir = output / "runs" / "lora" / f"fold{fold}"
        for name in ("measurements.json", "val_predictions.csv", "train.log", "checkpoints/last.ckpt"):
            assert (run_dir / name).is_file(), name
        assert f"fold {fold + 1} of 2 as val (train+val pooled, random)" in (run_dir / "train.log").read_text()
    assert sorted(p.name for p in (output / "runs" / "lora").iterdir()) == ["fold0", "fold1"]
    assert json.loads((output / "comparison.json").read_text())["folds"] == 2
    assert first["folds"] == 2


def test_a_method_is_the_mean_and_sd_of_its_folds(cross_validated):
    output, _, report, _, _ = cross_validated
    lora = MethodResult(**report["methods"][0])
    records = fold_records(output)
    assert lora.ok and lora.folds == 2 and len(lora.runs) == 2
    assert set(lora.val) == set(records[0]["val"]) >= {"top1", "macro_f1"}
    for metric in lora.val:
        values = [record["val"][metric] for record in records]
        assert lora.val[metric] == pytest.approx(statistics.mean(values))
        assert lora.val_sd[metric] == pytest.approx(statistics.stdev(values))
    for metric in lora.test:
        assert lora.test[metric] == pytest.approx(statistics.mean(record["test"][metric] for record in records))
    assert lora.val_images == sum(record["val_images"] for record in records) == 3 * (8 + 3)  # all train+val
    assert lora.test_images == 9 and lora.trainable == records[0]["trainable"]
    assert lora.step_time_s == pytest.approx(statistics.median(record["step_time_s"] for record in records))
    assert lora.wall_s == pytest.approx(sum(record["wall_s"] for record in records))
    scored = [row for path in lora.prediction_files for row in csv.DictReader(Path(path).read_text().splitlines())]
    pooled = sorted(str(p) for split in ("train", "val") for p in (output.parent / "data" / split).rglob("*.png"))
    assert sorted(row["path"] for row in scored) == pooled  # every train+val image scored once, by one fold
    assert lora.checkpoint is None  # each fold has its own: none of them is the method's
    text = (output / "report.md").read_text()
    assert "2-fold cross-validation over train+val (33 images)" in text
    row = next(line for line in text.splitlines() if line.startswith("| lora |"))
    assert row.startswith(f"| lora | {100 * lora.val['top1']:.1f} ± {100 * lora.val_sd['top1']:.1f} |")
    assert "  - fold 1 (`runs/lora/fold1`): `vitlora fit --config" in text


def test_resume_reruns_exactly_the_run_without_measurements(cross_validated):
    output, first, report, started, kept = cross_validated
    assert len(started["resumed"]) == 1
    command = started["resumed"][0]
    assert command[command.index("--data.fold") + 1] == "1"
    assert (output / "runs" / "lora" / "fold0" / "measurements.json").read_text() == kept  # not rerun
    assert report["methods"][0]["runs"][0] == first["methods"][0]["runs"][0]
    assert report["methods"][0]["val_images"] == 33
    assert (output / "runs" / "lora" / "fold1" / "measurements.json").is_file()


def test_finished_fold_predictions_are_what_a_later_comparison_pairs_with(cross_validated, tmp_path):
    output, *_ = cross_validated
    method_dir = output / "runs" / "lora"
    found = runner.finished_fold_predictions(method_dir)
    assert found == {k: method_dir / f"fold{k}" / "val_predictions.csv" for k in (0, 1)}
    rows = paired_by_fold(found, found)  # a method against itself: every image agrees
    assert rows[-1][0] == "pooled (2 folds)" and rows[-1][1].images == 33
    assert rows[-1][1].first_only == rows[-1][1].second_only == 0
    unfinished = tmp_path / "runs" / "full"
    for name in ("fold0", "fold1", "fold12", "folds", "notes"):  # fold1 still training; others not fold runs
        (unfinished / name).mkdir(parents=True)
        (unfinished / name / "val_predictions.csv").write_text("path,label,predicted\n")
        (unfinished / name / runner.RESULT_FILE).write_text("{}")
    (unfinished / "fold1" / runner.RESULT_FILE).unlink()
    assert sorted(runner.finished_fold_predictions(unfinished)) == [0, 12]
    with pytest.raises(ValueError, match=r"runs/nothing: no such folder \(a method's fold runs are in"):
        runner.finished_fold_predictions(tmp_path / "runs" / "nothing")


def fake_result(run, **fields) -> MethodResult:
    """What a run measures, written where the runner looks for it, without training anything."""
    record = {"val": {"top1": 0.5 + 0.1 * (run.fold or 0)}, "val_images": 10, "trainable": 5, "total": 50} | fields
    (run.run_dir / runner.RESULT_FILE).parent.mkdir(parents=True, exist_ok=True)
    (run.run_dir / runner.RESULT_FILE).write_text(json.dumps(record))
    return runner.read_run(run)


@pytest.fixture
def no_charts(monkeypatch):
    """Reports without their charts, which take a second each time on a busy machine."""
    monkeypatch.setattr(compare_report, "report_charts", lambda results: {})


@pytest.fixture
def fake_runs(monkeypatch, no_charts):
    """measure_run replaced: every call recorded (label, gpu) and answered by fake_result, no process started."""
    calls = []

    def measure_run(run, latency_rounds=10, gpu=None, resume_from=None):
        calls.append((run.label, gpu) + ((resume_from,) if resume_from else ()))
        return fake_result(run)

    monkeypatch.setattr(runner, "measure_run", measure_run)
    monkeypatch.setattr(runner, "visible_gpus", lambda: [])
    return calls


def test_fold_runs_combine_into_means_sums_and_medians():
    folds = [
        result("lora", top1, 100, images, step_time_s=step, wall_s=10.0 + k, checkpoint=f"fold{k}/last.ckpt",
               test={"top1": top1 - 0.1}, test_images=9, latency_s={"base": 1.0, "unmerged": step * 10},
               prediction_files=[f"fold{k}.csv"], curve=[{"step": 2, "top1": top1}], fit_command=f"fit {k}")
        for k, (top1, images, step) in enumerate([(0.8, 11, 0.1), (0.9, 11, 0.2), (0.6, 10, 0.6)])
    ]  # fmt: skip
    combined = combine_runs(folds, 3, name="lora", run_dir="runs/lora")
    assert combined.ok and combined.folds == 3 and combined.run_dir == "runs/lora"
    assert combined.val["top1"] == pytest.approx(0.7667, abs=1e-4)
    assert combined.val_sd["top1"] == pytest.approx(0.1528, abs=1e-4)  # sample sd: n - 1
    assert combined.test["top1"] == pytest.approx(0.6667, abs=1e-4) and combined.test_sd["top1"] > 0
    assert combined.val_images == 32 and combined.test_images == 9 and combined.wall_s == 33.0
    assert combined.step_time_s == 0.2 and combined.latency_s == {"base": 1.0, "unmerged": 2.0}  # medians
    assert combined.trainable == 100 and combined.checkpoint is None and combined.fit_command == ""
    assert combined.prediction_files == ["fold0.csv", "fold1.csv", "fold2.csv"]
    assert combined.curve == [{"step": 2, "top1": pytest.approx(0.7667, abs=1e-4)}]
    assert [run["fold"] for run in combined.runs] == [0, 1, 2] and combined.runs[2]["fit_command"] == "fit 2"


def test_one_run_is_its_own_result_and_a_failed_fold_fails_the_method():
    single = result("lora", 0.8, 100, test={"top1": 0.7}, latency_s={"base": 1.0}, prediction_files=["v.csv"])
    combined = combine_runs([single], 0, name="lora")
    assert asdict(combined) == asdict(single) | {"runs": combined.runs}
    assert combined.val_sd == {} and combined.folds == 0 and combined.runs[0]["fold"] is None
    broken = MethodResult("lora", error="exit code 1: out of memory", run_dir="runs/lora/fold1", fit_command="fit")
    failed = combine_runs([single, broken], 2, name="lora")
    assert not failed.ok and failed.error == "fold 1: exit code 1: out of memory" and failed.val == {}
    assert failed.runs[1]["run_dir"] == "runs/lora/fold1"  # where the report sends the reader for the log
    alone = combine_runs([broken], 0, name="lora")
    assert alone.error == "exit code 1: out of memory" and alone.fit_command == "fit"
    some = combine_runs([single, broken], 5, [0, 3], name="lora")  # folds 0 and 3 of 5 finished so far
    assert some.error == "fold 3: exit code 1: out of memory" and some.finished_folds == [0, 3] and some.folds == 5
    with pytest.raises(ValueError, match=r"2 runs but 1 fold numbers"):
        combine_runs([single, broken], 5, [0], name="lora")


def test_a_stopped_cross_validation_reports_every_method_on_the_folds_all_finished(tmp_path, monkeypatch, no_charts):
    started = []

    def measure_run(run, latency_rounds=10, gpu=None, resume_from=None):
        if len(started) == 3:  # from "full fold 1" on: the machine stopped
            raise KeyboardInterrupt
        started.append(run.label)
        return fake_result(run, val={"top1": 0.5 + 0.1 * run.fold + (0.05 if run.method.name == "full" else 0)})

    monkeypatch.setattr(runner, "measure_run", measure_run)
    monkeypatch.setattr(runner, "visible_gpus", lambda: [])
    methods = [MethodSpec("lora", RECIPES / "smoke.yaml"), MethodSpec("full", RECIPES / "smoke.yaml")]
    with pytest.raises(KeyboardInterrupt):
        compare_methods(methods, tmp_path, folds=3)
    assert started == ["lora fold 0", "full fold 0", "lora fold 1"]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["name"]: r for r in report["methods"]}
    assert set(rows) == {"lora", "full"} and report["finished_folds"] == [0]  # lora's fold 1 waits for full's
    assert [run["fold"] for run in rows["lora"]["runs"]] == [0] and rows["lora"]["folds"] == 3
    assert rows["lora"]["val"]["top1"] == pytest.approx(0.5) and rows["full"]["val"]["top1"] == pytest.approx(0.55)
    text = (tmp_path / "report.md").read_text()
    assert "**Partial: 1 of 3 folds have finished for every method (fold 0)**" in text
    monkeypatch.setattr(runner, "measure_run", lambda run, *args, **kwargs: fake_result(run))
    results = compare_methods(methods, tmp_path, folds=3, resume=True)
    assert [r.finished_folds for r in results] == [[0, 1, 2], [0, 1, 2]]
    assert "Partial" not in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["finished_folds"] == [0, 1, 2]


def test_a_failed_fold_fails_its_method_before_the_other_methods_reach_that_fold(tmp_path):
    methods = [MethodSpec("lora", RECIPES / "smoke.yaml"), MethodSpec("full", RECIPES / "smoke.yaml")]
    runs = runner.plan_runs(methods, tmp_path, folds=3)
    done = {index: fake_result(runs[index]) for index in (0, 1)}  # both methods' fold 0
    done[2] = MethodResult("lora", error="exit code 1: out of memory", run_dir=str(runs[2].run_dir))
    lora, full = runner.method_results(methods, runs, done)
    assert not lora.ok and lora.error == "fold 1: exit code 1: out of memory"
    assert full.ok and full.finished_folds == [0]


def test_resume_refuses_other_settings_and_warns_without_saved_ones(tmp_path, fake_runs, capsys):
    smoke = RECIPES / "smoke.yaml"
    lora = MethodSpec("lora", smoke)
    compare_methods([lora], tmp_path, folds=2)
    assert fake_runs == [("lora fold 0", None), ("lora fold 1", None)]
    with pytest.raises(ValueError, match=r"already holds files.*--resume"):
        compare_methods([lora], tmp_path, folds=2)
    with pytest.raises(ValueError, match=r"other settings.*folds: 2 -> 3"):
        compare_methods([lora], tmp_path, folds=3, resume=True)
    with pytest.raises(ValueError, match=r"methods: lora changed \(overrides: \{\} -> \{'model.lr': 0.1\}\)"):
        compare_methods([MethodSpec("lora", smoke, {"model.lr": 0.1})], tmp_path, folds=2, resume=True)
    with pytest.raises(ValueError, match=r"shared_args: \[\] -> \['--data.root', 'x'\]"):
        compare_methods([lora], tmp_path, folds=2, resume=True, shared_args=["--data.root", "x"])
    assert len(fake_runs) == 2  # nothing ran
    results = compare_methods([lora], tmp_path, folds=2, resume=True)
    assert len(fake_runs) == 2 and results[0].val["top1"] == pytest.approx(0.55)  # both folds read back
    (tmp_path / runner.SETTINGS_FILE).unlink()  # as if the runs had been started by hand
    compare_methods([lora], tmp_path, folds=2, resume=True)
    assert capsys.readouterr().err.count("warning") == 1 and (tmp_path / runner.SETTINGS_FILE).is_file()
    (tmp_path / runner.SETTINGS_FILE).unlink()
    with pytest.raises(ValueError, match=r"does not plan \(.*runs/lora/fold0/measurements.json"):
        compare_methods([lora], tmp_path, resume=True)  # without folds, runs/lora is one run


def test_resume_refuses_an_edited_recipe_but_not_a_new_comment(tmp_path, fake_runs, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((RECIPES / "smoke.yaml").read_text())
    lora, output = MethodSpec("lora", recipe), tmp_path / "out"
    compare_methods([lora], output, folds=2)
    (output / "runs" / "lora" / "fold1" / runner.RESULT_FILE).unlink()
    recipe.write_text(
        "# a note on the recipe, and its lines laid out again\n" + recipe.read_text().replace(": ", ":  ")
    )
    compare_methods([lora], output, folds=2, resume=True)
    assert fake_runs[-1] == ("lora fold 1", None)  # the same settings: it resumed
    recipe.write_text(recipe.read_text().replace("lr:  0.001", "lr:  0.01"))
    with pytest.raises(ValueError, match=r"methods: lora changed \(its recipe recipe\.yaml was edited since\)"):
        compare_methods([lora], output, folds=2, resume=True)
    saved = json.loads((output / runner.SETTINGS_FILE).read_text())
    for method in saved["methods"]:  # as a comparison started before recipes were fingerprinted saved it
        del method["recipe_sha256"]
    (output / runner.SETTINGS_FILE).write_text(json.dumps(saved))
    compare_methods([lora], output, folds=2, resume=True)
    assert "predates recipe fingerprints" in capsys.readouterr().err
    assert len(fake_runs) == 3  # both folds read back, and the new fingerprint saved for next time
    assert json.loads((output / runner.SETTINGS_FILE).read_text())["methods"][0]["recipe_sha256"]


def test_resume_reruns_unfinished_runs_from_a_clean_folder(tmp_path, fake_runs):
    methods = [MethodSpec("lora", RECIPES / "smoke.yaml"), MethodSpec("full", RECIPES / "smoke.yaml")]
    compare_methods(methods, tmp_path)
    (tmp_path / "runs" / "full" / runner.RESULT_FILE).unlink()
    (tmp_path / "runs" / "full" / "stale.ckpt").write_text("from the interrupted run")
    results = compare_methods(methods, tmp_path, resume=True)
    assert fake_runs == [("lora", None), ("full", None), ("full", None)]
    assert not (tmp_path / "runs" / "full" / "stale.ckpt").exists()
    assert [r.name for r in results] == ["lora", "full"] and all(r.ok for r in results)


def test_resume_continues_an_interrupted_run_from_its_whole_last_checkpoint(tmp_path, fake_runs):
    methods = [MethodSpec("lora", RECIPES / "smoke.yaml"), MethodSpec("full", RECIPES / "smoke.yaml")]
    compare_methods(methods, tmp_path)
    for name, checkpoint in (("lora", b"PK\x03\x04 a truncated zip"), ("full", whole_zip())):
        (tmp_path / "runs" / name / runner.RESULT_FILE).unlink()
        (tmp_path / "runs" / name / "checkpoints").mkdir()
        (tmp_path / "runs" / name / "checkpoints" / "last.ckpt").write_bytes(checkpoint)
        (tmp_path / "runs" / name / "metrics.csv").write_text("step\n")
    compare_methods(methods, tmp_path, resume=True)
    last = tmp_path / "runs" / "full" / "checkpoints" / "last.ckpt"
    assert fake_runs[2:] == [("lora", None), ("full", None, last)]  # a truncated checkpoint: started over
    assert not (tmp_path / "runs" / "lora" / "metrics.csv").exists()
    assert (tmp_path / "runs" / "full" / "metrics.csv").is_file() and last.is_file()


def whole_zip() -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"checkpoint")
    return buffer.getvalue()


@pytest.mark.parametrize("older_checkpoint", [False, True], ids=["with-measurements", "without-measurements"])
def test_a_comparison_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, older_checkpoint):
    """Killed at step 9 of 12 (SIGKILL inside the run's process), --resume goes on from the step-8
    checkpoint to the adapter and metrics file the uninterrupted comparison gets, and keeps the log.
    A checkpoint without the measurements of its steps (an older vitlora's) still resumes exactly."""
    make_workspace(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(compare_report, "report_charts", lambda results: {})
    method = [MethodSpec("lora", RECIPES / "smoke.yaml", {"model.lora.dropout": 0.2, "data.mixup": 0.8})]
    shared = ["--data.root", str(tmp_path / "data"), "--model.weights", str(tmp_path / "base.safetensors"),
              "--checkpoint_every_n_steps", "2", "--trainer.limit_train_batches", "null",
              "--trainer.log_every_n_steps", "3"]  # fmt: skip
    settings = {"shared_args": shared, "budget": Budget(max_epochs=2, limit_train_batches=None), "latency_rounds": 1}
    [whole] = compare_methods(method, tmp_path / "whole", **settings)

    popen = runner.subprocess.Popen

    def killed_at_step_9(command, *args, env, **kwargs):
        killing = ["--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step", "9"]
        tests = str(Path(__file__).parent)
        return popen(
            [*command, *killing], *args, env=env | {"PYTHONPATH": f"{env['PYTHONPATH']}{os.pathsep}{tests}"}, **kwargs
        )

    with monkeypatch.context() as patch:
        patch.setattr(runner.subprocess, "Popen", killed_at_step_9)
        [killed] = compare_methods(method, tmp_path / "resumed", **settings)
    assert not killed.ok and "exit code -9" in killed.error
    run_dir = tmp_path / "resumed" / "runs" / "lora"
    killed_log = (run_dir / "train.log").read_text()
    assert "epoch 1/2" in killed_log  # epoch 0 done before the kill, as the log kept it
    last = run_dir / "checkpoints" / "last.ckpt"
    if older_checkpoint:
        checkpoint = torch.load(last, weights_only=True)
        [measured] = [key for key in checkpoint["callbacks"] if "TrainingMeasurements" in key]
        del checkpoint["callbacks"][measured]
        torch.save(checkpoint, last)

    [resumed] = compare_methods(method, tmp_path / "resumed", resume=True, **settings)
    assert resumed.ok
    log = (run_dir / "train.log").read_text()
    assert log.startswith(killed_log) and f"continued from {run_dir / 'checkpoints' / 'last.ckpt'}" in log
    [note] = [note for note in resumed.notes if "continued from" in note]
    assert "at step 8" in note and ("kept no measurements" in note) == older_checkpoint
    adapters = [read_adapter(result.adapter).tensors for result in (whole, resumed)]
    assert any("lora_B" in key for key in adapters[0])
    torch.testing.assert_close(adapters[1], adapters[0], atol=1e-6, rtol=0)
    assert resumed.val == pytest.approx(whole.val, abs=1e-6)
    if older_checkpoint:  # what happened before step 8 is in metrics.csv alone
        assert [point["step"] for point in resumed.curve] == [12] and resumed.steps == 4
    else:  # the checkpoint carried the earlier validation and steps over
        assert [point["step"] for point in resumed.curve] == [point["step"] for point in whole.curve] == [6, 12]
        assert resumed.curve[0]["top1"] == pytest.approx(whole.curve[0]["top1"])
        assert resumed.steps == whole.steps == 12 and resumed.step_time_s > 0

    def logged(folder: Path) -> list[dict]:
        return list(csv.DictReader((folder / "metrics.csv").read_text().splitlines()))

    whole_rows, resumed_rows = logged(tmp_path / "whole" / "runs" / "lora"), logged(run_dir)
    assert len(resumed_rows) == len(whole_rows) > 4 and resumed_rows[0].keys() == whole_rows[0].keys()
    for resumed_row, whole_row in zip(resumed_rows, whole_rows, strict=True):  # every metric of every step
        assert {k: float(v) for k, v in resumed_row.items() if v} == pytest.approx(
            {k: float(v) for k, v in whole_row.items() if v}, abs=1e-5
        )

    def tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:  # the killed run's later events purged
        events = EventAccumulator(str(folder))
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    whole_events, resumed_events = tensorboard(tmp_path / "whole" / "runs" / "lora"), tensorboard(run_dir)
    assert resumed_events.keys() == whole_events.keys() and {"train/loss", "val/top1"} <= whole_events.keys()
    for tag, scalars in whole_events.items():
        assert [step for step, _ in resumed_events[tag]] == [step for step, _ in scalars], tag
        assert [value for _, value in resumed_events[tag]] == pytest.approx([value for _, value in scalars], abs=1e-5)


def test_runs_go_one_per_gpu_at_most_parallel_at_once_and_results_keep_config_order(tmp_path, monkeypatch):
    lock, running, seen, reported, gpus = threading.Lock(), {}, [], [], set()

    def measure_run(run, latency_rounds=10, gpu=None, resume_from=None):
        with lock:
            assert gpu not in running.values(), f"{run.label} given GPU {gpu}, which {running} holds"
            running[run.label] = gpu
            seen.append(len(running))
            gpus.add(gpu)
        time.sleep(0.05 * (6 - len(seen)))  # early runs take longest: they finish out of order
        with lock:
            del running[run.label]
        return fake_result(run)

    monkeypatch.setattr(runner, "measure_run", measure_run)
    monkeypatch.setattr(runner, "visible_gpus", lambda: ["3", "5", "7"])
    monkeypatch.setattr(runner, "write_report", lambda output, results, settings: reported.append(results))
    methods = [MethodSpec(name, RECIPES / "smoke.yaml") for name in ("a", "b", "c")]
    results = compare_methods(methods, tmp_path, folds=2, parallel=2)
    assert max(seen) == 2 and len(seen) == 6 and gpus == {"3", "5"}  # the first two of the visible GPUs
    assert [r.name for r in results] == ["a", "b", "c"] and all(r.folds == 2 for r in results)
    assert len(reported) == 6  # after each run: every method over the folds all have finished, in config order
    assert [[r.name for r in results] for results in reported][-1] == ["a", "b", "c"]
    assert all([r.name for r in results] == sorted(r.name for r in results) for results in reported)


def test_parallel_runs_are_pinned_to_visible_gpus(monkeypatch):
    monkeypatch.setattr(runner, "visible_gpus", lambda: ["4", "6"])
    assert runner.run_slots("auto") == ["4", "6"] and runner.run_slots(1) == ["4"]
    with pytest.raises(ValueError, match="only 2 GPUs are visible"):
        runner.run_slots(3)
    monkeypatch.setattr(runner, "visible_gpus", lambda: [])
    assert runner.run_slots("auto") == [None] and runner.run_slots(3) == [None, None, None]
    with pytest.raises(ValueError, match="positive number"):
        runner.run_slots(0)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5a1,7")
    monkeypatch.setattr(runner, "visible_gpus", visible_gpus)  # the real one, on 2 pretend GPUs
    assert runner.visible_gpus() == ["GPU-5a1", "7"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert runner.visible_gpus() == ["0", "1"]


def test_a_run_on_a_gpu_sees_only_that_gpu_and_trains_on_one_device(tmp_path, monkeypatch):
    seen = {}

    class FailedProcess:
        def __init__(self, command, env, **kwargs):
            seen.update(command=command, env=env)
            self.stdout, self.returncode = iter(["boom\n"]), 1

        def wait(self):
            return 1

    monkeypatch.setattr(runner.subprocess, "Popen", FailedProcess)
    (run,) = runner.plan_runs([MethodSpec("lora", RECIPES / "smoke.yaml")], tmp_path)
    failed = runner.measure_run(run, gpu="GPU-5a1")
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "GPU-5a1" and seen["command"][-2:] == ["--trainer.devices", "1"]
    assert failed.fit_command.startswith("CUDA_VISIBLE_DEVICES=GPU-5a1 vitlora fit --config")
    assert failed.error == "exit code 1: boom"
    runner.measure_run(run)
    assert "CUDA_VISIBLE_DEVICES" not in seen["env"] or seen["env"]["CUDA_VISIBLE_DEVICES"] == os.environ.get(
        "CUDA_VISIBLE_DEVICES"
    )
    assert "--trainer.devices" not in seen["command"]


def test_folds_are_planned_outermost_so_a_stopped_cross_validation_pairs_what_landed(tmp_path):
    methods = [MethodSpec("lora", RECIPES / "smoke.yaml"), MethodSpec("full", RECIPES / "smoke.yaml")]
    runs = runner.plan_runs(methods, tmp_path, folds=3)
    assert [run.label for run in runs] == [
        "lora fold 0", "full fold 0", "lora fold 1", "full fold 1", "lora fold 2", "full fold 2",
    ]  # fmt: skip
    assert runs[3].run_dir == tmp_path / "runs" / "full" / "fold1"
    assert runs[3].fit_args[runs[3].fit_args.index("--data.fold") + 1] == "1"
    assert [run.label for run in runner.plan_runs(methods, tmp_path)] == ["lora", "full"]


def grid_config(tmp_path: Path, **config) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"recipe": str(RECIPES / "smoke.yaml")} | config, sort_keys=False))
    return path


def test_a_grid_is_one_method_per_combination_named_by_its_values(tmp_path):
    grid = {"model.img_size": [32, 48], "data.mixup": [0.0, 0.2]}
    config = load_compare_config(
        grid_config(tmp_path, methods={"lora": {}, "full": {"model.method": "full"}}, grid=grid)
    )
    assert [m.name for m in config.methods] == [
        "lora.img_size-32.mixup-0.0", "lora.img_size-32.mixup-0.2", "lora.img_size-48.mixup-0.0",
        "lora.img_size-48.mixup-0.2", "full.img_size-32.mixup-0.0", "full.img_size-32.mixup-0.2",
        "full.img_size-48.mixup-0.0", "full.img_size-48.mixup-0.2",
    ]  # fmt: skip
    assert config.methods[5].overrides == {"model.method": "full", "model.img_size": 32, "data.mixup": 0.2}
    assert swept_options(config.methods) == ["model.img_size", "data.mixup"] and config.folds is None
    alone = load_compare_config(grid_config(tmp_path, grid={"model.img_size": [32, 48]}, folds=5))
    assert [m.name for m in alone.methods] == ["img_size-32", "img_size-48"] and alone.folds == 5
    replaced = load_compare_config(grid_config(tmp_path, grid=grid), grid={"data.mixup": [0.5]})  # --grid wins
    assert [m.name for m in replaced.methods] == ["img_size-32.mixup-0.5", "img_size-48.mixup-0.5"]
    smoke = MethodSpec("m", RECIPES / "smoke.yaml")
    names = [m.name for m in expand_grid([smoke], {"model.lora.alpha": [8.0], "model.head.alpha": [True]})]
    assert names == ["m.lora.alpha-8.0.head.alpha-true"]  # more of the option where its last part repeats
    names = [m.name for m in expand_grid([smoke], {"model.lora.targets": [["q", "v"]], "data.root": ["a/b c"]})]
    assert names == ["m.targets-q_v.root-a_b_c"]
    assert parse_grid_option("model.lr=0.001,3e-4,true") == ("model.lr", [0.001, "3e-4", True])


def test_the_fairness_check_lets_exactly_the_swept_options_differ(tmp_path):
    grid = {"model.img_size": [32, 48], "data.mixup": [0.0, 0.2]}
    load_compare_config(grid_config(tmp_path, methods={"lora": {}}, grid=grid))  # shared options, swept: fine
    with pytest.raises(ValueError, match=r"data\.batch_size \(lora\.img_size-32: 4, big\.img_size-32: 8"):
        load_compare_config(
            grid_config(tmp_path, methods={"lora": {}, "big": {"data.batch_size": 8}}, grid={"model.img_size": [32]})
        )
    with pytest.raises(ValueError, match=r"grid\.yaml: method 'lora' sets \['data\.mixup'\], which the grid sweeps"):
        load_compare_config(grid_config(tmp_path, methods={"lora": {"data.mixup": 0.1}}, grid=grid))
    with pytest.raises(ValueError, match=r"grid\.yaml: grid option 'model\.lr' needs a non-empty list"):
        load_compare_config(grid_config(tmp_path, grid={"model.lr": 0.1}))
    with pytest.raises(ValueError, match=r"`folds:` must be 2 or more for cross-validation \(1: none\), got 'five'"):
        load_compare_config(grid_config(tmp_path, methods={"lora": {}}, folds="five"))


def test_vary_frees_the_listed_options_and_only_them(tmp_path):
    methods = {"lora": {}, "mix": {"data.mixup": 0.2, "data.cutmix": 1.0}}
    with pytest.raises(ValueError, match=r"these settings differ: data\.cutmix .*; data\.mixup"):
        load_compare_config(grid_config(tmp_path, methods=methods))
    freed = load_compare_config(grid_config(tmp_path, methods=methods, vary=["data.mixup", "data.cutmix"]))
    assert [m.name for m in freed.methods] == ["lora", "mix"]
    assert swept_options(freed.methods) == ["data.mixup", "data.cutmix"]
    with pytest.raises(ValueError, match=r"these settings differ: data\.cutmix"):
        load_compare_config(grid_config(tmp_path, methods=methods, vary=["data.mixup"]))
    with pytest.raises(ValueError, match=r"`vary:` must list dotted"):
        load_compare_config(grid_config(tmp_path, methods=methods, vary="data.mixup"))
    sweep = load_compare_config(RECIPES / "grocery_sweep.yaml")  # the shipped sweep loads and is fair
    assert len(sweep.methods) == 10 * 2  # nine levers and full fine-tuning, each at two resolutions
    assert {"model.img_size", "data.mixup", "data.class_balance"} <= set(swept_options(sweep.methods))


def test_the_report_names_the_swept_options(tmp_path, fake_runs):
    methods = load_compare_config(grid_config(tmp_path, grid={"model.img_size": [32, 48]})).methods
    compare_methods(methods, tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Grid: the methods sweep `model.img_size`; all else is shared." in text
    assert json.loads((tmp_path / "out" / "report.json").read_text())["grid"] == ["model.img_size"]


def test_the_documented_grid_config_is_eight_methods_on_five_folds(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    example = next(block for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "grid:" in block)
    config = tmp_path / "sweep.yaml"
    config.write_text(example.replace("recipe: grocery_lora.yaml", f"recipe: {RECIPES / 'grocery_lora.yaml'}"))
    loaded = load_compare_config(config)
    assert len(loaded.methods) == 8 and loaded.folds == 5
    assert loaded.methods[1].name == "lora.img_size-224.mixup-0.2" and loaded.methods[-1].name.startswith("dora.")


def test_cli_sweeps_folds_and_parallel_runs_reach_the_runner(tmp_path, fake_runs, capsys):
    smoke = str(RECIPES / "smoke.yaml")
    main(["compare", "--recipes", smoke, "--output", str(tmp_path / "a"), "--grid", "model.lr=0.1,0.2", "--folds", "2"])
    assert fake_runs == [(f"smoke.lr-{lr} fold {k}", None) for k in (0, 1) for lr in (0.1, 0.2)]  # fold by fold
    fake_runs.clear()
    config = grid_config(tmp_path, methods={"lora": {}}, folds=3)
    main(["compare", "--config", str(config), "--output", str(tmp_path / "b"), "--folds", "2", "--parallel", "2"])
    assert sorted(fake_runs) == [("lora fold 0", None), ("lora fold 1", None)]  # the command line wins
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--recipes", smoke, "--output", str(tmp_path / "c"), "--parallel", "many"])
    assert exit_.value.code == 2 and "--parallel: invalid" in capsys.readouterr().err


def test_weakest_classes_of_the_best_method_with_every_method_on_them(tmp_path):
    def predictions(name, rows):
        path = tmp_path / f"{name}.csv"
        path.write_text("path,label,predicted\n" + "".join(f"{i}.jpg,{label},{pred}\n" for i, (label, pred) in rows))
        return [str(path)]

    labels = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    best_pred = [0, 0, 0, 0, 1, 1, 0, 0, 2, 1]  # class 1: 2/4, class 2: 1/2, class 0: 4/4
    other_pred = [0, 1, 1, 1, 1, 1, 1, 1, 2, 2]
    names = ["apple", "banana", "cherry"]
    best = MethodResult(
        "best", prediction_files=predictions("b", enumerate(zip(labels, best_pred, strict=True))), class_names=names
    )
    other = MethodResult("other", prediction_files=predictions("o", enumerate(zip(labels, other_pred, strict=True))))
    unscored = MethodResult("unscored", val={"top1": 0.5}, val_images=10)
    lines = list(compare_report.weakest_classes([best, other, unscored], standings([best, other, unscored]), count=2))
    assert lines[0] == "## Weakest classes of best"
    assert lines[2] == "| class | images | best (%) | other (%) |"
    assert lines[4:6] == ["| banana | 4 | 50.0 | 100.0 |", "| cherry | 2 | 50.0 | 100.0 |"]
    unscored_best = MethodResult("unscored", val={"top1": 0.9}, val_images=10)  # the most accurate, no predictions
    assert list(compare_report.weakest_classes([best, other], standings([best, other, unscored_best]))) == []


def test_a_pick_between_variants_of_one_method_names_what_they_share_not_a_fake_cost():
    same = {"adapter_bytes": 360_000, "peak_memory_mb": 1000.0}
    lines = comparison_reading(
        [
            result("hi_res", 0.91, 89_361, step_time_s=0.2, **same),
            result("low_res", 0.905, 89_361, step_time_s=0.1, **same),
        ]
    )
    pick = next(line for line in lines if line.startswith("Pick"))
    assert pick.startswith("Pick **low_res**: as accurate as hi_res within noise, training the same 89,361 parameters")
    assert "storing" not in pick and "0.50x the training step time" in pick
