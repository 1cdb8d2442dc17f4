"""vitlora LoRA vs full fine-tuning vs HF PEFT LoRA on one timm model, side by side in one run.

    python benchmarks/bench_core.py                                   # CPU: ViT-B/16, batch 8
    python benchmarks/bench_core.py --device cuda --batch 128 --dtype bf16

Training: forward + backward + AdamW step, the methods interleaved round by round so machine
noise hits all alike; medians and ratios are reported. Inference: base vs LoRA unmerged vs
merged, interleaved the same way. Memory: bytes saved for backward (exact, from
``saved_tensors_hooks``), plus CUDA peak allocation per method on a GPU or the peak RSS of a
separate process per method on CPU. Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import timm
import torch
import torch.nn.functional as F

from vitlora import LoRAConfig, activation_bytes, count_parameters, inject_lora, merge_lora, saved_for_backward

METHODS = ("full", "vitlora", "peft")


def build(method: str, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    if method == "vitlora":
        inject_lora(model, LoRAConfig(rank=args.rank, alpha=2 * args.rank, targets=("q", "v")))
    elif method == "peft":
        import peft

        last = getattr(args, "last_blocks", None)  # bench_gpu.py's option: the qkv of the last N blocks only
        depth = len(model.blocks)
        targets = rf"blocks\.({'|'.join(map(str, range(depth - last, depth)))})\.attn\.qkv" if last else ["qkv"]
        config = peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, modules_to_save=["head"]
        )
        model = peft.get_peft_model(model, config)
    return model.to(args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(args):
    if args.dtype == "fp32":
        return nullcontext()
    return torch.autocast(
        args.device.split(":")[0],
        dtype=getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[args.dtype]),
    )


def make_step(model, args):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    y = torch.randint(args.num_classes, (args.batch,), device=args.device)

    def step():
        with autocast(args):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def saved_for_backward_bytes(model, args) -> int:
    """Unique storages autograd keeps for one training forward: the activation memory."""
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    with autocast(args):
        return activation_bytes(saved_for_backward(model, x))


def timed_rounds(functions: dict, rounds: int, device: str) -> dict[str, float]:
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            sync(device)
            start = time.perf_counter()
            function()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory(method: str, args) -> float:
    """MB: CUDA max allocated for one method here, or peak RSS of a fresh process on CPU."""
    if args.device.startswith("cuda"):
        model = build(method, args)
        step = make_step(model, args)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        del model, step
        torch.cuda.empty_cache()
        return peak
    command = [sys.executable, __file__, "--rss-of", method, "--args-json", json.dumps(vars(args))]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def rss_child(method: str, args) -> None:
    """Peak RSS above the interpreter's own: the ru_maxrss of a spawned child starts at its parent's."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM, the peak resident set size
    baseline = _status_kb("VmRSS")
    model = build(method, args)
    step = make_step(model, args)
    for _ in range(2):
        step()
    print((_status_kb("VmHWM") - baseline) / 1024)


def benchmark_parser(description: str, *, batch: int, device: str, dtype: str, rounds: int, warmup: int):
    """The options ``build`` and ``make_step`` read, shared by every benchmark script; defaults per script."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--device", default=device)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=dtype)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--warmup", type=int, default=warmup)
    return parser


def main() -> None:
    parser = benchmark_parser(__doc__, batch=8, device="cpu", dtype="fp32", rounds=7, warmup=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--rss-of", help=argparse.SUPPRESS)
    parser.add_argument("--args-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_of:
        rss_child(args.rss_of, argparse.Namespace(**json.loads(args.args_json)))
        return

    models = {m: build(m, args) for m in METHODS}
    trainable = {m: count_parameters(model).trainable for m, model in models.items()}
    saved = {m: saved_for_backward_bytes(model, args) / 2**20 for m, model in models.items()}
    steps = {m: make_step(torch.compile(model) if args.compile else model, args) for m, model in models.items()}
    timed_rounds(steps, args.warmup, args.device)
    step_time = timed_rounds(steps, args.rounds, args.device)
    del steps
    memory = {m: peak_memory(m, args) for m in METHODS}

    base = models.pop("full").eval()
    unmerged = models.pop("vitlora").eval()
    del models
    merged = merge_lora(copy.deepcopy(unmerged)).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)

    def infer(model):
        def run():
            with torch.inference_mode(), autocast(args):
                model(x)

        return run

    latency = timed_rounds(
        {"base": infer(base), "unmerged": infer(unmerged), "merged": infer(merged)},
        args.warmup,
        args.device,
    )
    latency = timed_rounds(
        {"base": infer(base), "unmerged": infer(unmerged), "merged": infer(merged)},
        args.rounds,
        args.device,
    )

    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(f"\n{args.model} {args.img_size}px, batch {args.batch}, {args.dtype}, LoRA rank {args.rank}, {device}")
    print(f"torch {torch.__version__}, timm {timm.__version__}, command: {' '.join(sys.argv)}\n")
    memory_label = "peak CUDA alloc (MB)" if args.device.startswith("cuda") else "peak RSS over interpreter (MB)"
    print(
        f"| method | trainable | step (ms) | vs full | vs PEFT | saved for backward (MB) | {memory_label} | memory vs full |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m in METHODS:
        print(
            f"| {m} | {trainable[m]:,} | {1000 * step_time[m]:.1f} | {step_time[m] / step_time['full']:.3f} | "
            f"{step_time[m] / step_time['peft']:.3f} | {saved[m]:.1f} | {memory[m]:.0f} | {memory[m] / memory['full']:.3f} |"
        )
    print("\n| inference | latency (ms) | vs base |\n|---|---|---|")
    for name in ("base", "unmerged", "merged"):
        print(f"| {name} | {1000 * latency[name]:.1f} | {latency[name] / latency['base']:.3f} |")


if __name__ == "__main__":
    main()
