import zipfile

import pytest

from vitlora.training.download import download_grocery_store


def make_archive(path, with_dataset=True):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("GroceryStoreDataset-master/LICENSE", "MIT")
        archive.writestr("GroceryStoreDataset-master/README.md", "readme")
        if with_dataset:
            archive.writestr("GroceryStoreDataset-master/dataset/train.txt", "train/a.jpg, 0, 0\n")
            archive.writestr("GroceryStoreDataset-master/dataset/classes.csv", "header\nA,0,A,0,x,y\n")
            archive.writestr("GroceryStoreDataset-master/dataset/train/a.jpg", b"jpeg")
    return path


def test_download_installs_the_dataset_folder_from_a_local_archive(tmp_path):
    archive = make_archive(tmp_path / "master.zip")
    target = download_grocery_store(tmp_path / "data" / "grocery-store", url=archive.as_uri())
    assert (target / "train.txt").is_file() and (target / "train" / "a.jpg").read_bytes() == b"jpeg"
    assert (target / "LICENSE").read_text() == "MIT"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["grocery-store"]  # no temporaries


def test_a_bad_archive_leaves_nothing_behind(tmp_path):
    archive = make_archive(tmp_path / "master.zip", with_dataset=False)
    with pytest.raises(ValueError, match=r"no dataset/train\.txt"):
        download_grocery_store(tmp_path / "data" / "grocery-store", url=archive.as_uri())
    not_zip = tmp_path / "x.zip"
    not_zip.write_text("html error page")
    with pytest.raises(ValueError, match="not a zip archive"):
        download_grocery_store(tmp_path / "data" / "grocery-store", url=not_zip.as_uri())
    assert list((tmp_path / "data").iterdir()) == []
