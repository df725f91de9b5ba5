"""The group graph: channel groups, the tensors they slice and the ops that couple,
mix or pin them, as a networkx graph, and drawn as Graphviz DOT.

Nodes carry a ``kind``:

- ``"group"``: a channel group (``size``, ``prunable``, ``exact``, ``pinned``
  and ``inexact`` reasons); node key ``"group <id>"``;
- ``"tensor"``: a parameter or buffer a group slices; key its attribute path;
- ``"op"``: a graph node that aligned a tensor with a group, or mixes the
  values of a group's channels; key ``"op <node name>"``.

Edges: tensor -- group (``role``: out, in, norm, ...; ``dim``), op -- group
(``relation``: ``"aligns"`` or ``"mixes"``).
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["to_networkx", "to_dot", "write_svg"]


def _groups_of(groups, labels: torch.Tensor) -> list[int]:
    gids = torch.unique(groups.group_of_class[groups.class_of[labels.reshape(-1)]])
    return [int(g) for g in gids.tolist() if g >= 0]


def to_networkx(groups) -> Any:
    """The group graph of a :class:`~fxprune.channels.ChannelGroups` as a
    ``networkx.Graph`` (see the module docstring for its nodes and edges).

    Examples
    --------
    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> g = fxprune.analyze(net, torch.randn(1, 4)).to_networkx()
    >>> sorted(n for n, d in g.nodes(data=True) if d["kind"] == "group")
    ['group 0', 'group 1']
    >>> g.edges["0.weight", "group 0"]["role"]
    'out'
    """
    import networkx as nx

    graph = nx.Graph()
    for g in groups.groups:
        graph.add_node(f"group {g.id}", kind="group", size=g.size, prunable=len(g.prunable), exact=g.exact,
                       pinned=list(g.pinned_reasons), inexact=list(g.inexact_reasons))
    for a in groups.alignments:
        for gid in _groups_of(groups, a.labels):
            graph.add_node(a.path, kind="tensor")
            graph.add_edge(a.path, f"group {gid}", role=a.role, dim=a.dim)
            if a.node:
                graph.add_node(f"op {a.node}", kind="op")
                graph.add_edge(f"op {a.node}", f"group {gid}", relation="aligns")
    for site in groups.mixing:
        for gid in _groups_of(groups, site.labels):
            graph.add_node(f"op {site.node}", kind="op")
            graph.add_edge(f"op {site.node}", f"group {gid}", relation="mixes", reason=site.reason,
                           checked=site.masked is not None)
    return graph


def _quote(text: Any) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(groups) -> str:
    """Graphviz DOT text of the group graph: groups as boxes (pinned channels and their
    reasons, inexact reasons), tensors as ellipses, ops as diamonds; a mixing op's edge
    is dashed."""
    graph = to_networkx(groups)
    lines = ["graph channel_groups {", "  rankdir=LR;", "  node [fontsize=10];"]
    for key, d in graph.nodes(data=True):
        if d["kind"] == "group":
            label = f"{key}\n{d['prunable']}/{d['size']} prunable" + ("" if d["exact"] else ", inexact")
            label += "".join(f"\npinned: {r}" for r in d["pinned"] if d["prunable"] < d["size"])
            color = "lightgrey" if d["prunable"] <= 1 else ("lightblue" if d["exact"] else "khaki")
            lines.append(f"  {_quote(key)} [shape=box, style=filled, fillcolor={color}, label={_quote(label)}];")
        elif d["kind"] == "tensor":
            lines.append(f"  {_quote(key)} [shape=ellipse];")
        else:
            lines.append(f"  {_quote(key)} [shape=diamond, label={_quote(key[3:])}];")
    for u, v, d in graph.edges(data=True):
        if "role" in d:
            label = d["role"] if d["dim"] is None else f"{d['role']}, dim {d['dim']}"
            lines.append(f"  {_quote(u)} -- {_quote(v)} [label={_quote(label)}];")
        else:
            style = "dashed" if d["relation"] == "mixes" else "solid"
            lines.append(f"  {_quote(u)} -- {_quote(v)} [style={style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_svg(groups, path) -> None:
    """Draw the group graph to an SVG file with Graphviz's ``dot`` program."""
    dot = shutil.which("dot")
    if dot is None:
        raise ConfigError("drawing SVG needs Graphviz's 'dot' program on PATH (apt-get install graphviz); "
                          "--dot FILE writes the graph as DOT text without it")
    done = subprocess.run([dot, "-Tsvg", "-o", str(path)], input=to_dot(groups), text=True,
                          capture_output=True, check=False)
    if done.returncode != 0:
        raise ConfigError(f"Graphviz's dot failed: {done.stderr.strip()}")
