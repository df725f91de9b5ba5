"""Print (or write) the op-coverage table: every op the channel analysis has a rule
for, by family, with what its op spec declares (rewrite hook, shape shortcut, FLOP
count), generated from the rule registry.

    python tools/op_coverage.py            # print the table
    python tools/op_coverage.py --write    # regenerate docs/op-coverage.md
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

from fxprune.rules import registry

DOC = Path(__file__).resolve().parent.parent / "docs" / "op-coverage.md"


def _key_name(key) -> str:
    if isinstance(key, str):
        return f"`.{key}()`"
    if isinstance(key, type):
        where = "nn" if key.__module__.startswith("torch.nn") else key.__module__
        return f"`{where}.{key.__name__}`"
    if isinstance(key, torch._ops.OpOverloadPacket):
        return f"`aten.{key.__name__}`" if key._qualified_op_name.startswith("aten::") else f"`{key._qualified_op_name}`"
    if isinstance(key, torch.Tag):
        return f"every ATen op tagged `{key.name}`"
    mod = getattr(key, "__module__", None) or ""
    name = getattr(key, "__qualname__", None) or getattr(key, "__name__", None) or str(key)
    if name.startswith("_VariableFunctionsClass."):  # torch.addmm and its kin
        mod, name = "torch", name.split(".", 1)[1]
    mod = {"torch._C._VariableFunctions": "torch", "torch._C._nn": "torch._C._nn", "_operator": "operator",
           "torch.nn.functional": "F"}.get(mod, mod)
    return f"`{mod}.{name}`" if mod else f"`{name}`"


def table() -> str:
    """The Markdown text of docs/op-coverage.md."""
    import fxprune.rules  # noqa: F401  (fills the registry)

    by_rule: dict[tuple[str, str, bool, bool, bool], list[str]] = defaultdict(list)
    for tab, key, rule in registry.entries():
        if not rule.analyze.__module__.startswith("fxprune."):
            continue  # a rule registered by user code (or a test), not fxprune's own
        family = rule.analyze.__module__.rsplit(".", 1)[-1]
        name = f"`{key}`" if tab == "op_name" else _key_name(key)
        by_rule[(family, rule.name, rule.rewrite is not None, rule.shape is not None,
                 rule.flops is not None)].append(name)
    lines = ["# Op coverage", "",
             "Generated from the rule registry by `python tools/op_coverage.py --write`; a test fails",
             "when it is stale. An op not listed here pins its channels (the analysis names it).",
             "Each row is a rule with what its op spec declares (`fxprune/rules/registry.py`; specs",
             "are declared in the family's file under `fxprune/rules/`): a rewrite hook, a shape",
             "shortcut (capture computes the output shape without running the kernel) and a FLOP",
             "count (for the kernels the shortcut skips). Besides the ops listed, a torch function",
             "or method whose ATen op is tagged `pointwise` (`torch.frac`) takes the pointwise rule,",
             "and ATen's Python bindings (`torch._C._nn.pad`, which Dynamo's graphs call) take",
             "their ATen op's rule.", "",
             "| family | rule | rewrite hook | shape shortcut | FLOP count | ops |", "|---|---|---|---|---|---|"]
    for (family, rule, rewrite, shape, flops), keys in sorted(by_rule.items()):
        marks = " | ".join("yes" if flag else "" for flag in (rewrite, shape, flops))
        lines.append(f"| {family} | `{rule}` | {marks} | {', '.join(sorted(set(keys)))} |")
    total = sum(len(set(k)) for k in by_rule.values())
    lines += ["", f"{total} ops in {len(by_rule)} op specs."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"write {DOC.relative_to(DOC.parent.parent)}")
    args = parser.parse_args(argv)
    text = table()
    if args.write:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
