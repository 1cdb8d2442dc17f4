import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import REAL_WEIGHTS, TINY, make_grocery_folder, make_image_folder, randomize_lora
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from vitlora import activation_bytes, read_adapter, saved_for_backward
from vitlora.backbone import WeightsUnavailable, create_backbone
from vitlora.inference import tta_views
from vitlora.lora import LoRAConfig, lora_config, lora_modules
from vitlora.prompts import PromptConfig, prompt_config
from vitlora.training.data import ImageDataModule
from vitlora.training.module import ImageClassifier, warmup_cosine


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A local weights file standing in for a pretrained base: the real, rebuildable source."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(
        create_backbone("vit_tiny_patch16_224", 1000, pretrained=False, img_size=32, **TINY).state_dict(),
        path,
    )
    return path


@pytest.fixture(autouse=True)
def _weights(tiny_weights):
    global WEIGHTS
    WEIGHTS = str(tiny_weights)


def classifier(method="lora", **kwargs):
    defaults = dict(
        backbone="vit_tiny_patch16_224",
        method=method,
        weights=WEIGHTS,
        img_size=32,
        model_kwargs=TINY,
        class_names=["apple", "banana", "cherry"],
        lora=LoRAConfig(rank=4),
        warmup_epochs=0.5,
        lr=1e-2,
    )
    torch.manual_seed(0)
    return ImageClassifier(**{**defaults, **kwargs})


def datamodule(root, **kwargs):
    defaults = dict(backbone="vit_tiny_patch16_224", img_size=32, batch_size=4, num_workers=0, auto_augment=None)
    return ImageDataModule(str(root), **{**defaults, **kwargs})


class LossRecorder(Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, module):
        trainer.should_stop = True


def trainer(tmp_path, max_epochs=2, callbacks=()):
    return L.Trainer(
        max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=1, accelerator="cpu", logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), *callbacks],
    )  # fmt: skip


@pytest.fixture
def images(tmp_path):
    return make_image_folder(tmp_path / "data")


@pytest.mark.parametrize(("method", "trainable"), [("lora", {"lora", "head"}), ("linear", {"head"}), ("full", None)])
def test_each_method_trains_the_right_parameters(method, trainable):
    model = classifier(method)
    names = {n for n, p in model.model.named_parameters() if p.requires_grad}
    if trainable is None:
        assert names == {n for n, _ in model.model.named_parameters()}
    else:
        kinds = {"lora" if "lora_" in n else "head" if n.startswith("head.") else "other" for n in names}
        assert kinds == trainable
    assert bool(lora_modules(model.model)) == (method == "lora")


def kinds(model):
    names = {n for n, p in model.model.named_parameters() if p.requires_grad}
    return {"lora" if "lora_" in n else "prompt" if ".prompt." in n else n.rsplit(".", 1)[-1] for n in names}


@pytest.mark.parametrize(
    ("method", "trainable"), [("lora", {"lora", "prompt", "weight", "bias"}), ("linear", {"prompt", "weight", "bias"})]
)
def test_prompt_tokens_and_bias_tuning_join_lora_or_linear(method, trainable):
    model = classifier(method, prompt=PromptConfig(num_tokens=2, deep=True), bias_tuning=True)
    assert kinds(model) == trainable  # "weight" only from the head
    assert {n for n, p in model.model.named_parameters() if p.requires_grad and n.endswith("weight")} == {"head.weight"}
    assert prompt_config(model.model) == PromptConfig(num_tokens=2, deep=True)
    assert model.hparams.prompt == {"num_tokens": 2, "deep": True, "init_std": 0.02} and model.hparams.bias_tuning


@pytest.mark.parametrize("extra", [{"prompt": PromptConfig()}, {"bias_tuning": True}])
def test_full_fine_tuning_refuses_prompts_and_bias_tuning(extra):
    with pytest.raises(ValueError, match="'full' already trains every weight and bias"):
        classifier("full", **extra)


def test_prompt_and_bias_checkpoint_holds_them_restores_and_resumes(tmp_path, images):
    model = classifier("linear", prompt=PromptConfig(num_tokens=2, deep=True), bias_tuning=True)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    trainer(tmp_path, max_epochs=1).fit(model, datamodule(images))
    groups = model.trainer.optimizers[0].param_groups
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(model.model.blocks[1].prompt.tokens)] == decay[id(model.model.blocks[0].attn.qkv.bias)] == 0.0
    assert decay[id(model.model.head.weight)] > 0
    moved = {n for n, p in model.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in model.model.named_parameters() if p.requires_grad}  # each trained, base untouched

    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {f"model.{n}" for n in moved}
    assert {"model.blocks.1.prompt.tokens", "model.blocks.0.norm1.bias"} <= checkpoint["state_dict"].keys()
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(restored(x), model.eval()(x))
    resumed = classifier("linear", prompt=PromptConfig(num_tokens=2, deep=True), bias_tuning=True)
    trainer(tmp_path, max_epochs=2).fit(resumed, datamodule(images), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.trainer.global_step == 6


def test_optimizer_groups_and_schedule(tmp_path, images):
    model = classifier("full", head_lr=0.5)
    fit = trainer(tmp_path, max_epochs=1)
    fit.fit(model, datamodule(images))
    groups = model.trainer.optimizers[0].param_groups
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.model.head.weight)]["weight_decay"] > 0
    for name in (
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.bias",
        "pos_embed",
        "cls_token",
        "head.bias",
    ):
        assert by_id[id(model.model.get_parameter(name))]["weight_decay"] == 0.0, name
    assert by_id[id(model.model.head.weight)]["initial_lr"] == 0.5
    assert by_id[id(model.model.blocks[0].attn.qkv.weight)]["initial_lr"] == 1e-2
    schedule = model.trainer.lr_scheduler_configs[0].scheduler
    assert schedule.lr_lambdas[0](0) < 1.0  # warming up over the first half epoch (warmup_epochs=0.5)
    ramp = [warmup_cosine(s, 10, 100, 0.01) for s in range(100)]
    assert ramp[0] < ramp[9] <= 1.0 and ramp[10] == 1.0 and ramp[-1] == pytest.approx(0.01, abs=1e-3)


@pytest.mark.parametrize("lora_plus_ratio", [None, 16.0], ids=["one-lr", "lora-plus"])
def test_lora_plus_gives_every_b_a_larger_rate_and_one_schedule_scales_all_groups(tmp_path, images, lora_plus_ratio):
    dora = LoRAConfig(rank=4, targets=("q", "v", "fc1"), use_dora=True)
    model = classifier(lora=dora, head_lr=0.5, lora_plus_ratio=lora_plus_ratio)
    trainer(tmp_path, max_epochs=1).fit(model, datamodule(images))
    groups = model.trainer.optimizers[0].param_groups
    names = {id(p): n for n, p in model.model.named_parameters()}
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert sorted(by_name) == sorted(n for n, p in model.model.named_parameters() if p.requires_grad)
    expected = {"lora_B": 1e-2 * (lora_plus_ratio or 1), "lora_A": 1e-2, "lora_magnitude": 1e-2, "head": 0.5}
    for name, group in by_name.items():
        kind = "head" if name.startswith("head.") else name.rsplit(".", 1)[-1]
        assert group["initial_lr"] == pytest.approx(expected[kind]), name
        decays = kind != "lora_magnitude" and name != "head.bias"
        assert group["weight_decay"] == (0.05 if decays else 0.0), name
    assert len(groups) == (5 if lora_plus_ratio else 4)  # B gets its own group only with LoRA+
    schedule = model.trainer.lr_scheduler_configs[0].scheduler
    factor = schedule.lr_lambdas[0](schedule.last_epoch)
    assert 0 < factor < 1 and len(set(schedule.lr_lambdas)) == 1
    for group in groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * factor, rel=1e-12)


def test_lora_plus_ratio_must_be_positive():
    with pytest.raises(ValueError, match="lora_plus_ratio must be a positive number"):
        classifier(lora_plus_ratio=0.0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_checkpoint_holds_only_trainable_tensors(tmp_path, images, use_dora):
    model = classifier("lora", lora=LoRAConfig(rank=4, use_dora=use_dora))
    trainer(tmp_path, max_epochs=1).fit(model, datamodule(images))
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {f"model.{n}" for n, p in model.model.named_parameters() if p.requires_grad}
    assert any(key.endswith("lora_magnitude") for key in checkpoint["state_dict"]) == use_dora
    assert checkpoint["hyper_parameters"]["lora"]["use_dora"] == use_dora
    assert checkpoint["hyper_parameters"]["class_names"] == ["apple", "banana", "cherry"]
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    restored.eval()
    assert torch.equal(restored(x), model(x))


@pytest.mark.parametrize("method", [{}, {"lora_plus_ratio": 4.0, "use_dora": True}], ids=["lora", "dora-lora-plus"])
def test_resume_continues_exactly(tmp_path, images, method):
    """With every source of randomness on: LoRA dropout, drop-path, RandAugment, mixup/cutmix."""
    lora = LoRAConfig(rank=4, dropout=0.2, use_dora=method.get("use_dora", False))
    random = dict(lora=lora, drop_path_rate=0.2, lora_plus_ratio=method.get("lora_plus_ratio"))
    augment = dict(auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0)
    uninterrupted = LossRecorder()
    trainer(tmp_path / "a", callbacks=[uninterrupted]).fit(classifier(**random), datamodule(images, **augment))

    trainer(tmp_path / "b", callbacks=[StopAfterFirstEpoch()]).fit(classifier(**random), datamodule(images, **augment))
    resumed = LossRecorder()
    torch.manual_seed(999)  # a resumed process starts from another RNG state
    trainer(tmp_path / "b", callbacks=[resumed]).fit(
        classifier(**random), datamodule(images, **augment), ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt"
    )
    assert len(set(uninterrupted.losses.values())) == 6
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == uninterrupted.losses[step], step


def awake(module):
    """A random head and LoRA B (both start at zero), so every trainable weight gets a gradient."""
    with torch.no_grad():
        module.model.head.weight.copy_(
            torch.randn(module.model.head.weight.shape, generator=torch.Generator().manual_seed(3))
        )
    randomize_lora(module.model)
    return module.train()


def loss_and_gradients(module, x, y):
    module.zero_grad()
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


X, Y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_keeps_loss_and_gradients_and_keeps_less_for_backward(method):
    plain, checkpointed = (awake(classifier(method, gradient_checkpointing=on)) for on in (False, True))
    expected_loss, expected = loss_and_gradients(plain, X, Y)
    loss, grads = loss_and_gradients(checkpointed, X, Y)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected.keys() == {n for n, p in plain.named_parameters() if p.requires_grad}
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)
    kept = activation_bytes(saved_for_backward(checkpointed.model, X))
    assert kept < 0.5 * activation_bytes(saved_for_backward(plain.model, X))


def gradients_reaching_first_block(module) -> list[torch.Tensor]:
    """Fills with the gradient of block 0's output whenever a backward pass reaches it."""
    reached = []

    def watch(block, inputs, output):
        if output.requires_grad:
            output.register_hook(reached.append)

    module.model.blocks[0].register_forward_hook(watch)
    return reached


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_only_the_last_block_runs_no_backward_through_the_first(method):
    for last, through_first in ((None, True), (1, False)):
        module = awake(classifier(method, train_last_blocks=last))
        reached = gradients_reaching_first_block(module)
        in_first = [t for t in saved_for_backward(module.model, X) if f"{t.module}.".startswith("blocks.0.")]
        _, grads = loss_and_gradients(module, X, Y)
        assert bool(reached) == bool(in_first) == through_first, last
        assert any(name.startswith("model.blocks.0.") for name in grads) == through_first
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    if method == "lora":
        assert {n for n, _ in lora_modules(module.model)} == {"blocks.1.attn.qkv"}
        assert lora_config(module.model).blocks == (1,) and module.hparams.lora["blocks"] is None
    else:
        assert {n.split(".")[0] for n in trainable} == {"blocks", "norm", "head"}
        assert all(n.startswith("blocks.1.") for n in trainable if n.startswith("blocks"))


def test_train_last_blocks_is_checked():
    with pytest.raises(ValueError, match=r"either train_last_blocks or lora\.blocks"):
        classifier(train_last_blocks=1, lora=LoRAConfig(blocks=[0]))
    with pytest.raises(ValueError, match=r"last 3 blocks: this model has 2, choose 1\.\.2"):
        classifier("full", train_last_blocks=3)
    with pytest.raises(ValueError, match="linear trains the head alone"):
        classifier("linear", train_last_blocks=1)


COMPILED_GRAPHS = []


@torch._dynamo.register_backend(name="vitlora_test_counting")
def counting_backend(graph, example_inputs):
    """Runs dynamo's graph eagerly (inductor would take minutes on this CPU) and counts it."""
    COMPILED_GRAPHS.append(graph)
    return graph.forward


def test_torch_compile_trains_like_eager_with_unchanged_checkpoints_and_adapters(tmp_path, images):
    from vitlora.training.export import export_adapter

    COMPILED_GRAPHS.clear()
    runs = {}
    for name, options in (("eager", {}), ("compiled", {"torch_compile": True})):
        losses = LossRecorder()
        module = classifier(compile_kwargs={"backend": "vitlora_test_counting"}, **options)
        trainer(tmp_path / name, max_epochs=1, callbacks=[losses]).fit(module, datamodule(images))
        assert bool(COMPILED_GRAPHS) == (name == "compiled")
        adapter = read_adapter(export_adapter(tmp_path / name / "ckpt" / "last.ckpt", tmp_path / f"{name}.safetensors"))
        checkpoint = torch.load(tmp_path / name / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
        runs[name] = losses.losses, checkpoint, adapter.tensors
    (eager_losses, eager_state, eager_adapter), (losses, state, adapter) = runs["eager"], runs["compiled"]
    assert sorted(losses) == [1, 2, 3] and len(set(losses.values())) == 3
    torch.testing.assert_close(losses, eager_losses, atol=1e-6, rtol=1e-5)
    assert state.keys() == eager_state.keys() and adapter.keys() == eager_adapter.keys()
    torch.testing.assert_close(state, eager_state, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(adapter, eager_adapter, atol=1e-6, rtol=1e-5)


def test_test_stage_writes_metrics_per_class_accuracy_and_confusion_png(tmp_path, images):
    from PIL import Image

    model = classifier("linear")
    run = trainer(tmp_path, max_epochs=1)
    run.fit(model, datamodule(images))
    (result,) = run.test(model, datamodule(images))
    assert {"test/top1", "test/macro_f1"} <= result.keys()
    per_class = (tmp_path / "per_class_accuracy.csv").read_text().splitlines()
    assert per_class[0] == "class,accuracy,support" and per_class[1].startswith("apple,")
    assert Image.open(tmp_path / "confusion_matrix.png").size[0] > 30
    # class folders have no coarse classes: no coarse metric, no coarse report
    assert not [key for key in [*result, *run.callback_metrics] if "coarse" in key]
    assert not (tmp_path / "coarse_per_class_accuracy.csv").exists()


GROCERY_LABELS = dict(
    class_names=["Granny-Smith", "Pink-Lady", "Banana", "Oat-Milk"],
    fine_to_coarse=[0, 0, 1, 2],
    coarse_class_names=["Apple", "Banana", "Milk"],
)


@pytest.mark.parametrize("stage", ["validation", "test"])
def test_coarse_top1_counts_a_wrong_fine_class_inside_the_right_coarse_class(monkeypatch, stage):
    model = classifier("linear", **GROCERY_LABELS)
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
    monkeypatch.setattr(model, "log_dict", lambda *args, **kwargs: None)
    monkeypatch.setattr(model, "evaluation_outputs", lambda images: (images, None))  # each batch brings its logits
    step = getattr(model, f"{stage}_step")

    def batch(predicted, true):
        return F.one_hot(torch.tensor(predicted), 4).float(), torch.tensor(true)

    # Granny-Smith right; Pink-Lady for Granny-Smith and Granny-Smith for Pink-Lady: wrong, but both
    # apples; Banana for Pink-Lady: another coarse class. 3 of 4 coarse-right, 1 of 4 fine-right.
    step(batch([0, 1, 0, 2], [0, 0, 1, 1]), 0)
    step(batch([0, 3], [2, 2]), 1)  # Apple and Milk for Banana: 0 of 2
    prefix = "val" if stage == "validation" else "test"
    metrics = getattr(model, f"{prefix}_metrics")
    assert metrics[f"{prefix}/top1"].compute().item() == pytest.approx(1 / 6)
    # over all 6 images (3 / 6), not the mean of the two batches' rates ((3/4 + 0) / 2)
    assert getattr(model, f"{prefix}_coarse_top1").compute().item() == pytest.approx(3 / 6)


@pytest.mark.parametrize("weight", [-0.5, float("nan")])
def test_coarse_head_weight_must_be_zero_or_positive(weight):
    with pytest.raises(ValueError, match="coarse_head_weight must be 0"):
        classifier(coarse_head_weight=weight, **GROCERY_LABELS)


def test_a_coarse_head_needs_coarse_classes():
    with pytest.raises(ValueError, match="coarse_head_weight needs coarse classes"):
        classifier(coarse_head_weight=0.5)  # apple / banana / cherry: no coarse classes
    assert classifier(coarse_head_weight=0.0).coarse_head is None


def coarse_head_classifier(method="lora", weight=0.5, **kwargs):
    model = awake(classifier(method, coarse_head_weight=weight, **GROCERY_LABELS, **kwargs))
    with torch.no_grad():
        model.coarse_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    return model


@pytest.mark.parametrize("method", ["lora", "linear", "full"])
def test_the_coarse_head_leaves_the_fine_logits_and_adds_its_weighted_loss(monkeypatch, method):
    model = coarse_head_classifier(method, label_smoothing=0.1)
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
    fine, coarse = model.fine_and_coarse_logits(X)
    assert torch.equal(fine, model(X))  # the fine head's logits as without a coarse head
    assert coarse.shape == (4, 3)
    pooled = model.model.forward_head(model.model.forward_features(X), pre_logits=True)
    assert torch.allclose(coarse, pooled @ model.coarse_head.weight.T + model.coarse_head.bias, atol=1e-6)

    targets = torch.tensor([0, 1, 2, 3])  # Granny-Smith, Pink-Lady, Banana, Oat-Milk -> Apple, Apple, Banana, Milk
    expected = F.cross_entropy(fine, targets, label_smoothing=0.1) + 0.5 * F.cross_entropy(
        coarse, torch.tensor([0, 0, 1, 2]), label_smoothing=0.1
    )
    assert torch.allclose(model.training_step((X, targets), 0), expected, atol=1e-6)
    # mixup's soft targets: half Granny-Smith, half Pink-Lady is wholly Apple on the coarse level
    soft = torch.tensor([[0.5, 0.5, 0, 0], [0.3, 0, 0.7, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    coarse_soft = torch.tensor([[1.0, 0, 0], [0.3, 0.7, 0], [0, 1.0, 0], [0, 0, 1.0]])
    assert torch.equal(model.coarse_targets(soft), coarse_soft)
    smoothed = coarse_soft * 0.9 + 0.1 / 3
    expected_coarse = torch.sum(-smoothed * coarse.log_softmax(-1), -1).mean()
    fine_smoothed = soft * 0.9 + 0.1 / 4
    expected = torch.sum(-fine_smoothed * fine.log_softmax(-1), -1).mean() + 0.5 * expected_coarse
    assert torch.allclose(model.training_step((X, soft), 0), expected, atol=1e-6)


def test_the_coarse_loss_trains_the_coarse_head_and_the_adapter_and_nothing_frozen(monkeypatch):
    model = coarse_head_classifier("lora")
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
    model.training_step((X, torch.tensor([0, 1, 2, 3])), 0).backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert graded == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"coarse_head.weight", "coarse_head.bias"} <= graded
    assert any("lora_A" in n for n in graded) and "model.head.weight" in graded
    # the coarse loss alone moves the adapter: its gradient differs from the fine loss's
    model.zero_grad()
    fine, _ = model.fine_and_coarse_logits(X)
    F.cross_entropy(fine, torch.tensor([0, 1, 2, 3]), label_smoothing=0.1).backward()
    fine_only = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "coarse_head.weight" not in fine_only
    model.zero_grad()
    model.training_step((X, torch.tensor([0, 1, 2, 3])), 0).backward()
    lora_a = next(n for n in fine_only if "lora_A" in n)
    assert not torch.allclose(dict(model.named_parameters())[lora_a].grad, fine_only[lora_a])


@pytest.mark.parametrize("stage", ["validation", "test"])
def test_coarse_head_top1_scores_the_coarse_heads_own_prediction(monkeypatch, stage):
    model = classifier("linear", coarse_head_weight=1.0, **GROCERY_LABELS)
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
    monkeypatch.setattr(model, "log_dict", lambda *args, **kwargs: None)
    fine = F.one_hot(torch.tensor([0, 0, 3]), 4).float()  # right, wrong (Apple for Apple), wrong (Milk for Banana)
    coarse = F.one_hot(torch.tensor([0, 1, 1]), 3).float()  # Apple right, Banana wrong, Banana right
    monkeypatch.setattr(model, "evaluation_outputs", lambda images: (fine, coarse))
    getattr(model, f"{stage}_step")((torch.zeros(3), torch.tensor([0, 1, 2])), 0)
    prefix = "val" if stage == "validation" else "test"
    assert getattr(model, f"{prefix}_coarse_top1").compute().item() == pytest.approx(2 / 3)
    assert getattr(model, f"{prefix}_coarse_head_top1").compute().item() == pytest.approx(2 / 3)
    coarse = F.one_hot(torch.tensor([2, 2, 0]), 3).float()  # all wrong
    monkeypatch.setattr(model, "evaluation_outputs", lambda images: (fine, coarse))
    getattr(model, f"{prefix}_coarse_head_top1").reset()
    getattr(model, f"{stage}_step")((torch.zeros(3), torch.tensor([0, 1, 2])), 0)
    assert getattr(model, f"{prefix}_coarse_head_top1").compute().item() == 0.0


def test_evaluation_averages_the_coarse_head_over_the_tta_views():
    model = coarse_head_classifier("lora", tta="flip-zoom").eval()
    with torch.no_grad():
        fine, coarse = model.evaluation_outputs(X)
        views = [model.fine_and_coarse_logits(view) for view in tta_views(X, "flip-zoom")]
    assert len(views) == 4
    assert torch.allclose(fine, torch.stack([f for f, _ in views]).mean(0), atol=1e-6)
    assert torch.allclose(coarse, torch.stack([c for _, c in views]).mean(0), atol=1e-6)
    assert torch.equal(model.evaluation_logits(X), fine)


def test_a_coarse_head_run_checkpoints_restores_and_trains_it_at_the_heads_rate(tmp_path):
    grocery = make_grocery_folder(tmp_path / "grocery")
    model = classifier("lora", coarse_head_weight=0.5, head_lr=3e-2, **GROCERY_LABELS)
    before = model.coarse_head.weight.detach().clone()
    trainer(tmp_path, max_epochs=1).fit(model, datamodule(grocery))
    assert not torch.equal(model.coarse_head.weight, before)
    groups = model.trainer.optimizers[0].param_groups

    def group_of(parameter):
        return next(group for group in groups if any(p is parameter for p in group["params"]))

    weight, bias = group_of(model.coarse_head.weight), group_of(model.coarse_head.bias)
    assert weight is group_of(model.model.head.weight) and bias is group_of(model.model.head.bias)
    assert weight["initial_lr"] == bias["initial_lr"] == 3e-2  # head_lr, not lr
    assert weight["weight_decay"] == 0.05 and bias["weight_decay"] == 0.0
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert {"coarse_head.weight", "coarse_head.bias"} <= set(checkpoint["state_dict"])
    assert all(k.startswith(("model.", "coarse_head.")) for k in checkpoint["state_dict"])
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True).eval()
    model.eval()
    with torch.no_grad():
        for ours, theirs in zip(model.fine_and_coarse_logits(X), restored.fine_and_coarse_logits(X), strict=True):
            assert torch.equal(ours, theirs)


def test_grocery_test_run_logs_coarse_top1_and_writes_coarse_per_class_accuracy(tmp_path):
    import csv

    data = datamodule(make_grocery_folder(tmp_path / "data"))
    assert data.fine_to_coarse == GROCERY_LABELS["fine_to_coarse"]
    model = classifier(
        "linear",
        class_names=data.class_names,
        fine_to_coarse=data.fine_to_coarse,
        coarse_class_names=data.coarse_class_names,
    )
    run = trainer(tmp_path, max_epochs=1)
    run.fit(model, data)
    assert 0 <= run.callback_metrics["val/coarse_top1"] <= 1
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert {key: checkpoint["hyper_parameters"][key] for key in GROCERY_LABELS} == GROCERY_LABELS
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (result,) = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path).test(
        restored, datamodule(tmp_path / "data")
    )

    # by hand: every test image's fine prediction, mapped to its coarse class
    coarse = torch.tensor(GROCERY_LABELS["fine_to_coarse"])
    restored.eval()
    test_data = datamodule(tmp_path / "data")
    test_data.setup("test")
    with torch.no_grad():
        batches = [(restored(x).argmax(-1), y) for x, y in test_data.test_dataloader()]
    predicted, true = zip(*batches, strict=True)
    predicted, true = torch.cat(predicted), torch.cat(true)
    assert len(true) == 12
    right = coarse[predicted] == coarse[true]
    assert result["test/coarse_top1"] == pytest.approx(right.float().mean().item())
    assert result["test/top1"] == pytest.approx((predicted == true).float().mean().item())
    rows = list(csv.DictReader((tmp_path / "coarse_per_class_accuracy.csv").open()))
    assert [row["class"] for row in rows] == GROCERY_LABELS["coarse_class_names"]
    assert [int(row["support"]) for row in rows] == [6, 3, 3]
    for c, row in enumerate(rows):
        assert float(row["accuracy"]) == pytest.approx(right[coarse[true] == c].float().mean().item(), abs=5e-5)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"fine_to_coarse": [0, 0, 1]}, "give both or neither"),
        ({"fine_to_coarse": [0, 1], "coarse_class_names": ["Apple", "Banana"]}, "2 entries for 3 classes"),
        ({"fine_to_coarse": [0, 1, 2], "coarse_class_names": ["Apple", "Banana"]}, r"coarse classes \[2\] of only 2"),
    ],
)
def test_a_bad_coarse_mapping_is_refused(labels, message):
    with pytest.raises(ValueError, match=message):
        classifier("linear", **labels)


def test_warmup_is_sized_in_epochs_also_when_training_is_limited_by_steps(tmp_path, images):
    model = classifier(warmup_epochs=1.0)
    run = L.Trainer(max_steps=12, limit_val_batches=0, accelerator="cpu", logger=False, enable_progress_bar=False,
                    enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    learning_rates = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            learning_rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    run.callbacks.append(Record())
    run.fit(model, datamodule(images))  # 24 images / batch 4 = 6 steps per epoch
    peak = max(learning_rates)
    assert learning_rates.index(peak) == 6 and learning_rates[-1] < peak / 2


def test_a_checkpoint_refuses_another_base(tmp_path, images):
    from safetensors.torch import save_file

    trainer(tmp_path, max_epochs=1).fit(classifier(), datamodule(images))
    torch.manual_seed(5)
    other = create_backbone("vit_tiny_patch16_224", 1000, pretrained=False, img_size=32, **TINY)
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="differ from those this checkpoint was trained on"):
        ImageClassifier.load_from_checkpoint(
            tmp_path / "ckpt" / "last.ckpt", weights_only=True, weights=str(tmp_path / "other.safetensors")
        )


def test_an_unknown_backbone_name_is_named():
    with pytest.raises(ValueError, match="Unknown timm model 'vit_tinyy'"):
        create_backbone("vit_tinyy", 3)


def test_top5_is_reported_when_there_are_more_than_five_classes():
    assert "top5" in classifier(class_names=[str(i) for i in range(7)]).val_metrics
    assert "top5" not in classifier().val_metrics


def test_missing_weights_error_says_how_to_pass_a_local_file(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, no retries
    with pytest.raises(WeightsUnavailable, match=r"--model\.weights path/to/vit_tiny_patch16_224"):
        create_backbone("vit_tiny_patch16_224", 3, pretrained=True, img_size=32, **TINY)


def test_local_weights_load_strictly_except_the_head(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = create_backbone("vit_tiny_patch16_224", 10, pretrained=False, img_size=32, **TINY)
    torch.nn.init.normal_(source.head.weight)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    model = create_backbone("vit_tiny_patch16_224", 3, weights=tmp_path / "w.safetensors", img_size=32, **TINY)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert model.head.weight.shape == (3, 64) and not model.head.weight.any()
    state = source.state_dict()
    del state["blocks.0.attn.qkv.weight"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=r"(?s)broken\.safetensors: does not match.*blocks\.0\.attn\.qkv\.weight"):
        create_backbone("vit_tiny_patch16_224", 3, weights=tmp_path / "broken.safetensors", img_size=32, **TINY)


@pytest.mark.skipif(not REAL_WEIGHTS.is_file(), reason="../shared weights absent")
def test_real_weights_file_through_the_module():
    model = ImageClassifier(
        backbone="vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        weights=str(REAL_WEIGHTS),
        class_names=["a", "b"],
    )
    assert model.model.head.out_features == 2 and lora_modules(model.model)


def test_tta_averages_the_logits_of_its_views_and_true_means_flip():
    model = classifier(tta=True).eval()
    assert model.hparams.tta == "flip"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = (model(images) + model(images.flip(-1))) / 2
        assert torch.allclose(model.evaluation_logits(images), expected, atol=1e-6)
        zoomed = classifier(tta="flip-zoom").eval()
        zoomed.load_state_dict(model.state_dict())
        four = torch.stack([zoomed(view) for view in tta_views(images, "flip-zoom")]).mean(0)
        assert torch.allclose(zoomed.evaluation_logits(images), four, atol=1e-6)
        assert torch.equal(classifier(tta=False).eval().evaluation_logits(images), classifier().eval()(images))
    with pytest.raises(ValueError, match="tta must be one of"):
        classifier(tta="crops")
