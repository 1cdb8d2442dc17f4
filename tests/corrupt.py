"""Seeded corruptions of adapter files and PEFT folders, for tests/test_fuzz.py.

Each :class:`Variant` writes one damaged copy of a good adapter file (or PEFT folder) into a
folder and returns the path to hand to the reader. Families: byte flips anywhere and in the
header, truncations, appended bytes, header JSON edits, metadata edits (saved with a matching
digest, so the checks behind the digest are reached), tensor values and dtypes, pickles,
special paths, and PEFT folders with broken configs and tensors.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vitlora.validation import PAYLOAD_DIGEST_KEY, with_payload_digest

DEEP = 100_000  # nesting depth of the "nested" edits: deep enough to overflow a recursive decoder


@dataclass(frozen=True)
class Variant:
    family: str
    name: str
    write: Callable[[Path], Path]  # folder -> the damaged file or folder to read


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, "pt") as handle:
        return load_file(path), handle.metadata()


def saved(tensors: dict[str, torch.Tensor], metadata: dict[str, str], digest: bool = True) -> Callable[[Path], Path]:
    """A writer of ``tensors`` and ``metadata`` as a consistent file (digest recomputed unless ``digest=False``)."""

    def write(folder: Path) -> Path:
        path = folder / "adapter.safetensors"
        meta = with_payload_digest(tensors, metadata) if digest else {**metadata}
        if not digest:
            meta.pop(PAYLOAD_DIGEST_KEY, None)
        save_file(tensors, path, metadata=meta)
        return path

    return write


def raw(data: bytes, name: str = "adapter.safetensors") -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return write


def split(data: bytes) -> tuple[dict, bytes]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def joined(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def nested(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def byte_flips(data: bytes, rng: random.Random, count: int, stop: int | None = None) -> Iterator[tuple[str, bytes]]:
    stop = stop or len(data)
    for _ in range(count):
        at = rng.randrange(stop)
        flipped = bytearray(data)
        flipped[at] ^= rng.randrange(1, 256)
        yield f"at {at}", bytes(flipped)


def file_variants(path: Path, rng: random.Random, label: str) -> Iterator[Variant]:
    """Byte-level damage to the file at ``path``: flips, truncations, appended bytes, header JSON edits."""
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for name, damaged in byte_flips(data, rng, 60):
        yield Variant("byte flip anywhere", f"{label} {name}", raw(damaged))
    for name, damaged in byte_flips(data, rng, 30, stop=header_end):
        yield Variant("byte flip in header", f"{label} {name}", raw(damaged))
    for size in [0, 4, 8, 9, header_end - 1, header_end, *rng.sample(range(header_end, len(data)), 9)]:
        yield Variant("truncation", f"{label} to {size}", raw(data[:size]))
    for extra in (b"\0", b"\0" * 8, os.urandom(7), os.urandom(1000), data[:64]):
        yield Variant("appended bytes", f"{label} +{len(extra)}", raw(data + extra))
    header, body = split(data)
    keys = sorted(k for k in header if k != "__metadata__")
    for key in rng.sample(keys, 4):
        edits = {
            "renamed": lambda h, k=key: h.__setitem__(k + "x", h.pop(k)),
            "removed": lambda h, k=key: h.pop(k),
            "dtype I32": lambda h, k=key: h[k].__setitem__("dtype", "I32"),
            "dtype F16": lambda h, k=key: h[k].__setitem__("dtype", "F16"),
            "dtype BF16": lambda h, k=key: h[k].__setitem__("dtype", "BF16"),
            "dtype BOOL": lambda h, k=key: h[k].__setitem__("dtype", "BOOL"),
            "dtype F8_E4M3": lambda h, k=key: h[k].__setitem__("dtype", "F8_E4M3"),
            "shape doubled": lambda h, k=key: h[k]["shape"].__setitem__(0, h[k]["shape"][0] * 2),
            "shape 0-d": lambda h, k=key: h[k].__setitem__("shape", []),
            "offsets overlap": lambda h, k=key: h[k].__setitem__("data_offsets", [0, h[k]["data_offsets"][1] - h[k]["data_offsets"][0]]),
            "offsets out of range": lambda h, k=key: h[k].__setitem__("data_offsets", [h[k]["data_offsets"][0], 10**9]),
            "metadata dropped": lambda h: h.pop("__metadata__", None),
        }  # fmt: skip
        for edit, apply in edits.items():
            edited = json.loads(json.dumps(header))
            apply(edited)
            yield Variant("header JSON edit", f"{label} {key} {edit}", raw(joined(edited, body)))


def metadata_variants(path: Path, label: str) -> Iterator[Variant]:
    """Metadata a reader must refuse or read exactly, each saved with a matching digest."""
    tensors, meta = read(path)
    lora = json.loads(meta["lora_config"]) if "lora_config" in meta else None

    def edit(**changes: str | None) -> Callable[[Path], Path]:
        edited = {k: v for k, v in {**meta, **changes}.items() if v is not None}
        return saved(tensors, edited)

    for key in ("lora_config", "prompt_config", "bias_tuning", "class_names", "model_kwargs", "num_classes", "note"):
        yield Variant("metadata nesting", f"{label} {key}", edit(**{key: nested()}))
        yield Variant("metadata nesting", f"{label} {key} in object", edit(**{key: '{"a":' * 50 + "1" + "}" * 50}))
    yield Variant("metadata nesting", f"{label} huge string", edit(note='"' + "x" * (9 * 2**20) + '"'))
    if lora:
        for field, value in [
            ("rank", 10**9), ("rank", 2**63), ("rank", 0), ("rank", 1.5), ("rank", True), ("rank", "4"), ("rank", 3),
            ("alpha", 1e308), ("alpha", float("inf")), ("alpha", float("nan")), ("alpha", -1), ("alpha", "16"),
            ("dropout", 2.0), ("dropout", None), ("use_rslora", "no"), ("use_rslora", 1), ("use_dora", "false"),
            ("use_dora", not lora["use_dora"]), ("targets", 5), ("targets", [5]), ("targets", ["fc9"]),
            ("targets", ["q", "q"]), ("blocks", [10**12]), ("blocks", [7]), ("blocks", "0"), ("unknown", 1),
        ]:  # fmt: skip
            text = json.dumps({**lora, field: value})
            yield Variant("metadata sizes and types", f"{label} lora {field}={value!r}"[:80], edit(lora_config=text))
    for key, value in [
        ("num_classes", "1000000000"), ("num_classes", "9" * 30), ("num_classes", "-1"), ("num_classes", "4"),
        ("num_classes", "1e9"), ("num_classes", "0"), ("prompt_config", '{"num_tokens": 1000000000}'),
        ("prompt_config", '{"num_tokens": 2, "deep": "yes"}'), ("prompt_config", '{"init_std": 1e400}'),
        ("prompt_config", "[]"), ("bias_tuning", '"no"'), ("bias_tuning", "1"), ("bias_tuning", "true"),
        ("class_names", '["a"]'), ("class_names", json.dumps(["a"] * 7)), ("class_names", "[1, 2, 3, 4, 5]"),
        ("class_names", '"abcde"'), ("base_fingerprint", "0" * 64), ("base_fingerprint", "xyz"),
        ("base_fingerprint", None), ("format", "vitlora.adaptr"), ("format_version", "3"), ("lora_config", None),
        ("lora_config", "null"), ("model_kwargs", "5"), ("model_kwargs", '{"num_classes": 7}'),
        ("base_config", '{"num_heads": 4}'), ("base_config", '{"global_pool": "avg"}'), ("base_config", "[]"),
        ("base_config", None), ("unknown_key", '{"any": ["json"]}'), ("note", "plain text"), ("model_name", "x" * 500),
    ]:  # fmt: skip
        yield Variant("metadata sizes and types", f"{label} {key}={value!r}"[:80], edit(**{key: value}))


def kwargs_variants(path: Path, label: str) -> Iterator[Variant]:
    """model_kwargs that timm must not be handed unchecked (for build_model_with_adapter and merge_adapter)."""
    tensors, meta = read(path)
    kwargs = json.loads(meta.get("model_kwargs", "{}"))
    patch = kwargs.pop("patch_size", 8)
    for name, value in [
        ("foo", {**kwargs, "patch_size": patch, "foo": 1}),
        ("num_classes", {**kwargs, "patch_size": patch, "num_classes": 7}),
        ("patch_sqze", {**kwargs, "patch_sqze": patch}),
        ("embed_dim huge", {**kwargs, "patch_size": patch, "embed_dim": 10**7}),
        ("depth huge", {**kwargs, "patch_size": patch, "depth": 10**6}),
        ("num_heads 4", {**kwargs, "patch_size": patch, "num_heads": 4}),
        ("img_size str", {**kwargs, "patch_size": patch, "img_size": "big"}),
        ("not a dict", [patch]),
    ]:
        yield Variant("model_kwargs", f"{label} {name}", saved(tensors, {**meta, "model_kwargs": json.dumps(value)}))
    yield Variant("model_kwargs", f"{label} model_name", saved(tensors, {**meta, "model_name": "vit_nope"}))


def tensor_variants(path: Path, rng: random.Random, label: str) -> Iterator[Variant]:
    """Tensor values and dtypes a reader must refuse, saved with a matching digest."""
    tensors, meta = read(path)
    keys = sorted(tensors)
    for value in (float("nan"), float("inf"), float("-inf")):
        for key in rng.sample(keys, 3):
            changed = {**tensors, key: tensors[key].clone().reshape(-1).index_fill(0, torch.tensor([0]), value)}
            changed[key] = changed[key].reshape(tensors[key].shape)
            yield Variant("non-finite values", f"{label} {key} {value}", saved(changed, meta))
    for dtype in (torch.int32, torch.int64, torch.bool, torch.float16, torch.float64, torch.float8_e4m3fn, torch.uint8):
        key = rng.choice(keys)
        yield Variant("tensor dtypes", f"{label} {key} {dtype}", saved({**tensors, key: tensors[key].to(dtype)}, meta))
    lora = [k for k in keys if k.endswith((".lora_A", ".lora_B"))]
    for key in rng.sample(lora, min(3, len(lora))):
        for shape in ((), (5,), (2, 2, 2), (0, 64)):
            yield Variant("tensor shapes", f"{label} {key} {shape}", saved({**tensors, key: torch.ones(shape)}, meta))
    yield Variant("tensor shapes", f"{label} head 0-d", saved({**tensors, "head.weight": torch.ones(())}, meta))
    yield Variant(
        "tensor shapes", f"{label} extra tensor", saved({**tensors, "blocks.0.norm1.weight": torch.ones(64)}, meta)
    )
    older = {key: value for key, value in meta.items() if key != "base_config"}
    yield Variant("tensor shapes", f"{label} older file without digest", saved(tensors, older, digest=False))
    yield Variant("tensor shapes", f"{label} digest dropped", saved(tensors, meta, digest=False))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vitlora-fuzz-pwned",))


def pickle_variants() -> Iterator[Variant]:
    yield Variant("pickles", "pickled payload", raw(pickle.dumps(_Payload())))
    yield Variant("pickles", "pickled dict", raw(pickle.dumps({"head.weight": [1.0]})))

    def torch_saved(folder: Path) -> Path:
        torch.save({"head.weight": torch.zeros(5, 64)}, folder / "adapter.safetensors")
        return folder / "adapter.safetensors"

    yield Variant("pickles", "torch.save zip", torch_saved)


def path_variants() -> Iterator[Variant]:
    yield Variant("special paths", "folder", lambda folder: folder)
    yield Variant("special paths", "missing", lambda folder: folder / "nope.safetensors")
    yield Variant("special paths", "300-character name", lambda folder: folder / ("a" * 300 + ".safetensors"))
    yield Variant("special paths", "/proc/self/cmdline", lambda folder: Path("/proc/self/cmdline"))
    yield Variant("special paths", "/dev/null", lambda folder: Path("/dev/null"))
    yield Variant("special paths", "NUL byte", lambda folder: folder / "a\0b.safetensors")

    def fifo(folder: Path) -> Path:
        os.mkfifo(folder / "fifo.safetensors")
        return folder / "fifo.safetensors"

    def loop(folder: Path) -> Path:
        (folder / "loop.safetensors").symlink_to(folder / "loop.safetensors")
        return folder / "loop.safetensors"

    yield Variant("special paths", "FIFO", fifo)
    yield Variant("special paths", "symlink loop", loop)
    yield Variant("special paths", "empty file", raw(b""))


def peft_variants(folder: Path, rng: random.Random) -> Iterator[Variant]:
    """Damaged copies of the PEFT folder ``folder`` (adapter_config.json + adapter_model.safetensors)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    tensors, meta = read(weights)
    header = json.loads(meta["vitlora"])

    def peft(config_text: str | None = None, weights_data: bytes | None = None, extra: dict | None = None):
        def write(target: Path) -> Path:
            out = target / "peft"
            out.mkdir()
            if config_text is not None:
                (out / "adapter_config.json").write_text(config_text)
            if weights_data is not None:
                (out / "adapter_model.safetensors").write_bytes(weights_data)
            for name, content in (extra or {}).items():
                (out / name).write_bytes(content)
            return out

        return write

    def resaved(changed: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
        from safetensors.torch import save

        return save(changed, metadata=with_payload_digest(changed, metadata))

    good = json.dumps(config)
    for field, value in [
        ("r", 10**9), ("r", "8"), ("r", True), ("lora_alpha", 1e308), ("lora_alpha", "16"), ("lora_alpha", None),
        ("lora_dropout", 5), ("use_rslora", "no"), ("use_dora", not config["use_dora"]), ("use_dora", "yes"),
        ("modules_to_save", 5), ("modules_to_save", [5]), ("modules_to_save", ["blocks"]), ("peft_type", "IA3"),
        ("target_modules", 5), ("base_model_name_or_path", 5), ("init_lora_weights", "pissa"), ("bias", "all"),
        ("rank_pattern", {"x": 2}),
    ]:  # fmt: skip
        text = json.dumps({**config, field: value})
        yield Variant("PEFT config", f"{field}={value!r}", peft(text, data))
    yield Variant("PEFT config", "nested", peft(nested(), data))
    yield Variant(
        "PEFT config",
        "nested value",
        peft(json.dumps({**config, "task_type": None})[:-1] + ', "x": ' + nested() + "}", data),
    )
    yield Variant("PEFT config", "not JSON", peft("{r: 8", data))
    yield Variant("PEFT config", "list", peft("[]", data))
    yield Variant("PEFT config", "binary", peft(os.urandom(64).decode("latin-1"), data))
    yield Variant("PEFT config", "missing", peft(None, data))
    yield Variant("PEFT tensors", "missing weights", peft(good, None))
    yield Variant("PEFT tensors", "pickled weights", peft(good, None, {"adapter_model.bin": pickle.dumps(_Payload())}))
    for name, damaged in byte_flips(data, rng, 15):
        yield Variant("PEFT tensors", f"flip {name}", peft(good, damaged))
    for size in (0, 8, len(data) // 2, len(data) - 1):
        yield Variant("PEFT tensors", f"truncated to {size}", peft(good, data[:size]))
    for key in rng.sample(sorted(tensors), 3):
        yield Variant(
            "PEFT tensors", f"NaN in {key}", peft(good, resaved({**tensors, key: tensors[key] * float("nan")}, meta))
        )
        yield Variant(
            "PEFT tensors", f"removed {key}", peft(good, resaved({k: v for k, v in tensors.items() if k != key}, meta))
        )
        yield Variant("PEFT tensors", f"{key} as int", peft(good, resaved({**tensors, key: tensors[key].int()}, meta)))
        yield Variant("PEFT tensors", f"{key} 0-d", peft(good, resaved({**tensors, key: torch.ones(())}, meta)))
    for field, value in [
        ("base_fingerprint", 7), ("num_classes", 5), ("lora_config", {"rank": 4}), ("format", None),
        ("lora_config", nested()), ("class_names", nested()), ("model_kwargs", '{"foo": 1}'),
    ]:  # fmt: skip
        edited = {**header, field: value}
        text = json.dumps({k: v for k, v in edited.items() if v is not None})
        yield Variant(
            "PEFT header", f"{field}={str(value)[:20]}", peft(good, resaved(tensors, {**meta, "vitlora": text}))
        )
    dora = json.loads(header["lora_config"])
    dora["use_dora"] = not dora["use_dora"]
    flipped = json.dumps({**header, "lora_config": json.dumps(dora)})
    yield Variant("PEFT header", "use_dora disagrees", peft(good, resaved(tensors, {**meta, "vitlora": flipped})))
    yield Variant("PEFT header", "nested header", peft(good, resaved(tensors, {**meta, "vitlora": nested()})))
    yield Variant("PEFT header", "header is a list", peft(good, resaved(tensors, {**meta, "vitlora": "[1]"})))
