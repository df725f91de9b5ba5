"""docs/op-coverage.md is generated from the rule registry and kept current."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_op_coverage_table_is_current():
    spec = importlib.util.spec_from_file_location("op_coverage", ROOT / "tools" / "op_coverage.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = tool.table()
    assert "| norm | `layer_norm` | yes |" in text and "`nn.LayerNorm`" in text
    assert (ROOT / "docs" / "op-coverage.md").read_text() == text, \
        "docs/op-coverage.md is stale: run python tools/op_coverage.py --write"
