"""Importance criteria (score-* passes): hand-computed scores on tiny networks, group
reductions and normalizers, rankings that differ where they should, and end-to-end
pruning under the oracle. Calibration (untouched model, errors): test_calibration.py."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from tests.helpers.criteria_nets import (BATCHES, CRITERIA, DATA, DATA_DRIVEN, W1, W2, X, hidden, linear_net,
                           resnet_like, score)
from fxprune.scoring import NORMALIZERS, REDUCTIONS
from tests.helpers.healthy import make_healthy
from tests.helpers.oracle import prune_and_verify
from fxprune.passes.score_magnitude import magnitude_scores


def hand_grads(x):
    """dL/dW1, dL/dW2 of L = 0.5 mean(y^2), y = x W1^T W2^T, by the chain rule (no autograd)."""
    h = x @ W1.T
    dy = (h @ W2.T) / x.shape[0]
    return (W2.T @ dy.T @ x).double(), (dy.T @ h).double()


def hand_members(name, variant=None):
    """Per-member values (W1 rows, W2 columns) of each hidden channel, by hand."""
    w1, w2 = W1.double(), W2.double()
    g = [hand_grads(x) for x in BATCHES]
    if name == "taylor" and variant == "abs":
        m1, m2 = (sum(a for a, _ in g) / 2, sum(b for _, b in g) / 2)
        return [(w1 * m1).abs().sum(1), (w2 * m2).abs()[0]]
    if name == "taylor":  # Molchanov 2019: mean over batches of the squared signed sum
        return [sum((w1 * a).sum(1) ** 2 for a, _ in g) / 2, sum((w2 * b)[0] ** 2 for _, b in g) / 2]
    if name == "hessian":
        f1, f2 = (sum(a ** 2 for a, _ in g) / 2, sum(b ** 2 for _, b in g) / 2)
        return [(0.5 * w1 ** 2 * f1).sum(1), (0.5 * w2 ** 2 * f2)[0]]
    if name == "lamp":  # squares (1, 4, 2) and (4, 1, 0.25)
        return [torch.tensor([1 / 7, 4 / 4, 2 / 6]), torch.tensor([4 / 4, 1 / 5, 0.25 / 5.25])]
    if name == "fpgm":  # rows (1,0), (0,2), (1,1); columns 2, -1, 0.5
        r5, r2 = math.sqrt(5), math.sqrt(2)
        return [torch.tensor([r5 + 1, r5 + r2, 1 + r2]), torch.tensor([4.5, 4.5, 3.0])]
    raise KeyError(name)


REDUCED = {"mean": lambda a, b: (a + b) / 2, "sum": lambda a, b: a + b, "max": torch.maximum,
           "prod": lambda a, b: a * b, "first": lambda a, b: a}
HAND = [("taylor", {"variant": "abs"}), ("taylor", {"variant": "squared"}), ("hessian", {}),
        ("lamp", {}), ("fpgm", {})]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name, kw", HAND, ids=lambda v: str(v))
def test_hand_computed_scores_every_reduction(name, kw, reduction):
    g = fxprune.analyze(linear_net(), BATCHES[0])
    a, b = hand_members(name, kw.get("variant"))
    got = hidden(g, score(name, g, reduction=reduction, **kw))
    torch.testing.assert_close(got, REDUCED[reduction](a, b).double(), rtol=1e-6, atol=1e-9)


class TwoNorms(nn.Module):
    """conv a -> bn a and conv b -> bn b added: one group holding two norm layers."""

    def __init__(self, ga, gb):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 3, 1), nn.Conv2d(1, 3, 1)
        self.bna, self.bnb = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.head = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.bna.weight.copy_(torch.tensor(ga))
            self.bnb.weight.copy_(torch.tensor(gb))

    def forward(self, x):
        return self.head(torch.relu(self.bna(self.a(x)) + self.bnb(self.b(x))))


@pytest.mark.parametrize("reduction, expected", [
    ("mean", [2.0, 1.0, 2.0]), ("sum", [4.0, 2.0, 4.0]), ("max", [3.0, 2.0, 3.0]),
    ("prod", [3.0, 0.0, 3.0]), ("first", [1.0, 2.0, 3.0])])
def test_bn_scale_reduces_every_norm_of_the_group(reduction, expected):
    g = fxprune.analyze(TwoNorms([1.0, -2.0, 3.0], [3.0, 0.0, -1.0]).eval(), torch.randn(2, 1, 4, 4))
    assert hidden(g, score("bn-scale", g, reduction=reduction)).tolist() == expected


class FunctionalNorms(nn.Module):
    """F.batch_norm / F.layer_norm with scales reached through get_attr under odd names."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2))
        self.gamma, self.beta = nn.Parameter(torch.tensor([5.0, -6.0, 7.0])), nn.Parameter(torch.ones(3) * 9)
        self.register_buffer("mu", torch.zeros(3))
        self.register_buffer("var", torch.ones(3))
        self.ln_scale, self.ln_shift = nn.Parameter(torch.tensor([0.1, 0.2, 0.3])), nn.Parameter(torch.ones(3))
        self.out = nn.Linear(3, 1)

    def forward(self, x):
        h = F.batch_norm(F.linear(x, self.w), self.mu, self.var, self.gamma, self.beta)
        return self.out(F.layer_norm(h, (3,), self.ln_scale, self.ln_shift))


def test_bn_scale_finds_functional_scales_not_biases():
    g = fxprune.analyze(FunctionalNorms(), torch.randn(4, 2))
    s = score("bn-scale", g, reduction="sum")
    assert hidden(g, s).tolist() == pytest.approx([5.1, 6.2, 7.3])


def test_bn_scale_without_norm_is_nan_unless_fallback():
    g = fxprune.analyze(linear_net(), BATCHES[0])
    assert bool(torch.isnan(hidden(g, score("bn-scale", g))).all())
    for fallback, p in (("l1", 1.0), ("l2", 2.0)):
        got = hidden(g, score("bn-scale", g, fallback=fallback, reduction="sum"))
        assert torch.equal(got, hidden(g, magnitude_scores(g, p=p, reduction="sum")))


def test_random_is_seeded_uniform_and_reduced():
    g = fxprune.analyze(linear_net(), BATCHES[0])
    first = [hidden(g, score("random", g, seed=s, reduction="first")) for s in (0, 0, 1)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    assert bool(((first[0] >= 0) & (first[0] < 1)).all())
    state = torch.random.get_rng_state()
    r = {red: hidden(g, score("random", g, seed=3, reduction=red)) for red in REDUCTIONS}
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(r["sum"], 2 * r["mean"])
    assert bool((r["max"] >= r["mean"]).all()) and bool((r["prod"] <= r["max"] ** 2).all())
    assert bool((r["max"] >= r["first"]).all()) and not torch.equal(r["first"], r["max"])


def test_default_cross_entropy_matches_brute_force_backward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    data = [(torch.randn(3, 2, 6, 6), torch.randint(0, 3, (3,))) for _ in range(3)]
    ref = copy.deepcopy(net)
    for x, y in data:
        F.cross_entropy(ref(x), y).backward()
    g = {n: p.grad.double() / len(data) for n, p in ref.named_parameters()}
    w = {n: p.detach().double() for n, p in net.named_parameters()}
    t = {n: (w[n] * g[n]).abs() for n in w}
    expected = (t["0.weight"].sum((1, 2, 3)) + t["0.bias"] + t["1.weight"] + t["1.bias"]
                + t["3.weight"].sum((0, 2, 3)))
    groups = fxprune.analyze(net, data[0][0])
    s = score("taylor", groups, data=data, reduction="sum")
    torch.testing.assert_close(hidden(groups, s), expected, rtol=1e-5, atol=1e-10)


def dead_input_net():
    """Hidden channel 0 has the largest weights but reads only input feature 1."""
    return linear_net(torch.tensor([[0.0, 5.0], [1.0, 0.3], [0.5, 0.5]]), torch.tensor([[2.0, 1.0, 1.0]]))


def test_magnitude_and_data_driven_criteria_disagree():
    net, calib = dead_input_net(), [torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.5, 0.0]])]
    g = fxprune.analyze(net, calib[0])
    ranks = {}
    for name, s in [("l2", magnitude_scores(g)), ("taylor", score("taylor", g, data=calib)),
                    ("hessian", score("hessian", g, data=calib)), ("fpgm", score("fpgm", g))]:
        ranks[name] = torch.argsort(hidden(g, s), descending=True).tolist()
    assert ranks["l2"][0] == 0 and ranks["taylor"][-1] == 0 and ranks["hessian"][-1] == 0
    assert ranks["fpgm"][0] == 0  # far from the other filters
    x = torch.tensor([[1.0, 1.0], [0.5, -1.0]])  # the oracle's input feeds channel 0
    kept = {imp: prune_and_verify(dead_input_net(), x, healthy=False, ratio=0.34, importance=imp,
                                  **({"data": calib} if imp == "taylor" else {}))[0].plan.kept
            for imp in ("l2", "taylor")}
    assert not torch.equal(kept["l2"], kept["taylor"])




@pytest.mark.parametrize("name", CRITERIA)
def test_end_to_end_under_the_oracle(name):
    kw = {"data": DATA} if name in DATA_DRIVEN else {}
    model = resnet_like()
    result, _ = prune_and_verify(model, X, importance=name, ratio=0.5, **kw)
    assert result.scores.criterion.startswith(name)
    assert [n for n, _ in result.timings][2] == f"score-{name}"
    baseline = fxprune.prune(model, X, importance="l2", ratio=0.5)
    assert not torch.equal(result.plan.kept, baseline.plan.kept), "criterion chose as magnitude does"


@pytest.mark.parametrize("name", CRITERIA)
@pytest.mark.parametrize("normalizer", NORMALIZERS[1:])
def test_normalizers_rescale_each_group_keeping_its_order(name, normalizer):
    g = fxprune.analyze(make_healthy(resnet_like(), X.shape), X)  # distinct norm scales
    kw = {"data": DATA[:1]} if name in DATA_DRIVEN else {}
    base, norm = score(name, g, **kw).values, score(name, g, normalizer=normalizer, **kw).values
    checks = {"mean": lambda v: v.mean() - 1, "max": lambda v: v.max() - 1, "sum": lambda v: v.sum() - 1,
              "standardization": lambda v: v.min().abs() + (v.max() - 1).abs(),
              "gaussian": lambda v: v.mean().abs() + (v.std(unbiased=False) - 1).abs()}
    checked = 0
    for grp in g.prunable:
        idx = torch.tensor(grp.classes)
        b, v = base[idx], norm[idx]
        if bool(torch.isnan(b).all()) or b.unique().numel() < 2:
            continue
        checked += 1
        assert float(checks[normalizer](v)) == pytest.approx(0.0, abs=1e-9), grp
        assert torch.equal(torch.argsort(b, stable=True), torch.argsort(v, stable=True))
    assert checked >= 3
