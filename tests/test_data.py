import warnings
from pathlib import Path

import pytest
import torch
from conftest import SHARED, make_grocery_folder, make_image_folder
from PIL import Image

from vitlora.datasets import (
    DatasetError,
    EpochShuffler,
    ImageDataset,
    class_balanced_weights,
    read_dataset,
    stratified_folds,
)
from vitlora.training.data import ImageDataModule

GROCERY = SHARED / "data" / "grocery-store"


def module(root, **kwargs):
    defaults = dict(backbone="vit_tiny_patch16_224", img_size=32, batch_size=4, num_workers=0, auto_augment=None)
    return ImageDataModule(str(root), **{**defaults, **kwargs})


def test_folder_layout_is_detected_and_classes_come_from_train(tmp_path):
    make_image_folder(tmp_path)
    index = read_dataset(tmp_path)
    assert index.class_names == ["apple", "banana", "cherry"]
    assert {s: len(v) for s, v in index.splits.items()} == {"train": 24, "val": 9, "test": 9}


def test_csv_manifest_with_and_without_split(tmp_path):
    make_image_folder(tmp_path)
    rows = ["path,label,split"] + [
        f"{split}/{c}/{c}_{i}.png,{c},{split}"
        for split in ("train", "val")
        for c in ("apple", "banana")
        for i in range(3)
    ]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    index = read_dataset(tmp_path)
    assert index.class_names == ["apple", "banana"] and len(index.splits["val"]) == 6
    (tmp_path / "m2.csv").write_text("path,label\ntrain/apple/apple_0.png,apple\ntrain/banana/banana_0.png,banana\n")
    assert list(read_dataset(tmp_path, manifest=tmp_path / "m2.csv").splits) == ["train"]


def write_grocery(root, lines, classes=("Golden-Delicious,0,Apple,0,x,y", "Banana,1,Banana,1,x,y")):
    make_image_folder(root, classes=("a", "b"), per_split={"train": 2})
    (root / "classes.csv").write_text("Class Name (str),Class ID (int),Coarse...\n" + "\n".join(classes) + "\n")
    (root / "train.txt").write_text("\n".join(lines) + "\n")


def test_grocery_layout_fine_and_coarse(tmp_path):
    write_grocery(tmp_path, ["train/a/a_0.png, 0, 0", "train/b/b_1.png, 1, 1"])
    assert read_dataset(tmp_path).class_names == ["Golden-Delicious", "Banana"]
    coarse = read_dataset(tmp_path, label_level="coarse")
    assert coarse.class_names == ["Apple", "Banana"] and coarse.splits["train"][1][1] == 1


def test_grocery_fine_labels_carry_each_class_coarse_class_and_the_data_module_exposes_it(tmp_path):
    make_grocery_folder(tmp_path)
    index = read_dataset(tmp_path)
    assert index.class_names == ["Granny-Smith", "Pink-Lady", "Banana", "Oat-Milk"]
    assert index.fine_to_coarse == [0, 0, 1, 2] and index.coarse_class_names == ["Apple", "Banana", "Milk"]
    data = module(tmp_path)
    assert data.fine_to_coarse == [0, 0, 1, 2] and data.coarse_class_names == ["Apple", "Banana", "Milk"]
    coarse = read_dataset(tmp_path, label_level="coarse")  # the labels are the coarse classes already
    assert coarse.class_names == ["Apple", "Banana", "Milk"] and coarse.splits["test"][4][1] == 0
    assert coarse.fine_to_coarse is None and coarse.coarse_class_names is None


def test_layouts_without_coarse_classes_have_no_mapping(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "m.csv").write_text("path,label\ntrain/apple/apple_0.png,apple\n")
    for index in (read_dataset(tmp_path), read_dataset(tmp_path / "m.csv")):
        assert index.fine_to_coarse is None and index.coarse_class_names is None
    assert module(tmp_path).fine_to_coarse is None


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        (  # Pink-Lady listed a second time, in Banana
            "classes.csv",
            lambda text: text + "Pink-Lady,1,Banana,1,/iconic/x.jpg\n",
            r"classes\.csv:6: fine class 1 \(Pink-Lady\) has coarse id 1 here but 0 on line 3",
        ),
        (
            "classes.csv",
            lambda text: text.replace("Oat-Milk,3,Milk,2", "Oat-Milk,3,Oats,1"),
            r"classes\.csv:5: coarse id 1 is named 'Oats' here but 'Banana' above",
        ),
        (
            "classes.csv",
            lambda text: text.replace("Oat-Milk,3,Milk,2", "Oat-Milk,3,Milk,5"),
            r"classes\.csv: coarse class ids are not 0\.\.2",
        ),
        (  # the second Banana image (line 10) put into Apple
            "train.txt",
            lambda text: text.replace("Banana_1.png, 2, 1", "Banana_1.png, 2, 0"),
            r"train\.txt:10: fine class 2 \(Banana\) has coarse id 0 here but 1 \(Banana\) in classes\.csv",
        ),
    ],
)
def test_a_fine_class_in_two_coarse_classes_is_refused_naming_file_and_line(tmp_path, file, edit, message):
    make_grocery_folder(tmp_path)
    path = tmp_path / file
    before = path.read_text()
    path.write_text(edit(before))
    assert path.read_text() != before  # the edit took
    with pytest.raises(DatasetError, match=message):
        read_dataset(tmp_path)


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda root: (root / "train" / "apple" / "apple_0.png").unlink() or None, None),
        (
            lambda root: [p.unlink() for p in (root / "val" / "banana").iterdir()],
            r"val/banana: empty class folder",
        ),
        (
            lambda root: (root / "val" / "durian").mkdir() or Image.new("RGB", (9, 9)).save(root / "val/durian/x.png"),
            r"durian.*not among the train classes",
        ),
    ],
)
def test_folder_problems_are_named_at_setup(tmp_path, break_it, message):
    make_image_folder(tmp_path)
    break_it(tmp_path)
    if message is None:  # a removed file is simply not listed
        assert len(read_dataset(tmp_path).splits["train"]) == 23
        return
    with pytest.raises(DatasetError, match=message):
        module(tmp_path).setup("fit")


def test_manifest_problems_are_named(tmp_path):
    make_image_folder(tmp_path)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,split\ntrain/apple/apple_0.png,apple,train\nval/x/gone.png,apple,val\n")
    with pytest.raises(DatasetError, match=r"1 listed image files do not exist.*gone\.png"):
        read_dataset(tmp_path)
    manifest.write_text("path,label,split\ntrain/apple/apple_0.png,apple,train\nval/apple/apple_0.png,kiwi,val\n")
    with pytest.raises(DatasetError, match=r"manifest\.csv: val rows use labels not in train: \['kiwi'\]"):
        read_dataset(tmp_path)
    write_grocery(tmp_path / "g", ["train/a/a_0.png, 7, 0"])
    with pytest.raises(DatasetError, match=r"train\.txt:1: unknown fine label 7"):
        read_dataset(tmp_path / "g")
    with pytest.raises(DatasetError, match="cannot tell the dataset layout"):
        read_dataset(tmp_path / "g" / "train" / "a")  # images, but no class folders
    manifest.write_text("path,label,split\ntrain/apple/apple_0.png,,train\n")
    with pytest.raises(DatasetError, match=r"manifest\.csv:2: a row needs both a path and a label"):
        read_dataset(tmp_path)
    (tmp_path / "g" / "classes.csv").write_text("header\nBanana\n")
    with pytest.raises(DatasetError, match=r"classes\.csv:2: expected"):
        read_dataset(tmp_path / "g")


def test_bad_images_are_skipped_with_one_warning_each_or_fail_fast(tmp_path, caplog):
    make_image_folder(tmp_path)
    (tmp_path / "train/apple/apple_0.png").write_bytes(b"garbage")
    (tmp_path / "train/banana/banana_0.png").write_bytes((tmp_path / "train/banana/banana_1.png").read_bytes()[:60])
    Image.new("CMYK", (30, 30)).save(tmp_path / "train/cherry/cmyk.jpg")  # convertible: kept
    data = module(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.setup("fit")
    skipped = [str(w.message) for w in caught if "skipping image" in str(w.message)]
    assert len(skipped) == 2 and any("apple_0.png" in s for s in skipped)
    assert "skipped 2 of 25 images" in caplog.text
    assert len(data._datasets["train"]) == 23
    with pytest.raises(ValueError, match=r"apple_0\.png"):
        module(tmp_path, fail_on_bad_images=True).setup("fit")


def test_transforms_follow_the_backbone_pretrained_config(tmp_path):
    make_image_folder(tmp_path)
    data = module(tmp_path, backbone="vit_tiny_patch16_224.augreg_in21k_ft_in1k", img_size=None)
    data.setup("fit")
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (4, 3, 224, 224) and labels.dtype == torch.int64
    # AugReg normalises with mean = std = 0.5: pixel values span [-1, 1]
    assert images.min() >= -1.0001 and images.max() <= 1.0001 and images.min() < -0.5


def test_training_order_and_augmentation_depend_only_on_seed_and_epoch(tmp_path):
    make_image_folder(tmp_path)
    first, second = (
        module(tmp_path, auto_augment="rand-m9-mstd0.5-inc1"),
        module(tmp_path, auto_augment="rand-m9-mstd0.5-inc1"),
    )
    for data in (first, second):
        data.setup("fit")
    batch = lambda data: next(iter(data.train_dataloader()))  # noqa: E731
    torch.manual_seed(123)
    a = batch(first)
    torch.manual_seed(456)  # the global RNG does not matter
    b = batch(second)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    sampler = EpochShuffler(10, seed=0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0 and sorted(i for i, _ in sampler) == list(range(10))


@pytest.mark.parametrize("size", [12, 11])
def test_ranks_share_one_order_so_a_global_batch_is_what_one_process_draws(size):
    single = list(EpochShuffler(size, seed=3))
    ranks = [EpochShuffler(size, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    shares = [list(sampler) for sampler in ranks]
    assert len(shares[0]) == len(shares[1]) == len(ranks[0]) == (size + 1) // 2
    for step in range(size // 4):  # per-rank batch 2 == one process's batch 4
        together = sorted(shares[0][2 * step : 2 * step + 2] + shares[1][2 * step : 2 * step + 2])
        assert together == sorted(single[4 * step : 4 * step + 4]), step
    assert sorted(shares[0] + shares[1]) == sorted(single + single[: 2 * len(shares[0]) - size])  # pads by repeats
    for sampler in ranks:
        sampler.set_epoch(1)
    assert [list(s) for s in ranks] != shares and all(epoch == 1 for s in ranks for _, epoch in s)


def test_class_balanced_weights_give_each_class_the_mass_the_power_asks_for():
    labels = [0] * 8 + [1] * 2
    mass = lambda w: [w[:8].sum().item(), w[8:].sum().item()]  # noqa: E731
    assert mass(class_balanced_weights(labels, 0.0)) == [8.0, 2.0]
    assert mass(class_balanced_weights(labels, 1.0)) == pytest.approx([1.0, 1.0])
    assert mass(class_balanced_weights(labels, 0.5)) == pytest.approx([8 / 8**0.5, 2 / 2**0.5])


def test_a_weighted_epoch_draws_rare_classes_as_often_seeded_and_resumable():
    labels = [0] * 900 + [1] * 100
    sampler = EpochShuffler(len(labels), seed=1, weights=class_balanced_weights(labels, 1.0))
    keys = list(sampler)
    assert len(keys) == len(sampler) == 1000 and keys == list(sampler)  # one draw per image, seeded
    rare = sum(labels[key[0]] for key in keys) / len(keys)
    assert 0.44 < rare < 0.56  # 10% of the images, half of the draws
    assert len({key for key in keys}) == len(keys)  # a repeat is keyed apart, so it is augmented anew
    assert max(key[2] for key in keys if len(key) == 3) >= 5  # the rare images come back many times
    sampler.resume(0, 300)
    assert list(sampler) == keys[300:]
    sampler.set_epoch(1)
    assert list(sampler) != keys
    with pytest.raises(ValueError, match="one weight per image"):
        EpochShuffler(3, seed=0, weights=torch.ones(4))


def test_ranks_split_one_weighted_order():
    weights = class_balanced_weights([0] * 9 + [1] * 2, 1.0)
    single = list(EpochShuffler(11, seed=2, weights=weights))
    shares = [list(EpochShuffler(11, seed=2, num_replicas=2, rank=r, weights=weights)) for r in (0, 1)]
    assert shares[0] == single[0::2] and shares[1] == single[1::2] + single[:1]


def test_an_image_drawn_again_gets_another_augmentation_and_the_same_one_every_run(tmp_path):
    make_image_folder(tmp_path)
    data = module(tmp_path)
    data.setup("fit")
    train = data._datasets["train"]
    again = ImageDataset(train.samples, train.transform, seed=data.hparams.seed)
    assert torch.equal(train[(0, 0)][0], again[(0, 0)][0])
    assert torch.equal(train[(0, 0, 1)][0], again[(0, 0, 1)][0])
    assert not torch.equal(train[(0, 0)][0], train[(0, 0, 1)][0])


def test_class_balance_reaches_the_training_sampler_only(tmp_path):
    make_image_folder(tmp_path, per_split={"train": 2, "val": 2})
    make_image_folder(tmp_path, classes=("apple",), per_split={"train": 10})  # 10 apples, 2 bananas, 2 cherries
    data = module(tmp_path, class_balance=1.0)
    data.setup("fit")
    weights = data.train_dataloader().sampler.weights
    names = [data.class_names[label] for _, label in data.split_samples("train")]
    assert {name: round(weights[[n == name for n in names]].sum().item(), 6) for name in set(names)} == {
        "apple": 1.0,
        "banana": 1.0,
        "cherry": 1.0,
    }
    assert not hasattr(data.val_dataloader().sampler, "weights")  # every val image once, in order
    unbalanced = module(tmp_path)
    unbalanced.setup("fit")
    assert unbalanced.train_dataloader().sampler.weights is None
    with pytest.raises(ValueError, match="class_balance must be in"):
        module(tmp_path, class_balance=1.5)


def fake_trainer(training=True, batches=3):
    from types import SimpleNamespace

    progress = SimpleNamespace(total=SimpleNamespace(ready=batches))
    return SimpleNamespace(
        training=training, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    )


def test_mixup_gives_soft_targets_seeded_by_the_batch_in_training_only(tmp_path):
    make_image_folder(tmp_path)
    data = module(tmp_path, mixup=0.8, cutmix=1.0)
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    mix = {}
    for batches in (3, 3, 4):
        data.trainer = fake_trainer(batches=batches)
        mix.setdefault(batches, []).append(data.on_after_batch_transfer((images.clone(), labels), 0))
    (mixed, soft), (again, soft_again) = mix[3]
    assert soft.shape == (4, 3) and torch.allclose(soft.sum(-1), torch.ones(4))
    assert torch.equal(mixed, again) and torch.equal(soft, soft_again)  # same batch number, same mix
    assert not torch.equal(mix[4][0][1], soft) or not torch.equal(mix[4][0][0], mixed)
    data.trainer = fake_trainer(training=False)
    assert data.on_after_batch_transfer((images, labels), 0)[1] is labels


def test_mixup_needs_an_even_batch(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be even, got 5"):
        module(tmp_path, mixup=0.2, batch_size=5)


def test_val_is_carved_from_train_when_absent(tmp_path):
    make_image_folder(tmp_path, per_split={"train": 10})
    index = module(tmp_path, val_fraction=0.2).index
    assert len(index.splits["val"]) == 6 and len(index.splits["train"]) == 24
    assert {label for _, label in index.splits["val"]} == {0, 1, 2}


def test_stratified_folds_partition_the_samples_evenly_per_class_and_follow_the_seed():
    samples = [(Path(f"{label}_{i}.jpg"), label) for label, count in enumerate([7, 5, 2, 9]) for i in range(count)]
    dealt = stratified_folds(samples, 3, seed=1)
    assert sorted(s for fold in dealt for s in fold) == sorted(samples)  # disjoint and complete
    assert max(map(len, dealt)) - min(map(len, dealt)) <= 1
    for label, count in enumerate([7, 5, 2, 9]):
        per_fold = [sum(s[1] == label for s in fold) for fold in dealt]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == count
    assert stratified_folds(samples, 3, seed=1) == dealt
    assert stratified_folds(samples, 3, seed=2) != dealt
    with pytest.raises(ValueError, match="at least 2 folds"):
        stratified_folds(samples, 1, seed=1)


def test_cross_validation_pools_train_and_val_and_leaves_test_alone(tmp_path):
    make_image_folder(tmp_path, per_split={"train": 8, "val": 3, "test": 3})
    plain = module(tmp_path).index.splits
    pooled = sorted(plain["train"] + plain["val"])
    vals = []
    for fold in range(4):
        splits = module(tmp_path, folds=4, fold=fold).index.splits
        assert sorted(splits["train"] + splits["val"]) == pooled and not set(splits["train"]) & set(splits["val"])
        assert splits["test"] == plain["test"]
        vals += splits["val"]
    assert sorted(vals) == pooled  # every train+val image is val in exactly one fold
    for folds, fold in [(4, 4), (1, 0), (3, -1)]:
        with pytest.raises(ValueError, match=r"data\.fold must be"):
            module(tmp_path, folds=folds, fold=fold)


@pytest.mark.skipif(not (GROCERY / "train.txt").is_file(), reason="../shared grocery data absent")
def test_real_grocery_store_layout():
    index = read_dataset(GROCERY)
    assert len(index.class_names) == 81 and index.class_names[0] == "Golden-Delicious"
    assert len(index.splits["train"]) == 2640 and len(index.splits["val"]) == 296
    # classes.csv has coarse ids 0..42 (43 classes; the copy's README says 42)
    assert len(read_dataset(GROCERY, label_level="coarse").class_names) == 43
    # every listed image's coarse id agrees with classes.csv (read_dataset checks each line)
    coarse = dict(zip(index.class_names, (index.coarse_class_names[c] for c in index.fine_to_coarse), strict=True))
    assert coarse["Granny-Smith"] == coarse["Pink-Lady"] == "Apple" and coarse["Oatly-Oat-Milk"] == "Oat-Milk"
    assert len(set(index.fine_to_coarse)) == len(index.coarse_class_names) == 43


def test_strong_randaugment_never_crashes_on_posterize(tmp_path):
    from timm.data.auto_augment import rand_augment_transform

    from vitlora.datasets import allow_zero_bit_posterize

    allow_zero_bit_posterize()
    augment = rand_augment_transform("rand-m10-n4-mstd2-inc1", {})
    image = Image.new("RGB", (32, 32), (200, 100, 50))
    for seed in range(200):
        torch.manual_seed(seed)
        import random

        random.seed(seed)
        assert augment(image).size == (32, 32)


@pytest.mark.parametrize("augment", ["rand-m9-mstd0.5-inc1", "trivial", "augmix-m5-w4", None])
def test_training_augmentations_are_configurable(tmp_path, augment):
    make_image_folder(tmp_path)
    data = module(tmp_path, auto_augment=augment)
    names = [type(t).__name__ for t in data.transform(train=True).transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandomHorizontalFlip" in names
    expected = {
        "rand-m9-mstd0.5-inc1": "RandAugment",
        "trivial": "TrivialAugmentWide",
        "augmix-m5-w4": "AugMixAugment",
    }
    assert (expected.get(augment) in names) if augment else len(names) == 4
    data.setup("fit")
    assert next(iter(data.train_dataloader()))[0].shape == (4, 3, 32, 32)


def test_flat_class_folders_are_all_train_and_val_is_carved_per_class(tmp_path):
    make_image_folder(tmp_path, per_split={"train": 5})
    for class_dir in (tmp_path / "train").iterdir():
        class_dir.rename(tmp_path / class_dir.name)  # PHOTOS/<class>/*.png
    (tmp_path / "train").rmdir()
    (tmp_path / ".thumbnails").mkdir()  # hidden folders are no class
    index = read_dataset(tmp_path)
    assert index.class_names == ["apple", "banana", "cherry"] and list(index.splits) == ["train"]
    assert index.layout.startswith("folder") and len(index.splits["train"]) == 15
    data = module(tmp_path, val_fraction=0.1)  # 10% of 5 rounds to 0: every class still gets one val image
    assert sorted(label for _, label in data.index.splits["val"]) == [0, 1, 2]
    again = module(tmp_path, val_fraction=0.1).index.splits["val"]
    assert again == data.index.splits["val"]  # seeded


def test_a_csv_file_as_root_or_the_one_csv_in_a_folder_with_other_column_names(tmp_path):
    make_image_folder(tmp_path / "photos", per_split={"train": 2})
    rows = [f"photos/train/{c}/{c}_{i}.png,{c}" for c in ("apple", "banana") for i in range(2)]
    (tmp_path / "labels.csv").write_text("image,class\n" + "\n".join(rows) + "\n")
    for root in (tmp_path / "labels.csv", tmp_path):
        index = read_dataset(root)
        assert index.class_names == ["apple", "banana"] and len(index.splits["train"]) == 4
        assert index.layout == "csv (labels.csv)"


def test_a_missing_root_is_an_error_naming_it_and_never_a_download(tmp_path, monkeypatch):
    import vitlora.training.download as download

    monkeypatch.setattr(download, "download_grocery_store", lambda root: pytest.fail(f"downloaded into {root}"))
    with pytest.raises(DatasetError, match=r"my_photoz: dataset folder does not exist"):
        _ = module(tmp_path / "my_photoz", download=True).index
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"cannot tell the dataset layout \(1 images but no class folders\)"):
        read_dataset(tmp_path)


def test_download_fills_only_the_default_grocery_root(tmp_path, monkeypatch):
    import vitlora.training.download as download

    fetched = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        download,
        "download_grocery_store",
        lambda root: fetched.append(root) or write_grocery(root, ["train/a/a_0.png, 0, 0"]),
    )
    assert module("data/grocery-store", download=True).num_classes == 2 and fetched == [Path("data/grocery-store")]


def test_skipped_images_are_counted_per_split(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "val/apple/apple_0.png").write_bytes(b"garbage")
    data = module(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.setup("fit")
    assert data.skipped == {"train": 0, "val": 1}
