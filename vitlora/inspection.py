"""What an adapter file holds and how strongly it changes each layer, read from the file alone.

Every LoRA update is ``scale * B A``; on a fused ``qkv`` each chosen projection has its own
rank-r block of ``A`` and ``B``. No base weights are needed: the size and shape of an update
depend on ``A`` and ``B`` only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vitlora.adapter import Adapter, AdapterError, class_labels, read_adapter
from vitlora.charts import heatmap_image
from vitlora.files import atomic_write, check_output_path
from vitlora.targets import CLASSIFIER_NAMES, PATCH_EMBED_PATH, VALID_TARGETS, update_labels
from vitlora.trainable import is_lora_name, is_prompt_name

SHOWN_CLASSES = 5


@dataclass(frozen=True)
class UpdateStats:
    """One low-rank update ``scale * B_t A_t``: its block, target and singular values (descending).

    ``block`` is -1 for the patch embedding, which comes before the blocks.
    """

    block: int
    target: str
    layer: str
    singular_values: tuple[float, ...]

    @property
    def frobenius_norm(self) -> float:
        return math.sqrt(sum(s * s for s in self.singular_values))

    @property
    def effective_rank(self) -> float:
        """``exp(H(p))`` with ``p_i = s_i / sum(s)`` the normalised singular values (Roy & Vetterli, 2007).

        k equal non-zero singular values give exactly k; a dominant direction gives close to
        1; a zero update gives 0. Unlike a thresholded count it shows how evenly the rank
        budget is used.
        """
        total = sum(self.singular_values)
        if total == 0:
            return 0.0
        shares = [s / total for s in self.singular_values if s > 0]
        return math.exp(-sum(p * math.log(p) for p in shares))


@dataclass(frozen=True)
class AdapterSummary:
    adapter: Adapter
    file_size: int
    parameters: dict[str, int]  # shipped tensors by group: lora, prompt, bias, head
    updates: list[UpdateStats]

    def __str__(self) -> str:
        a, config = self.adapter, self.adapter.config
        names = class_labels(a.class_names and a.class_names[:SHOWN_CLASSES], min(a.num_classes, SHOWN_CLASSES))
        shown = ", ".join(names) + (", ..." if a.num_classes > SHOWN_CLASSES else "")
        lines = [
            f"adapter    {a.path} ({self.file_size / 1e3:.1f} KB)",
            f"base model {a.model_name or '?'} (architecture {a.architecture or '?'}), kwargs {a.model_kwargs}",
            f"base       fingerprint {a.base_fingerprint[:16]}",
            "lora       none"
            if config is None
            else f"lora       rank {config.rank}, alpha {config.alpha:g}, scaling {config.scaling:g}, "
            f"targets {','.join(config.targets)}, blocks {'all' if config.blocks is None else list(config.blocks)}, "
            f"dropout {config.dropout:g}, rslora {config.use_rslora}, dora {config.use_dora}",
            f"prompts    {'none' if a.prompt is None else a.prompt}; bias tuning {a.bias_tuning}",
            f"classes    {a.num_classes}: {shown}",
            "trainable  "
            + " + ".join(f"{count:,} {group}" for group, count in self.parameters.items() if count)
            + f" = {sum(self.parameters.values()):,}",
            "",
            f"{'block':>5}  {'target':<11} {'rank':>4} {'||dW||_F':>10} {'sigma_max':>10} {'eff.rank':>8}",
        ]
        lines += [
            f"{u.block if u.block >= 0 else '-':>5}  {u.target:<11} {len(u.singular_values):>4} {u.frobenius_norm:>10.4g} "
            f"{max(u.singular_values, default=0.0):>10.4g} {u.effective_rank:>8.2f}"
            for u in self.updates
        ]
        lines.append("eff.rank: exp(entropy) of the normalised singular values of scale*B*A (0 for no update)")
        if config is not None and config.use_dora:
            lines.append("DoRA: the rows shown are the directional update; the learned magnitudes rescale them")
        return "\n".join(lines)


def inspect_adapter(path: str | os.PathLike) -> AdapterSummary:
    """Config, classes, parameter counts and per-layer update statistics of an adapter file.

    Computed from the file alone (no base weights): each update's singular values come exactly
    from an ``r x r`` core, never from a dense ΔW.

    Args:
        path: the adapter file.

    Returns:
        An :class:`AdapterSummary`; ``print()`` it for the ``vitlora inspect`` report.

    Raises:
        AdapterError: an unusable adapter file.
    """
    adapter = read_adapter(path)
    parameters = dict.fromkeys(("lora", "prompt", "bias", "head"), 0)
    for key, tensor in adapter.tensors.items():
        parameters[_group(key)] += tensor.numel()
    return AdapterSummary(adapter, adapter.path.stat().st_size, parameters, _update_stats(adapter))


def _group(key: str) -> str:
    if is_lora_name(key):
        return "lora"
    if is_prompt_name(key):
        return "prompt"
    return "head" if key.startswith(tuple(f"{name}." for name in CLASSIFIER_NAMES)) else "bias"


def _update_stats(adapter: Adapter) -> list[UpdateStats]:
    """Singular values of each update from the r x r core ``R_B R_A^T`` (QR of B and A^T): exact, never dense."""
    if adapter.config is None:
        return []
    updates = []
    for key in sorted(k for k in adapter.tensors if k.endswith(".lora_A")):
        layer = key.removesuffix(".lora_A")
        rank, scaling = adapter.config.rank_for(layer), adapter.config.scaling_for(layer)
        down, up = adapter.tensors[key].double(), adapter.tensors.get(f"{layer}.lora_B")
        labels = update_labels(layer, adapter.config.targets)
        parts = len(labels)
        block = "-1" if layer == PATCH_EMBED_PATH else layer.split(".")[1] if layer.startswith("blocks.") else ""
        if (
            not parts
            or up is None
            or not block.lstrip("-").isdigit()
            or down.shape[0] != parts * rank
            or up.shape[1] != rank
            or up.shape[0] % parts
        ):
            raise AdapterError(adapter.path, f"{layer}: LoRA tensors do not fit {parts} update(s) of rank {rank}.")
        for label, b, a in zip(labels, up.double().chunk(parts), down.chunk(parts), strict=True):
            core = torch.linalg.qr(b).R @ torch.linalg.qr(a.T).R.T
            values = (scaling * torch.linalg.svdvals(core)).tolist()
            updates.append(UpdateStats(int(block), label, layer, tuple(values)))
    return sorted(updates, key=lambda u: (u.block, _target_order(u.target), u.target))


def _target_order(target: str) -> int:
    """Targets in LoRAConfig's order; SwiGLU's fc1_g / fc1_x sort as fc1."""
    return VALID_TARGETS.index(target if target in VALID_TARGETS else target.split("_")[0])


def update_norm_table(summary: AdapterSummary) -> tuple[torch.Tensor, list[str], list[str]]:
    """``||dW||_F`` per block (rows) and target (columns), NaN where a block has no update, with both labels."""
    blocks = list(range(max((u.block for u in summary.updates), default=-1) + 1))
    if any(u.block < 0 for u in summary.updates):  # the patch embedding, before block 0
        blocks.insert(0, -1)
    targets = list(dict.fromkeys(u.target for u in summary.updates))
    values = torch.full((len(blocks), len(targets)), float("nan"))
    for u in summary.updates:
        values[blocks.index(u.block), targets.index(u.target)] = u.frobenius_norm
    return values, [f"block {b}" if b >= 0 else "patch embed" for b in blocks], targets


def write_update_heatmap(summary: AdapterSummary, path: str | os.PathLike) -> Path:
    """A PNG of ``||dW||_F`` per block (rows) and target (columns), with a colour scale.

    Blocks between adapted ones are drawn grey, so a gap in ``LoRAConfig.blocks`` shows.

    Args:
        summary: what :func:`inspect_adapter` returned.
        path: the ``.png`` file to write (atomically).

    Returns:
        ``path``.
    """
    path = check_output_path(path, (".png",))
    values, blocks, targets = update_norm_table(summary)
    title = f"LoRA update size per block and target ({summary.adapter.path.name})"
    image = heatmap_image(values, title, blocks, targets, "||ΔW||_F (Frobenius norm)")
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
    return path
