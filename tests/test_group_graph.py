"""The group graph: groups, the tensors they slice and the ops that align, mix or
pin them, as networkx and as Graphviz DOT (``fxprune analyze --dot``)."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import fxprune
from fxprune.cli import main
from fxprune.errors import ConfigError
from fxprune.group_graph import to_dot, write_svg


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(self.ln(h + self.b(h)))


def test_groups_tensors_and_ops_with_their_relations():
    groups = fxprune.analyze(Net().eval(), torch.randn(2, 4))
    g = groups.to_networkx()
    kinds = {k: d["kind"] for k, d in g.nodes(data=True)}
    assert sorted(k for k, v in kinds.items() if v == "group") == [f"group {i}" for i in range(len(groups))]
    residual = groups.group_of("a.weight")
    key = f"group {residual.id}"
    # the residual stream: a's and b's rows, the norm's affine, head's columns
    assert {n for n in g.neighbors(key) if kinds[n] == "tensor"} >= {"a.weight", "b.weight", "ln.weight",
                                                                     "head.weight"}
    assert g.edges["head.weight", key]["role"] == "in" and g.edges["head.weight", key]["dim"] == 1
    mixes = [(u, d) for u, v, d in g.edges(key, data=True) if d.get("relation") == "mixes"]
    assert mixes and mixes[0][1]["checked"] and "layer norm" in mixes[0][1]["reason"]
    assert g.nodes[key]["exact"] is False and g.nodes[key]["inexact"]
    out = groups.group_of("head.weight")
    assert g.nodes[f"group {out.id}"]["pinned"] == ["model output"]


def test_dot_text_and_the_command_line(tmp_path, capsys):
    groups = fxprune.analyze(Net().eval(), torch.randn(2, 4))
    dot = to_dot(groups)
    assert dot.startswith("graph channel_groups {") and dot.rstrip().endswith("}")
    assert '"head.weight" -- ' in dot or ' -- "head.weight"' in dot
    assert "pinned: model output" in dot and "style=dashed" in dot  # the layer norm mixes
    path = tmp_path / "g.dot"
    assert main(["analyze", "resnet20", "--dot", str(path)]) == 0
    text = path.read_text()
    assert "conv1.weight" in text and "fc.weight" in text and f"group graph: {path}" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("dot") is not None, reason="Graphviz is installed here")
def test_svg_without_graphviz_says_what_to_install(tmp_path):
    groups = fxprune.analyze(Net().eval(), torch.randn(2, 4))
    with pytest.raises(ConfigError, match="Graphviz's 'dot' program"):
        write_svg(groups, tmp_path / "g.svg")


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot")
def test_svg_with_graphviz(tmp_path):
    groups = fxprune.analyze(Net().eval(), torch.randn(2, 4))
    write_svg(groups, tmp_path / "g.svg")
    assert "<svg" in (tmp_path / "g.svg").read_text()
