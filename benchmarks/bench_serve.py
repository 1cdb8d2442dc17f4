"""`vitlora serve` under concurrent loopback load: 1, 4 and 16 adapters on one base, and mixed batches vs HF PEFT.

    python benchmarks/bench_serve.py --weights ../shared/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors \
        --photos ../shared/data/grocery-store/train

Servers: one `vitlora serve` per adapter count (1, 4, 16 random LoRA adapters of rank 8 on the
fused qkv, 81-class heads, all on the given base), started together; rounds of the same
requests (real photos, base64 JSON, spread evenly over the adapters) go to each server in
turn, so machine noise hits all alike. The 1-adapter server is the baseline (a). Reports
throughput (requests/s) and p50/p99 latency, medians over rounds.

In process (b): the same mixed batch (one image per adapter in turn) through vitlora's
MultiAdapter and through HF PEFT's ``adapter_names`` mixed batch on the same base, and one
adapter alone through MultiAdapter, interleaved round by round.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

from vitlora import LoRAConfig, MultiAdapter, inject_lora, save_adapter
from vitlora.backbone import create_backbone

MODEL = "vit_tiny_patch16_224"
ADAPTER_COUNTS = (1, 4, 16)
ROOT = Path(__file__).resolve().parents[1]


def lora_config(rank: int) -> LoRAConfig:
    return LoRAConfig(rank=rank, alpha=2 * rank, targets=("qkv",))  # the whole fused qkv, as PEFT's target


def make_adapters(folder: Path, weights: str, count: int, rank: int, num_classes: int) -> list[Path]:
    """``count`` adapters with random non-zero LoRA updates and heads, as if trained on ``weights``."""
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = inject_lora(create_backbone(MODEL, num_classes, weights=weights), lora_config(rank))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name or name.startswith("head"):
                    parameter.normal_(0.0, 0.02)
        classes = [f"adapter{i}_class{c}" for c in range(num_classes)]
        paths.append(save_adapter(model, folder / f"adapter{i:02d}.safetensors", class_names=classes))
    return paths


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(adapters: list[Path], args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        sys.executable, "-m", "vitlora.cli", "serve", *map(str, adapters), "--weights", args.weights,
        "--port", str(port), "--accelerator", "cpu",
        "--max-batch-size", str(args.max_batch_size), "--batch-timeout", str(args.batch_timeout),
    ]  # fmt: skip
    handle = open(log, "w")  # noqa: SIM115 - the server's log, closed with the process
    process = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.5)
    raise SystemExit(f"server {url} did not start:\n{log.read_text()}")


def load_round(url: str, jobs: list[dict], concurrency: int) -> tuple[float, float, float]:
    """Sends every job with ``concurrency`` clients; requests/s, p50 and p99 latency in ms."""
    sessions: dict[int, requests.Session] = {}

    def send(job: dict) -> float:
        import threading

        session = sessions.setdefault(threading.get_ident(), requests.Session())
        start = time.perf_counter()
        answer = session.post(f"{url}/predict", json=job, timeout=120)
        if answer.status_code != 200:
            raise RuntimeError(f"{url}: {answer.status_code} {answer.text}")
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(send, jobs))
    wall = time.perf_counter() - start
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return len(jobs) / wall, 1000 * statistics.median(latencies), 1000 * p99


def bench_servers(args: argparse.Namespace, folder: Path, adapters: list[Path], photos: list[str]) -> dict:
    servers = {}
    try:
        for count in ADAPTER_COUNTS:
            servers[count] = start_server(adapters[:count], args, folder / f"server{count}.log")
        for count, (process, url) in servers.items():
            wait_ready(process, url, folder / f"server{count}.log")
        jobs = {
            count: [
                {"adapter": adapters[i % count].stem, "image": photos[i % len(photos)], "top_k": 5}
                for i in range(args.requests)
            ]
            for count in ADAPTER_COUNTS
        }
        for count, (_, url) in servers.items():  # warm-up
            load_round(url, jobs[count][: args.concurrency * 2], args.concurrency)
        results: dict[int, list[tuple[float, float, float]]] = {count: [] for count in ADAPTER_COUNTS}
        for _ in range(args.rounds):
            for count, (_, url) in servers.items():
                results[count].append(load_round(url, jobs[count], args.concurrency))
                print(f"{count} adapters: {results[count][-1]}", file=sys.stderr, flush=True)
        return results
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGINT)
        for process, _ in servers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):  # its workers too, even after a clean exit
                os.killpg(process.pid, signal.SIGKILL)  # the server leads its own process group


def bench_in_process(args: argparse.Namespace, adapters: list[Path]) -> dict[str, float]:
    """Median ms per mixed batch: vitlora MultiAdapter vs PEFT adapter_names, plus one adapter alone."""
    import peft

    count = len(adapters)
    multi = MultiAdapter(create_backbone(MODEL, 1, weights=args.weights)).eval()
    for path in adapters:
        multi.add(path.stem, path)
    base = create_backbone(MODEL, args.num_classes, weights=args.weights)
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["qkv"], modules_to_save=["head"])
    peft_model = peft.get_peft_model(base, config, adapter_name="adapter00")
    for i in range(1, count):
        peft_model.add_adapter(f"adapter{i:02d}", config)
    peft_model.eval()
    batch = torch.randn(args.max_batch_size, 3, 224, 224)
    names = [adapters[i % count].stem for i in range(len(batch))]
    single = [adapters[0].stem] * len(batch)
    functions = {
        "vitlora mixed": lambda: multi(batch, names),
        "PEFT mixed (adapter_names)": lambda: peft_model(batch, adapter_names=names),
        "vitlora one adapter": lambda: multi(batch, single),
    }
    times: dict[str, list[float]] = {name: [] for name in functions}
    with torch.inference_mode():
        for round_ in range(args.batch_rounds + 1):
            for name, function in functions.items():
                start = time.perf_counter()
                function()
                if round_:  # the first round warms up
                    times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="the ViT-Ti base weights (.safetensors)")
    parser.add_argument("--photos", required=True, type=Path, help="a folder of photos (searched recursively)")
    parser.add_argument("--requests", type=int, default=256, help="requests per round and server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="clients sending at once")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--batch-rounds", type=int, default=5, help="rounds of the in-process comparison")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=81)
    args = parser.parse_args()
    photos = [base64.b64encode(p.read_bytes()).decode() for p in sorted(args.photos.rglob("*.jpg"))[:64]]
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        adapters = make_adapters(folder, args.weights, max(ADAPTER_COUNTS), args.rank, args.num_classes)
        served = bench_servers(args, folder, adapters, photos)
        batches = bench_in_process(args, adapters)

    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}"
    )
    print(f"command: {' '.join(sys.argv)}\n")
    baseline = statistics.median(r[0] for r in served[1])
    print("| adapters | requests/s | vs 1 adapter | p50 (ms) | p99 (ms) |\n|---|---|---|---|---|")
    for count, rounds in served.items():
        rate = statistics.median(r[0] for r in rounds)
        p50, p99 = (statistics.median(r[k] for r in rounds) for k in (1, 2))
        print(f"| {count} | {rate:.1f} | {rate / baseline:.3f} | {p50:.0f} | {p99:.0f} |")
    print(f"\nrounds (requests/s): { ({c: [round(r[0], 1) for r in rounds] for c, rounds in served.items()}) }\n")
    reference = batches["PEFT mixed (adapter_names)"]
    print(f"| batch of {args.max_batch_size}, {max(ADAPTER_COUNTS)} adapters | ms | vs PEFT |\n|---|---|---|")
    for name, ms in batches.items():
        print(f"| {name} | {ms:.0f} | {ms / reference:.3f} |")


if __name__ == "__main__":
    main()
