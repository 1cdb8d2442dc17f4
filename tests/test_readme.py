"""The README's Python examples run as written, in order (offline: pretrained weights become random)."""

import re
from pathlib import Path

import timm
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    create_model = timm.create_model

    def offline_create_model(name, pretrained=False, num_classes=None, **kwargs):
        torch.manual_seed(0)  # the same random stand-in for the pretrained base every time
        model = create_model(name, pretrained=False, img_size=64, **kwargs)
        if num_classes is not None:
            model.reset_classifier(num_classes)
        return model

    monkeypatch.setattr(timm, "create_model", offline_create_model)
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), namespace)
    deployed = namespace["deployed"]
    assert deployed.num_classes == 3
    assert not any("lora_" in key for key in deployed.state_dict())
    assert namespace["mixed"].num_classes == [3, 1000, 3, 1000]
    torch.testing.assert_close(namespace["fruit_logits"], deployed(namespace["batch"]), rtol=1e-4, atol=1e-4)
    vpt, trained = namespace["vpt"], namespace["vpt_model"].eval()  # prompts, biases and head from the file
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(vpt(x), trained(x)) and vpt.blocks[-1].prompt.tokens.shape == (8, 192)


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    commands = re.findall(r"^(\S.*?)\s+# the test suite", README.read_text(), flags=re.M)
    assert commands and commands[0] in ci
