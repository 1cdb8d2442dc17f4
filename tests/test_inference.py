"""Catalog-scale classify: batched worker-process decoding, streamed CSV/JSONL rows, resume, per-row errors."""

import csv
import json

import pytest
import torch
from conftest import make_adapter, make_workspace

from vitlora import LoRAConfig
from vitlora.cli import main
from vitlora.inference import classify, classify_files


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("catalog"))
    make_adapter(root, root / "fruit.safetensors", LoRAConfig(rank=4), ["apple", "banana", "cherry"], seed=3)
    (root / "data" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def read_rows(path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return [
        {
            "path": row["path"],
            "labels": [row[f"label_{i}"] for i in (1, 2) if row[f"label_{i}"]],
            "probabilities": [float(row[f"prob_{i}"]) for i in (1, 2) if row[f"prob_{i}"]],
            "error": row["error"],
        }
        for row in rows
    ]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_rows_equal_the_in_process_classify_with_unreadable_images_reported(catalog, suffix):
    weights = str(catalog / "base.safetensors")
    expected = classify(catalog / "fruit.safetensors", [catalog / "data"], weights=weights, top_k=2)
    output = catalog / f"predictions{suffix}"
    written, unreadable = classify_files(
        catalog / "fruit.safetensors", [catalog / "data"], output, weights=weights, top_k=2, batch_size=4,
        num_workers=2, progress=False,
    )  # fmt: skip
    assert (written, unreadable) == (len(expected), 1) and len(expected) == 43  # 42 photos, folders recursed
    rows = read_rows(output)
    assert [row["path"] for row in rows] == [row["path"] for row in expected]
    for row, reference in zip(rows, expected, strict=True):
        assert row["labels"] == reference["labels"] and row["error"] == reference["error"]
        assert row["probabilities"] == pytest.approx(reference["probabilities"], abs=1e-6)
    [broken] = [row for row in rows if row["error"]]
    assert broken["path"].endswith("broken.jpg") and "not a recognised image format" in broken["error"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_skips_what_an_interrupted_run_wrote(catalog, suffix):
    weights, adapter = str(catalog / "base.safetensors"), catalog / "fruit.safetensors"
    full = catalog / f"full{suffix}"
    classify_files(adapter, [catalog / "data"], full, weights=weights, num_workers=0, progress=False)
    lines = full.read_text().splitlines(keepends=True)
    interrupted = catalog / f"interrupted{suffix}"
    interrupted.write_text("".join(lines[:20]) + lines[20][:15])  # killed in the middle of a row
    written, _ = classify_files(
        adapter, [catalog / "data"], interrupted, weights=weights, num_workers=0, resume=True, progress=False
    )
    assert written == len(lines) - 20  # the rows after the 19 (CSV: and a header) or 20 (JSONL) complete ones
    assert sorted(interrupted.read_text().splitlines()) == sorted(full.read_text().splitlines())


def test_the_command_streams_csv_and_refuses_other_suffixes(catalog, capsys):
    output = catalog / "cli.csv"
    main(["classify", str(catalog / "fruit.safetensors"), str(catalog / "data" / "val"), "--output", str(output),
          "--weights", str(catalog / "base.safetensors"), "--num-workers", "0", "--no-progress"])  # fmt: skip
    assert "9 of 9 images classified" in capsys.readouterr().out and len(read_rows(output)) == 9
    with pytest.raises(SystemExit, match=r"preds\.txt: the output must end in \.csv or \.jsonl or \.json"):
        main(["classify", str(catalog / "fruit.safetensors"), str(catalog / "data"), "--output", "preds.txt"])
    with pytest.raises(ValueError, match=r"must end in \.csv or \.jsonl"):
        classify_files(catalog / "fruit.safetensors", [catalog / "data"], catalog / "x.json")


def test_tta_views_are_the_batch_its_mirror_and_a_central_zoom_of_both():
    from vitlora.inference import tta_views

    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    assert [v.data_ptr() for v in tta_views(images, "none")] == [images.data_ptr()]
    plain, mirror = tta_views(images, "flip")
    assert torch.equal(plain, images) and torch.equal(mirror, images.flip(-1))
    views = tta_views(images, "flip-zoom")
    assert len(views) == 4 and all(v.shape == images.shape for v in views)
    assert torch.equal(views[3], views[2].flip(-1))
    constant = torch.full((1, 3, 16, 16), 0.25)
    assert torch.allclose(tta_views(constant, "flip-zoom")[2], constant)  # a zoom only rescales
    ramp = torch.arange(16.0).expand(1, 1, 16, 16).contiguous()  # columns 0..15; the zoom keeps 1..14
    zoom_row = tta_views(ramp, "flip-zoom")[2][0, 0, 0]
    assert 0.5 < zoom_row[0] < 1.6 and 13.4 < zoom_row[-1] < 14.5 and torch.all(zoom_row.diff() > 0)
    with pytest.raises(ValueError, match="Unknown test-time augmentation"):
        tta_views(images, "crops")
