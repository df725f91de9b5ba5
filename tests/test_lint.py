"""The code passes the project's ruff configuration (pyproject.toml: pyflakes and
syntax errors), so the README's test command is also the lint gate."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: pip install -e '.[test]' brings it")
    done = subprocess.run([ruff, "check", "fxprune", "passes", "tools", "tests"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean_on_the_rules_and_the_analysis():
    """pyproject.toml's [tool.mypy]: fxprune/rules/ and fxprune/analysis.py are checked
    with the flags of ``mypy --strict`` (the modules they import are followed for their
    types, their own errors not reported). The cache lives in the temp dir, so a second
    run takes seconds."""
    import tempfile

    mypy = shutil.which("mypy") or str(Path(sys.executable).parent / "mypy")
    if not Path(mypy).exists():
        pytest.skip("mypy is not installed (pip install -e '.[test]' brings it)")
    cache = Path(tempfile.gettempdir()) / "fxprune-mypy-cache"
    done = subprocess.run([mypy, "--cache-dir", str(cache)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr
