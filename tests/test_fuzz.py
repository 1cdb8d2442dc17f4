"""Hundreds of damaged adapter files and PEFT folders: each is an AdapterError or an exact load, never
another exception, and a refused file leaves the model exactly as it was. Variants: tests/corrupt.py."""

from __future__ import annotations

import copy
import random
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import IMG_SIZE, TINY, randomize_lora, tiny_model
from corrupt import (
    Variant,
    file_variants,
    kwargs_variants,
    metadata_variants,
    path_variants,
    peft_variants,
    pickle_variants,
    tensor_variants,
)
from safetensors.torch import load_file, save_file

from vitlora import LoRAConfig, PromptConfig, add_prompt_tokens, enable_bias_tuning, inject_lora, save_adapter
from vitlora.adapter import AdapterError, UndigestedFileWarning, read_adapter
from vitlora.apply import build_model_with_adapter, load_adapter
from vitlora.inspection import inspect_adapter, write_update_heatmap
from vitlora.merge import merge_adapter
from vitlora.multi import MultiAdapter
from vitlora.peft_format import convert_adapter, export_peft, import_peft, read_peft
from vitlora.trainable import adapter_state_dict, bias_tuning_enabled

KWARGS = {"img_size": IMG_SIZE, **TINY}
ALWAYS_REFUSED = {
    "byte flip anywhere", "byte flip in header", "truncation", "header JSON edit", "non-finite values",
    "tensor dtypes", "pickles", "special paths", "other bases", "metadata nesting",
}  # fmt: skip


def adapted(model, lora=None, prompt=None, bias=False):
    if lora:
        inject_lora(model, lora)
        randomize_lora(model)
    if prompt:
        add_prompt_tokens(model, prompt)
    if bias:
        enable_bias_tuning(model)
    with torch.no_grad():
        model.head.weight.add_(0.3)
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Good adapter files (LoRA; DoRA + deep prompts + biases), a PEFT folder, a base weights file, and adapters
    of other bases: once per module."""
    root = tmp_path_factory.mktemp("sources")
    save_file(tiny_model().state_dict(), root / "base.safetensors")
    names = ["apple", "banana", "cherry", "dates", "eggplant"]
    lora = adapted(tiny_model(), LoRAConfig(rank=4, targets=("q", "v", "fc2")))
    meta = {"model_name": "vit_tiny_patch16_224", "model_kwargs": KWARGS}
    paths = {"lora": save_adapter(lora, root / "lora.safetensors", class_names=names, run="fuzz", **meta)}
    mixed = adapted(tiny_model(), LoRAConfig(rank=2, targets=("qkv",), use_dora=True), PromptConfig(2, deep=True), True)
    paths["mixed"] = save_adapter(mixed, root / "mixed.safetensors", **meta)
    paths["peft"] = export_peft(lora, root / "peft", class_names=names, **meta)
    paths["base"] = root / "base.safetensors"
    others = {
        "num_heads 4": tiny_model(num_heads=4),
        "global_pool avg": tiny_model(global_pool="avg", class_token=False, no_embed_class=True),
        "fc_norm": tiny_model(global_pool="avg", fc_norm=True),
        "depth 3": tiny_model(depth=3),
        "seed 7": tiny_model(seed=7),
        "deit": tiny_model("deit_tiny_distilled_patch16_224"),
        "eva": tiny_model("eva02_tiny_patch14_224"),
        "dinov2 reg": tiny_model("vit_small_patch14_reg4_dinov2"),
    }
    for name, model in others.items():
        paths[f"other {name}"] = save_adapter(adapted(model, LoRAConfig(rank=4)), root / f"{name}.safetensors")
    return paths


def variants(sources: dict[str, Path]) -> Iterator[Variant]:
    rng = random.Random(0)
    for label in ("lora", "mixed"):
        yield from file_variants(sources[label], rng, label)
        yield from metadata_variants(sources[label], label)
        yield from tensor_variants(sources[label], rng, label)
    yield from kwargs_variants(sources["lora"], "lora")
    yield from pickle_variants()
    yield from path_variants()
    for key in (k for k in sources if k.startswith("other ")):
        yield Variant("other bases", key.removeprefix("other "), lambda folder, path=sources[key]: path)
    yield from peft_variants(sources["peft"], rng)


class Snapshot:
    """What a failed load must leave as it was: values, module objects, flags, the trainable set."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.modules = [(n, id(m), m.training) for n, m in model.named_modules()]
        self.flags = self.flags_of(model)

    @staticmethod
    def flags_of(model):
        grads = tuple(p.requires_grad for p in model.parameters())
        hooks = tuple(len(m._forward_pre_hooks) for m in model.modules())
        return model.num_classes, getattr(model, "num_prefix_tokens", None), bias_tuning_enabled(model), grads, hooks

    def unchanged(self, model) -> bool:
        state = model.state_dict()
        return (
            [(n, id(m), m.training) for n, m in model.named_modules()] == self.modules
            and self.flags_of(model) == self.flags
            and state.keys() == self.state.keys()
            and all(torch.equal(v, self.state[k]) for k, v in state.items())
        )


def outcome(call: Callable[[], object]) -> str:
    """ "loaded" or "refused" (an AdapterError with a one-line message); any other exception propagates."""
    try:
        call()
    except AdapterError as error:
        assert "\n" not in str(error), str(error)
        return "refused"
    return "loaded"


def test_every_damaged_file_is_refused_or_loads_exactly(sources, tmp_path, capsys):
    pristine = tiny_model(num_classes=1000)
    model = copy.deepcopy(pristine)
    before = Snapshot(model)
    multi = MultiAdapter(copy.deepcopy(pristine))
    counts: dict[str, Counter] = defaultdict(Counter)
    failures: list[str] = []
    for index, variant in enumerate(variants(sources)):
        folder = tmp_path / str(index)
        folder.mkdir()
        path = variant.write(folder)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UndigestedFileWarning)
                result = check_variant(variant, path, model, before, multi, folder, sources, index)
        except Exception as error:  # the fuzz reports every escape at once
            failures.append(f"{variant.family} / {variant.name}: {type(error).__name__}: {str(error)[:200]}")
            result = "escaped"
        if result != "refused" or not before.unchanged(model):  # loaded, or a failed check: a fresh model
            model = copy.deepcopy(pristine)
            before = Snapshot(model)
        counts[variant.family][result] += 1
    with capsys.disabled():
        print("\nfamily                       variants  refused  loaded")
        for family, counter in counts.items():
            print(f"{family:<28} {sum(counter.values()):>8} {counter['refused']:>8} {counter['loaded']:>7}")
        print(f"{'total':<28} {sum(sum(c.values()) for c in counts.values()):>8}")
    assert not failures, "\n".join(failures[:30])
    assert sum(sum(c.values()) for c in counts.values()) >= 500


def check_variant(variant: Variant, path: Path, model, before: Snapshot, multi, folder: Path, sources, index) -> str:
    """Runs every reader on one variant; returns its outcome, raising AssertionError on a wrong one."""
    if variant.family.startswith("PEFT"):
        return check_peft(path, model, before, folder, sources, index)
    read = outcome(lambda: read_adapter(path))
    inspected = outcome(lambda: str(inspect_adapter(path)))
    loaded = outcome(lambda: load_adapter(model, path))
    assert read == inspected and (read == "loaded" or loaded == "refused"), (read, inspected, loaded)
    if variant.family in ALWAYS_REFUSED:
        assert loaded == "refused", "loaded a file that must be refused"
    if loaded == "refused":
        assert before.unchanged(model), "a refused file changed the model"
    else:
        expected = load_file(path)
        assert {k: torch.equal(v, expected[k]) for k, v in adapter_state_dict(model).items()} == dict.fromkeys(
            expected, True
        ), "loaded, but not exactly what the file holds"
        if index % 10 == 0:
            write_update_heatmap(inspect_adapter(path), folder / "updates.png")
    if index % 4 == 0:
        structure = [(n, id(m)) for n, m in multi.named_modules()]
        added = outcome(lambda: multi.add("fuzz", path))
        if added == "loaded":
            multi.remove("fuzz")
        assert [(n, id(m)) for n, m in multi.named_modules()] == structure and not multi.adapters
    if variant.family in ("model_kwargs", "other bases"):
        built = outcome(lambda: build_model_with_adapter(path, sources["base"]))
        merged = outcome(lambda: merge_adapter(path, folder / "merged.safetensors", weights=sources["base"]))
        assert built == merged == "refused", (built, merged)
    return loaded


def check_peft(path: Path, model, before: Snapshot, folder: Path, sources, index) -> str:
    read = outcome(lambda: read_peft(path, base=model))
    loaded = outcome(lambda: import_peft(model, path))
    assert read == "loaded" or loaded == "refused", (read, loaded)
    if loaded == "refused":
        assert before.unchanged(model), "a refused folder changed the model"
    if index % 3 == 0:
        converted = outcome(lambda: convert_adapter(path, folder / "out.safetensors", weights=sources["base"]))
        assert loaded == "loaded" or converted == "refused", (converted, loaded)  # building may refuse model_kwargs
    return loaded
