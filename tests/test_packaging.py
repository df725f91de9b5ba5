"""fxprune installs one top-level package: its passes are ``fxprune.passes`` (the
top-level ``passes/`` folder of the source tree), so a user's own package called
``passes`` is theirs, and a model using it saves and loads."""

from __future__ import annotations

import importlib.metadata
import sys

import torch

import fxprune


def test_only_fxprune_is_installed_at_the_top_level():
    top = importlib.metadata.distribution("fxprune").read_text("top_level.txt")
    assert top is not None and top.split() == ["fxprune"]
    import fxprune.passes.select as select

    assert select.__name__ == "fxprune.passes.select"
    assert "passes" not in sys.modules or not hasattr(sys.modules["passes"], "select")


def test_a_users_package_called_passes_saves_and_loads(tmp_path, monkeypatch):
    pkg = tmp_path / "src" / "passes"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import torch\n\n\nclass Twice(torch.nn.Module):\n    def forward(self, x):\n        return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.delitem(sys.modules, "passes", raising=False)
    from passes import Twice

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), Twice(), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    result = fxprune.prune(model, x, ratio=0.5, leaf_modules=[Twice])
    assert fxprune.verify(model, result, x).complete
    fxprune.save(result, tmp_path / "saved", example_inputs=x)
    loaded = fxprune.load(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded(x), result.module(x))
