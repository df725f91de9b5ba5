"""Tests of fxprune.io: save -> load is bit-exact and needs no fxprune."""

import fractions
import json
import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn

import fxprune.io as fio
from fxprune.errors import LoadError
from fxprune.io import SaveError, check_save_target, load, save
from fxprune.models import BasicBlock
from fxprune.report import ModelStats, PruneReport


def scaled(x):
    return x * 2.0


torch.fx.wrap("scaled")


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.branch = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.branch(x))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


def healthy(model):
    """Give BatchNorm non-trivial statistics so equal outputs prove something."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32))
    return model.eval()


@pytest.fixture
def small_gm():
    torch.manual_seed(0)
    return torch.fx.symbolic_trace(healthy(SmallCNN()))


@pytest.fixture
def saved(tmp_path, small_gm):
    return save(small_gm, tmp_path / "saved_cnn"), small_gm


def outputs_equal(a, b, x):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return ya.shape == yb.shape and torch.equal(ya, yb)


def test_small_cnn_round_trip(saved):
    path, gm = saved
    assert sorted(os.listdir(path)) == ["__init__.py", "fxprune.json", "module.py", "weights.pt"]
    model = load(path)
    assert type(model).__name__ == "SmallCNN" and not isinstance(model, torch.fx.GraphModule)
    assert not model.training
    x = torch.randn(3, 3, 32, 32)
    assert outputs_equal(model, gm, x)
    assert gm(x).abs().max() > 1e-2  # not a degenerate comparison


def test_resnet18_round_trip_and_readable_source(tmp_path):
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(torchvision.models.resnet18().eval())
    x = torch.randn(1, 3, 64, 64)
    path = save(gm, tmp_path / "r18", example_inputs=x)
    model = load(path)
    assert outputs_equal(model, gm, x)
    source = (path / "module.py").read_text()
    assert "_put(self, 'conv1', torch.nn.Conv2d(3, 64, (7, 7), stride=(2, 2), padding=(3, 3), " \
           "bias=False))" in source
    assert "_blank(" not in source.split("class ResNet")[1]  # every module by its constructor
    assert "fxprune" not in source.split('"""', 2)[2]  # no import of fxprune at all
    manifest = json.loads((path / "fxprune.json").read_text())
    assert manifest["input_shapes"] == [[1, 3, 64, 64]]
    assert manifest["class_name"] == "ResNet"


FAKE_FXPRUNE = 'raise ImportError("fxprune must not be needed to load a saved model")\n'

PLAIN_TORCH_LOAD = textwrap.dedent("""
    import importlib, importlib.util, sys
    fake, parent, name, io_file = sys.argv[1:5]
    sys.path.insert(0, fake)
    try:
        import fxprune
    except ImportError:
        pass
    else:
        raise SystemExit("the fake fxprune did not shadow the real one")
    import torch
    x, expected = torch.load(io_file, weights_only=True)
    # recipe 1: import the folder as a package
    sys.path.insert(1, parent)
    model = importlib.import_module(name).load()
    with torch.no_grad():
        assert torch.equal(model(x), expected), "recipe 1 output differs"
    # recipe 2: load module.py by file path
    spec = importlib.util.spec_from_file_location("other_name", parent + "/" + name + "/module.py")
    saved = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(saved)
    with torch.no_grad():
        assert torch.equal(saved.load()(x), expected), "recipe 2 output differs"
    assert not [m for m in sys.modules if m.split(".")[0] in ("fxprune", "passes")]
    print("OK", type(model).__name__)
""")


def test_loads_without_fxprune_in_subprocess(tmp_path, small_gm):
    for pkg in ("fxprune", "passes"):
        (tmp_path / "fake" / pkg).mkdir(parents=True)
        (tmp_path / "fake" / pkg / "__init__.py").write_text(FAKE_FXPRUNE)
    x = torch.randn(2, 3, 32, 32)
    save(small_gm, tmp_path / "models" / "pruned_cnn", example_inputs=x)
    with torch.no_grad():
        torch.save((x, small_gm(x)), tmp_path / "io.pt")
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_TORCH_LOAD, str(tmp_path / "fake"), str(tmp_path / "models"),
         "pruned_cnn", str(tmp_path / "io.pt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "OK SmallCNN"


def test_folder_is_relocatable(saved, tmp_path):
    path, gm = saved
    moved = tmp_path / "elsewhere" / "copy"
    moved.parent.mkdir()
    path.rename(moved)
    assert outputs_equal(load(moved), gm, torch.randn(1, 3, 32, 32))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6, bias=False)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.tensor([1.5]), persistent=False)
        self.offset = torch.arange(6.0)  # plain tensor attribute: a traced constant

    def forward(self, x):
        y = self.b(self.a(x)) * self.scale + self.offset
        return torch.clamp(scaled(y) + torch.tensor([0.25]), max=float("inf"))


def test_ties_constants_wrapped_functions(tmp_path):
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(Tied())
    model = load(save(gm, tmp_path / "tied"))
    assert model.a.weight is model.b.weight
    assert model.training  # saved in train mode, comes back in train mode
    assert outputs_equal(model, gm, torch.randn(4, 6))
    source = (tmp_path / "tied" / "module.py").read_text()
    assert f"import {__name__}" in source and f"scaled = {__name__}.scaled" in source  # tests.test_io
    assert "inf = float('inf')" in source


class LeafTracer(torch.fx.Tracer):
    def __init__(self, leaves):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m, name):
        return isinstance(m, self.leaves) or super().is_leaf_module(m, name)


def trace_with_leaves(root, leaves):
    return torch.fx.GraphModule(root, LeafTracer(leaves).trace(root), type(root).__name__)


def test_generic_rebuild_of_non_torch_leaf_and_float64(tmp_path):
    frozen = torchvision.ops.FrozenBatchNorm2d(8)
    frozen.running_mean.normal_()
    root = nn.Sequential(nn.Conv2d(3, 8, 3), frozen, nn.ReLU()).double().eval()
    gm = trace_with_leaves(root, torchvision.ops.FrozenBatchNorm2d)
    path = save(gm, tmp_path / "frozen", example_inputs=torch.randn(1, 3, 8, 8).double())
    source = (path / "module.py").read_text()
    assert "_blank(torchvision.ops.misc.FrozenBatchNorm2d, {'eps': 1e-05}" in source
    assert "_blank(torch.nn.Conv2d" in source  # float64: the constructor would not match
    model = load(path)
    assert getattr(model, "0").weight.dtype == torch.float64
    assert outputs_equal(model, gm, torch.randn(2, 3, 8, 8).double())


def test_transformer_leaves_with_function_attributes(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, activation="gelu",
                                       batch_first=True)
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(8, 16), layer).eval())
    x = torch.randn(2, 5, 8)
    path = save(gm, tmp_path / "tel", example_inputs=x)
    source = (path / "module.py").read_text()
    assert re.search(r"_blank\(torch.nn.TransformerEncoderLayer, .*'activation': torch\.\S*gelu",
                     source)  # a function-valued attribute, written as its import path
    assert "torch.nn.MultiheadAttention(16, 4, dropout=0.1, kdim=16, vdim=16, batch_first=True)" \
        in source
    assert outputs_equal(load(path), gm, x)


def test_function_whose_module_is_shadowed(tmp_path):
    # StochasticDepth calls a torch.fx.wrap'ed function of the module
    # torchvision.ops.stochastic_depth, but torchvision.ops.stochastic_depth is
    # that function, so the expression ...stochastic_depth.stochastic_depth fails
    root = nn.Sequential(nn.Conv2d(3, 4, 1), torchvision.ops.StochasticDepth(0.2, "row"))
    gm = torch.fx.symbolic_trace(root.eval())
    x = torch.randn(2, 3, 4, 4)
    path = save(gm, tmp_path / "sd", example_inputs=x)
    source = (path / "module.py").read_text()
    assert ("from torchvision.ops.stochastic_depth import stochastic_depth as "
            "_imp_stochastic_depth") in source
    assert outputs_equal(load(path), gm, x)


def test_save_leaves_rng_alone(small_gm, tmp_path):
    state = torch.get_rng_state()
    save(small_gm, tmp_path / "rng")
    assert torch.equal(torch.get_rng_state(), state)


def test_result_object_writes_report_and_overwrites(small_gm, tmp_path):
    report = PruneReport(ModelStats(10, 20), ModelStats(5, 8), 16, 8, 2, (("rewrite", 0.1),))
    path = save(SimpleNamespace(module=small_gm, report=report), tmp_path / "res")
    assert PruneReport.from_dict(json.loads((path / "report.json").read_text())) == report
    save(small_gm, path)  # overwriting an earlier save is fine; the stale report goes
    assert not (path / "report.json").exists()
    assert outputs_equal(load(path), small_gm, torch.randn(1, 3, 32, 32))


def test_round_trip_check_can_fail(small_gm, tmp_path, monkeypatch):
    real_load = fio.load

    def perturbed(path, device="cpu"):
        model = real_load(path, device=device)
        with torch.no_grad():
            model.fc.bias.add_(1e-6)
        return model

    monkeypatch.setattr(fio, "load", perturbed)
    with pytest.raises(SaveError, match="different outputs.*fxprune bug"):
        save(small_gm, tmp_path / "bad", example_inputs=torch.randn(1, 3, 32, 32))


def local_leaf_gm():
    class Local(nn.Module):
        def forward(self, x):
            return x + 1

    return trace_with_leaves(nn.Sequential(Local()), Local)


def hooked_gm():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    gm.get_submodule("0").register_forward_hook(lambda *args: None)
    return gm


@pytest.mark.parametrize("make,match", [
    (lambda: SmallCNN(), r"plain SmallCNN; trace it first"),
    (lambda: SimpleNamespace(module=42), r"got SimpleNamespace"),
    (lambda: "model", r"got str"),
    (local_leaf_gm, r"defined inside a function.*define it at module level"),
    (lambda: trace_with_leaves(nn.Sequential(BasicBlock(4, 4)), BasicBlock),
     r"fxprune\.models\.BasicBlock lives in 'fxprune\.models'"),
    (hooked_gm, r"module '0' has forward/backward hooks"),
])
def test_save_errors(make, match, tmp_path):
    with pytest.raises(SaveError, match=match):
        save(make(), tmp_path / "out")


def test_save_target_errors(tmp_path, small_gm):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(SaveError, match=r"file\.txt is a file"):
        save(small_gm, tmp_path / "file.txt")
    with pytest.raises(SaveError, match=r"busy is a non-empty folder that fxprune did not write"):
        check_save_target(tmp_path / "busy")
    (tmp_path / "empty").mkdir()
    assert check_save_target(tmp_path / "empty") == tmp_path / "empty"


def rehash(path):
    manifest = json.loads((path / "fxprune.json").read_text())
    manifest["files"] = {n: fio._sha256(path / n) for n in manifest["files"]}
    (path / "fxprune.json").write_text(json.dumps(manifest))


def edit_manifest(**changes):
    def edit(path):
        manifest = json.loads((path / "fxprune.json").read_text())
        manifest.update(changes)
        (path / "fxprune.json").write_text(json.dumps(manifest))
    return edit


def then_rehash(edit):
    def run(path):
        edit(path)
        rehash(path)
    return run


def write_weights(obj):
    return then_rehash(lambda p: torch.save(obj, p / "weights.pt"))


def drop_state_key(path):
    tensors = torch.load(path / "weights.pt", weights_only=True)
    tensors["state_dict"].pop("fc.bias")
    torch.save(tensors, path / "weights.pt")
    rehash(path)


CORRUPTIONS = [
    ("missing-folder", lambda p: p.rename(p.with_name("gone")), r"saved_cnn does not exist"),
    ("json-missing", lambda p: (p / "fxprune.json").unlink(), r"fxprune\.json is missing.*save"),
    ("json-invalid", lambda p: (p / "fxprune.json").write_text("{"), r"not valid JSON"),
    ("json-foreign", lambda p: (p / "fxprune.json").write_text("[1]"), r"not an fxprune manifest"),
    ("format-newer", edit_manifest(format_version=99), r"format version 99.*upgrade fxprune"),
    ("format-older", edit_manifest(format_version=0), r"format version 0.*save the model again"),
    ("files-unlisted", edit_manifest(files={}), r"does not list module\.py and weights\.pt"),
    ("weights-missing", lambda p: (p / "weights.pt").unlink(), r"weights\.pt is missing"),
    ("init-missing", lambda p: (p / "__init__.py").unlink(), r"__init__\.py is missing"),
    ("code-edited", lambda p: (p / "module.py").open("a").write("#\n"),
     r"module\.py does not match its sha256 checksum"),
    ("weights-flipped", lambda p: (p / "weights.pt").write_bytes(b"x" + (p / "weights.pt")
                                                                  .read_bytes()[1:]),
     r"weights\.pt does not match its sha256"),
    ("weights-truncated", then_rehash(lambda p: (p / "weights.pt").write_bytes(
        (p / "weights.pt").read_bytes()[:100])), r"weights\.pt cannot be loaded"),
    ("weights-unsafe-pickle", write_weights({"state_dict": fractions.Fraction(1, 3), "extra": {}}),
     r"weights\.pt cannot be loaded \(UnpicklingError"),
    ("weights-foreign", write_weights({"weight": torch.zeros(1)}),
     r"does not hold fxprune weights"),
    ("weights-key-missing", drop_state_key,
     r"weights\.pt does not match the model in .*module\.py.*fc\.bias"),
    ("code-syntax", then_rehash(lambda p: (p / "module.py").write_text("def (")),
     r"module\.py cannot be imported \(SyntaxError"),
    ("code-import", then_rehash(lambda p: (p / "module.py").write_text("import no_such_pkg_q\n")),
     r"module\.py cannot be imported \(ModuleNotFoundError.*install the packages"),
    ("code-broken", then_rehash(lambda p: (p / "module.py").write_text(
        "def load(device, tensors):\n    raise KeyError('boom')\n")),
     r"module\.py failed to build the model \(KeyError"),
]


@pytest.mark.parametrize("corrupt,match", [c[1:] for c in CORRUPTIONS],
                         ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_folders_raise_load_error(saved, corrupt, match):
    path, _ = saved
    corrupt(path)
    with pytest.raises(LoadError, match=match):
        load(path)


def test_load_a_file_instead_of_folder(saved):
    path, _ = saved
    with pytest.raises(LoadError, match=r"module\.py is not a folder.*not a file inside it"):
        load(path / "module.py")


def test_doctests():
    import doctest

    import fxprune._pysource

    result = doctest.testmod(fxprune._pysource)
    assert result.attempted > 0 and result.failed == 0
