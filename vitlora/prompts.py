"""Visual prompt tokens (VPT): learnable tokens placed between the prefix and the patch tokens.

Shallow VPT inserts ``num_tokens`` tokens before block 0; deep VPT gives every block its own
tokens, replacing the previous block's prompt outputs. Each block keeps its tokens in a child
``prompt`` module and a forward pre-hook splices them into the block's input, so timm's forward
(``forward_features``, ``forward_head``, ``forward_intermediates``, gradient checkpointing,
``torch.compile``) runs unchanged. ``num_prefix_tokens`` grows by ``num_tokens``, so every
pooling (class token, average, attention pool) and the prefix split of intermediates skip the
prompt tokens. This module knows nothing of LoRA, files or training loops.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vitlora.targets import transformer_blocks, unwrap
from vitlora.trainable import PROMPT_MODULE, freeze_base


@dataclass(frozen=True)
class PromptConfig:
    """Learnable prompt tokens (VPT) the frozen ViT attends to.

    Attributes:
        num_tokens: Tokens per prompted block.
        deep: Every block gets its own tokens (VPT-deep); else block 0 only.
        init_std: Tokens start as N(0, init_std²), the scale of timm's class and position embeddings.
    """

    num_tokens: int = 8
    deep: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"Prompt num_tokens must be a positive integer, got {self.num_tokens!r}.")
        if not isinstance(self.deep, bool):
            raise ValueError(f"Prompt deep must be true or false, got {self.deep!r}.")
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) or not self.init_std >= 0:
            raise ValueError(f"Prompt init_std must be a number >= 0, got {self.init_std!r}.")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PromptConfig:
        return cls(**json.loads(text))


class PromptTokens(nn.Module):
    """One block's prompt tokens and where they go: after ``start`` prefix tokens, inserted or replacing."""

    def __init__(self, config: PromptConfig, dim: int, start: int, replace: bool, like: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.start = start
        self.replace = replace
        self.enabled = True  # False (prompts_disabled): the block's input passes unchanged
        self.tokens = nn.Parameter(torch.empty(config.num_tokens, dim, dtype=like.dtype, device=like.device))
        nn.init.normal_(self.tokens, std=config.init_std)

    def extra_repr(self) -> str:
        action = "replacing the previous block's" if self.replace else "inserted as"
        return f"{self.config.num_tokens} tokens of {self.tokens.shape[1]}, {action} tokens {self.start}.."


def _splice_prompt_tokens(block: nn.Module, args: tuple) -> tuple | None:
    """The forward pre-hook: the block's input with its prompt tokens in place."""
    prompt: PromptTokens = getattr(block, PROMPT_MODULE)
    if not prompt.enabled:
        return None
    x, *rest = args
    tokens = prompt.tokens.to(x.dtype).expand(x.shape[0], -1, -1)
    after = prompt.start + tokens.shape[1] if prompt.replace else prompt.start
    return (torch.cat((x[:, : prompt.start], tokens, x[:, after:]), dim=1), *rest)


def check_promptable(model: nn.Module) -> None:
    """Raises, naming the reason, for models where inserted tokens would be misread."""
    from timm.models.vision_transformer import VisionTransformer  # here: reading adapter files needs no timm

    name = type(model).__name__
    if prompt_config(model) is not None:
        raise ValueError(f"{name} already has prompt tokens: remove_prompt_tokens first.")
    if getattr(model, "rope", None) is not None:
        raise ValueError(
            f"{name} applies rotary position embeddings by token position: inserted prompt tokens would shift "
            "every patch's rotation. Prompt tokens support timm's VisionTransformer family (ViT, DeiT, DINOv2, "
            "CLIP, SigLIP); use LoRA on this model."
        )
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"{name} is not a timm VisionTransformer: prompt tokens need its num_prefix_tokens to keep pooling off "
            "them (ViT, DeiT, DINOv2, CLIP, SigLIP)."
        )
    if model.dynamic_img_size:
        raise ValueError(
            f"{name} was built with dynamic_img_size: it resamples position embeddings by num_prefix_tokens, "
            "which prompt tokens change. Build it with a fixed img_size."
        )
    if model.pool_include_prefix:
        raise ValueError(f"{name} pools over its prefix tokens (pool_include_prefix): prompt tokens would enter it.")


def prompt_config(model: nn.Module) -> PromptConfig | None:
    """The config prompt tokens were added with.

    Args:
        model: any timm model (a compiled one too).

    Returns:
        Its :class:`PromptConfig`, or None for a model without prompt tokens.
    """
    blocks = getattr(unwrap(model), "blocks", None)
    has_blocks = isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0
    prompt = getattr(blocks[0], PROMPT_MODULE, None) if has_blocks else None
    return prompt.config if isinstance(prompt, PromptTokens) else None


def add_prompt_tokens(model: nn.Module, config: PromptConfig) -> nn.Module:
    """Adds learnable prompt tokens in place and freezes all but the adapter (prompts, heads, LoRA, biases).

    The model stays a timm VisionTransformer with the same modules and base state-dict keys;
    its tokens are ``blocks.<i>.prompt.tokens``.

    Args:
        model: a timm ViT without prompt tokens.
        config: how many tokens, shallow or deep, their initial scale.

    Returns:
        ``model``, with the tokens spliced in after the prefix tokens (class, distillation, registers).

    Raises:
        ValueError: before changing anything, for a family where inserted tokens would be
            misread (EVA's rotary embeddings, dynamic image sizes) or a model that has tokens already.
    """
    model = unwrap(model)
    check_promptable(model)
    blocks = transformer_blocks(model)
    start, like = model.num_prefix_tokens, next(model.parameters())
    for index, block in enumerate(blocks if config.deep else blocks[:1]):
        prompt = PromptTokens(config, model.embed_dim, start, replace=index > 0, like=like)
        block.add_module(PROMPT_MODULE, prompt)
        block.register_forward_pre_hook(_splice_prompt_tokens)
    model.num_prefix_tokens = start + config.num_tokens
    return freeze_base(model)


def remove_prompt_tokens(model: nn.Module) -> nn.Module:
    """Drops the prompt tokens: the model's structure and outputs as before, all trainable as timm makes it.

    Args:
        model: a model :func:`add_prompt_tokens` adapted.

    Returns:
        ``model`` without its tokens.

    Raises:
        ValueError: the model has no prompt tokens.
    """
    model = unwrap(model)
    config = prompt_config(model)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no prompt tokens to remove.")
    for block in transformer_blocks(model):
        for key, hook in list(block._forward_pre_hooks.items()):
            if hook is _splice_prompt_tokens:
                del block._forward_pre_hooks[key]
        if isinstance(getattr(block, PROMPT_MODULE, None), PromptTokens):
            delattr(block, PROMPT_MODULE)
    model.num_prefix_tokens -= config.num_tokens
    model.requires_grad_(True)
    return model


@contextmanager
def prompts_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Skips every prompt token of ``model`` for the duration: its outputs are those of the model without them.

    Unlike :func:`remove_prompt_tokens` nothing is deleted or unfrozen; a model without prompt
    tokens passes through unchanged.
    """
    model = unwrap(model)
    config = prompt_config(model)
    if config is None or not _prompt_modules(model)[0].enabled:
        yield model
        return
    prompts = _prompt_modules(model)
    for prompt in prompts:
        prompt.enabled = False
    model.num_prefix_tokens -= config.num_tokens
    try:
        yield model
    finally:
        model.num_prefix_tokens += config.num_tokens
        for prompt in prompts:
            prompt.enabled = True


def _prompt_modules(model: nn.Module) -> list[PromptTokens]:
    blocks = transformer_blocks(model)
    return [prompt for block in blocks if isinstance(prompt := getattr(block, PROMPT_MODULE, None), PromptTokens)]
