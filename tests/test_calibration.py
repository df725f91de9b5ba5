"""Calibration for the data-driven criteria (fxprune/calibration.py): the user's model
is left exactly as it was, no autograd graph outlives its batch, data reaches text
pipelines through fxprune.prune, and every bad argument gets a ConfigError that
names it and the fix."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from tests.helpers.criteria_nets import DATA, DATA_DRIVEN, X, resnet_like
from fxprune.errors import ConfigError
from fxprune.passes_base import make_pass
from tests.helpers.oracle import assert_untouched, snapshot
from fxprune.passes.score_taylor import taylor_scores


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(DATA_DRIVEN))
def test_data_driven_criteria_leave_the_model_untouched(name):
    model = resnet_like().train()
    model[4].eval()  # mixed training flags must come back as they were
    model[0].weight.requires_grad_(False)  # a frozen parameter is still scored
    model[8].weight.grad = torch.randn_like(model[8].weight)
    model[3].c1.weight.grad = torch.zeros_like(model[3].c1.weight)
    before, grads = snapshot(model), _grads(model)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        result = fxprune.prune(model, X, importance=name, data=DATA, ratio=0.5, report=False)
        assert not torch.is_grad_enabled()
    assert_untouched(model, before)  # BN statistics included
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None), n
        assert p.grad is None or torch.equal(p.grad, grads[n]), n
    stem = result.groups.group_of("0.weight")
    assert not bool(torch.isnan(result.scores.values[list(stem.classes)]).any())
    # the scores use eval-mode semantics: the same as when the model is in eval mode
    again = fxprune.prune(model.eval(), X, importance=name, data=DATA, ratio=0.5, report=False)
    assert torch.equal(result.scores.values.nan_to_num(-1), again.scores.values.nan_to_num(-1))


def test_no_autograd_graph_outlives_its_batch():
    outputs = []

    def loss_fn(out, target):
        assert all(r() is None for r in outputs), "the previous batch's graph is still alive"
        loss = F.cross_entropy(out, target)
        outputs.extend((weakref.ref(out), weakref.ref(loss)))
        return loss

    g = fxprune.analyze(resnet_like().eval(), X)
    taylor_scores(g, DATA, loss_fn, progress=False)
    assert len(outputs) == 6 and all(r() is None for r in outputs)


def test_pipeline_text_takes_data_from_prune():
    net = resnet_like().eval()
    api = fxprune.prune(net, X, importance="taylor", data=DATA, ratio=0.5)
    text = fxprune.prune(net, X, pipeline="channel-deps,score-taylor,select{ratio=0.5},rewrite", data=DATA)
    assert torch.equal(api.plan.kept, text.plan.kept) and api.module.code == text.module.code
    assert text.pipeline == "capture,channel-deps,score-taylor,select,rewrite"
    sq = fxprune.prune(net, X, data=DATA, loss_fn=lambda out, y: F.cross_entropy(out, y),
                       pipeline="channel-deps,score-taylor{variant='squared',reduction='sum'},select,rewrite")
    assert "score-taylor{variant='squared',reduction='sum'}" in sq.pipeline
    assert str(fxprune.parse_pipeline(sq.pipeline)) == sq.pipeline
    assert not torch.equal(sq.scores.values.nan_to_num(), api.scores.values.nan_to_num())


def test_max_batches_and_progress_bar(capsys):
    g = fxprune.analyze(resnet_like().eval(), X)

    def endless():
        while True:
            yield from DATA

    a = taylor_scores(g, endless(), max_batches=2, progress=True)
    assert "score-taylor calibration" in capsys.readouterr().err
    b = taylor_scores(g, DATA[:2], progress=False)
    assert capsys.readouterr().err == ""
    assert torch.equal(a.values.nan_to_num(-1), b.values.nan_to_num(-1))


def _never_iterated():
    raise AssertionError("options must be checked before the data is read")
    yield


SMALL = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
XS = torch.randn(2, 3, 6, 6)


@pytest.mark.parametrize("kwargs, match", [
    ({"importance": "taylor"}, r"score-taylor needs calibration data: pass data="),
    ({"importance": "hessian", "data": XS}, r"must be an iterable of batches .* data=\[x\]"),
    ({"importance": "taylor", "data": []}, r"data for score-taylor yielded no batches"),
    ({"importance": "taylor", "data": [{"x": XS}]}, r"a batch of data must be a tensor or a tuple/list"),
    ({"importance": "taylor", "data": [XS], "loss_fn": lambda out, y: out.sum(1)},
     r"loss_fn for score-taylor must return a scalar tensor, got \(2,\); reduce it"),
    ({"importance": "hessian", "data": [XS], "loss_fn": lambda out, y: out.detach().sum()},
     r"does not depend on the model output"),
    ({"importance": "taylor", "data": [XS], "loss_fn": "ce"}, r"loss_fn must be callable"),
    ({"importance": "taylor", "data": [(XS, torch.randn(2, 7))]}, r"the default loss .* failed .*pass loss_fn="),
    ({"importance": make_pass("score-taylor", {"max_batches": 0}), "data": [XS]},
     r"max_batches must be a positive integer"),
    ({"importance": make_pass("score-taylor", {"variant": "cubic"}), "data": _never_iterated()},
     r"unknown Taylor variant 'cubic'"),
    ({"importance": make_pass("score-hessian", {"reduction": "median"}), "data": _never_iterated()},
     r"unknown group reduction 'median'"),
    ({"importance": make_pass("score-taylor", {"normalizer": "z"}), "data": _never_iterated()},
     r"unknown normalizer 'z'"),
    ({"importance": make_pass("score-bn-scale", {"fallback": "l3"})}, r"unknown bn-scale fallback 'l3'"),
    ({"importance": make_pass("score-fpgm", {"p": 0})}, r"fpgm distance norm p must be > 0"),
    ({"importance": make_pass("score-random", {"seed": "a"})}, r"random seed must be an integer"),
    ({"importance": make_pass("score-lamp", {"reduction": "avg"})}, r"unknown group reduction 'avg'"),
    ({"importance": "lamp", "data": [XS]}, r"importance 'score-lamp' does not use data"),
    ({"pipeline": "channel-deps,score-fpgm,select,rewrite", "data": [XS]},
     r"has no pass that uses data; add a data-driven scoring pass"),
    ({"pipeline": "channel-deps,score-hessian,select,rewrite"}, r"score-hessian needs calibration data"),
])
def test_errors_name_the_argument_and_the_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        fxprune.prune(SMALL, XS, **kwargs)
