"""The real ViT-Ti from ../shared/weights (skipped when absent): strict load, unchanged predictions."""

import pytest
import timm
import torch
from conftest import REAL_WEIGHTS

from vitlora import LoRAConfig, count_parameters, inject_lora, merge_lora
from vitlora.files import read_state_dict

pytestmark = pytest.mark.skipif(not REAL_WEIGHTS.is_file(), reason=f"{REAL_WEIGHTS} not present")


def test_real_vit_tiny_loads_strictly_and_injection_keeps_its_predictions():
    model = timm.create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=False)
    model.load_state_dict(read_state_dict(REAL_WEIGHTS), strict=True)
    model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        inject_lora(model, LoRAConfig(rank=8, targets=("q", "v")))
        assert torch.equal(model(x), expected)
        count = count_parameters(model)
        assert count.trainable_fraction < 0.05 and count.by_group["lora"] == 12 * 2 * 8 * (192 + 192)
        merge_lora(model)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
