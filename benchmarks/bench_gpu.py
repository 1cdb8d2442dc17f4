"""GPU training speed, MFU and memory: full fine-tuning vs vitlora LoRA vs linear probe vs HF PEFT LoRA.

    python benchmarks/bench_gpu.py                                   # ViT-B/16 224 px, batch 128, bf16, CUDA
    python benchmarks/bench_gpu.py --compile                         # torch.compile every model
    python benchmarks/bench_gpu.py --grad-ckpt --last-blocks 4       # memory options of ImageClassifier
    python benchmarks/bench_gpu.py --device cpu --batch 4 --model vit_tiny_patch16_224 --rounds 3   # anywhere

Models are built by ``ImageClassifier`` (so its ``gradient_checkpointing`` / ``train_last_blocks``
options are what is measured; PEFT through ``peft.get_peft_model``), random weights. Per method:
step time (forward + backward + AdamW step under autocast, timm's fused SDPA attention),
methods interleaved round by round; model FLOPs of one step counted by ``FlopCounterMode`` on
the eager model without recomputation, and MFU against the GPU's dense bf16 peak; bytes saved
for backward (exact); CUDA peak allocation at the batch and the largest batch that fits
(doubling, then bisection, catching OOM). Inference: base vs LoRA unmerged vs merged.
Prints Markdown tables for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import sys

import timm
import timm.layers
import torch
import torch.nn.functional as F
from bench_core import autocast, benchmark_parser, build, make_step, saved_for_backward_bytes, sync, timed_rounds
from torch.utils.flop_counter import FlopCounterMode

from vitlora import LoRAConfig, count_parameters, merge_lora
from vitlora.training.module import ImageClassifier

METHODS = ("full", "vitlora", "linear", "peft")
DENSE_BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, no sparsity


def build_method(method: str, args: argparse.Namespace) -> torch.nn.Module:
    if method == "peft":
        model = build("peft", args)
        if args.grad_ckpt:
            model.get_base_model().set_grad_checkpointing()
        return model
    torch.manual_seed(0)
    module = ImageClassifier(
        backbone=args.model,
        method="lora" if method == "vitlora" else method,
        lora=LoRAConfig(rank=args.rank, alpha=2 * args.rank, targets=("q", "v")),
        pretrained=False,
        num_classes=args.num_classes,
        img_size=args.img_size,
        gradient_checkpointing=args.grad_ckpt,
        train_last_blocks=None if method == "linear" else args.last_blocks,
    )
    return module.model.to(args.device)


def timm_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def step_flops(model: torch.nn.Module, args: argparse.Namespace) -> int:
    """Model FLOPs of one training step: forward + backward, without checkpointing's recomputation."""
    base = timm_model(model)
    checkpointing = getattr(base, "grad_checkpointing", False)
    base.set_grad_checkpointing(False)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    y = torch.randint(args.num_classes, (args.batch,), device=args.device)
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(args):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    base.set_grad_checkpointing(checkpointing)
    return counter.get_total_flops()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fits(model: torch.nn.Module, args: argparse.Namespace, batch: int) -> bool:
    """Whether two training steps at ``batch`` run without a CUDA out-of-memory error."""
    ok = True
    try:
        step = make_step(model, argparse.Namespace(**{**vars(args), "batch": batch}))
        step()
        step()
        sync(args.device)
    except torch.cuda.OutOfMemoryError:
        ok = False
    step = None  # free the optimizer state and, after an OOM, the half-built graph
    model.zero_grad(set_to_none=True)
    release()
    return ok


def largest_batch(model: torch.nn.Module, args: argparse.Namespace) -> str:
    """Doubling from --batch until OOM, then bisection to a multiple of --batch-resolution."""
    if not args.device.startswith("cuda"):
        return "n/a (CPU)"
    low, high = 0, args.batch
    while high <= args.max_batch and fits(model, args, high):
        low, high = high, 2 * high
    if high > args.max_batch:
        return f">= {low}"
    while high - low > args.batch_resolution:
        middle = (low + high) // 2 // args.batch_resolution * args.batch_resolution
        if middle <= low:
            break
        low, high = (middle, high) if fits(model, args, middle) else (low, middle)
    return str(low)


def peak_memory_mb(model: torch.nn.Module, args: argparse.Namespace) -> float | None:
    """CUDA peak allocation of two steps above what was allocated before them (model weights included)."""
    if not args.device.startswith("cuda"):
        return None
    release()
    torch.cuda.reset_peak_memory_stats()
    step = make_step(model, args)
    step()
    step()
    sync(args.device)
    peak = torch.cuda.max_memory_allocated() / 2**20
    del step
    model.zero_grad(set_to_none=True)
    release()
    return peak


def device_name(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def dense_peak(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in DENSE_BF16_PEAK.items() if key in name), None)


def main() -> None:
    parser = benchmark_parser(__doc__, batch=128, device="cuda", dtype="bf16", rounds=10, warmup=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (training and inference)")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of every block")
    parser.add_argument(
        "--last-blocks", type=int, help="train only the last N blocks (LoRA in them; full: them + head)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--max-batch", type=int, default=4096, help="upper end of the largest-batch search")
    parser.add_argument("--batch-resolution", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, help="dense peak of the device, for MFU (known GPUs: automatic)")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 parts autocast leaves (head, norms)

    models = {m: build_method(m, args) for m in args.methods}
    trainable = {m: count_parameters(model).trainable for m, model in models.items()}
    flops = {m: step_flops(model, args) for m, model in models.items()}
    saved = {m: saved_for_backward_bytes(model, args) / 2**20 for m, model in models.items()}
    steps = {m: make_step(torch.compile(model) if args.compile else model, args) for m, model in models.items()}
    timed_rounds(steps, args.warmup, args.device)
    step_time = timed_rounds(steps, args.rounds, args.device)
    del steps
    for model in models.values():
        model.zero_grad(set_to_none=True)
        model.cpu()
    release()
    memory, largest = {}, {}
    for m, model in models.items():  # one model at a time on the device, so its peak is its own
        model.to(args.device)
        memory[m], largest[m] = peak_memory_mb(model, args), largest_batch(model, args)
        model.cpu()
        release()

    peak = dense_peak(args)
    reference = "full" if "full" in args.methods else args.methods[0]
    print(f"\n{args.model} {args.img_size}px, batch {args.batch}, {args.dtype} autocast, LoRA rank {args.rank} on q,v")
    print(
        f"{device_name(args)}; torch {torch.__version__}, timm {timm.__version__}; fused SDPA attention: "
        f"{timm.layers.use_fused_attn()}; compile: {args.compile}; gradient checkpointing: {args.grad_ckpt}; "
        f"last blocks: {args.last_blocks or 'all'}\ncommand: {' '.join(sys.argv)}\n"
    )
    print(
        "| method | trainable | step (ms) | images/s | vs full | GFLOP/step | MFU | saved for backward (MB) "
        "| peak alloc (MB) | vs full | largest batch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in args.methods:
        mfu = f"{flops[m] / step_time[m] / peak:.1%}" if peak else "n/a"
        mem = f"{memory[m]:.0f} | {memory[m] / memory[reference]:.3f}" if memory[m] else "n/a | n/a"
        print(
            f"| {m} | {trainable[m]:,} | {1000 * step_time[m]:.1f} | {args.batch / step_time[m]:.0f} | "
            f"{step_time[m] / step_time[reference]:.3f} | {flops[m] / 1e9:.1f} | {mfu} | {saved[m]:.1f} | {mem} | "
            f"{largest[m]} |"
        )

    if not {"full", "vitlora"} <= set(args.methods):
        return
    base, unmerged = (models[m].to(args.device).eval() for m in ("full", "vitlora"))
    merged = merge_lora(copy.deepcopy(unmerged)).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)

    def infer(model):
        model = torch.compile(model) if args.compile else model

        def run():
            with torch.inference_mode(), autocast(args):
                model(x)

        return run

    runs = {"base": infer(base), "LoRA unmerged": infer(unmerged), "LoRA merged": infer(merged)}
    timed_rounds(runs, args.warmup, args.device)
    latency = timed_rounds(runs, args.rounds, args.device)
    print(f"\n| inference, batch {args.batch} | latency (ms) | vs base |\n|---|---|---|")
    for name, seconds in latency.items():
        print(f"| {name} | {1000 * seconds:.1f} | {seconds / latency['base']:.3f} |")


if __name__ == "__main__":
    main()
