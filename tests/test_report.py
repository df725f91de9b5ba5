"""Tests of fxprune.report: parameter/MAC counting and the PruneReport table."""

import json
import math

import pytest
import torch
from torch import nn

from fxprune._util import as_tuple
from fxprune.errors import ConfigError, InputError
from fxprune.report import ModelStats, PruneReport, human, measure


def conv_out(size, k, stride=1, pad=0):
    return (size + 2 * pad - k) // stride + 1


# (name, model factory, input shape, hand-computed params, hand-computed MACs)
# MACs: conv = out elements x (in/groups x kh x kw); linear = batch x in x out;
# bias adds, BN, activations and pooling are not counted.
CASES = [
    ("linear", lambda: nn.Linear(4, 3), (2, 4), 4 * 3 + 3, 2 * 4 * 3),
    ("linear-nobias", lambda: nn.Linear(5, 7, bias=False), (3, 5), 35, 3 * 5 * 7),
    (
        "conv-linear",
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(8 * 4 * 4, 10)),
        (1, 3, 4, 4),
        (8 * 3 * 9 + 8) + (128 * 10 + 10),
        8 * 4 * 4 * 3 * 9 + 128 * 10,
    ),
    (
        "strided-conv-bn",
        lambda: nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, bias=False),
                              nn.BatchNorm2d(16), nn.ReLU()),
        (2, 3, 9, 9),
        16 * 3 * 9 + 2 * 16,
        2 * 16 * conv_out(9, 3, 2) ** 2 * 3 * 9,
    ),
    (
        "grouped-conv",
        lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False),
        (1, 8, 5, 5),
        16 * 2 * 9,
        16 * 5 * 5 * 2 * 9,
    ),
    (
        "depthwise-pointwise",
        lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, bias=False),
                              nn.Conv2d(4, 6, 1, bias=False)),
        (1, 4, 6, 6),
        4 * 9 + 6 * 4,
        4 * 4 * 4 * 9 + 6 * 4 * 4 * 4,
    ),
    ("no-params", lambda: nn.Sequential(nn.ReLU(), nn.Flatten()), (1, 2, 3), 0, 0),
]


@pytest.mark.parametrize("name,factory,shape,params,macs", CASES, ids=[c[0] for c in CASES])
def test_measure_matches_hand_count(name, factory, shape, params, macs):
    torch.manual_seed(0)
    stats = measure(factory(), torch.randn(shape))
    assert stats == ModelStats(params=params, macs=macs)


def test_tied_parameters_count_once():
    a, b = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)
    b.weight = a.weight
    stats = measure(nn.Sequential(a, b), torch.randn(1, 6))
    assert stats.params == 36
    assert stats.macs == 2 * 36  # the tied weight is still used twice


def test_tuple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    stats = measure(Two(), (torch.randn(1, 3), torch.randn(1, 5)))
    assert stats == ModelStats(params=8 + 12, macs=6 + 10)


def test_restores_training_flags_and_keeps_bn_stats():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5))
    net.train()
    net[2].eval()  # a mixed state must come back exactly
    mean_before = net[1].running_mean.clone()
    measure(net, torch.randn(2, 3, 4, 4) + 5.0)
    assert [m.training for m in net.modules()] == [True, True, True, False]
    assert torch.equal(net[1].running_mean, mean_before)
    assert net[1].num_batches_tracked.item() == 0


def test_eval_mode_during_measure():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((self.training, torch.is_grad_enabled()))
            return x

    probe = Probe().train()
    measure(probe, torch.zeros(1))
    assert seen == [(False, False)]
    assert probe.training


def test_bad_inputs_raise_input_error():
    net = nn.Linear(4, 3).train()
    with pytest.raises(InputError, match=r"Linear on the example inputs failed.*RuntimeError"):
        measure(net, torch.randn(2, 5))
    assert net.training  # restored even on failure


@pytest.mark.parametrize("kwargs", [dict(params=-1, macs=0), dict(params=1, macs=1.5),
                                    dict(params=True, macs=0)])
def test_model_stats_validation(kwargs):
    with pytest.raises(ConfigError, match=r"ModelStats\.\w+ must be a non-negative int"):
        ModelStats(**kwargs)


@pytest.mark.parametrize("n,text", [(0, "0"), (7, "7"), (999, "999"), (1000, "1.00K"),
                                    (855770, "856K"), (23_500_000, "23.5M"),
                                    (4_090_000_000, "4.09G"), (1.5e12, "1.50T")])
def test_human(n, text):
    assert human(n) == text


def make_report(**overrides):
    fields = dict(before=ModelStats(855770, 125_750_000), after=ModelStats(427885, 62_000_000),
                  channels_before=2032, channels_after=1016, groups_pruned=27,
                  timings=(("channel-deps", 0.25), ("rewrite", 0.5)))
    fields.update(overrides)
    return PruneReport(**fields)


def test_ratios():
    r = make_report()
    assert r.params_ratio == pytest.approx(0.5)
    assert r.macs_ratio == pytest.approx(62 / 125.75)
    assert r.channels_ratio == 0.5
    assert r.speedup == pytest.approx(125.75 / 62)
    assert r.total_seconds == 0.75


def test_degenerate_ratios():
    r = make_report(before=ModelStats(0, 10), after=ModelStats(0, 0), channels_before=0,
                    channels_after=0)
    assert r.params_ratio == 1.0 and r.channels_ratio == 1.0
    assert math.isinf(r.speedup)
    d = r.to_dict()
    assert d["speedup"] is None and d["macs_ratio"] == 0.0
    json.dumps(d, allow_nan=False)


def test_str_table():
    text = str(make_report())
    lines = text.splitlines()
    assert lines[0].split() == ["before", "after", "ratio"]
    assert lines[1].split() == ["params", "856K", "428K", "0.500"]
    assert lines[2].split() == ["MACs", "126M", "62.0M", "0.493"]
    assert lines[3].split() == ["channels", "2032", "1016", "0.500"]
    assert "groups pruned: 27" in text and "speed-up (MACs): 2.03x" in text
    assert lines[-3].split() == ["channel-deps", "0.250"]
    assert lines[-1].split() == ["total", "0.750"]
    assert len({len(line) for line in lines[:4]}) == 1  # fixed width


def test_str_without_timings_has_no_pass_table():
    assert "pass" not in str(make_report(timings=()))


def test_to_dict_round_trip():
    r = make_report()
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["timings"] == [{"pass": "channel-deps", "seconds": 0.25},
                            {"pass": "rewrite", "seconds": 0.5}]
    assert PruneReport.from_dict(d) == r


def test_from_dict_error():
    with pytest.raises(ConfigError, match="not a PruneReport dict.*KeyError"):
        PruneReport.from_dict({"before": {"params": 1, "macs": 1}})


def test_report_is_frozen():
    with pytest.raises(AttributeError):
        make_report().groups_pruned = 3


@pytest.mark.parametrize("value,expected_len", [(torch.zeros(1), 1), ((torch.zeros(1),) * 2, 2),
                                                ([torch.zeros(1)] * 3, 3), (5, 1)])
def test_as_tuple(value, expected_len):
    out = as_tuple(value)
    assert isinstance(out, tuple) and len(out) == expected_len


def test_doctests():
    import doctest

    import fxprune._util
    import fxprune.report

    for module in (fxprune.report, fxprune._util):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


class _Mixed(nn.Module):
    """Layers whose MACs the meta count takes from torch's formulas without running them
    (conv, linear, attention), next to ones it runs (transposed conv, LSTM, matmul)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.group = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.c1 = nn.Conv1d(4, 6, 3)
        self.c3 = nn.Conv3d(1, 2, (1, 3, 3))
        self.proj = nn.Linear(6, 12)
        self.w = nn.Parameter(torch.randn(12, 12))
        self.lstm = nn.LSTM(12, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(10, 4)
        self.rnn = nn.RNN(4, 3)
        self.proj_lstm = nn.LSTM(3, 6, proj_size=2)
        self.mha = nn.MultiheadAttention(10, 2, batch_first=True)

    def forward(self, x):
        y = self.up(self.dw(self.group(self.conv(x))))  # (1, 4, 8, 8)
        z = self.c3(y[:, :1].unsqueeze(1))  # (1, 2, 1, 6, 6)
        s = self.proj(self.c1(y.flatten(2)).transpose(1, 2))  # (1, 62, 12)
        s = torch.nn.functional.linear(s, self.w)
        q = s.reshape(1, 62, 2, 6).transpose(1, 2)
        mask = torch.ones(62, 62, dtype=torch.bool).tril()
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        a3 = torch.nn.functional.scaled_dot_product_attention(q[0], q[0], q[0])
        h = self.lstm(s[:, :5])[0]  # (1, 5, 10): short sequences, for the reference run
        m = self.mha(h, h, h, need_weights=False)[0]
        r = self.proj_lstm(self.rnn(self.gru(h[0])[0])[0])[0]  # unbatched
        return torch.stack([z.sum(), a.sum(), a3.sum(), m.sum(), (s @ self.w).sum(), r.sum()])


def _all_kernels_on_meta(gm, x) -> int:
    """MACs of ``gm`` with every op run on meta tensors under torch's FLOP counter."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    on_meta = copy.deepcopy(gm).to("meta")
    with torch.no_grad(), torch.device("meta"), FlopCounterMode(display=False) as counter:
        on_meta(torch.empty_like(x, device="meta"))
    return counter.get_total_flops() // 2


def test_meta_count_skips_no_flops():
    """The report's MACs (conv, linear and attention taken from torch's formulas, not run)
    equal a meta run of every kernel under torch's FLOP counter, for the captured graph and
    its pruned result."""
    import fxprune
    from fxprune.budget import meta_stats

    torch.manual_seed(0)
    model, x = _Mixed().eval(), torch.randn(1, 3, 8, 8)
    gm = fxprune.trace(model, x)
    before = meta_stats(gm, (x,))
    assert before.macs == _all_kernels_on_meta(gm, x) > 0
    assert before.params == measure(model, x).params
    result = fxprune.prune(model, x, ratio=0.5)
    assert fxprune.verify(model, result, x).max_rel_err < 1e-4
    after = meta_stats(result.module, (x,))
    assert after.macs == _all_kernels_on_meta(result.module, x) < before.macs
    assert (result.report.before, result.report.after) == (before, after)
