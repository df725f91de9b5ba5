"""Calibration statistics, activation-aware criteria (wanda, flap, activation), adaptive
allocation and bias compensation: each checked against a brute-force computation on
small models with made-up data, and every pruned model through the oracle."""

import os
import sys

import pytest
import torch
from torch import nn

import fxprune
from fxprune.activation_scores import activation_scores
from fxprune.blocks import Llama
from fxprune.errors import ConfigError
from fxprune.plan import class_costs, select_channels
from fxprune.statistics import collect_statistics, consumer_sites
from tests.helpers.healthy import make_healthy
from tests.helpers.oracle import prune_and_verify


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)).eval()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 10, 1), nn.ReLU(), nn.Conv2d(10, 6, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 8 * 8, 5)).eval()


def shifted_batches(shape, n=4, seed=0):
    """Data with channel means far from zero (compensation has something to fold)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 1.5 + 0.7 for _ in range(n)]


def _inputs_of(model, module, batches):
    """Brute force: every input ``module`` sees over ``batches`` (a forward hook)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    with torch.no_grad():
        for x in batches:
            model(x)
    handle.remove()
    return seen


@pytest.mark.parametrize("make,shape,layer,dim", [(mlp, (5, 6), 2, -1), (cnn, (2, 3, 8, 8), 3, 1)])
def test_statistics_match_brute_force(make, shape, layer, dim):
    model = make()
    batches = shifted_batches(shape)
    groups = fxprune.analyze(model, batches[0])
    key, site = next((k, s) for k, s in consumer_sites(groups).items() if k[0] in (str(layer), f"_{layer}"))
    st = collect_statistics(groups, batches, gram=[key], progress=False).of(site)
    seen = _inputs_of(model, model[layer], batches)
    rows = torch.cat([x.movedim(dim, -1).reshape(-1, x.shape[dim]) for x in seen])
    assert st.count == rows.shape[0]
    torch.testing.assert_close(st.mean, rows.mean(0))
    torch.testing.assert_close(st.var, rows.var(0, unbiased=False))
    torch.testing.assert_close(st.sample_var, rows.var(0, unbiased=True))
    torch.testing.assert_close(st.rms, rows.pow(2).mean(0).sqrt())
    torch.testing.assert_close(st.abs_mean, rows.abs().mean(0))
    per_sample = torch.cat([x.abs().movedim(dim, -1).reshape(x.shape[0], -1, x.shape[dim]).mean(1) for x in seen])
    torch.testing.assert_close(st.sample_abs_rms, per_sample.pow(2).mean(0).sqrt())
    ext = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(st.gram, ext.T @ ext)
    assert float(st.var.min()) > 0  # the data made the check non-trivial


def test_statistics_leave_model_and_buffers_untouched():
    model = cnn()
    make_healthy(model, (2, 3, 8, 8))
    model.train()  # a BatchNorm in train mode would update its running statistics
    groups = fxprune.analyze(model, torch.randn(2, 3, 8, 8))
    before = {k: v.clone() for k, v in groups.gm.state_dict().items()}
    modes = [m.training for m in groups.gm.modules()]
    collect_statistics(groups, shifted_batches((2, 3, 8, 8)), progress=False)
    after = groups.gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in groups.gm.modules()] == modes


def test_criteria_match_their_formulas():
    model = mlp()
    batches = shifted_batches((5, 6))
    groups = fxprune.analyze(model, batches[0])
    hidden = groups.group_of("0.weight")  # the 12 channels between layers 0 and 2
    seen = torch.cat([x.reshape(-1, 12) for x in _inputs_of(model, model[2], batches)])
    w = model[2].weight.detach().double()
    expected = {"wanda": w.abs().mean(0) * seen.pow(2).mean(0).sqrt(),
                "fluctuation": seen.var(0, unbiased=True) * w.pow(2).sum(0),
                "activation": seen.abs().mean(0)}  # one position per sample: RMS over samples of |x|
    expected["activation"] = seen.abs().pow(2).mean(0).sqrt()
    for criterion, want in expected.items():
        scores, _ = activation_scores(groups, batches, criterion=criterion)
        got = scores.values[list(hidden.classes)]
        torch.testing.assert_close(got, want, msg=criterion)


@pytest.mark.parametrize("importance", ["wanda", "flap", "activation"])
def test_activation_criteria_prune_cnn_and_transformer(importance):
    model = cnn()
    x = torch.randn(2, 3, 8, 8)
    result, v = prune_and_verify(model, x, ratio=0.4, importance=importance, data=shifted_batches((2, 3, 8, 8)))
    assert result.scores.criterion in (importance, "fluctuation")
    llama = Llama(vocab=40, dim=32, layers=2).eval()
    ids = [torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    prune_and_verify(llama, ids[0], ratio=0.3, importance=importance, data=ids, healthy=False)


def test_criteria_disagree_with_magnitude_where_activations_matter():
    """A channel with large weights but a dead input scores low by activation, high by L2."""
    model = mlp()
    with torch.no_grad():
        model[0].weight[3].mul_(20.0)
        model[0].bias[3] = -1000.0  # GELU(-huge) = 0: channel 3 never carries anything
    x = shifted_batches((5, 6))
    groups = fxprune.analyze(model, x[0])
    cls = list(groups.group_of("0.weight").classes)
    for criterion in ("wanda", "fluctuation", "activation"):
        values = activation_scores(groups, x, criterion=criterion)[0].values[cls]
        assert int(values.argmin()) == 3, criterion
    assert int(fxprune.scoring.magnitude_scores(groups).values[cls].argmax()) == 3


# -- adaptive allocation -------------------------------------------------------------------
def deep_mlp():
    torch.manual_seed(1)
    layers = []
    widths = [8, 16, 24, 16, 32, 4]
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def test_adaptive_removes_the_ratio_of_cost_and_respects_caps():
    model = deep_mlp()
    groups = fxprune.analyze(model, torch.randn(4, 8))
    torch.manual_seed(3)
    scores = fxprune.scoring.ChannelScores(torch.rand(groups.n_classes, dtype=torch.float64), "random")
    cost = class_costs(groups, "params")
    cand = torch.cat([torch.tensor(g.prunable) for g in groups.prunable])
    for ratio in (0.2, 0.5):
        plan = select_channels(groups, scores, ratio=ratio, adaptive=True, max_ratio=0.6)
        removed = float(cost[~plan.kept].sum())
        assert ratio * float(cost[cand].sum()) <= removed <= ratio * float(cost[cand].sum()) + float(cost.max())
        fractions = [float((~plan.kept[list(g.classes)]).double().mean()) for g in groups.prunable]
        assert max(fractions) <= 0.6 + 1e-9  # the cap
        assert all(bool(plan.kept[list(g.classes)].any()) for g in groups.groups)  # the floor
    # per-group ratios differ: that is the point of adaptive allocation
    assert len({round(f, 3) for f in fractions}) > 1


def test_adaptive_composes_with_a_parameter_budget():
    model = deep_mlp()
    make_healthy(model, (4, 8))
    x = torch.randn(4, 8)
    data = shifted_batches((6, 8))
    result, v = prune_and_verify(model, x, target_params=0.6, importance="wanda", adaptive=True, data=data,
                                 healthy=False)
    assert result.budget.achieved.params <= 0.6 * result.budget.original.params
    with pytest.raises(ConfigError, match="adaptive and isomorphic"):
        fxprune.prune(model, x, adaptive=True, isomorphic=True)


def test_adaptive_beats_uniform_on_uneven_layers():
    """Two layers, one whose channels matter little: adaptive takes more from it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[2].weight[:, :12] *= 0.01  # most of layer 0's channels are read with tiny weights
    data = shifted_batches((32, 8))
    held_out = shifted_batches((64, 8), n=1, seed=9)[0]
    errors = {}
    for adaptive in (False, True):
        r = fxprune.prune(model, data[0], ratio=0.5, importance="wanda", data=data, adaptive=adaptive)
        fxprune.verify(model, r, data[0])
        with torch.no_grad():
            errors[adaptive] = float((r.module(held_out) - model(held_out)).pow(2).mean())
        assert r.report.after.params <= r.report.before.params
    assert errors[True] < errors[False]


# -- bias compensation -----------------------------------------------------------------------
def mean_replaced_reference(model, layer_inputs_means, removed, x):
    """Brute force, independent of the oracle: run the original model with each removed
    channel replaced by its calibration mean at the input of every listed layer."""
    hooks = []
    for module, means in layer_inputs_means.items():
        chans = removed[module]

        def pre(m, args, means=means, chans=chans):
            t = args[0].clone()
            t[:, chans] = means[chans].to(t.dtype).reshape(-1, *([1] * (t.ndim - 2)))
            return (t,)
        hooks.append(module.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()


def test_bias_compensation_equals_mean_replacement():
    model = mlp()
    with torch.no_grad():
        model[2].bias = None  # a consumer without bias gets one
    data = shifted_batches((8, 6))
    x = data[0]
    result, v = prune_and_verify(model, x, ratio=0.5, importance="l2", compensate="bias", data=data,
                                 healthy=False)
    assert "bias" in result.module.code or result.module.get_submodule("2").bias is not None
    assert result.module.get_submodule("2").bias is not None
    # the brute-force reference: removed channels replaced by their means on the original
    groups = result.groups
    means, removed = {}, {}
    for layer, width in ((2, 12), (4, 10)):
        seen = torch.cat([t.reshape(-1, width) for t in _inputs_of(model, model[layer], data)])
        means[model[layer]] = seen.mean(0)
        cls = groups.group_of(f"{layer - 2}.weight").classes
        removed[model[layer]] = torch.tensor([i for i, c in enumerate(cls) if not bool(result.plan.kept[c])])
    want = mean_replaced_reference(model, means, removed, x)
    got = result.module(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and compensation helps on data like the calibration data: closer to the original
    plain = fxprune.prune(model, x, ratio=0.5, importance="l2")
    fxprune.verify(model, plain, x)
    held_out = shifted_batches((512, 6), n=1, seed=5)[0]
    with torch.no_grad():
        ref = model(held_out)
        assert (result.module(held_out) - ref).pow(2).mean() < (plain.module(held_out) - ref).pow(2).mean()


def test_bias_compensation_on_convs_skips_padded_ones():
    model = cnn()
    data = shifted_batches((2, 3, 8, 8))
    result, v = prune_and_verify(model, data[0], ratio=0.5, importance="flap", compensate="bias", data=data)
    comp = result.plan.compensation
    assert any("padding" in s for s in comp.skipped)  # the 3x3 conv with padding is left alone
    assert comp.fills  # the 1x1 conv and the flatten-linear are compensated


def test_bias_compensation_on_a_transformer_functional_graph():
    llama = Llama(vocab=40, dim=32, layers=2).eval()
    ids = [torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result, v = prune_and_verify(llama, ids[0], ratio=0.3, importance="wanda", compensate="bias", data=ids,
                                 healthy=False, frontend="export")
    comp = result.plan.compensation
    assert comp.fills
    # the folded biases are the layers' own biases (llama's layers had none): in the code and in write-back
    params = dict(result.module.named_parameters())
    assert comp.written and all(p.endswith(".bias") and p in params for p in comp.written)
    assert all(p.replace(".", "_") in result.module.code for p in comp.written)


# -- bad input --------------------------------------------------------------------------------
def test_errors_name_what_to_pass():
    model = mlp()
    x = torch.randn(5, 6)
    with pytest.raises(ConfigError, match="needs calibration data"):
        fxprune.prune(model, x, importance="wanda")
    with pytest.raises(ConfigError, match="needs calibration data"):
        fxprune.prune(model, x, compensate="bias")
    with pytest.raises(ConfigError, match="does not fit the model"):
        fxprune.prune(model, x, importance="flap", data=[torch.randn(5, 7)])
    groups = fxprune.analyze(model, x)
    with pytest.raises(ConfigError, match="no linear consumer input"):
        collect_statistics(groups, [x], gram=[("1", 0)])
    with pytest.raises(ConfigError, match="compensate"):
        fxprune.prune(model, x, compensate="lsq-typo", data=[x])
    with pytest.raises(ConfigError, match="unknown cost"):
        fxprune.prune(model, x, adaptive=True, cost="flops")


def test_text_pipelines_name_the_new_passes():
    model = mlp()
    data = shifted_batches((5, 6))
    r = fxprune.prune(model, data[0], pipeline="channel-deps,score-flap,select{ratio=0.3,adaptive=True},"
                                               "rewrite{compensate='bias'}", data=data)
    fxprune.verify(model, r, data[0])
    assert r.plan.compensation is not None and r.plan.n_removed > 0


# -- distributed -------------------------------------------------------------------------------
def _rank(rank, world, path, init):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = mlp()
        data = shifted_batches((5, 6), n=4)
        shard = data[rank::world]
        groups = fxprune.analyze(model, data[0])
        st = collect_statistics(groups, shard, progress=False)
        scores, _ = activation_scores(groups, criterion="fluctuation", stats=st)
        plan = select_channels(groups, scores, ratio=0.5)
        torch.save({"kept": plan.kept, "mean": {k: s.mean for k, s in st.stats.items()},
                    "m2": {k: s.m2 for k, s in st.stats.items()}, "batches": st.batches}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo over a file store")
def test_distributed_statistics_equal_the_union(tmp_path):
    import torch.multiprocessing as mp

    path = str(tmp_path / "out")
    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(_rank, args=(2, path, init), nprocs=2, join=True, start_method="spawn")
    model = mlp()
    data = shifted_batches((5, 6), n=4)
    groups = fxprune.analyze(model, data[0])
    st = collect_statistics(groups, data, progress=False)
    plan = select_channels(groups, activation_scores(groups, criterion="fluctuation", stats=st)[0], ratio=0.5)
    for rank in range(2):
        got = torch.load(f"{path}.{rank}")
        assert got["batches"] == 4
        assert torch.equal(got["kept"], plan.kept)
        for k, s in st.stats.items():
            torch.testing.assert_close(got["mean"][k], s.mean)
            torch.testing.assert_close(got["m2"][k], s.m2)
    assert os.path.exists(f"{path}.1")


# -- least-squares refit ------------------------------------------------------------------------
def test_lsq_refit_is_checked_and_never_worse_on_held_out_data_than_the_mean():
    model = mlp()
    data = shifted_batches((32, 6), n=6)
    x = data[0]
    results = {}
    for comp in ("bias", "lsq"):
        results[comp], v = prune_and_verify(model, x, ratio=0.5, importance="wanda", compensate=comp,
                                            data=data, healthy=False)
    refits = results["lsq"].plan.compensation.refits
    assert set(refits) >= {"_2", "_4"} or len(refits) == 2
    for r in refits.values():  # the ridge was chosen on held-out data, inf (the mean) included
        errors = dict(r.curve)
        assert errors[r.lam] <= errors[float("inf")] + 1e-12
    held_out = shifted_batches((512, 6), n=1, seed=11)[0]
    with torch.no_grad():
        ref = model(held_out)
        err = {k: float((r.module(held_out) - ref).pow(2).mean()) for k, r in results.items()}
    assert err["lsq"] <= err["bias"] * 1.05


def test_lsq_on_a_functional_transformer_graph_and_its_errors():
    llama = Llama(vocab=40, dim=32, layers=2).eval()
    ids = [torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    result, v = prune_and_verify(llama, ids[0], ratio=0.3, importance="flap", compensate="lsq", data=ids,
                                 healthy=False, frontend="export")
    assert result.plan.compensation.refits
    with pytest.raises(ConfigError, match="at least 2 calibration batches"):
        fxprune.prune(llama, ids[0], ratio=0.3, compensate="lsq", data=ids[:1])


class _KeywordLinears(nn.Module):
    """Functional linears whose weights and biases are passed by keyword, one without a bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w1, self.b1 = nn.Parameter(torch.randn(12, 6) * 0.4), nn.Parameter(torch.randn(12) * 0.1)
        self.w2 = nn.Parameter(torch.randn(5, 12) * 0.3)

    def forward(self, x):
        h = torch.nn.functional.gelu(torch.nn.functional.linear(input=x, weight=self.w1, bias=self.b1))
        return torch.nn.functional.linear(h, weight=self.w2)


@pytest.mark.parametrize("compensate", ["bias", "lsq"])
def test_compensation_reads_and_writes_arguments_passed_by_keyword(compensate):
    model = _KeywordLinears().eval()
    data = shifted_batches((16, 6), n=4)
    result, v = prune_and_verify(model, data[0], ratio=0.5, importance="l2", compensate=compensate, data=data,
                                 healthy=False)
    comp = result.plan.compensation
    assert (comp.fills if compensate == "bias" else comp.refits)  # the keyword-called consumer was found
    consumer = next(n for n in result.module.graph.nodes if n.op == "call_function" and n.kwargs.get("weight")
                    is not None and tuple(result.module.get_parameter(n.kwargs["weight"].target).shape)[0] == 5)
    assert isinstance(consumer.kwargs.get("bias"), torch.fx.Node)  # set where the call passes arguments
    assert set(model.state_dict()) == {"w1", "b1", "w2"}  # the user's model is untouched


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("compensate", ["bias", "lsq"])
def test_compensated_layers_write_back_to_the_users_classes(frontend, compensate):
    model = mlp()
    with torch.no_grad():
        model[2].bias = None  # compensation gives it one
    data = shifted_batches((16, 6), n=4)
    result = fxprune.prune(model, data[0], ratio=0.5, importance="flap", compensate=compensate, data=data,
                           frontend=frontend)
    fxprune.verify(model, result, data[0])
    assert "2.bias" in result.plan.compensation.written
    back = result.apply(model, data[0])
    assert type(back) is nn.Sequential and isinstance(back[2].bias, nn.Parameter)
    assert model[2].bias is None  # the user's model is not changed
    torch.testing.assert_close(back(data[1]), result.module(data[1]))
