import math

import pytest
import torch
from conftest import make_image_folder

from vitlora.files import read_state_dict
from vitlora.folds import MAX_FOLD_SHARE, appearance_folds, cached_features, spherical_kmeans
from vitlora.training.data import ImageDataModule


def clustered(
    sizes_per_class: list[list[int]], dim: int = 16, seed: int = 0
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Features of tight, far-apart clusters: (features, labels, cluster id of each row)."""
    generator = torch.Generator().manual_seed(seed)
    rows, labels, cluster_ids = [], [], []
    cluster = 0
    for label, sizes in enumerate(sizes_per_class):
        for size in sizes:
            centre = torch.randn(dim, generator=generator) * 10
            rows.append(centre + 0.05 * torch.randn(size, dim, generator=generator))
            labels += [label] * size
            cluster_ids += [cluster] * size
            cluster += 1
    return torch.cat(rows), labels, cluster_ids


def test_look_alike_clusters_stay_in_one_fold_and_each_class_uses_every_fold():
    features, labels, clusters = clustered([[10, 8, 7], [9, 9, 6], [12, 7, 7]])
    fold_of = appearance_folds(features, labels, folds=3, seed=0)
    for cluster in set(clusters):
        assert len({fold_of[i] for i, c in enumerate(clusters) if c == cluster}) == 1  # never split
    for label in set(labels):
        assert {fold_of[i] for i, y in enumerate(labels) if y == label} == {0, 1, 2}
    sizes = [fold_of.count(k) for k in range(3)]
    assert max(sizes) - min(sizes) <= 12, sizes  # largest cluster first to the emptiest fold: within one cluster
    assert appearance_folds(features, labels, folds=3, seed=0) == fold_of  # seeded


def test_a_dominant_look_is_capped_so_training_keeps_most_of_the_class():
    features, labels, _ = clustered([[40, 1, 1]])  # one look nearly everywhere, two odd photos
    fold_of = appearance_folds(features, labels, folds=3, seed=0)
    cap = math.ceil(MAX_FOLD_SHARE * 42 / 3)
    assert max(fold_of.count(k) for k in range(3)) == cap  # uncapped, one fold would hold 40 of 42
    assert min(fold_of.count(k) for k in range(3)) >= 1


def test_a_class_smaller_than_the_folds_is_dealt_one_per_fold():
    features, labels, _ = clustered([[2], [6, 6, 6]])
    fold_of = appearance_folds(features, labels, folds=3, seed=0)
    assert len({fold_of[0], fold_of[1]}) == 2


def test_bad_arguments_are_refused():
    features, labels, _ = clustered([[4, 4]])
    with pytest.raises(ValueError, match="at least 2 folds"):
        appearance_folds(features, labels, folds=1, seed=0)
    with pytest.raises(ValueError, match="7 feature rows for 8 labels"):
        appearance_folds(features[:7], labels, folds=2, seed=0)


def test_kmeans_separates_far_clusters_and_leaves_none_empty():
    features, _, truth = clustered([[5, 5, 5, 1]])
    unit = torch.nn.functional.normalize(features, dim=1)
    found = spherical_kmeans(unit, 4, torch.Generator().manual_seed(3))
    assert len(set(found)) == 4
    groups = {frozenset(i for i, c in enumerate(truth) if c == t) for t in set(truth)}
    assert {frozenset(i for i, c in enumerate(found) if c == f) for f in set(found)} == groups


def test_cached_features_are_computed_once_and_again_when_an_image_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLORA_CACHE", str(tmp_path / "cache"))
    images = [tmp_path / f"{i}.png" for i in range(3)]
    for path in images:
        path.write_bytes(b"x")
    samples = [(path, 0) for path in images]
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6.0).reshape(3, 2) + len(calls)

    first = cached_features(["model"], samples, compute)
    assert torch.equal(cached_features(["model"], samples, compute), first) and len(calls) == 1
    cached_features(["other model"], samples, compute)
    assert len(calls) == 2
    images[1].write_bytes(b"changed")  # another size: another key
    assert not torch.equal(cached_features(["model"], samples, compute), first) and len(calls) == 3
    for entry in (tmp_path / "cache" / "fold-features").iterdir():
        entry.write_bytes(b"not a safetensors file")
    cached_features(["model"], samples, compute)  # a damaged entry is recomputed, not an error
    assert len(calls) == 4


def test_the_data_module_deals_appearance_folds_from_cached_backbone_features(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLORA_CACHE", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "data", per_split={"train": 7, "val": 2, "test": 2})
    (root / "train" / "apple" / "apple_6.png").write_bytes(b"not an image")  # skipped at set-up, as ever

    def module(fold: int) -> ImageDataModule:
        return ImageDataModule(
            str(root), backbone="vit_tiny_patch16_224", pretrained=False, num_workers=0, folds=3, fold=fold,
            fold_by="appearance",
        )  # fmt: skip

    splits = [module(fold).index.splits for fold in range(3)]
    pooled = sorted(splits[0]["train"] + splits[0]["val"])
    assert sorted(s for split in splits for s in split["val"]) == pooled  # each image val exactly once
    assert all(not set(split["train"]) & set(split["val"]) for split in splits)
    assert "look-alikes kept together" in module(0).index.layout
    with pytest.raises(ValueError, match=r"set data\.folds too"):
        ImageDataModule(str(root), fold_by="appearance")
    with pytest.warns(UserWarning, match=r"apple_6\.png"):
        data = module(next(k for k in range(3) if any(p.name == "apple_6.png" for p, _ in splits[k]["train"])))
        data.setup("fit")
    assert data.skipped == {"train": 1, "val": 0}
    cache = list((tmp_path / "cache" / "fold-features").iterdir())
    assert len(cache) == 1  # three folds, one embedding of the images
    features = read_state_dict(cache[0])["features"]
    plain = ImageDataModule(str(root), num_workers=0).index.splits
    pooled_in_order = plain["train"] + plain["val"]  # the order cross-validation pools them in
    fold_of = appearance_folds(features, [label for _, label in pooled_in_order], 3, seed=0)
    for fold in range(3):
        assert sorted(splits[fold]["val"]) == sorted(
            s for s, k in zip(pooled_in_order, fold_of, strict=True) if k == fold
        )
