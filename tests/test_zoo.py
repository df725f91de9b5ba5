"""Every torchvision CNN classification model prunes at ratio 0.5 with
``weights=None``: forward runs, output shape unchanged, MACs go down, the oracle
passes (on healthy activations, with a measurable effect of the removed channels).

The transformer models (ViT, Swin, MaxViT) belong to the transformers issue and
are listed in TRANSFORMERS; they only have to analyse without error here.
"""

import pytest
import torch
import torchvision

from oracle import prune_and_verify

TRANSFORMERS = {"maxvit_t", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t",
                "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32"}
ALL = torchvision.models.list_models(module=torchvision.models)
CNNS = [m for m in ALL if m not in TRANSFORMERS]
SIZE = {"inception_v3": 299}  # its auxiliary head (run while recalibrating BN) needs it


def test_zoo_lists_every_cnn_family():
    families = {"alexnet", "vgg11", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121",
                "squeezenet1_0", "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_small",
                "mnasnet0_5", "shufflenet_v2_x0_5", "efficientnet_b0", "efficientnet_v2_s",
                "regnet_y_400mf", "convnext_tiny"}
    assert families <= set(CNNS)
    assert len(CNNS) == len(ALL) - len(TRANSFORMERS) == 68


@pytest.mark.parametrize("name", CNNS)
def test_cnn_prunes_at_half_and_matches_oracle(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    size = SIZE.get(name, 64)
    x = torch.randn(1, 3, size, size)
    result, v = prune_and_verify(model, x, ratio=0.5, min_effect=1e-3)
    rep = result.report
    assert rep.after.macs < rep.before.macs
    assert rep.after.params < rep.before.params
    assert v.exact_groups > 0
    assert not result.groups.barriers, result.groups.barriers
