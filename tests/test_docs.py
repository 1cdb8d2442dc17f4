"""Every Python example in README.md and docs/ runs as written, file by file, offline.

Offline, ``pretrained=True`` models become the same random stand-in every time.
"""

import re
from pathlib import Path

import pytest
import timm
import torch

import vitlora.backbone

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").glob("*.md")])


@pytest.fixture
def offline_timm(monkeypatch, tmp_path):
    create_model = timm.create_model

    def offline_create_model(name, pretrained=False, num_classes=None, **kwargs):
        torch.manual_seed(0)  # the same random stand-in for the pretrained base every time
        model = create_model(name, pretrained=False, img_size=64, **kwargs)
        if num_classes is not None:
            model.reset_classifier(num_classes)
        return model

    monkeypatch.setattr(timm, "create_model", offline_create_model)
    monkeypatch.setattr(vitlora.backbone, "hub_cached_file", lambda name: None)  # the stand-in, never a cache
    monkeypatch.setattr(vitlora.backbone, "hub_unreachable", lambda name: None)  # the stand-in needs no hub
    monkeypatch.chdir(tmp_path)  # examples may write files next to them


def run_python_blocks(path: Path) -> dict:
    namespace: dict = {}
    for code in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S):
        exec(compile(code, str(path), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_examples_run(path, offline_timm):
    run_python_blocks(path)


def test_readme_example_serves_a_plain_timm_model(offline_timm):
    served = run_python_blocks(README)["served"]
    assert served.num_classes == 3 and not any("lora_" in key for key in served.state_dict())


def test_api_examples_compute_what_they_say(offline_timm):
    namespace = run_python_blocks(ROOT / "docs" / "api.md")
    deployed = namespace["deployed"]
    assert deployed.num_classes == 3
    assert not any("lora_" in key for key in deployed.state_dict())
    assert namespace["mixed"].num_classes == [3, 1000, 3, 1000]
    torch.testing.assert_close(namespace["fruit_logits"], deployed(namespace["batch"]), rtol=1e-4, atol=1e-4)
    vpt, trained = namespace["vpt"], namespace["vpt_model"].eval()  # prompts, biases and head from the file
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(vpt(x), trained(x)) and vpt.blocks[-1].prompt.tokens.shape == (8, 192)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(\S.*?)\s+# the test suite", README.read_text(), flags=re.M)
    assert commands and commands[0] in ci


def test_relative_links_in_the_docs_point_at_files():
    broken = [
        f"{path.name}: {target}"
        for path in DOCS
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text())
        if not (path.parent / target).exists()
    ]
    assert not broken
