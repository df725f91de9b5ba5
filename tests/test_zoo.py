"""All 80 torchvision classification models prune at ratio 0.5 with
``weights=None``: forward runs, output shape unchanged, MACs and parameters go
down, the oracle passes on healthy activations with a measurable effect of the
removed channels, and no op is left without a rule. ViTs use a small
``image_size``; their attention is pruned through the decomposed
nn.MultiheadAttention. Swin hands its window attention over to symbolic tracing
as one wrapped call, so the auto front end captures it with torch.export,
where the window attention and the relative-position bias table are analysed
op by op.
"""

import pytest
import torch
import torchvision

from tests.helpers.oracle import prune_and_verify

ALL = torchvision.models.list_models(module=torchvision.models)
TRANSFORMERS = [m for m in ALL if m.startswith(("vit_", "swin", "maxvit"))]
SIZE = {"inception_v3": 299, "maxvit_t": 224, "vit_h_14": 56}


def build(name):
    kwargs = {"image_size": SIZE.get(name, 64)} if name.startswith("vit_") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def test_zoo_lists_all_80_models():
    families = {"alexnet", "vgg11", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121",
                "squeezenet1_0", "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_small",
                "mnasnet0_5", "shufflenet_v2_x0_5", "efficientnet_b0", "efficientnet_v2_s",
                "regnet_y_400mf", "convnext_tiny", "vit_b_16", "swin_t", "swin_v2_t", "maxvit_t"}
    assert families <= set(ALL)
    assert len(ALL) == 80 and len(TRANSFORMERS) == 12


@pytest.mark.parametrize("name", ALL)
def test_model_prunes_at_half_and_matches_oracle(name):
    torch.manual_seed(0)
    model = build(name)
    size = SIZE.get(name, 64)
    x = torch.randn(1, 3, size, size)
    result, v = prune_and_verify(model, x, ratio=0.5, min_effect=1e-3)
    rep = result.report
    assert rep.after.macs < rep.before.macs
    assert rep.after.params < rep.before.params
    assert v.groups_checked == v.groups_removed > 0 and v.channels_checked == v.channels_removed
    assert not result.groups.barriers, result.groups.barriers
    assert result.frontend == ("export" if name.startswith("swin") else "fx")


# beyond classification: video (3-d convs, factorized (2+1)-d convs, 3-d shifted-window
# attention whose wrapped helper mutates its list argument) and segmentation heads (ASPP
# branches concatenated, a low-resolution branch gating a high-resolution one)
OTHER_TASKS = {"r3d_18": (1, 3, 4, 32, 32), "mc3_18": (1, 3, 4, 32, 32), "r2plus1d_18": (1, 3, 4, 32, 32),
               "swin3d_t": (1, 3, 8, 64, 64), "lraspp_mobilenet_v3_large": (1, 3, 64, 64),
               "fcn_resnet50": (1, 3, 64, 64), "deeplabv3_mobilenet_v3_large": (1, 3, 64, 64)}


@pytest.mark.parametrize("name", sorted(OTHER_TASKS))
def test_video_and_segmentation_models_prune(name):
    torch.manual_seed(0)
    extra = {"weights_backbone": None} if name not in ("r3d_18", "mc3_18", "r2plus1d_18", "swin3d_t") else {}
    model = torchvision.models.get_model(name, weights=None, **extra).eval()
    x = torch.randn(OTHER_TASKS[name])
    result, v = prune_and_verify(model, x, ratio=0.5, min_effect=1e-3)
    assert not result.groups.barriers, result.groups.barriers
    assert result.report.after.params < 0.3 * result.report.before.params
    assert v.groups_checked == v.groups_removed > 0
    with torch.no_grad():
        out_ref, out = model(x), result.module(x)
    assert type(out) is type(out_ref)  # segmentation models return an OrderedDict
    ref = out_ref["out"] if isinstance(out_ref, dict) else out_ref
    assert (out["out"] if isinstance(out, dict) else out).shape == ref.shape


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_fpn", "ssdlite320_mobilenet_v3_large"])
def test_detection_backbone_prunes_and_goes_back_into_the_detector(name):
    """Detectors take lists of images and branch on them (not capturable whole); their
    backbone (with FPN: a dict of feature maps, whose channels stay) prunes, and the
    detector runs with the pruned one in its place."""
    import fxprune
    from tests.helpers.healthy import make_healthy

    torch.manual_seed(0)
    det = torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()
    x = torch.randn(1, 3, 128, 128)
    make_healthy(det.backbone, x.shape)
    result = fxprune.prune(det.backbone, x, ratio=0.5)
    assert not result.groups.barriers
    assert result.report.after.params < 0.5 * result.report.before.params
    v = fxprune.verify(det.backbone, result, x)
    assert v.max_rel_err < 1e-4 and v.effect > 1e-3
    with torch.no_grad():
        assert type(result.module(x)) is type(det.backbone(x))  # FPN: an OrderedDict of maps
    with torch.no_grad():
        before = det([torch.rand(3, 128, 128)])
        det.backbone = result.module
        after = det([torch.rand(3, 128, 128)])
    assert len(after) == len(before) == 1 and set(after[0]) == set(before[0])
