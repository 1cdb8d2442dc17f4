"""The Lightning module: one timm backbone, three ways to adapt it, compared on equal terms.

``method="lora"`` trains LoRA + head, ``"full"`` every weight, ``"linear"`` the head alone;
prompt tokens (VPT) and bias tuning (BitFit) can join lora or linear. Checkpoints of
lora/linear runs hold only the trainable tensors (plus optimizer state); the frozen base is
rebuilt from its source when a checkpoint is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from vitlora.adapt import Method, adapt_backbone, check_adaptation
from vitlora.adapter import base_fingerprint, class_labels
from vitlora.backbone import create_backbone
from vitlora.inference import TTA_MODES, tta_views
from vitlora.lora import LoRAConfig, lora_modules
from vitlora.prompts import PromptConfig
from vitlora.targets import classifier_prefixes
from vitlora.trainable import count_parameters, is_prompt_name
from vitlora.training.data import batches_seen
from vitlora.training.ema import TrainableAverage


class ImageClassifier(L.LightningModule):
    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        method: Method = "lora",
        lora: LoRAConfig = LoRAConfig(),  # noqa: B008 - a frozen default, never mutated
        prompt: PromptConfig | None = None,
        bias_tuning: bool = False,
        weights: str | None = None,
        pretrained: bool = True,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        fine_to_coarse: list[int] | None = None,
        coarse_class_names: list[str] | None = None,
        img_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 2e-3,
        head_lr: float | None = None,
        lora_plus_ratio: float | None = None,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.1,
        drop_path_rate: float = 0.0,
        tta: bool | Literal["none", "flip", "flip-zoom"] = False,
        seed: int = 0,
        gradient_checkpointing: bool = False,
        train_last_blocks: int | None = None,
        torch_compile: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
        explain_worst: int = 0,
        ema_decay: float = 0.0,
        coarse_head_weight: float = 0.0,
    ) -> None:
        """One backbone adapted by ``method``; its options as ``vitlora fit --model.*`` shows them.

        Args:
            backbone: timm model name with its pretrained tag (timm.list_models("vit_*", pretrained=True)).
            method: lora (LoRA + head), full (every weight) or linear (the head alone).
            lora: LoRA rank, alpha, targets and blocks (method lora).
            prompt: Learnable prompt tokens (VPT), with method lora or linear; null for none.
            bias_tuning: Also train every bias (BitFit), with method lora or linear.
            weights: Local pretrained weights file (.safetensors or .pth, timm keys) instead of the
                hub: what machines without internet need. Stored as an absolute path.
            pretrained: Start from pretrained weights (false: random, for tests).
            num_classes: Classes of the new head; set from the data.
            class_names: Set from the data; recorded in checkpoints and adapters.
            fine_to_coarse: Set from the data where its classes group into coarse ones (Grocery
                Store, fine labels): the coarse class of each class. Validation and test then also
                log coarse_top1, each prediction mapped to its coarse class.
            coarse_class_names: Set from the data with fine_to_coarse: the coarse classes' names.
            img_size: Input resolution other than the backbone's (position embeddings resized).
            model_kwargs: Extra timm.create_model arguments (tests use tiny configs).
            lr: Peak learning rate of the adapted weights (after warm-up, then cosine decay).
            head_lr: Peak learning rate of the new head (default: lr).
            lora_plus_ratio: LoRA+ (Hayou et al. 2024): every LoRA B trains at lr * ratio; null or 1 is plain LoRA.
            weight_decay: AdamW weight decay of matrices (never of biases, norms, tokens).
            warmup_epochs: Linear warm-up length, in epochs (may be fractional).
            min_lr_ratio: The cosine schedule ends at this fraction of the peak rates.
            label_smoothing: Cross-entropy label smoothing.
            drop_path_rate: Stochastic depth of the backbone's blocks.
            tta: Test-time augmentation: average the logits of each image and its mirror image
                (true or flip), also of a central zoom of both (flip-zoom), or none (false).
            seed: Set from seed_everything: dropout and drop-path per batch.
            gradient_checkpointing: Recompute each block in backward instead of keeping its
                activations: less memory, about a third more time.
            train_last_blocks: Adapt only the last N blocks (LoRA in them, or for full them
                plus the final norm and head); backward never runs through the earlier ones.
            torch_compile: Compile the backbone in place when the trainer sets the model up.
            compile_kwargs: torch.compile arguments, e.g. {"mode": "max-autotune"}.
            explain_worst: vitlora test also writes explanation sheets (vitlora.explain) of the N
                test images whose true class got the lowest probability, next to the confusion matrix.
            ema_decay: Validate, checkpoint and export a moving average of the trained weights
                (0: off). The decay ramps up as (1 + step) / (10 + step) until it reaches this
                value, so the average spans about the last ninth of the steps so far, at most
                about 1 / (1 - ema_decay) steps (500 for 0.998). Only the trained tensors are
                averaged: for LoRA it costs a copy of the adapter, not of the model.
            coarse_head_weight: Also train a head on the coarse classes (fine_to_coarse, from the
                data), on the same pooled features as the fine head, its cross-entropy weighted by
                this (0: none). It only shapes training: predictions, adapters and served models use
                the fine head; validation and test also log coarse_head_top1.
        """
        super().__init__()
        if isinstance(prompt, dict):  # as stored in checkpoints
            prompt = PromptConfig(**prompt)
        if isinstance(lora, dict):  # as stored in checkpoints: plain data, loadable with weights_only
            lora = LoRAConfig(**lora)
        check_adaptation(method, lora, prompt, bias_tuning, train_last_blocks)
        if class_names is not None:
            num_classes = num_classes or len(class_names)
            if len(class_names) != num_classes:
                raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}.")
        if not num_classes:
            raise ValueError("num_classes (or class_names) is required; the CLI takes them from the data.")
        check_coarse_classes(fine_to_coarse, coarse_class_names, num_classes)
        if not (math.isfinite(coarse_head_weight) and coarse_head_weight >= 0):
            raise ValueError(f"coarse_head_weight must be 0 (off) or a positive number, got {coarse_head_weight!r}.")
        if coarse_head_weight and fine_to_coarse is None:
            raise ValueError(
                "coarse_head_weight needs coarse classes: data whose classes group into coarse ones "
                "(the Grocery Store layout with label_level fine)."
            )
        if lora_plus_ratio is not None and not lora_plus_ratio > 0:
            raise ValueError(f"lora_plus_ratio must be a positive number (None or 1 for off), got {lora_plus_ratio!r}.")
        tta = {True: "flip", False: "none"}.get(tta, tta)
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {[True, False, *TTA_MODES]}, got {tta!r}.")
        if weights:  # checkpoints rebuild the base from here: keep it valid from any working directory
            weights = str(Path(weights).resolve())
        self.save_hyperparameters(ignore=["lora", "prompt"])
        self.hparams["tta"] = tta
        self.hparams["weights"] = weights  # resolved (LightningCLI hands over its raw config as hparams)
        self.hparams["lora"] = asdict(lora)
        self.hparams["prompt"] = asdict(prompt) if prompt is not None else None
        kwargs = dict(model_kwargs or {})
        if img_size:
            kwargs["img_size"] = img_size
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        self.model = create_backbone(backbone, num_classes, weights=weights, pretrained=pretrained, **kwargs)
        if gradient_checkpointing:
            self.model.set_grad_checkpointing()
        adapt_backbone(self.model, method, lora, prompt, bias_tuning, train_last_blocks)
        self.coarse_head = None
        if coarse_head_weight:
            features = getattr(self.model, "head_hidden_size", self.model.num_features)
            self.coarse_head = torch.nn.Linear(features, len(coarse_class_names))
        trained = ((name, p) for name, p in self.named_parameters() if p.requires_grad)
        self.ema = TrainableAverage(trained, ema_decay) if ema_decay else None
        metrics = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
        if num_classes > 5:
            metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        metrics["macro_f1"] = MulticlassF1Score(num_classes, average="macro")
        self.val_metrics = MetricCollection(metrics, prefix="val/")
        self.val_loss = MeanMetric()  # per image, synced as sums: exact under DDP with uneven shares
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        self.test_per_class = MulticlassAccuracy(num_classes, average="none")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        coarse_of = torch.tensor(fine_to_coarse) if fine_to_coarse is not None else None
        self.register_buffer("coarse_of", coarse_of, persistent=False)  # derived from hparams: not in checkpoints
        if coarse_of is not None:  # synced counts: exact under DDP, whatever the shares
            self.val_coarse_top1 = MulticlassAccuracy(len(coarse_class_names), average="micro")
            self.test_coarse_top1 = self.val_coarse_top1.clone()
        if self.coarse_head is not None:
            self.val_coarse_head_top1 = self.val_coarse_top1.clone()
            self.test_coarse_head_top1 = self.val_coarse_top1.clone()

    @property
    def class_names(self) -> list[str]:
        return class_labels(self.hparams.class_names, self.hparams.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def fine_and_coarse_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's logits and, with a coarse head, its logits on the same pooled features."""
        if self.coarse_head is None:
            return self(images), None
        features = self.model.forward_features(images)  # timm: forward == forward_head(forward_features)
        pooled = self.model.forward_head(features, pre_logits=True)
        return self.model.forward_head(features), self.coarse_head(pooled)

    def configure_model(self) -> None:
        if self.hparams.torch_compile and not getattr(self, "_compiled", False):
            self.model.compile(**(self.hparams.compile_kwargs or {}))  # in place: same module, same state-dict keys
            self._compiled = True

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            counts = str(count_parameters(self.model))
            if self.coarse_head is not None:
                coarse = sum(p.numel() for p in self.coarse_head.parameters())
                counts += f"\n{'+ coarse':<10} {coarse:>11,}  (a training head: not in adapters)"
            print(f"{self.hparams.method} on {self.hparams.backbone}:\n{counts}")

    # --- training -------------------------------------------------------------------------

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Each batch's randomness (dropout, drop-path) is a function of (seed, batch): resumes are exact."""
        torch.manual_seed(self.hparams.seed * 1_000_003 + batches_seen(self.trainer))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        logits, coarse_logits = self.fine_and_coarse_logits(images)
        loss = smoothed_cross_entropy(logits, targets, self.hparams.label_smoothing)
        if coarse_logits is not None:
            coarse_loss = smoothed_cross_entropy(
                coarse_logits, self.coarse_targets(targets), self.hparams.label_smoothing
            )
            self.log("train/coarse_loss", coarse_loss)
            loss = loss + self.hparams.coarse_head_weight * coarse_loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def coarse_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Each image's coarse class; mixup's soft targets summed within each coarse class."""
        if targets.ndim == 2:  # a sum, not a matmul: autocast would round the matmul to bf16
            summed = targets.new_zeros(len(targets), self.coarse_head.out_features)
            return summed.index_add_(1, self.coarse_of, targets)
        return self.coarse_of[targets]

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # here, not at batch end: a step checkpoint saved then already holds this step
            self.ema.update(self.trainer.global_step + 1)  # Lightning counts the step once this returns

    def on_validation_epoch_start(self) -> None:
        if self.ema is not None and self.trainer.state.fn == "fit":
            self.ema.swap()  # validate the averaged weights, which checkpoints hold

    def on_validation_epoch_end(self) -> None:
        if self.ema is not None and self.trainer.state.fn == "fit":
            self.ema.swap()

    def on_fit_end(self) -> None:
        if self.ema is not None:
            self.ema.swap()  # fit ends with the averaged weights, as its checkpoints and adapters

    def evaluation_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fine logits, and the coarse head's where there is one, each averaged over the TTA views."""
        if self.coarse_head is None:
            return self.evaluation_logits(images), None
        outputs = [self.fine_and_coarse_logits(view) for view in tta_views(images, self.hparams.tta)]
        return torch.stack([fine for fine, _ in outputs]).mean(0), torch.stack([c for _, c in outputs]).mean(0)

    def evaluation_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The fine logits averaged over the TTA views (predictions: the model's own, compiled forward)."""
        return torch.stack([self(view) for view in tta_views(images, self.hparams.tta)]).mean(0)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        logits, coarse_logits = self.evaluation_outputs(images)
        self.val_loss.update(F.cross_entropy(logits.float(), targets), weight=len(targets))
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.val_metrics.update(logits, targets)
        self.log_dict(self.val_metrics, prog_bar=True)
        self.log_coarse_top1("val", logits, coarse_logits, targets)

    def test_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        logits, coarse_logits = self.evaluation_outputs(images)
        self.test_metrics.update(logits, targets)
        self.log_dict(self.test_metrics)
        self.log_coarse_top1("test", logits, coarse_logits, targets)
        self.test_per_class.update(logits, targets)
        self.test_confusion.update(logits, targets)
        if self.hparams.explain_worst:
            self._worst = worst_images(getattr(self, "_worst", []), images, targets, logits, self.hparams.explain_worst)

    def log_coarse_top1(
        self, stage: str, logits: torch.Tensor, coarse_logits: torch.Tensor | None, targets: torch.Tensor
    ) -> None:
        """``<stage>/coarse_top1``: a fine prediction counts as right when it lies in the image's coarse
        class; ``<stage>/coarse_head_top1``: the coarse head's own prediction, where there is one."""
        if self.coarse_of is None:
            return
        metric = getattr(self, f"{stage}_coarse_top1")
        metric.update(self.coarse_of[logits.argmax(-1)], self.coarse_of[targets])
        self.log(f"{stage}/coarse_top1", metric, prog_bar=stage == "val")
        if coarse_logits is not None:
            metric = getattr(self, f"{stage}_coarse_head_top1")
            metric.update(coarse_logits.argmax(-1), self.coarse_of[targets])
            self.log(f"{stage}/coarse_head_top1", metric)

    def on_test_epoch_end(self) -> None:
        from vitlora.training.report import write_test_report

        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        per_class, confusion = self.test_per_class.compute(), self.test_confusion.compute()  # syncs: every rank
        if self.trainer.is_global_zero:
            hp = self.hparams
            write_test_report(
                folder, self.class_names, per_class.cpu(), confusion.cpu(), hp.coarse_class_names, hp.fine_to_coarse
            )
            if getattr(self, "_worst", None):
                self.explain_worst_images(folder / "explanations")
        self._worst = []
        self.test_per_class.reset()
        self.test_confusion.reset()

    def explain_worst_images(self, folder: Path) -> None:
        """Sheets of the most confused test images (this rank's), explaining each one's true class."""
        from vitlora.datasets import backbone_data_config
        from vitlora.explain import explain_pixels, with_heads_of, write_explanations

        hp = self.hparams
        base = None
        if hp.bias_tuning:  # tuned biases replaced the base's own: rebuild the frozen base
            kwargs = {**(hp.model_kwargs or {}), **({"img_size": hp.img_size} if hp.img_size else {})}
            plain = create_backbone(hp.backbone, hp.num_classes, weights=hp.weights, pretrained=hp.pretrained, **kwargs)
            base = with_heads_of(plain.to(self.device), self.model)
        config = backbone_data_config(hp.backbone, hp.img_size)
        _, images, targets = zip(*self._worst, strict=True)
        with torch.inference_mode(False):  # Lightning tests in inference mode; attributions need gradients
            pixels = torch.stack(images).clone().to(self.device)
            explanations = explain_pixels(
                self.model,
                pixels,
                names=[f"worst-{i + 1}-{self.class_names[t]}" for i, t in enumerate(targets)],
                class_names=self.class_names,
                mean=config["mean"],
                std=config["std"],
                methods=("integrated-gradients", "occlusion"),
                targets=torch.tensor(targets),
                base=base,
            )
        write_explanations(explanations, folder)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.evaluation_logits(images).softmax(-1)

    # --- optimisation -----------------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        no_decay_names = set(getattr(self.model, "no_weight_decay", lambda: set())())
        heads = classifier_prefixes(self.model)
        lora_plus = hp.lora_plus_ratio or 1.0
        lora_B_names = {f"{name}.lora_B" for name, _ in lora_modules(self.model)} if lora_plus != 1.0 else set()
        groups: dict[tuple[bool, bool, bool], list[torch.nn.Parameter]] = {}
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            decay = parameter.ndim > 1 and name not in no_decay_names and not is_prompt_name(name)
            groups.setdefault((name.startswith(heads), decay, name in lora_B_names), []).append(parameter)
        for parameter in self.coarse_head.parameters() if self.coarse_head is not None else ():
            groups.setdefault((True, parameter.ndim > 1, False), []).append(parameter)  # a head: head_lr
        param_groups = [
            {
                "params": params,
                "lr": (hp.head_lr or hp.lr) if is_head else hp.lr * (lora_plus if is_lora_B else 1.0),
                "weight_decay": hp.weight_decay if decay else 0.0,
            }
            for (is_head, decay, is_lora_B), params in sorted(groups.items())
        ]
        optimizer = torch.optim.AdamW(param_groups, betas=(0.9, 0.999))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if self.trainer.train_dataloader is None:  # not loaded when only max_steps bounds training
            self.trainer.fit_loop.setup_data()
        batches = self.trainer.num_training_batches
        steps_per_epoch = math.ceil(batches / self.trainer.accumulate_grad_batches) if math.isfinite(batches) else total
        warmup = min(round(hp.warmup_epochs * steps_per_epoch), total - 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- checkpoints ------------------------------------------------------------------------

    @property
    def base_is_rebuildable(self) -> bool:
        """A random (not pretrained) base has no source to rebuild from, so it must be saved."""
        return bool(self.hparams.weights or self.hparams.pretrained)

    @property
    def trainable_only_checkpoints(self) -> bool:
        return self.hparams.method != "full" and self.base_is_rebuildable

    def frozen_base_fingerprint(self) -> str:
        if getattr(self, "_base_fingerprint", None) is None:  # the base is frozen: hash it once
            self._base_fingerprint = base_fingerprint(self.model)
        return self._base_fingerprint

    def trainable_state_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.trainable_only_checkpoints:
            trainable = self.trainable_state_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
            checkpoint["vitlora"] = {"base_fingerprint": self.frozen_base_fingerprint()}
        if self.ema is not None:  # evaluation, export and test read the average; resuming needs the trained weights
            trained, averaged = self.ema.trained_and_averaged()  # also right when saved after fit swapped them
            checkpoint.setdefault("vitlora", {})["trained_weights"] = trained
            checkpoint["state_dict"].update(averaged)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Fills the frozen base (rebuilt from its source in __init__) into a trainable-only
        checkpoint, after checking that it is the base the checkpoint was trained on."""
        state = checkpoint["state_dict"]
        expected_base = checkpoint.get("vitlora", {}).get("base_fingerprint")
        if expected_base and expected_base != self.frozen_base_fingerprint():
            raise ValueError(
                f"The base weights rebuilt from {self.hparams.weights or self.hparams.backbone!r} differ from "
                "those this checkpoint was trained on; pass the original file with --model.weights."
            )
        if self._trainer is not None and self._trainer.state.fn == "fit":  # resuming
            if self.ema is not None and self.ema.averages().keys() <= state.keys():
                self.ema.load(state)  # the saved average, or (saved without EMA) one that starts here
            # train on from the trained weights, not their average, whether or not this run averages too
            state.update(checkpoint.get("vitlora", {}).get("trained_weights", {}))
        missing = sorted(self.trainable_state_keys() - state.keys())
        if missing:
            raise ValueError(f"Checkpoint lacks trainable tensors {missing[:5]}: was it saved by another method?")
        for key, tensor in self.state_dict().items():
            state.setdefault(key, tensor)


def check_coarse_classes(
    fine_to_coarse: list[int] | None, coarse_class_names: list[str] | None, num_classes: int
) -> None:
    """Both or neither given, one coarse class per class, every one among the coarse names."""
    if (fine_to_coarse is None) != (coarse_class_names is None):
        raise ValueError("fine_to_coarse and coarse_class_names go together: give both or neither.")
    if fine_to_coarse is None:
        return
    if len(fine_to_coarse) != num_classes:
        raise ValueError(f"fine_to_coarse has {len(fine_to_coarse)} entries for {num_classes} classes.")
    outside = sorted({c for c in fine_to_coarse if not 0 <= c < len(coarse_class_names)})
    if outside:
        raise ValueError(f"fine_to_coarse names coarse classes {outside} of only {len(coarse_class_names)}.")


def worst_images(
    kept: list[tuple[float, torch.Tensor, int]],
    images: torch.Tensor,
    targets: torch.Tensor,
    logits: torch.Tensor,
    count: int,
) -> list[tuple[float, torch.Tensor, int]]:
    """The ``count`` (true-class probability, image, class) with the lowest probability so far, on the CPU."""
    probabilities = logits.float().softmax(-1).gather(1, targets[:, None])[:, 0].tolist()
    batch = [
        (p, image.detach().cpu(), int(t)) for p, image, t in zip(probabilities, images, targets.tolist(), strict=True)
    ]
    return sorted(kept + batch, key=lambda item: item[0])[:count]


def smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label-smoothed cross-entropy against class indices or (mixup / cutmix) soft targets, in float32."""
    if targets.ndim == 2:
        soft = targets * (1 - smoothing) + smoothing / targets.shape[1]
        return torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up from ~0, then cosine decay to ``min_ratio`` of the peak rate."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
