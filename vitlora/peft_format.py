"""Hugging Face PEFT adapter folders: vitlora LoRA to PEFT and back, exactly.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (``r x in``), ``...lora_B.weight`` (``out x r``),
with DoRA (``use_dora``) ``...lora_magnitude_vector`` (``out``), and the classifier head(s) of
``modules_to_save`` as ``base_model.model.head.weight``. The patch embedding's Conv2d LoRA is
``r x C x kh x kw`` / ``out x r x 1 x 1`` (vitlora holds the same numbers as matrices). PEFT has
no update on chosen q/k/v slices of a fused ``qkv``, so vitlora's q/v update on ``qkv`` is
written as one rank ``n*r`` LoRA whose B is zero outside each slice's rows and rank columns;
modules whose rank differs from the most common one are named in ``rank_pattern`` (and
``alpha_pattern``, so that each scaling is unchanged), never zero-padded. PEFT's DoRA magnitude covers every row: rows vitlora does not update (k) get the
base's own row norms, where PEFT's update is zero, so its scale there is exactly 1. vitlora's
own header rides along in the safetensors metadata (PEFT ignores it), so the original config,
classes and base fingerprint come back on import. Only files are handled here; PEFT itself is
never imported.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save as serialize
from torch import nn

from vitlora.adapter import (
    MAX_ALPHA,
    Adapter,
    AdapterError,
    adapter_header,
    check_adapter_tensors,
    decode_adapter,
    is_file,
    read_adapter,
    read_safetensors,
    resave_metadata,
    save_adapter,
)
from vitlora.apply import apply_adapter, build_base
from vitlora.files import atomic_directory
from vitlora.lora import (
    LoRAConfig,
    LoRAConv2d,
    LoRALayer,
    LoRALinear,
    expand_lora_B,
    lora_config,
    lora_modules,
    place_rows,
)
from vitlora.prompts import prompt_config
from vitlora.targets import (
    CLASSIFIER_NAMES,
    PATCH_EMBED_PATH,
    PROJECTIONS,
    SITE_PATHS,
    VALID_TARGETS,
    classifier_names,
    classifier_prefixes,
    qkv_slices,
    rerouted_attention,
    site_target,
    unwrap,
)
from vitlora.trainable import bias_tuning_enabled, is_bias_name
from vitlora.validation import (
    PEFT_DTYPES,
    InvalidJSON,
    check_int,
    check_json_type,
    check_number,
    decode_json,
    with_payload_digest,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
HEADER_KEY = "vitlora"  # safetensors metadata entry holding vitlora's adapter header as JSON

# PEFT options that change what the saved tensors mean, with the value that leaves LoRA plain.
_PLAIN_OPTIONS: dict[str, Any] = {
    "lora_bias": False,
    "use_qalora": False, "use_bdlora": False, "alora_invocation_tokens": None, "arrow_config": None,
    "velora_config": None, "monteclora_config": None, "kasa_config": None, "layer_replication": None,
    "target_parameters": None, "trainable_token_indices": None, "megatron_config": None,
}  # fmt: skip
# Initialisations besides True/False that leave the base weights alone (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA
# rewrite them, so the saved tensors only fit a changed base).
_PLAIN_INITS = ("gaussian", "eva", "orthogonal")
# What PEFT's modules_to_save may name: the classifier heads (a ClassifierHead's ``fc`` included).
_SAVED_HEADS = (*CLASSIFIER_NAMES, "head.fc")
_BIAS_MODES = ("none", "all", "lora_only")


def export_peft(model: nn.Module, directory: str | os.PathLike, **metadata: Any) -> Path:
    """Writes a vitlora LoRA model as a PEFT adapter folder, atomically.

    ``peft.PeftModel.from_pretrained(timm_model, directory)`` then gives the same logits on the
    same base (the heads travel in ``modules_to_save``), DoRA included. ``metadata`` is
    :func:`vitlora.save_adapter`'s (``class_names``, ``model_name``, ...). EVA attention that
    reads ``qkv.weight`` directly also bypasses PEFT's layers: a warning says so.

    Args:
        model: a model with vitlora LoRA or DoRA (no prompt tokens, no tuned biases).
        directory: the folder to write (``adapter_config.json``, ``adapter_model.safetensors``).
        **metadata: as for :func:`vitlora.save_adapter`.

    Returns:
        ``directory``.

    Raises:
        ValueError: prompt tokens or tuned biases, which PEFT's LoRA cannot hold.
    """
    model = unwrap(model)
    config = lora_config(model)
    unsupported = [
        label
        for label, present in (
            ("prompt tokens", prompt_config(model) is not None),
            ("tuned biases", bias_tuning_enabled(model)),
        )
        if present
    ]
    if unsupported:
        raise ValueError(f"{directory}: PEFT export of adapters with {' and '.join(unsupported)} is not supported yet.")
    header = adapter_header(model, **metadata)
    modules = lora_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, layer in modules:
            tensors.update(_peft_lora_tensors(name, layer))
    heads = classifier_prefixes(model)
    tensors.update({PREFIX + key: t.detach() for key, t in model.state_dict().items() if key.startswith(heads)})
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": header["model_name"] or None,
        **_peft_ranks_and_alphas(config, modules),
        "use_rslora": config.use_rslora,
        "lora_dropout": config.dropout,
        "target_modules": [name for name, _ in modules],  # full paths: a bare "proj" also matches patch_embed.proj
        "modules_to_save": [prefix.rstrip(".") for prefix in heads],
        "bias": "none",
        "use_dora": config.use_dora,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {key: t.to("cpu").contiguous() for key, t in tensors.items()}
    payload = serialize(
        tensors, metadata=with_payload_digest(tensors, {"format": "pt", HEADER_KEY: json.dumps(header)})
    )
    adapted = {name for name, _ in modules}
    bypassed = [name for name in rerouted_attention(model) if f"{name}.qkv" in adapted]
    if bypassed:
        warnings.warn(
            f"{directory}: PEFT's LoRA on {bypassed[0]}.qkv and {len(bypassed) - 1} more like it would have no "
            "effect, as timm's attention reads qkv.weight directly there; call "
            "vitlora.targets.route_fused_qkv_through_module(model) before PeftModel.from_pretrained.",
            stacklevel=2,
        )
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")
        (tmp / WEIGHTS_NAME).write_bytes(payload)
    return Path(directory)


def _peft_lora_tensors(name: str, layer: LoRALayer) -> dict[str, torch.Tensor]:
    """One layer's PEFT tensors: B expanded over the fused qkv rows, kernel-shaped on the patch embedding."""
    a, b = layer.lora_A.detach(), expand_lora_B(layer.lora_B.detach(), layer.slices, layer.out_features)
    if isinstance(layer, LoRAConv2d):  # PEFT's Conv2d DoRA magnitude is 1 x out x 1 x 1
        a, b = a.view(a.shape[0], *layer.weight.shape[1:]), b[:, :, None, None]
        magnitude = layer.lora_magnitude.detach().view(1, -1, 1, 1) if layer.config.use_dora else None
    else:
        magnitude = _magnitude_on_every_row(layer) if layer.config.use_dora else None
    tensors = {f"{PREFIX}{name}.lora_A.weight": a, f"{PREFIX}{name}.lora_B.weight": b}
    if magnitude is not None:
        tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = magnitude
    return tensors


def _peft_ranks_and_alphas(config: LoRAConfig, modules: list[tuple[str, LoRALayer]]) -> dict[str, Any]:
    """PEFT's ``r`` / ``lora_alpha`` (the most common ones) and patterns naming each module that differs.

    A fused qkv with n updated parts is one PEFT LoRA of rank ``n*r``; its alpha grows by n
    (sqrt(n) with rsLoRA), so that PEFT's scaling is vitlora's.
    """
    ranks, alphas = {}, {}
    for name, layer in modules:
        parts = len(layer.slices)
        ranks[name] = parts * layer.rank
        alphas[name] = config.alpha_for(name) * (math.sqrt(parts) if config.use_rslora else parts)
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(name): r for name, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(name): a for name, a in alphas.items() if a != alpha},
    }


def import_peft(model: nn.Module, directory: str | os.PathLike, *, check_base: bool = True) -> nn.Module:
    """Loads a PEFT LoRA adapter folder onto a plain timm model as vitlora LoRA; returns the model.

    Same logits as PEFT gives (on EVA's fused qkv: as PEFT would if it reached that layer).

    Args:
        model: a plain timm model with the base weights the adapter was trained on.
        directory: a PEFT LoRA/DoRA folder.
        check_base: check the base-weight fingerprint (folders vitlora wrote record one).

    Returns:
        ``model``, adapted in place.

    Raises:
        AdapterError: naming the file and the problem (options vitlora cannot represent are
            named); the model is then left untouched.
    """
    return apply_adapter(model, read_peft(directory, base=model), check_base=check_base)


def convert_adapter(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    model_name: str | None = None,
) -> Path:
    """vitlora file -> PEFT folder, or PEFT folder -> vitlora file (direction from the paths).

    Goes through the base model both belong on, so the result is checked on real weights.

    Args:
        source: a vitlora ``.safetensors`` adapter or a PEFT folder.
        output: a PEFT folder, or a ``.safetensors`` file for a PEFT source.
        weights: a local base weights file (offline machines).
        model_name: the timm model, for PEFT folders that name none.

    Returns:
        ``output``.

    Raises:
        AdapterError: an unusable source or one that names no model; ValueError: two paths of one kind.
    """
    source, output = Path(source), Path(output)
    to_peft = source.suffix == ".safetensors"
    if to_peft == (output.suffix == ".safetensors"):
        raise ValueError(f"convert {source} -> {output}: one must be a .safetensors file, the other a PEFT folder.")
    adapter = read_adapter(source) if to_peft else read_peft(source)
    if not (model_name or adapter.model_name):
        raise AdapterError(source, "records no timm model name: pass --model NAME (and --weights BASE_FILE).")
    base = build_base(adapter, weights, model_name=model_name)
    model = apply_adapter(base, adapter) if to_peft else import_peft(base, source)
    metadata = resave_metadata(adapter) | ({"model_name": model_name} if model_name else {})
    return export_peft(model, output, **metadata) if to_peft else save_adapter(model, output, **metadata)


def read_peft(directory: str | os.PathLike, base: nn.Module | None = None) -> Adapter:
    """A PEFT LoRA adapter folder as a vitlora :class:`~vitlora.Adapter`; ``base`` is only read.

    A folder vitlora exported comes back with its original config, classes and base fingerprint
    (unless PEFT has changed its tensors since); any other keeps PEFT's rank and alpha, and
    names its timm model only if ``base_model_name_or_path`` is one. DoRA on some rows of a
    fused qkv (q and v) comes back as such only if the other rows' magnitudes are still the
    row norms of ``base`` (the model it will load onto); without ``base`` it keeps PEFT's
    whole-layer form, which gives the same logits.

    Args:
        directory: a PEFT LoRA/DoRA folder.
        base: the plain model it will load onto, only read (DoRA k rows, PEFT's ``bias`` modes).

    Returns:
        The folder as an :class:`~vitlora.Adapter`.

    Raises:
        AdapterError: naming the file and the problem.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    peft_config = _read_config(config_path)
    if not is_file(weights_path):
        found = " (vitlora never unpickles adapter_model.bin: save it with safe_serialization=True)"
        raise AdapterError(
            weights_path, "no such file" + (found if (directory / "adapter_model.bin").exists() else ".")
        )
    metadata, tensors = read_safetensors(weights_path, PEFT_DTYPES)
    tensors, biases = _take_biases(tensors)
    pairs, heads = _split_tensors(weights_path, tensors, use_dora=bool(peft_config.get("use_dora")))
    tuned_biases = _tuned_biases(config_path, peft_config.get("bias", "none"), biases, base)
    generic = _peft_lora_config(config_path, peft_config, pairs)
    exported = _exported_header(weights_path, metadata, use_dora=generic.use_dora)
    restored = _restore_vitlora_layout(exported.config, pairs, base) if exported else None
    config, lora = (exported.config, restored) if restored else (generic, _vitlora_names(pairs))
    adapter = Adapter(
        path=directory,
        config=config,
        tensors={**lora, **tuned_biases, **_heads_left_on_base(heads, base)},
        num_classes=int(heads["head.weight"].shape[0]),
        architecture=exported.architecture if exported else None,
        model_name=exported.model_name if exported else _timm_name(peft_config.get("base_model_name_or_path")),
        class_names=exported.class_names if exported else None,
        base_fingerprint=exported.base_fingerprint if exported else None,
        metadata=exported.metadata if exported else {},
        bias_tuning=bool(tuned_biases),
        base_config=exported.base_config if exported else None,
    )
    check_adapter_tensors(adapter)
    return adapter


def _read_config(path: Path) -> dict[str, Any]:
    if not is_file(path):
        raise AdapterError(path, "no such file: not a PEFT adapter folder.")
    try:
        peft_config = decode_json(path.read_text(), "the config")
    except InvalidJSON as error:
        raise AdapterError(path, f"not valid JSON ({error.__cause__}).") from error
    except (OSError, UnicodeDecodeError) as error:
        raise AdapterError(path, f"cannot be read as text ({type(error).__name__}: {error}).") from error
    except ValueError as error:
        raise AdapterError(path, str(error)) from error
    if not isinstance(peft_config, dict) or peft_config.get("peft_type") != "LORA":
        kind = peft_config.get("peft_type") if isinstance(peft_config, dict) else None
        raise AdapterError(path, f"not a PEFT LoRA adapter (peft_type is {kind!r}).")
    for option, plain in _PLAIN_OPTIONS.items():
        if peft_config.get(option, plain) not in (plain, None, False, {}, []):
            raise AdapterError(path, f"PEFT option {option}={peft_config[option]!r} is not supported by vitlora.")
    if peft_config.get("use_dora") not in (True, False, None):
        raise AdapterError(path, f"PEFT option use_dora={peft_config['use_dora']!r} is not true or false.")
    _check_config_types(path, peft_config)
    init = peft_config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in _PLAIN_INITS):
        raise AdapterError(
            path,
            f"PEFT option init_lora_weights={init!r} is not supported by vitlora: it changes the base weights "
            "(PEFT converts such adapters to plain LoRA with save_pretrained(path_initial_model_for_weight_conversion=...)).",
        )
    if peft_config.get("bias", "none") not in _BIAS_MODES:
        raise AdapterError(path, f"PEFT option bias={peft_config['bias']!r} is not supported by vitlora.")
    extra = sorted(set(peft_config.get("modules_to_save") or ()) - set(_SAVED_HEADS))
    if extra:
        raise AdapterError(
            path, f"modules_to_save {extra} are not supported: vitlora adapters carry only {list(_SAVED_HEADS)}."
        )
    return peft_config


def _check_config_types(path: Path, peft_config: Mapping[str, Any]) -> None:
    """PEFT's numbers and flags, each of its JSON type and finite: ``"use_rslora": "no"`` is refused, not true."""
    try:
        check_int(peft_config.get("r", 8), "r", 1, 2**20)
        check_number(peft_config.get("lora_alpha", 8), "lora_alpha", 0.0, MAX_ALPHA * 2**10)
        check_number(peft_config.get("lora_dropout", 0.0), "lora_dropout", 0.0, 1.0)
        check_json_type(peft_config.get("use_rslora", False), "use_rslora", bool)
        check_json_type(peft_config.get("base_model_name_or_path") or "", "base_model_name_or_path", str)
        for module in check_json_type(peft_config.get("modules_to_save") or [], "modules_to_save", list):
            check_json_type(module, "modules_to_save entry", str)
    except ValueError as error:
        raise AdapterError(path, f"PEFT option {error}") from error


def _split_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], use_dora: bool
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """PEFT keys to ``{module path: {"A": .., "B": .., "magnitude": .. (DoRA)}}`` and the heads by their timm keys."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    heads: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        module, _, leaf = name.rpartition(".lora_")
        if key.startswith(PREFIX) and leaf in ("A.weight", "B.weight"):
            pairs.setdefault(module, {})[leaf[0]] = tensor
        elif key.startswith(PREFIX) and leaf == "magnitude_vector" and use_dora:
            pairs.setdefault(module, {})["magnitude"] = tensor
        elif key.startswith(PREFIX) and name.startswith(tuple(f"{head}." for head in CLASSIFIER_NAMES)):
            heads[name] = tensor
        else:
            unexpected.append(key)
    pairs = {module: _as_matrices(pair) for module, pair in pairs.items()}
    foreign = sorted(module for module in pairs if site_target(module) is None)
    if foreign:
        raise AdapterError(
            path,
            f"LoRA on {foreign[:5]} cannot be imported: vitlora adapts {SITE_PATHS} "
            "(leave the others out of PEFT's target_modules, e.g. with exclude_modules).",
        )
    if unexpected:
        found = "LoRA A/B, a DoRA magnitude or a classifier head" if use_dora else "LoRA A/B or a classifier head"
        raise AdapterError(path, f"unexpected tensors {sorted(unexpected)[:5]} (not {found}).")
    misshapen = sorted(
        module
        for module, pair in pairs.items()
        if not {"A", "B"} <= pair.keys() or pair["A"].ndim != 2 or pair["B"].ndim != 2
        or pair["A"].shape[0] != pair["B"].shape[1]
    )  # fmt: skip
    if misshapen:
        raise AdapterError(path, f"LoRA on {misshapen[:5]} is not a matching pair of 2-D lora_A and lora_B.")
    misfit = sorted(
        module
        for module, pair in pairs.items()
        if use_dora and ("magnitude" not in pair or pair["magnitude"].shape != pair["B"].shape[:1])
    )
    if misfit:
        raise AdapterError(
            path, f"use_dora is set but LoRA on {misfit[:5]} has no lora_magnitude_vector with one value per row."
        )
    if not pairs:
        raise AdapterError(path, "holds no LoRA tensors.")
    if "head.weight" not in heads or heads["head.weight"].ndim != 2:
        raise AdapterError(
            path, "holds no classifier head: vitlora adapters carry it (train with modules_to_save=['head'])."
        )
    return pairs, heads


def _peft_lora_config(path: Path, peft_config: Mapping[str, Any], pairs: Mapping[str, Mapping]) -> LoRAConfig:
    """PEFT's own rank, alpha (and their patterns) and modules as a vitlora config: one set of targets for the
    chosen blocks, plus the patch embedding."""
    targets_by_block: dict[int, set[str]] = {}
    for module in pairs:
        block, target = site_target(module)
        if block is not None:
            targets_by_block.setdefault(block, set()).add(target)
    target_sets = {frozenset(targets) for targets in targets_by_block.values()}
    if len(target_sets) > 1:
        found = {block: sorted(targets) for block, targets in sorted(targets_by_block.items())}
        raise AdapterError(
            path, f"LoRA targets differ between blocks ({found}): vitlora adapts the same targets in each chosen block."
        )
    targets = set(next(iter(target_sets), ())) | ({"patch_embed"} if PATCH_EMBED_PATH in pairs else set())
    try:
        config = LoRAConfig(
            rank=peft_config.get("r", 8),
            alpha=peft_config.get("lora_alpha", 8),
            dropout=peft_config.get("lora_dropout", 0.0),
            targets=tuple(t for t in VALID_TARGETS if t in targets),
            blocks=sorted(targets_by_block),
            use_rslora=bool(peft_config.get("use_rslora", False)),
            use_dora=bool(peft_config.get("use_dora")),
            rank_pattern=peft_config.get("rank_pattern") or {},
            alpha_pattern=peft_config.get("alpha_pattern") or {},
        )
    except ValueError as error:
        raise AdapterError(path, f"unsupported PEFT LoRA settings: {error}") from error
    misranked = {
        module: int(pair["A"].shape[0])
        for module, pair in pairs.items()
        if pair["A"].shape[0] != config.rank_for(module)
    }
    if misranked:
        module, rank = next(iter(misranked.items()))
        raise AdapterError(
            path, f"r and rank_pattern give {module} rank {config.rank_for(module)}, but its tensors have rank {rank}."
        )
    return config


def _as_matrices(pair: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PEFT Conv2d LoRA (``r x C x kh x kw``, ``out x r x 1 x 1``, DoRA ``1 x out x 1 x 1``) as vitlora's matrices;
    a Linear LoRA as it is."""
    a, b = pair.get("A"), pair.get("B")
    if a is None or b is None or a.ndim != 4 or b.ndim != 4 or b.shape[2:] != (1, 1):
        return dict(pair)
    matrices = {**pair, "A": a.flatten(1), "B": b.flatten(1)}
    if "magnitude" in pair and pair["magnitude"].numel() == b.shape[0]:
        matrices["magnitude"] = pair["magnitude"].reshape(-1)
    return matrices


def _heads_left_on_base(heads: dict[str, torch.Tensor], base: nn.Module | None) -> dict[str, torch.Tensor]:
    """The saved heads plus ``base``'s own head tensors that PEFT did not save (DeiT's ``head_dist`` when
    modules_to_save names only ``head``, where ``bias="all"`` saves only its bias): PEFT keeps the base's
    there, so the logits stay PEFT's."""
    if base is None:
        return heads
    kept = {
        key: tensor.detach().to("cpu", copy=True)
        for name in classifier_names(base)
        for key, tensor in getattr(base, name).state_dict(prefix=f"{name}.").items()
        if key not in heads
    }
    return {**heads, **kept}


def _take_biases(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tensors without the backbone biases PEFT's ``bias`` option saves, and those biases by their timm keys
    (``X.base_layer.bias`` is a LoRA layer's own ``X.bias``). The copies of a saved head's bias that
    ``bias="all"`` adds (``head.modules_to_save.bias``, ``head.original_module.bias``) are dropped:
    ``head.bias`` is the one PEFT loads."""
    heads = tuple(f"{PREFIX}{head}." for head in CLASSIFIER_NAMES)
    rest, biases = {}, {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX).replace(".base_layer.", ".")
        if key.startswith(heads) and re.search(r"\.(modules_to_save|original_module)\.bias$", key):
            continue
        if key.startswith(PREFIX) and not key.startswith(heads) and "lora_" not in key and is_bias_name(name):
            biases[name] = tensor
        else:
            rest[key] = tensor
    return rest, biases


def _tuned_biases(
    path: Path, mode: str, biases: Mapping[str, torch.Tensor], base: nn.Module | None
) -> dict[str, torch.Tensor]:
    """PEFT's trained biases (``bias="all"``/``"lora_only"``) as vitlora's bias tuning: every backbone bias, the ones
    PEFT did not save taken from ``base``, which is exactly what PEFT computes with; empty for ``bias="none"``."""
    if mode == "none":
        if biases:
            raise AdapterError(path, f"bias is 'none' but the weights hold biases {sorted(biases)[:5]}.")
        return {}
    if base is None:
        raise AdapterError(
            path, f"PEFT option bias={mode!r} maps onto vitlora's bias tuning only on the base model: use import_peft."
        )
    heads = classifier_prefixes(base)
    own = {n: p.detach() for n, p in base.named_parameters() if is_bias_name(n) and not n.startswith(heads)}
    foreign = sorted(set(biases) - set(own))
    if foreign:
        raise AdapterError(
            path, f"PEFT option bias={mode!r} trains {foreign[:5]}, which vitlora's bias tuning does not hold."
        )
    misshapen = sorted(name for name, tensor in biases.items() if tensor.shape != own[name].shape)
    if misshapen:
        raise AdapterError(path, f"biases {misshapen[:5]} do not fit the base model's.")
    return {name: biases.get(name, own[name]).to("cpu", copy=True) for name in own}


def _exported_header(path: Path, metadata: Mapping[str, str], use_dora: bool) -> Adapter | None:
    """vitlora's header from a folder it exported (None for other folders), decoded and validated: a LoRA
    adapter (export_peft writes no other) whose DoRA flag agrees with the PEFT config's."""
    if HEADER_KEY not in metadata:
        return None
    try:
        header = decode_json(metadata[HEADER_KEY], f"metadata {HEADER_KEY!r}", dict)
    except ValueError as error:
        raise AdapterError(path, str(error)) from error
    exported = decode_adapter(path, header, {})
    if exported.config is None or exported.prompt is not None or exported.bias_tuning:
        raise AdapterError(path, f"metadata {HEADER_KEY!r} is not the header of a LoRA adapter vitlora exports.")
    if exported.config.use_dora != use_dora:
        raise AdapterError(
            path, f"metadata {HEADER_KEY!r} says use_dora {exported.config.use_dora}, the PEFT config {use_dora}."
        )
    return exported


def _magnitude_on_every_row(layer: LoRALinear) -> torch.Tensor:
    """PEFT's DoRA magnitude, one per output row: vitlora's on the updated rows, ``||W||`` on the others,
    where PEFT's update is zero, so its scale ``m / ||W + 0||`` is exactly 1."""
    others = layer.on_all_rows(torch.zeros_like(layer.lora_magnitude, dtype=torch.bool), fill=True)
    norms = torch.linalg.vector_norm(layer.weight, dim=1).to(layer.lora_magnitude.dtype)
    return torch.where(others, norms, layer.on_all_rows(layer.lora_magnitude, fill=0.0))


def _restore_vitlora_layout(
    config: LoRAConfig, pairs: Mapping[str, Mapping[str, torch.Tensor]], base: nn.Module | None
) -> dict[str, torch.Tensor] | None:
    """The vitlora tensors export_peft expanded, or None if PEFT has changed the zero blocks since
    (or, with DoRA, the magnitudes of the rows vitlora does not update no longer are ``base``'s norms)."""
    parts = [p for p in PROJECTIONS if p in config.targets]
    tensors: dict[str, torch.Tensor] = {}
    for module, pair in pairs.items():
        a, b = pair["A"], pair["B"]
        fused_parts = site_target(module)[1] == "qkv" and parts
        slices = qkv_slices(b.shape[0], parts) if fused_parts else ((0, b.shape[0]),)
        rank = config.rank_for(module)
        used = len(slices) * rank
        if a.shape[0] < used or a[used:].any():
            return None
        blocks = [b[start:stop, i * rank : (i + 1) * rank] for i, (start, stop) in enumerate(slices)]
        rest = b.clone()
        for i, (start, stop) in enumerate(slices):
            rest[start:stop, i * rank : (i + 1) * rank] = 0
        if rest.any():
            return None
        tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = a[:used], torch.cat(blocks)
        if config.use_dora:
            chosen = torch.zeros(sum(stop - start for start, stop in slices), dtype=torch.bool)
            others = place_rows(chosen, slices, b.shape[0], fill=True)
            if others.any() and not _are_base_norms(pair["magnitude"], others, base, module):
                return None
            tensors[f"{module}.lora_magnitude"] = pair["magnitude"][~others]
    return tensors


def _are_base_norms(magnitude: torch.Tensor, rows: torch.Tensor, base: nn.Module | None, module: str) -> bool:
    """Whether ``magnitude`` on ``rows`` is the row norms of ``base``'s weight at ``module``, as export_peft
    fills them (to a rounding error: the base may now be on another device)."""
    try:
        weight = base.get_submodule(module).weight if base is not None else None
    except AttributeError:
        return False
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[0] != magnitude.shape[0]:
        return False
    norms = torch.linalg.vector_norm(weight.detach(), dim=1).to(magnitude)
    rtol = 2 * torch.finfo(magnitude.dtype).eps
    return torch.allclose(magnitude[rows], norms[rows], rtol=rtol, atol=0.0)


def _vitlora_names(pairs: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``lora_A``, ``lora_B`` and (DoRA) ``lora_magnitude`` by their LoRALinear keys."""
    return {f"{module}.lora_{part}": tensor for module, pair in pairs.items() for part, tensor in pair.items()}


def _timm_name(name: Any) -> str | None:
    """A timm model name from PEFT's base_model_name_or_path (``timm/...`` and ``hf-hub:`` allowed)."""
    if not isinstance(name, str):
        return None
    name = name.removeprefix("hf-hub:").removeprefix("timm/")
    return name if timm.is_model(name) else None
