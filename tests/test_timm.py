"""timm models that symbolic tracing cannot capture (mobilevit, tf_efficientnetv2,
vgg: the issue's examples) go through the torch.export fallback; others trace and
prune with no op left without a rule. Every result is checked by the oracle."""

import pytest
import torch

from tests.helpers.oracle import prune_and_verify

timm = pytest.importorskip("timm")

EXPORTED = ["mobilevit_xxs", "tf_efficientnetv2_b0", "vgg11"]
TRACED = ["deit_tiny_patch16_224", "levit_128s", "ghostnet_100", "edgenext_xx_small", "poolformer_s12"]


@pytest.mark.parametrize("name", EXPORTED + TRACED)
def test_timm_model_prunes_exactly(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    size = 224 if name in ("deit_tiny_patch16_224", "levit_128s") else 64
    x = torch.randn(1, 3, size, size)
    result, v = prune_and_verify(model, x, ratio=0.5, min_effect=1e-3)
    assert result.frontend == ("export" if name in EXPORTED else "fx")
    assert not result.groups.barriers, result.groups.barriers
    assert result.report.after.params < 0.6 * result.report.before.params
