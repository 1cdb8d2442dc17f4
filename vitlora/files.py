"""Safe file handling shared by every writer and reader: atomic writes, no unpickling."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it into place only if the block succeeds.

    A crash or an exception never leaves a half-written file under ``path`` and never
    leaves the temporary behind.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _shareable_mode(target))  # mkstemp makes 0600; keep what a plain open() gives
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MB chunks: what identifies a base weights file or an adapter."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_path(path: str | os.PathLike, suffixes: tuple[str, ...]) -> Path:
    """Fails before any work on an output that cannot be written: a wrong suffix, a missing folder.

    Slow exports call it first, so a typo costs nothing (atomic_write itself would create the folder).
    """
    path = Path(path)
    if path.suffix not in suffixes:
        raise ValueError(f"{path}: the output must end in {' or '.join(suffixes)}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the output folder {path.parent} does not exist.")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a file to write.")
    return path


def _shareable_mode(target: Path, new_mode: int = 0o666) -> int:
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return new_mode & ~umask


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside ``path`` and renames it into place only if the block succeeds.

    A folder already at ``path`` is replaced only when it holds nothing but files the new one
    also has (an earlier export), so an unrelated folder is never deleted; readers see the old
    folder or the new one, never a mix.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target}: exists and is not a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for file in tmp.iterdir():
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, _shareable_mode(target, 0o777))  # mkdtemp makes 0700
        _replace_directory(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_directory(new: Path, target: Path) -> None:
    if not target.exists():
        os.replace(new, target)
        return
    foreign = sorted(p.name for p in target.iterdir() if not (p.is_file() and (new / p.name).is_file()))
    if foreign:
        raise FileExistsError(
            f"{target}: exists and holds {foreign}, which this would not write; choose another folder."
        )
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    try:
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads a ``.safetensors`` file, or a PyTorch checkpoint with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file.")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error}).") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path}: cannot be read as a weights-only PyTorch checkpoint ({error}). "
            "vitlora never unpickles arbitrary objects; convert the file to .safetensors."
        ) from error
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of tensor names to tensors.")
    return state
