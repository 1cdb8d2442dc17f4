"""Paired statistics of two methods on the same images, and the reading and report that use them."""

import json
import math
import random
import time
from pathlib import Path

import pytest
import torch

from vitlora.compare import MethodResult, comparison_reading
from vitlora.compare.measure import write_predictions
from vitlora.compare.paired import bootstrap_interval, mcnemar_p, paired_by_fold, paired_comparison, read_correct
from vitlora.compare.report import write_report

# --- McNemar's exact test -------------------------------------------------------------------


def test_mcnemar_p_is_the_doubled_exact_binomial_tail():
    assert mcnemar_p(10, 0) == mcnemar_p(0, 10) == 2 * 0.5**10
    assert mcnemar_p(3, 1) == 2 * (1 + 4) / 2**4  # P(X <= 1) for X ~ Binomial(4, 1/2), doubled
    assert mcnemar_p(1, 0) == 1.0  # one discordant image proves nothing: the doubled tail is capped at 1
    for equal in (0, 1, 7, 500):
        assert mcnemar_p(equal, equal) == 1.0
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_p(-1, 3)


def test_mcnemar_p_on_many_images_matches_independent_computations():
    b, c = 600, 500  # the normal approximation with continuity correction is close at this size
    assert mcnemar_p(b, c) == pytest.approx(math.erfc((abs(b - c) - 1) / math.sqrt(2 * (b + c))), rel=0.02)
    b, c = 3000, 2000  # far in the tail: the same sum in log space, term by term
    n = b + c
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2) for k in range(c + 1)]
    top = max(logs)
    expected_log = math.log(2) + top + math.log(sum(math.exp(v - top) for v in logs))
    p = mcnemar_p(b, c)
    assert 0 < p < 1e-40 and math.log(p) == pytest.approx(expected_log, rel=1e-9)


# --- the paired bootstrap -------------------------------------------------------------------


def test_bootstrap_interval_is_deterministic_for_a_seed():
    assert bootstrap_interval(70, 32, 2936, seed=3) == bootstrap_interval(70, 32, 2936, seed=3)
    few_rounds = {bootstrap_interval(70, 32, 2936, rounds=100, seed=seed) for seed in range(5)}
    assert len(few_rounds) > 1  # the seed is what repeats it (10,000 rounds settle on the same grid points)
    low, high = bootstrap_interval(0, 0, 9)  # agreeing on 9 images proves little...
    assert low < -0.15 and high > 0.15
    low, high = bootstrap_interval(0, 0, 3000)  # ...on 3,000 it pins the difference down
    assert -0.002 < low < 0 < high < 0.002
    with pytest.raises(ValueError, match="do not fit in 10 images"):
        bootstrap_interval(8, 5, 10)


def test_bootstrap_interval_matches_the_normal_interval_on_many_images():
    b, c, n = 240, 90, 3000
    difference = (b - c) / n
    error = math.sqrt(((b + c) / n - difference**2) / n)  # standard error of a mean of per-image -1/0/+1
    low, high = bootstrap_interval(b, c, n)
    assert low == pytest.approx(difference - 1.96 * error, abs=0.001)
    assert high == pytest.approx(difference + 1.96 * error, abs=0.001)


def test_bootstrap_of_counts_is_the_bootstrap_of_images():
    """Resampling images index by index, the slow way, gives the same interval as drawing the counts."""
    b, c, n = 30, 12, 300
    per_image = torch.tensor([1.0] * (b + 1) + [-1.0] * (c + 1) + [0.0] * (n - b - c), dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)  # one pseudo-image of each discordant kind, as documented
    means = torch.cat([per_image[torch.randint(n + 2, (1000, n + 2), generator=generator)].mean(1) for _ in range(10)])
    slow = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert bootstrap_interval(b, c, n) == pytest.approx(slow, abs=0.005)  # within 1.5 images of 300


def simulated_methods(images: int, rng: random.Random) -> tuple[dict[str, bool], dict[str, bool]]:
    """Two methods with a true accuracy gap of 5 points: 80% both right, 8% only the first, 3% only the second."""
    first, second = {}, {}
    for index in range(images):
        draw = rng.random()
        first[f"img{index}"] = draw < 0.88
        second[f"img{index}"] = draw < 0.80 or 0.88 <= draw < 0.91
    return first, second


def test_interval_contains_the_true_difference_about_95_times_in_100():
    true_difference = 0.88 - 0.83
    rng = random.Random(0)
    hits = [
        low <= true_difference <= high
        for low, high in (paired_comparison(*simulated_methods(500, rng), seed=i).interval for i in range(400))
    ]
    assert 0.92 <= sum(hits) / len(hits) <= 0.98
    one = paired_comparison(*simulated_methods(3000, random.Random(1)))
    assert one.interval[0] < true_difference < one.interval[1]


def test_paired_comparison_counts_the_shared_images_only():
    first = {"a": True, "b": True, "c": False, "d": False, "e": True, "only_first": True}
    second = {"a": True, "b": False, "c": True, "d": False, "e": False, "only_second": False}
    pair = paired_comparison(first, second)
    assert (pair.images, pair.first_only, pair.second_only) == (5, 2, 1)
    assert (pair.first_accuracy, pair.second_accuracy, pair.difference) == (0.6, 0.4, pytest.approx(0.2))
    assert pair.p_value == mcnemar_p(2, 1) == 1.0
    assert pair.interval == bootstrap_interval(2, 1, 5)
    with pytest.raises(ValueError, match="No image scored by both"):
        paired_comparison({"a": True}, {"b": True})


def test_paired_comparison_of_3000_images_is_fast():
    first, second = simulated_methods(3000, random.Random(2))
    start = time.perf_counter()
    paired_comparison(first, second, rounds=10_000)
    assert time.perf_counter() - start < 2.0


# --- reading prediction files ---------------------------------------------------------------


def predictions(path: Path, right: list[bool], first_image: int = 0) -> str:
    """A val_predictions.csv as measure writes it: images first_image... of class 1, predicted right or not."""
    samples = [(Path(f"data/img{first_image + i}.jpg"), 1) for i in range(len(right))]
    write_predictions(path, samples, torch.tensor([1 if r else 0 for r in right]))
    return str(path)


def test_read_correct_pools_folds(tmp_path):
    folds = [predictions(tmp_path / "fold0.csv", [True, False]), predictions(tmp_path / "fold1.csv", [False], 2)]
    assert read_correct(folds) == {"data/img0.jpg": True, "data/img1.jpg": False, "data/img2.jpg": False}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("path,label\na.jpg,1\n", "no predicted column"),
        ("", "no path, label, predicted column"),
        ("path,label,predicted\na.jpg,1,one\n", r"line 2: expected path,label,predicted with class numbers"),
        ("path,label,predicted\na.jpg,1,1\nb.jpg,1\n", "line 3: expected"),
        ("path,label,predicted\na.jpg,1,1,0\n", "line 2: expected"),
        ("path,label,predicted\n,1,1\n", "line 2: expected"),
        ("path,label,predicted\na.jpg,1,1\na.jpg,1,0\n", r"line 3: a\.jpg is already scored in .*bad\.csv"),
    ],
)
def test_read_correct_refuses_malformed_files_naming_them(tmp_path, text, problem):
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(ValueError, match=problem) as error:
        read_correct([bad])
    assert str(error.value).startswith(str(bad))


def test_read_correct_refuses_an_image_in_two_folds_and_a_missing_file(tmp_path):
    first = predictions(tmp_path / "fold0.csv", [True, True])
    second = predictions(tmp_path / "fold1.csv", [True], first_image=1)
    with pytest.raises(ValueError, match=rf"^{second}, line 2: data/img1\.jpg is already scored in {first}\.$"):
        read_correct([first, second])
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'gone.csv'}: cannot read predictions"):
        read_correct([tmp_path / "gone.csv"])


def test_paired_by_fold_pairs_each_shared_fold_then_pools_them(tmp_path):
    """Folds 0 and 1 finished for both, fold 2 for the first only: it is left out, not half-paired."""
    lora = {0: predictions(tmp_path / "l0.csv", [True, True, False]), 1: predictions(tmp_path / "l1.csv", [True], 3)}
    lora[2] = predictions(tmp_path / "l2.csv", [True], 4)
    full = {0: predictions(tmp_path / "f0.csv", [True, False, False]), 1: predictions(tmp_path / "f1.csv", [False], 3)}
    rows = paired_by_fold(lora, full)
    assert [label for label, _ in rows] == ["fold 0", "fold 1", "pooled (2 folds)"]
    fold0, fold1, pooled = (pair for _, pair in rows)
    assert (fold0.images, fold0.first_only, fold0.second_only, fold0.difference) == (3, 1, 0, pytest.approx(1 / 3))
    assert (fold1.images, fold1.first_only, fold1.second_only) == (1, 1, 0)
    assert pooled == paired_comparison(read_correct([lora[0], lora[1]]), read_correct([full[0], full[1]]))
    assert (pooled.images, pooled.first_accuracy, pooled.second_accuracy) == (4, 3 / 4, 1 / 4)
    assert [label for label, _ in paired_by_fold({0: lora[0]}, {0: full[0]})] == ["fold 0"]  # one fold: no pool


def test_paired_by_fold_refuses_folds_that_hold_out_other_images(tmp_path):
    first = {0: predictions(tmp_path / "a.csv", [True, True])}
    shifted = {0: predictions(tmp_path / "b.csv", [True, True], first_image=1)}
    with pytest.raises(ValueError, match=rf"^Fold 0 holds out other images in {first[0]} than in {shifted[0]} "):
        paired_by_fold(first, shifted)
    with pytest.raises(ValueError, match=r"No fold finished for both methods \(folds \[0\] and \[1\]\)"):
        paired_by_fold(first, {1: shifted[0]})
    twice = {0: first[0], 1: predictions(tmp_path / "c.csv", [False], first_image=1)}  # img1 in both folds
    with pytest.raises(ValueError, match=r"line 2: data/img1\.jpg is already scored in .*a\.csv"):
        paired_by_fold(twice, twice)


# --- the reading and the report -------------------------------------------------------------


def scored(name: str, right: list[bool], folder: Path | None, trainable: int) -> MethodResult:
    """A finished method with its logged val top-1 and, given a folder, its per-image predictions."""
    files = [predictions(folder / f"{name}.csv", right)] if folder else []
    top1 = sum(right) / len(right)
    return MethodResult(
        name, val={"top1": top1}, val_images=len(right), trainable=trainable, total=10**6, prediction_files=files
    )


def two_methods(folder: Path | None, both: int, full_only: int, lora_only: int, neither: int) -> list[MethodResult]:
    full = [True] * (both + full_only) + [False] * (lora_only + neither)
    lora = [True] * both + [False] * full_only + [True] * lora_only + [False] * neither
    return [scored("full", full, folder, 10**6), scored("lora", lora, folder, 10**4)]


def test_a_5_point_gap_on_296_images_is_real_when_the_images_are_paired(tmp_path):
    """15 images only full gets right, none the other way: the unpaired rule called this noise."""
    paired = comparison_reading(two_methods(tmp_path, both=235, full_only=15, lora_only=0, neither=46))
    pair = paired_comparison(*(read_correct([tmp_path / f"{name}.csv"]) for name in ("full", "lora")))
    low, high = (100 * bound for bound in pair.interval)
    assert paired[0].startswith("**full** is the most accurate on val: top-1 84.5% on 296 images")
    assert paired[1] == (
        "lora is 5.1 points lower on the same 296 images: a real gap (McNemar p < 0.001; 95% interval of the "
        f"difference {low:.1f} to {high:.1f} points; full is right where lora is wrong on 15 images, the reverse "
        "on 0)."
    )
    assert 0 < low < 5.1 < high
    assert next(line for line in paired if line.startswith("Pick")).startswith("Pick **full**: nothing comes within")
    unpaired = comparison_reading(two_methods(None, both=235, full_only=15, lora_only=0, neither=46))
    assert unpaired[1].startswith("lora is 5.1 points lower: within noise (unpaired: no per-image predictions;")
    assert next(line for line in unpaired if line.startswith("Pick")).startswith("Pick **lora**")


def test_an_even_split_is_noise_and_a_wide_interval_asks_for_more_images(tmp_path):
    lines = comparison_reading(two_methods(tmp_path, both=2500, full_only=40, lora_only=30, neither=430))
    evidence = "within noise (McNemar p = 0.282;"  # the normal approximation: erfc(9 / sqrt(140)) = 0.282
    assert lines[1].startswith(f"lora is 0.3 points lower on the same 3,000 images: {evidence}")
    assert next(line for line in lines if line.startswith("Pick")).startswith("Pick **lora**: as accurate as full")
    assert not any("evaluate on more images" in line for line in lines)  # 3,000 images pin the difference down
    few = comparison_reading(two_methods(tmp_path, both=40, full_only=4, lora_only=2, neither=14))
    assert "within noise (McNemar p = 0.688;" in few[1]  # 2 (1 + 6 + 15) / 2**6 = 0.6875
    assert few[-1].startswith("A close call's 95% interval of the difference spans")
    assert few[-1].endswith("with 60 val images: evaluate on more images before a close call.")
    agreeing = comparison_reading(two_methods(tmp_path, both=9, full_only=0, lora_only=0, neither=0))
    assert "full is 0.0 points lower on the same 9 images: within noise (McNemar p = 1;" in agreeing[1]  # a tie
    assert "evaluate on more images" in agreeing[-1]  # agreeing on 9 images is no evidence that they are equal


def test_the_best_is_scored_on_its_pooled_folds(tmp_path):
    """Two folds of 100 images pool into 200; a method scored on the first fold only is paired on those 100."""
    folds = [
        predictions(tmp_path / "f0.csv", [True] * 90 + [False] * 10),
        predictions(tmp_path / "f1.csv", [True] * 100, 100),
    ]
    cross = MethodResult("cross", val={"top1": 0.5}, val_images=100, trainable=10, total=100, prediction_files=folds)
    single = scored("single", [True] * 92 + [False] * 8, tmp_path, 5)
    legacy = MethodResult("legacy", val={"top1": 0.7}, val_images=100, trainable=1, total=100)
    lines = comparison_reading([single, legacy, cross])
    assert lines[0].startswith("**cross** is the most accurate on val: top-1 95.0% on 200 images pooled over 2 folds")
    assert lines[1].startswith("single is 2.0 points higher on the same 100 images: within noise")
    assert "cross is right where single is wrong on 0 images, the reverse on 2)" in lines[1]
    assert lines[2].startswith("legacy is 25.0 points lower: a real gap (unpaired: no per-image predictions;")


def test_the_report_lists_the_paired_comparisons(tmp_path):
    results = two_methods(tmp_path, both=235, full_only=15, lora_only=0, neither=46)
    settings = {"command": "vitlora compare", "budget": "none", "shared_args": [], "latency_rounds": 1}
    write_report(tmp_path, results, settings)
    pair = paired_comparison(*(read_correct(r.prediction_files) for r in results))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["paired"] == [{"method": "lora", "against": "full", **json.loads(json.dumps(pair.__dict__))}]
    table = (tmp_path / "report.md").read_text().split("## Paired comparisons")[1].split("##")[0]
    low, high = pair.interval
    assert f"| lora | 296 | 79.4 | 84.5 | 5.1 | {100 * low:.1f} to {100 * high:.1f} | 6.1e-05 | 15 | 0 |" in table
