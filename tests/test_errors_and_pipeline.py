"""Every bad input gets a typed error with a useful message; the pipeline text
builds the same passes as the Python API."""

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import ConfigError, FxpruneError, InputError, PipelineError, TraceError
from fxprune.passes_base import Pipeline, PruneState
from tests.helpers.oracle import prune_and_verify


def small():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))


X = torch.randn(2, 3, 10, 10)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "half", True])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ConfigError, match=r"ratio must be a number in \[0, 1\)"):
        fxprune.prune(small(), X, ratio=ratio)


def test_ratio_for_a_module_out_of_range():
    net = small()
    with pytest.raises(ConfigError, match="ratio for '0'"):
        fxprune.prune(net, X, ratios={net[0]: 2.0})


@pytest.mark.parametrize("x, match", [
    (torch.randn(2, 5, 10, 10), r"do not fit the model: running node %_0 .*expected input.*3 channels"),
    ((torch.randn(2, 3, 10, 10), torch.randn(2)), r"takes 1 positional input\(s\) but 2"),
])
def test_example_inputs_that_do_not_fit(x, match):
    with pytest.raises(InputError, match=match):
        fxprune.prune(small(), x)


def test_a_model_that_does_not_run_on_its_inputs_is_named_as_the_cause():
    """When no front end captures the model, capture runs it once: a model that fails by
    itself gets that error, not a tracing one."""

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: no symbolic trace
                x = x * 2
            return self.lin(x)  # and 4 features do not fit a Linear(5, 3)

    with pytest.raises(InputError, match=r"the model itself does not run on the example inputs: RuntimeError"):
        fxprune.prune(Broken(), torch.randn(2, 4))


def test_ignored_module_not_in_model():
    with pytest.raises(ConfigError, match="ignore: the Conv2d passed is not part of Sequential"):
        fxprune.prune(small(), X, ignore=[nn.Conv2d(3, 3, 1)])
    with pytest.raises(ConfigError, match="ignore: 'nope' is not a module or parameter"):
        fxprune.prune(small(), X, ignore=["nope"])


def test_untraceable_model_names_module_line_and_fix():
    with pytest.raises(TraceError, match=r"could not trace Branchy at .*test_errors_and_pipeline.py:\d+: "
                                         r"if x.sum\(\) > 0.*concrete_args"):
        fxprune.prune(Branchy(), X)


def test_unknown_importance_and_pass():
    with pytest.raises(ConfigError, match="unknown importance 'magic'"):
        fxprune.prune(small(), X, importance="magic")
    with pytest.raises(PipelineError, match="unknown pass 'score-magic'; known passes: .*channel-deps"):
        fxprune.parse_pipeline("channel-deps,score-magic,select,rewrite")
    with pytest.raises(PipelineError, match="has no option"):
        fxprune.parse_pipeline("select{rate=0.5}")
    with pytest.raises(PipelineError, match="cannot parse pipeline"):
        fxprune.parse_pipeline("select{ratio=0.5")


def test_errors_share_one_root():
    for cls in (ConfigError, InputError, PipelineError, TraceError, fxprune.VerificationError,
                fxprune.LoadError, fxprune.RewriteError, fxprune.AnalysisError):
        assert issubclass(cls, FxpruneError)


def test_pipeline_text_matches_api():
    torch.manual_seed(0)
    net = small()
    a = fxprune.prune(net, X, ratio=0.5, importance="l1")
    b = fxprune.prune(net, X, pipeline="channel-deps,score-magnitude{p=1},select{ratio=0.5},rewrite")
    assert torch.equal(a.plan.kept, b.plan.kept)
    assert a.module.code == b.module.code
    assert [n for n, _ in b.timings] == ["capture", "channel-deps", "score-magnitude", "select", "rewrite"]
    assert all(t >= 0 for _, t in b.timings)
    assert str(fxprune.parse_pipeline(b.pipeline)) == b.pipeline
    assert fxprune.verify(net, b, X).max_rel_err < 1e-4


def test_ignore_keeps_output_channels_and_ratios_override():
    torch.manual_seed(0)
    net = small()
    r = fxprune.prune(net, X, ratio=0.5, ignore=[net[0]])
    assert r.module.get_submodule("0").out_channels == 8
    r = fxprune.prune(net, X, ratio=0.5, ratios={"0": 0.25})
    assert r.module.get_submodule("0").out_channels == 6
    assert fxprune.verify(net, r, X).max_rel_err < 1e-4


def test_round_to_and_global_ranking():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 12, 3), nn.ReLU(), nn.Conv2d(12, 2, 1))
    r = fxprune.prune(net, X, ratio=0.3, round_to=4)
    assert r.module.get_submodule("0").out_channels % 4 == 0
    assert r.module.get_submodule("2").out_channels % 4 == 0
    assert fxprune.verify(net, r, X).max_rel_err < 1e-4
    with torch.no_grad():  # make layer 2 unimportant: global ranking must take more from it
        net[2].weight.mul_(1e-3)
    r = fxprune.prune(net, X, ratio=0.5, global_ranking=True)
    assert r.module.get_submodule("2").out_channels < r.module.get_submodule("0").out_channels
    assert r.module.get_submodule("2").out_channels >= 1
    prune_and_verify(net, X, ratio=0.5, global_ranking=True, healthy=False)


def test_ratio_zero_removes_nothing_and_model_equals():
    net = small().eval()
    r = fxprune.prune(net, X, ratio=0.0)
    assert r.plan.n_removed == 0
    with torch.no_grad():
        assert torch.allclose(r.module(X), net(X), atol=1e-6)


def test_oracle_catches_a_perturbed_weight():
    torch.manual_seed(0)
    net = small()
    result, _ = prune_and_verify(net, X, ratio=0.5)
    with torch.no_grad():
        result.module.get_submodule("3").weight[0, 0, 0, 0] += 1e-2
    with pytest.raises(fxprune.VerificationError, match="differs from the oracle"):
        fxprune.verify(net, result, X)


def test_oracle_refuses_a_degenerate_reference():
    net = small().eval()
    with torch.no_grad():
        net[3].weight.zero_()
        net[3].bias.fill_(0.5)  # every output is 0.5: a comparison proves nothing
    result = fxprune.prune(net, X, ratio=0.5)
    with pytest.raises(fxprune.DegenerateReferenceError, match="degenerate"):
        fxprune.verify(net, result, X)


def test_unknown_op_pins_its_channels_and_says_so():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            h = F.relu(self.a(x))
            h = torch.logcumsumexp(h, dim=-1)  # no rule: a barrier
            return self.c(F.relu(self.b(h)))

    torch.manual_seed(0)
    groups = fxprune.analyze(Odd(), X)
    assert not groups.group_of("a.weight").is_prunable
    assert groups.group_of("b.weight").is_prunable
    assert "no rule for" in str(groups) and "logcumsumexp" in str(groups)
    prune_and_verify(Odd(), X, ratio=0.5)


def test_the_pipeline_pauses_the_garbage_collector_and_restores_it():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            return x

    class Look:
        name = "look"

        def run(self, state):
            seen.append(gc.isenabled())
            return state

    state = PruneState(model=Probe(), example_inputs=(torch.randn(1),))
    assert gc.isenabled()
    Pipeline((Look(),)).run(state)
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        Pipeline((Look(),)).run(state)
        assert not gc.isenabled()  # a collector the caller had turned off stays off
    finally:
        gc.enable()


def test_a_pruned_model_that_does_not_run_is_an_error_naming_the_node_and_module(monkeypatch):
    # break the rewrite on purpose: the second conv loses one input channel too many, so the
    # pruned model fails where the model itself ran; prune must say where, not blame the inputs
    import fxprune.passes.rewrite as rewrite

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    real = rewrite.rewrite_graph

    def broken(groups, kept):
        out = real(groups, kept)
        conv = out.get_submodule("2")
        conv.weight = torch.nn.Parameter(conv.weight[:, :-1].detach().clone())
        conv.in_channels -= 1
        return out

    monkeypatch.setattr(rewrite, "rewrite_graph", broken)
    with pytest.raises(fxprune.errors.RewriteError) as info:
        fxprune.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5)
    msg = str(info.value)
    assert "does not run on the example inputs" in msg and "node %_2" in msg
    assert "in module '2'" in msg and "ignore=['2']" in msg


def test_progress_bar_over_the_passes_only_when_asked(capsys):
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(1, 3, 8, 8)
    quiet = fxprune.prune(net, x, ratio=0.5, report=False)
    assert capsys.readouterr().err == ""
    shown = fxprune.prune(net, x, ratio=0.5, report=False, progress=True)
    err = capsys.readouterr().err
    assert "fxprune: capture" in err and "fxprune: rewrite" in err and "/5 " in err
    assert [n for n, _ in shown.timings] == [n for n, _ in quiet.timings]
    assert torch.equal(shown.module(x), quiet.module(x))
    assert fxprune.verify(net, shown, x).exact_groups == 1


def test_a_pipeline_without_a_scoring_pass_is_an_error_naming_what_to_add():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(PipelineError, match=r"pass 'select' needs scores, which no pass before it produces; "
                                            r"put one of .*score-magnitude"):
        fxprune.prune(net, torch.randn(2, 4), pipeline="channel-deps,select{ratio=0.5},rewrite")
    with pytest.raises(PipelineError, match=r"pass 'rewrite' needs plan"):
        fxprune.prune(net, torch.randn(2, 4), pipeline="channel-deps,score-magnitude,rewrite")


def test_every_pass_declares_what_it_needs_and_produces():
    from fxprune.passes_base import _PASSES, known_passes

    for name in known_passes():
        cls = _PASSES[name]
        assert cls.produces, f"{name} produces nothing"
        assert set(cls.requires) | set(cls.produces) <= {"model", "gm", "groups", "scores", "stats", "plan", "module"}
