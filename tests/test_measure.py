"""Measurements of one method: step statistics, peak memory, inference timing and the models timed."""

import mmap
import time
from pathlib import Path

import pytest
import torch
from conftest import images, randomize_lora, tiny_model

from vitlora import LoRAConfig, inject_lora
from vitlora.compare.measure import TrainingMeasurements, inference_latency, peak_rss_mb, serving_models
from vitlora.lora import lora_modules


def test_training_speed_skips_warm_up_and_counts_loading_in_throughput():
    meter = TrainingMeasurements(warmup_steps=2)
    meter.step_seconds = [5.0, 3.0, 0.2, 0.4, 0.3]  # slow first steps: allocator growth, caches
    meter.batch_seconds = [6.0, 4.0, 0.5, 0.5, 1.0]  # compute plus loading
    meter.batch_sizes = [8, 8, 8, 8, 4]
    step, images_per_s = meter.training_speed()
    assert step == pytest.approx(0.3)
    assert images_per_s == pytest.approx(20 / 2.0)


def test_training_speed_of_a_two_step_run_keeps_one_step():
    meter = TrainingMeasurements()
    meter.step_seconds, meter.batch_seconds, meter.batch_sizes = [2.0, 0.5], [3.0, 1.0], [4, 4]
    assert meter.training_speed() == (pytest.approx(0.5), pytest.approx(4.0))
    assert TrainingMeasurements().training_speed() == (None, None)


def current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_peak_rss_rises_past_the_old_peak_with_a_larger_allocation():
    before = peak_rss_mb()
    extra_mb = before - current_rss_mb() + 64  # enough to pass the old peak by 64 MiB
    # A fresh anonymous mapping: malloc could hand back freed heap pages that are already resident.
    fresh = mmap.mmap(-1, int(extra_mb) * 2**20)
    torch.frombuffer(fresh, dtype=torch.uint8).fill_(1)  # written, so resident
    assert peak_rss_mb() >= before + 60
    fresh.close()


def test_inference_latency_times_each_model_on_the_same_images():
    seen = []

    def fast(x):
        seen.append(x)
        return x

    def slow(x):
        seen.append(x)
        time.sleep(0.02)
        return x

    x = torch.zeros(2, 3)
    latency = inference_latency({"fast": fast, "slow": slow}, x, rounds=3, min_round_seconds=0.0)
    assert set(latency) == {"fast", "slow"}
    assert latency["slow"] >= 0.02 > latency["fast"]
    assert len(seen) == 2 * (2 + 3) and all(item is x for item in seen)  # two warm-up rounds, then three


def test_serving_models_are_the_base_the_module_and_the_exact_merge():
    model = inject_lora(tiny_model(), LoRAConfig(rank=4, targets=("q", "v")))
    randomize_lora(model)
    models = serving_models(model, model)
    assert models["unmerged"] is model and lora_modules(model)  # the trained model is left as it was
    assert not lora_modules(models["base"]) and not lora_modules(models["merged"])
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(models["merged"](x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(models["base"](x), tiny_model()(x))  # LoRA removed: the backbone itself
        assert not torch.allclose(models["base"](x), model(x), atol=1e-3)


def test_serving_models_without_lora_have_nothing_to_merge():
    model = tiny_model()
    models = serving_models(model, model)
    assert set(models) == {"base", "unmerged"} and models["base"] is not model
