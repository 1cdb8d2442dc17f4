"""Checks on what a file holds, before anything is built from it: bounded JSON, tensor dtypes and values, digests.

Adapter files, PEFT folders and merged models are read by the same rules, so no reader can be
stricter or looser than another: JSON is size- and depth-bounded before it is decoded and must
have the expected type; tensors hold only the float dtypes a writer produces and only finite
values; and a file that records a digest of its payload must still match it. Every check raises
``ValueError`` with a one-line problem; readers turn it into their own error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

MAX_JSON_CHARS = 8 * 2**20  # one metadata value or config file: room for ~200k class names
MAX_JSON_DEPTH = 32  # vitlora's own metadata nests 2 levels deep
PAYLOAD_DIGEST_KEY = "payload_sha256"
ADAPTER_DTYPES = (torch.float32, torch.bfloat16)  # what save_adapter writes (it refuses float16 models)
PEFT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what PEFT's save_pretrained writes

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


class InvalidJSON(ValueError):
    """Text that does not parse as JSON at all (other tools may store plain strings)."""


_JSON_TYPES = {
    type(None): "null",
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "true or false",
    int: "an integer",
}


def decode_json(text: Any, what: str, expected: type | tuple[type, ...] | None = None) -> Any:
    """``json.loads(text)`` for text read from a file: bounded in size and depth, of the ``expected`` type.

    Args:
        text: the JSON text (anything else is refused).
        what: names the value in the error (``"metadata 'lora_config'"``).
        expected: the JSON type(s) the value must decode to (None: any).

    Returns:
        The decoded value.

    Raises:
        ValueError: not a string, too long, nested deeper than ``MAX_JSON_DEPTH`` or of another type;
            :class:`InvalidJSON` (a ValueError) where it is no JSON at all.
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} is {type(text).__name__}, not JSON text.")
    if len(text) > MAX_JSON_CHARS:
        raise ValueError(f"{what} is {len(text):,} characters long (at most {MAX_JSON_CHARS:,}).")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{what} nests {depth} levels deep (at most {MAX_JSON_DEPTH}).")
    try:
        value = json.loads(text)
    except ValueError as error:
        raise InvalidJSON(f"{what} is not valid JSON ({error}).") from error
    if expected is not None:
        check_json_type(value, what, expected)
    return value


def json_depth(text: str) -> int:
    """How deeply the brackets of JSON ``text`` nest, counted without recursion (strings skipped)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def check_json_type(value: Any, what: str, expected: type | tuple[type, ...]) -> Any:
    """``value`` if it is of a ``expected`` JSON type; a JSON boolean is never an integer or a number."""
    kinds = expected if isinstance(expected, tuple) else (expected,)
    is_bool = isinstance(value, bool)
    if not any(isinstance(value, kind) and (kind is bool or not is_bool) for kind in kinds):
        names = " or ".join(_JSON_TYPES.get(kind, "a number" if kind is float else kind.__name__) for kind in kinds)
        raise ValueError(f"{what} is {_shown(value)}, not {names}.")
    return value


def check_int(value: Any, what: str, low: int, high: int) -> int:
    """``value`` if it is a JSON integer (not a boolean) in ``[low, high]``."""
    check_json_type(value, what, int)
    if not low <= value <= high:
        raise ValueError(f"{what} is {_shown(value)}, not between {low} and {high:,}.")
    return value


def check_number(value: Any, what: str, low: float, high: float) -> float:
    """``value`` if it is a finite JSON number (not a boolean) in ``[low, high]``."""
    check_json_type(value, what, (int, float))
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{what} is {_shown(value)}, not a finite number between {low:g} and {high:g}.")
    return value


def check_tensor_dtypes(tensors: Mapping[str, torch.Tensor], allowed: Iterable[torch.dtype]) -> None:
    """Refuses a tensor of any dtype but ``allowed``: casting an int, bool, complex, float8, float16 or
    float64 tensor would silently reinterpret or round what the file holds."""
    allowed = tuple(allowed)
    for key, tensor in sorted(tensors.items()):
        if tensor.dtype not in allowed:
            names = ", ".join(str(dtype).removeprefix("torch.") for dtype in allowed)
            raise ValueError(f"tensor {key!r} is stored as {str(tensor.dtype).removeprefix('torch.')}, not {names}.")


def check_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuses a tensor holding NaN or infinity, naming it: no trained adapter or model holds one."""
    for key, tensor in sorted(tensors.items()):
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"tensor {key!r} holds {bad} non-finite value(s) (NaN or infinity).")


def payload_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 of a safetensors file's payload: every tensor's name, dtype, shape and raw bytes in key
    order, then every metadata entry but the digest itself in key order.

    Independent of how a writer lays the file out (tensor order, offsets, header whitespace), so it
    is stable across safetensors versions; any change of a value, a name or the metadata changes it.
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    entries = sorted((key, value) for key, value in metadata.items() if key != PAYLOAD_DIGEST_KEY)
    digest.update(json.dumps(entries).encode())
    return digest.hexdigest()


def with_payload_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` plus the :func:`payload_digest` of ``tensors`` and ``metadata``, for a writer to store."""
    return {**metadata, PAYLOAD_DIGEST_KEY: payload_digest(tensors, metadata)}


def verify_payload_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bool:
    """Whether the file records a payload digest (False: an older file), raising if it does not match.

    Raises:
        ValueError: the recorded digest differs from the payload's: the file was changed or damaged.
    """
    recorded = metadata.get(PAYLOAD_DIGEST_KEY)
    if recorded is None:
        return False
    if recorded != payload_digest(tensors, metadata):
        raise ValueError(
            f"corrupted: its tensors or metadata do not match the SHA-256 digest it records ({PAYLOAD_DIGEST_KEY})."
        )
    return True


def _shown(value: Any, limit: int = 60) -> str:
    """A value for an error message, cut short: a file can hold anything."""
    text = repr(value) if not isinstance(value, (dict, list)) else f"{type(value).__name__} of {len(value)}"
    return text if len(text) <= limit else text[:limit] + "..."
