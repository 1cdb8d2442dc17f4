"""Where each LoRA target lives inside timm's Vision Transformer families.

This module is the only place that knows timm's attribute layout: ViT/DeiT/DINOv2/CLIP/
SigLIP keep a fused ``attn.qkv``; EVA-02 has a fused ``qkv`` or separate
``q_proj``/``k_proj``/``v_proj``; MLPs have ``fc1`` (fused GLU included) or SwiGLU's
``fc1_g``/``fc1_x``, then ``fc2``; the patch embedding is the convolution ``patch_embed.proj``
(kernel = stride). Everything here only reads the model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

PROJECTIONS = ("q", "k", "v")
VALID_TARGETS = ("q", "k", "v", "qkv", "proj", "fc1", "fc2", "patch_embed")
PATCH_EMBED_PATH = "patch_embed.proj"
CLASSIFIER_NAMES = ("head", "head_dist")

_SITE_PATH = re.compile(r"blocks\.(\d+)\.(?:attn\.(qkv|proj|[qkv]_proj)|mlp\.(fc1|fc1_g|fc1_x|fc2))")
SITE_PATHS = "blocks.N.attn.{qkv,q_proj,k_proj,v_proj,proj}, blocks.N.mlp.{fc1,fc1_g,fc1_x,fc2} and patch_embed.proj"
_SUPPORTED_LAYOUT = (
    "`model.blocks[i].attn` with a fused `qkv` nn.Linear or separate "
    "`q_proj`/`k_proj`/`v_proj` nn.Linear layers (timm ViT, DeiT, DINOv2, CLIP, SigLIP, EVA)"
)


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself under ``torch.compile``'s wrapper (whose state-dict keys carry an ``_orig_mod.`` prefix)."""
    return getattr(model, "_orig_mod", model)


@dataclass(frozen=True)
class LoRASite:
    """One nn.Linear (or the patch-embedding nn.Conv2d) to adapt, and which parts of its output get an update.

    ``parts`` names the updated output slices (``("q", "v")`` on a fused qkv) and
    ``slices`` gives their ``(start, stop)`` rows; a whole-layer update has one slice.
    """

    path: str
    linear: nn.Linear | nn.Conv2d
    parts: tuple[str, ...]
    slices: tuple[tuple[int, int], ...]


def transformer_blocks(model: nn.Module) -> Sequence[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise ValueError(f"{type(model).__name__} has no supported transformer blocks: looked for {_SUPPORTED_LAYOUT}.")
    return blocks


def last_blocks(model: nn.Module, count: int) -> tuple[int, ...]:
    """Indices of the last ``count`` transformer blocks."""
    depth = len(transformer_blocks(model))
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= depth:
        raise ValueError(f"Cannot train the last {count!r} blocks: this model has {depth}, choose 1..{depth}.")
    return tuple(range(depth - count, depth))


def modules_after_blocks(model: nn.Module) -> list[nn.Module]:
    """The final norm, pooling and head(s): timm registers a model's children in forward order."""
    children = [module for _, module in model.named_children()]
    blocks = transformer_blocks(model)
    return children[next(i for i, child in enumerate(children) if child is blocks) + 1 :]


def resolve_block_indices(blocks: Iterable[int] | None, depth: int) -> list[int]:
    """Turns None (every block) or possibly negative indices into sorted positive ones."""
    if blocks is None:
        return list(range(depth))
    resolved = set()
    for index in blocks:
        if isinstance(index, bool) or not isinstance(index, int) or not -depth <= index < depth:
            raise ValueError(
                f"LoRA block index {index!r} is out of range: this model has {depth} blocks, "
                f"valid indices are 0..{depth - 1} or -{depth}..-1."
            )
        resolved.add(index % depth)
    return sorted(resolved)


def find_lora_sites(model: nn.Module, targets: Sequence[str], blocks: Iterable[int] | None = None) -> list[LoRASite]:
    """Lists every layer that LoRA will wrap; raises before anything is changed.

    ``blocks`` limits the targets inside the transformer blocks; ``patch_embed`` lies before them.
    """
    all_blocks = transformer_blocks(model)
    sites = [patch_embedding_site(model)] if "patch_embed" in targets else []
    for index in resolve_block_indices(blocks, len(all_blocks)):
        sites.extend(_block_sites(all_blocks[index], f"blocks.{index}", targets))
    return sites


def patch_embedding_site(model: nn.Module) -> LoRASite:
    """``patch_embed.proj``, the convolution that embeds each patch, or a ValueError saying why it is none.

    A hybrid ViT's ``patch_embed`` runs a CNN stem (``backbone``) first, and its ``proj`` only
    projects CNN features: LoRA there would not adapt a patch embedding, so it is refused.
    """
    name = type(model).__name__
    patch_embed = getattr(model, "patch_embed", None)
    if getattr(patch_embed, "backbone", None) is not None:
        raise ValueError(
            f"{name}'s patch_embed is a CNN stem ({type(patch_embed.backbone).__name__}) followed by a projection of "
            "its features, not a patch embedding: LoRA target 'patch_embed' is for plain ViT patch embeddings."
        )
    conv = getattr(patch_embed, "proj", None)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{name} has no patch-embedding convolution: looked for `patch_embed.proj` (nn.Conv2d).")
    if conv.kernel_size != conv.stride or conv.padding not in (0, (0, 0), "valid") or conv.groups != 1:
        raise ValueError(
            f"{name}'s patch_embed.proj is not a patch embedding (kernel {conv.kernel_size}, stride {conv.stride}, "
            f"padding {conv.padding}, groups {conv.groups}): LoRA target 'patch_embed' needs kernel = stride."
        )
    return LoRASite(PATCH_EMBED_PATH, conv, ("patch_embed",), ((0, conv.out_channels),))


def _block_sites(block: nn.Module, prefix: str, targets: Sequence[str]) -> list[LoRASite]:
    attn = getattr(block, "attn", None)
    if attn is None:
        raise ValueError(f"{prefix} has no `attn`: looked for {_SUPPORTED_LAYOUT}.")
    sites: list[LoRASite] = []
    qkv_targets = [t for t in PROJECTIONS if t in targets or "qkv" in targets]
    fused = getattr(attn, "qkv", None)
    if qkv_targets and isinstance(fused, nn.Linear):
        if "qkv" in targets:
            sites.append(_whole(f"{prefix}.attn.qkv", fused, ("qkv",)))
        else:
            sites.append(_fused_parts(f"{prefix}.attn.qkv", fused, qkv_targets))
    elif qkv_targets:
        separate = {t: getattr(attn, f"{t}_proj", None) for t in PROJECTIONS}
        if not all(isinstance(layer, nn.Linear) for layer in separate.values()):
            raise ValueError(
                f"{prefix}.attn ({type(attn).__name__}) is not a supported attention: looked for {_SUPPORTED_LAYOUT}."
            )
        sites.extend(_whole(f"{prefix}.attn.{t}_proj", separate[t], (t,)) for t in qkv_targets)
    if "proj" in targets:
        sites.append(_whole(f"{prefix}.attn.proj", _linear(attn, "proj", prefix + ".attn"), ("proj",)))
    mlp = getattr(block, "mlp", None)
    if "fc1" in targets:
        if mlp is not None and isinstance(getattr(mlp, "fc1_g", None), nn.Linear):
            for name in ("fc1_g", "fc1_x"):
                layer = _linear(mlp, name, prefix + ".mlp")
                sites.append(_whole(f"{prefix}.mlp.{name}", layer, ("fc1",)))
        else:
            sites.append(_whole(f"{prefix}.mlp.fc1", _linear(mlp, "fc1", prefix + ".mlp"), ("fc1",)))
    if "fc2" in targets:
        sites.append(_whole(f"{prefix}.mlp.fc2", _linear(mlp, "fc2", prefix + ".mlp"), ("fc2",)))
    return sites


def _linear(parent: nn.Module | None, name: str, parent_path: str) -> nn.Linear:
    layer = getattr(parent, name, None)
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"{parent_path}.{name} is not an nn.Linear (found {type(layer).__name__}).")
    return layer


def _whole(path: str, linear: nn.Linear, parts: tuple[str, ...]) -> LoRASite:
    return LoRASite(path, linear, parts, ((0, linear.out_features),))


def _fused_parts(path: str, linear: nn.Linear, parts: Sequence[str]) -> LoRASite:
    if linear.out_features % 3:
        raise ValueError(f"{path} has {linear.out_features} outputs, not three equal q/k/v parts.")
    return LoRASite(path, linear, tuple(parts), qkv_slices(linear.out_features, parts))


def qkv_slices(out_features: int, parts: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """The ``(start, stop)`` output rows of the chosen q/k/v parts of a fused qkv projection."""
    width = out_features // 3
    return tuple((PROJECTIONS.index(p) * width, (PROJECTIONS.index(p) + 1) * width) for p in parts)


def site_target(path: str) -> tuple[int | None, str] | None:
    """Block index and LoRA target of a module path that :func:`find_lora_sites` can return, else None.

    A fused ``attn.qkv`` is ``"qkv"``, separate projections are ``"q"``/``"k"``/``"v"``,
    SwiGLU's ``fc1_g``/``fc1_x`` are ``"fc1"`` and ``patch_embed.proj`` is ``"patch_embed"`` (block
    None): reading other tools' adapters by module path.
    """
    if path == PATCH_EMBED_PATH:
        return None, "patch_embed"
    match = _SITE_PATH.fullmatch(path)
    if match is None:
        return None
    block, attn, mlp = match.groups()
    target = attn[0] if attn and attn.endswith("_proj") else attn or mlp
    return int(block), "fc1" if target.startswith("fc1") else target


def update_labels(layer: str, targets: Sequence[str]) -> tuple[str, ...]:
    """The updates a LoRA layer at state-dict path ``layer`` carries, in the order of its A/B blocks.

    Lets an adapter file be read without building its model: a fused ``qkv`` carries one
    update per chosen projection (``("q", "v")``) unless ``qkv`` itself is the target,
    ``q_proj`` carries ``q``, and any other layer is labelled by its own name (``fc1_g``).
    """
    name = layer.rsplit(".", 1)[-1]
    if layer == PATCH_EMBED_PATH:
        return ("patch_embed",)
    if name == "qkv" and "qkv" not in targets:
        return tuple(t for t in PROJECTIONS if t in targets)
    if name in {f"{t}_proj" for t in PROJECTIONS}:
        return (name[0],)
    return (name,)


def input_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """``(channels, height, width)`` of the images the model takes, or None when it does not say.

    Height and width come from the patch embedding, channels from the first convolution
    (a hybrid ViT's CNN stem, else the patch projection)."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if img_size is None or stem is None:
        return None
    return (stem.in_channels, *img_size)


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """The classifier heads an adapter trains and ships (DeiT-distilled has two)."""
    return tuple(name for name in CLASSIFIER_NAMES if isinstance(getattr(model, name, None), nn.Module))


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict key prefixes of the classifier heads (``"head."``, ``"head_dist."``)."""
    return tuple(f"{name}." for name in classifier_names(model))


def route_fused_qkv_through_module(model: nn.Module) -> None:
    """Makes attention call its ``qkv`` module instead of reading ``qkv.weight`` directly.

    timm's EVA/BEiT attention with q/v biases computes ``F.linear(x, self.qkv.weight, bias)``,
    which would silently bypass a LoRA wrapper; its ``qkv_bias_separate`` path calls the
    module and adds the same bias afterwards. Switched modules are marked so that
    :func:`restore_fused_qkv_routing` can undo exactly this change.
    """
    for module in model.modules():
        if getattr(module, "qkv_bias_separate", True) is False and getattr(module, "q_bias", None) is not None:
            module.qkv_bias_separate = True
            module._vitlora_rerouted = True


def rerouted_attention(model: nn.Module) -> list[str]:
    """Attention modules whose ``qkv`` is called only because vitlora rerouted it (other LoRA tools miss it)."""
    return [name for name, module in model.named_modules() if module.__dict__.get("_vitlora_rerouted")]


def restore_fused_qkv_routing(model: nn.Module) -> None:
    for module in model.modules():
        if module.__dict__.pop("_vitlora_rerouted", False):
            module.qkv_bias_separate = False
