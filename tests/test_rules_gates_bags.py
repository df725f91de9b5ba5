"""Ops that pair, scale or look up channels in ways of their own: GLU (channel i gated by
i + half), per-channel PReLU slopes, local response norm (mixes neighbours: inexact),
nn.Bilinear (two inputs contracted by one weight), embedding bags. Each in both front
ends, each checked by the oracle."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from tests.helpers.oracle import prune_and_verify

FRONTENDS = ["fx", "export"]


class GatedConv(nn.Module):
    """Conv1d -> GLU over channels (nn.GLU or F.glu) -> conv: the gate pairs channel i with i + 16."""

    def __init__(self, module: bool):
        super().__init__()
        self.c1 = nn.Conv1d(4, 32, 3, padding=1)
        self.glu = nn.GLU(dim=1) if module else None
        self.c2 = nn.Conv1d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = self.c1(x)
        y = self.glu(y) if self.glu is not None else F.glu(y, dim=1)
        return self.head(F.relu(self.c2(y)).mean(-1))


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("module", [True, False], ids=["nn.GLU", "F.glu"])
def test_glu_prunes_gate_pairs_together(module, frontend):
    model = GatedConv(module)
    result, v = prune_and_verify(model, torch.randn(2, 4, 12), ratio=0.5, frontend=frontend)
    assert not result.groups.barriers
    g = next(g for g in result.groups.prunable if any(m.path == "c1.weight" for m in g.members))
    assert len(g.classes) == 16  # 32 conv channels in 16 gate pairs
    w_old, w_new = model.c1.weight, result.module.get_parameter("c1.weight")
    assert w_new.shape[0] == 2 * result.module.get_parameter("c2.weight").shape[1] == 16
    # each kept row is an original row; value row i is kept exactly with its gate row i + 16
    origin = [next(i for i in range(32) if torch.equal(w_new[j], w_old[i])) for j in range(16)]
    assert all(i < 16 for i in origin[:8]) and [i + 16 for i in origin[:8]] == origin[8:]


class PReLUNet(nn.Module):
    def __init__(self, shared: bool):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3)
        self.act = nn.PReLU(1 if shared else 16, init=0.1)
        self.c2 = nn.Conv2d(16, 4, 3)

    def forward(self, x):
        return self.c2(self.act(self.c1(x)))


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("shared", [False, True], ids=["per-channel", "shared"])
def test_prelu_slopes_follow_their_channels(shared, frontend):
    model = PReLUNet(shared)
    with torch.no_grad():
        model.act.weight.copy_(torch.linspace(-0.5, 0.5, model.act.weight.numel()))
    result, _ = prune_and_verify(model, torch.randn(2, 3, 10, 10), ratio=0.5, frontend=frontend)
    assert not result.groups.barriers
    assert result.module.get_parameter("c1.weight").shape[0] == 8
    if frontend == "fx":
        act = result.module.act
        assert act.weight.numel() == act.num_parameters == (1 if shared else 8)


def test_functional_prelu_with_a_parameter_slope():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 12, 3), nn.Conv2d(12, 2, 1)
            self.slope = nn.Parameter(torch.linspace(0.0, 0.3, 12))

        def forward(self, x):
            return self.c2(F.prelu(self.c1(x), self.slope))

    result, _ = prune_and_verify(Net(), torch.randn(2, 3, 8, 8), ratio=0.5)
    assert result.module.slope.shape == (6,)


class LRNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3)
        self.lrn = nn.LocalResponseNorm(3)
        self.c2 = nn.Conv2d(16, 4, 3)

    def forward(self, x):
        return self.c2(self.lrn(F.relu(self.c1(x))))


def test_local_response_norm_is_inexact_and_prunes():
    result, v = prune_and_verify(LRNNet(), torch.randn(2, 3, 10, 10), ratio=0.5)
    g = next(g for g in result.groups.prunable if any(m.path == "c1.weight" for m in g.members))
    assert not g.exact and any("across channels" in r for r in g.inexact_reasons)
    assert result.module.c1.out_channels == 8 and v.exact_groups == 0


def test_local_response_norm_in_export_is_pinned_with_its_reason():
    # export decomposes it into a pool over a view of the channel dim: kept, and said why
    groups = fxprune.analyze(LRNNet(), torch.randn(2, 3, 10, 10), frontend="export")
    g = next(g for g in groups.groups if any(m.path == "c1.weight" for m in g.members))
    assert not g.prunable and any("channel dim" in r for r in g.pinned_reasons)


class BilinearNet(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(6, 12)
        self.bil = nn.Bilinear(16, 12, 8)
        self.functional = functional
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        p, q = F.relu(self.a(x)), F.relu(self.b(x))
        if self.functional:
            y = F.bilinear(p, q, self.bil.weight, self.bil.bias)
        else:
            y = self.bil(p, q)
        return self.head(F.relu(y))


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("functional", [False, True], ids=["nn.Bilinear", "F.bilinear"])
def test_bilinear_prunes_both_inputs_and_its_outputs(functional, frontend):
    model = BilinearNet(functional)
    result, v = prune_and_verify(model, torch.randn(5, 6), ratio=0.5, frontend=frontend)
    assert not result.groups.barriers and v.exact_groups == 3
    assert tuple(result.module.get_parameter("bil.weight").shape) == (4, 8, 6)
    if frontend == "fx" and not functional:
        m = result.module.bil
        assert (m.out_features, m.in1_features, m.in2_features) == (4, 8, 6)


class Bags(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.tok = nn.Embedding(40, 16)
        self.bag = nn.EmbeddingBag(40, 16, mode=mode)
        self.fc = nn.Linear(16, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(F.relu(self.fc(self.tok(ids).mean(1) + self.bag(ids))))


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("mode", ["mean", "sum", "max"])
def test_embedding_bag_dim_prunes_with_what_it_feeds(mode, frontend):
    ids = torch.randint(0, 40, (3, 7))
    result, _ = prune_and_verify(Bags(mode), ids, ratio=0.5, healthy=False, frontend=frontend)
    assert not result.groups.barriers
    assert tuple(result.module.get_parameter("bag.weight").shape) == (40, 8)
    assert tuple(result.module.get_parameter("tok.weight").shape) == (40, 8)
    if frontend == "fx":
        assert result.module.bag.embedding_dim == 8


def test_unknown_layer_fed_only_by_ids_is_a_named_barrier():
    class Lookup(nn.Module):  # a layer no rule knows, with weights of its own
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(40, 16))

        def forward(self, ids):
            return self.table[ids]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lookup, self.fc, self.head = Lookup(), nn.Linear(16, 8), nn.Linear(8, 2)

        def forward(self, ids):
            return self.head(F.relu(self.fc(self.lookup(ids).mean(1))))

    groups = fxprune.analyze(Net(), torch.randint(0, 40, (3, 7)), leaf_modules=[Lookup])
    assert any("lookup: no rule for" in b for b in groups.barriers)


class RenormedEmbedding(nn.Module):
    """nn.Embedding(max_norm=1): every looked-up row is rescaled by its norm over the
    embedding dim (in place, by the model's own forward)."""

    def __init__(self, functional=False):
        super().__init__()
        self.functional = functional
        self.emb = nn.Embedding(20, 12, max_norm=1.0)
        self.a, self.out = nn.Linear(12, 8), nn.Linear(8, 2)

    def forward(self, t):
        e = F.embedding(t, self.emb.weight, max_norm=1.0) if self.functional else self.emb(t)
        return self.out(torch.relu(self.a(e.mean(1))))


@pytest.mark.parametrize("functional", [False, True])
def test_embedding_max_norm_makes_its_dim_inexact(functional):
    # it was exact, and the pruned model differed from the oracle by 3%
    torch.manual_seed(0)
    model, t = RenormedEmbedding(functional).eval(), torch.randint(0, 20, (3, 5))
    result = fxprune.prune(model, (t,), ratio=0.5)
    g = result.groups.group_of("emb.weight")
    assert g.is_prunable and not g.exact and any("max_norm" in r for r in g.inexact_reasons)
    v = fxprune.verify(model, result, (t,))  # exact groups exactly, this one for shape
    assert v.max_rel_err < 1e-4 and v.exact_groups == 1 and v.effect > 1e-4
    assert result.module.get_parameter("emb.weight").shape == (20, 6)
