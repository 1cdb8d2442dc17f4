"""The adaptation policy: which parts of a timm backbone train, for each method.

``lora`` wraps the targeted projections (head and LoRA train), ``full`` trains every weight (or
the last blocks, the final norm and the head), ``linear`` the head alone; prompt tokens (VPT) and
bias tuning (BitFit) join ``lora`` or ``linear``. One plain function, so a Lightning module, a
hand-written loop and the tests adapt a model the same way.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from torch import nn

from vitlora.lora import LoRAConfig, inject_lora
from vitlora.prompts import PromptConfig, add_prompt_tokens
from vitlora.targets import last_blocks, modules_after_blocks, transformer_blocks
from vitlora.trainable import enable_bias_tuning, freeze_base

Method = Literal["lora", "full", "linear"]
METHODS: tuple[str, ...] = ("lora", "full", "linear")


def check_adaptation(
    method: str,
    lora: LoRAConfig | None = None,
    prompt: PromptConfig | None = None,
    bias_tuning: bool = False,
    train_last_blocks: int | None = None,
) -> None:
    """Refuses combinations that mean nothing, before a backbone is built.

    Raises:
        ValueError: an unknown method, ``train_last_blocks`` with ``linear`` or beside
            ``lora.blocks``, or prompt tokens / bias tuning with ``full`` (which trains them already).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
    if train_last_blocks is not None and method == "linear":
        raise ValueError("train_last_blocks is for the lora and full methods; linear trains the head alone.")
    if method == "full" and (prompt is not None or bias_tuning):
        raise ValueError(
            "method 'full' already trains every weight and bias: prompt tokens and bias tuning join "
            "method lora or linear (a frozen backbone)."
        )
    if method == "lora" and train_last_blocks is not None and lora is not None and lora.blocks is not None:
        raise ValueError("Give either train_last_blocks or lora.blocks, not both.")


def adapt_backbone(
    model: nn.Module,
    method: Method = "lora",
    lora: LoRAConfig | None = None,
    prompt: PromptConfig | None = None,
    bias_tuning: bool = False,
    train_last_blocks: int | None = None,
) -> nn.Module:
    """Adapts a plain timm model in place for training with ``method``; only what it trains needs gradients.

    Args:
        model: a plain timm ViT (its head already sized for the task).
        method: ``lora``, ``full`` or ``linear``.
        lora: the LoRA config for ``lora`` (default :class:`LoRAConfig`); ignored otherwise.
        prompt: prompt tokens to add (``lora`` or ``linear``).
        bias_tuning: train every bias as well (``lora`` or ``linear``).
        train_last_blocks: adapt only the last N blocks (LoRA in them; for ``full`` them, the final
            norm and the head), so backward never runs through the earlier ones.

    Returns:
        ``model``, adapted.

    Raises:
        ValueError: see :func:`check_adaptation`; or a LoRA config that does not fit the model.
    """
    check_adaptation(method, lora, prompt, bias_tuning, train_last_blocks)
    if method == "lora":
        lora = lora or LoRAConfig()
        if train_last_blocks is not None:
            lora = replace(lora, blocks=last_blocks(model, train_last_blocks))
        inject_lora(model, lora)
    elif method == "linear":
        freeze_base(model)
    elif train_last_blocks is not None:  # full fine-tuning of the last blocks, the final norm and the head
        blocks = transformer_blocks(model)
        model.requires_grad_(False)
        for module in [*(blocks[i] for i in last_blocks(model, train_last_blocks)), *modules_after_blocks(model)]:
            module.requires_grad_(True)
    if prompt is not None:
        add_prompt_tokens(model, prompt)
    if bias_tuning:
        enable_bias_tuning(model)
    return model
