"""Fetching the Grocery Store dataset from its public GitHub repository."""

from __future__ import annotations

import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

GROCERY_STORE_URL = "https://github.com/marcusklasson/GroceryStoreDataset/archive/refs/heads/master.zip"


def download_grocery_store(destination: str | Path, url: str = GROCERY_STORE_URL) -> Path:
    """Downloads the repository archive and installs its ``dataset/`` folder (and LICENSE) at
    ``destination``. Nothing appears there unless the whole download and extraction succeed."""
    destination = Path(destination)
    if (destination / "train.txt").is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".grocery-") as tmp:
        archive = Path(tmp) / "archive.zip"
        print(f"Downloading the Grocery Store dataset from {url} ...")
        with urllib.request.urlopen(url) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
        try:
            with zipfile.ZipFile(archive) as zipped:
                members = [m for m in zipped.namelist() if "/dataset/" in m or m.endswith("/LICENSE")]
                if not any(m.endswith("dataset/train.txt") for m in members):
                    raise ValueError(f"{url}: archive has no dataset/train.txt")
                zipped.extractall(tmp, members)
        except zipfile.BadZipFile as error:
            raise ValueError(f"{url}: not a zip archive ({error})") from error
        dataset = next(Path(tmp).glob("*/dataset"))
        for license_file in Path(tmp).glob("*/LICENSE"):
            shutil.copy(license_file, dataset / "LICENSE")
        if destination.exists():
            shutil.rmtree(destination)
        dataset.rename(destination)
    return destination
