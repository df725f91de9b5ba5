"""Tests of the fxprune command line (fxprune.cli.main and python -m fxprune)."""

import json
import re
import subprocess
import sys

import pytest
import torch

import fxprune
import fxprune.io
from fxprune.cli import main



def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_has_examples(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "fxprune prune --ratio 0.5 --out pruned_resnet56" in out
    for command in ("prune", "analyze", "models"):
        assert command in out


def test_prune_help(capsys):
    code, out, _ = run(capsys, "prune", "--help")
    assert code == 0
    for option in ("--ratio", "--importance", "--input-shape", "--out", "--global-ranking",
                   "--round-to", "--ignore", "--pipeline", "--seed", "--no-verify"):
        assert option in out
    assert "plain PyTorch" in out


def test_models_lists_builtins(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("resnet")}
    assert list(lines) == ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
    assert "856K" in lines["resnet56"] and "1,3,32,32" in lines["resnet56"]


@pytest.mark.parametrize("argv,stderr", [
    ([], r"required: COMMAND"),
    (["prune"], r"required: --out"),
    (["prune", "--out", "o", "--ratio", "1.5"], r"--ratio: '1.5' is not a ratio in \[0, 1\)"),
    (["prune", "--out", "o", "--ratio", "half"], r"--ratio: 'half' is not a ratio"),
    (["prune", "--out", "o", "--input-shape", "1,3,x"], r"--input-shape: '1,3,x' is not a shape"),
    (["prune", "--out", "o", "--input-shape", "1,0,4"], r"is not a shape"),
    (["prune", "--out", "o", "--round-to", "0"], r"--round-to: '0' is not a positive integer"),
    (["analyze", "--seed", "x"], r"--seed: invalid int value"),
    (["frobnicate"], r"invalid choice: 'frobnicate'"),
])
def test_usage_errors_exit_2(capsys, argv, stderr):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert re.search(stderr, err), err


@pytest.mark.parametrize("argv,message", [
    (["prune", "resnet57", "--out", "{tmp}/o"], r"error: unknown model 'resnet57'.*resnet56"),
    (["analyze", "torchvision:not_a_net"], r"error: torchvision has no model 'not_a_net'"),
    (["analyze", "no_such_pkg_zz:make"], r"error: cannot import 'no_such_pkg_zz'"),
    (["prune", "--out", "{tmp}/file.txt"], r"error: .*file\.txt is a file"),
    (["prune", "--out", "{tmp}/busy"], r"error: .*busy is a non-empty folder"),
])
def test_fxprune_errors_exit_2_without_traceback(capsys, tmp_path, argv, message):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep").write_text("x")
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    assert re.search(message, err), err
    assert "Traceback" not in err and err.count("\n") == 1


def test_prune_resnet20(capsys, tmp_path):
    out_dir = tmp_path / "r20"
    code, out, err = run(capsys, "prune", "resnet20", "--ratio", "0.25", "--out", str(out_dir))
    assert code == 0, err
    assert "model: resnet20 (CifarResNet), input 1x3x32x32, seed 0" in out
    check = re.search(r"verify: checked (\d+)/(\d+) groups, (\d+)/(\d+) removed channels, "
                      r"max rel\. error (\S+) \(float64\)", out)
    assert check, out
    g_checked, g_removed, c_checked, c_removed = (int(check.group(i)) for i in range(1, 5))
    assert g_checked == g_removed > 0 and c_checked == c_removed > 0 and float(check.group(5)) < 1e-6
    table = [line.split() for line in out.splitlines()]
    assert ["before", "after", "ratio"] in table
    params = next(row for row in table if row and row[0] == "params")
    assert params[1] == "272K" and float(params[3]) < 1.0
    assert f"saved: {out_dir}/" in out
    model = fxprune.io.load(out_dir)
    with torch.no_grad():
        y = model(torch.randn(1, 3, 32, 32))
    assert y.shape == (1, 10)
    report = json.loads((out_dir / "report.json").read_text())
    assert report["after"]["params"] < report["before"]["params"] == 272474


def test_prune_options_and_overwrite(capsys, tmp_path):
    out_dir = tmp_path / "r20"
    argv = ["prune", "resnet20", "--ratio", "0.5", "--round-to", "4", "--global-ranking",
            "--ignore", "fc", "--importance", "l1", "--seed", "3", "--no-verify",
            "--input-shape", "2,3,32,32", "--out", str(out_dir)]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "verify:" not in out
    code, out, err = run(capsys, *argv)  # writing over an earlier output is fine
    assert code == 0, err
    manifest = json.loads((out_dir / "fxprune.json").read_text())
    assert manifest["input_shapes"] == [[2, 3, 32, 32]]
    model = fxprune.io.load(out_dir)
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 4 == 0 for w in widths)


@pytest.mark.parametrize("argv,message", [
    (["--importance", "bogus"], r"error: unknown importance 'bogus'"),
    (["--ignore", "no.such.layer"], r"error: ignore: 'no.such.layer' is not a module"),
    (["--pipeline", "no-such-pass"], r"error: .*no-such-pass"),
])
def test_core_errors_exit_2(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, "prune", "resnet20", "--out", str(tmp_path / "o"), *argv)
    assert code == 2
    assert re.search(message, err), err


def test_analyze(capsys):
    code, out, err = run(capsys, "analyze", "resnet20")
    assert code == 0, err
    assert out.startswith("model: resnet20 (CifarResNet), input 1x3x32x32")
    assert len(out.splitlines()) > 2


def test_analyze_with_the_export_front_end_finds_the_same_groups(capsys):
    code, out, err = run(capsys, "analyze", "resnet20")
    code_x, out_x, err_x = run(capsys, "analyze", "resnet20", "--frontend", "export")
    assert code == 0 and code_x == 0, err_x
    assert "front end: fx" in out and "front end: export" in out_x
    first = lambda text: next(l for l in text.splitlines() if "channel groups" in l)  # noqa: E731
    assert first(out).split(", front end")[0] == first(out_x).split(", front end")[0]


def test_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fxprune", "models"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resnet110" in proc.stdout


def test_prune_to_a_macs_budget_with_a_policy(capsys, tmp_path):
    out_dir = tmp_path / "budget"
    code, out, err = run(capsys, "prune", "resnet20", "--target-macs", "0.5", "--policy", "outer",
                         "--importance", "lamp", "--out", str(out_dir))
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["after"]["macs"] <= 0.5 * report["before"]["macs"]
    assert report["after"]["macs"] > 0.3 * report["before"]["macs"]
    assert "verify: checked" in out


@pytest.mark.parametrize("argv, stderr", [
    (["prune", "resnet20", "--target-macs", "-3", "--out", "x"], "is not a budget"),
    (["prune", "resnet20", "--policy", "sideways", "--out", "x"], "invalid choice"),
])
def test_budget_and_policy_usage_errors(capsys, argv, stderr):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert stderr in err


def test_prune_a_language_model_with_token_ids(capsys, tmp_path):
    code, out, err = run(capsys, "prune", "fxprune.blocks:Llama", "--input-shape", "1,8",
                         "--token-ids", "40", "--policy", "heads", "--out", str(tmp_path / "llama"))
    assert code == 0, err
    assert "input 1x8 token ids < 40" in out and "verify: checked" in out
    assert (tmp_path / "llama" / "module.py").exists()
    code, out, err = run(capsys, "prune", "--token-ids", "0", "--out", str(tmp_path / "x"))
    assert code != 0 and "positive integer" in err


def test_an_untrained_model_with_vanishing_outputs_gets_the_calibrate_hint_then_verifies(capsys, tmp_path):
    pytest.importorskip("torchvision")
    args = ("prune", "torchvision:mobilenet_v3_small", "--input-shape", "1,3,64,64", "--ratio", "0.3")
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "a"))
    assert code == 2 and "degenerate" in err and "--calibrate-bn" in err
    assert not (tmp_path / "a" / "module.py").exists()
    code, out, _ = run(capsys, *args, "--calibrate-bn", "2", "--out", str(tmp_path / "b"))
    assert code == 0, out
    assert "BatchNorm calibrated on 2 random batches" in out
    err = float(re.search(r"max rel\. error (\S+)", out).group(1))
    assert err < 1e-6
    assert (tmp_path / "b" / "module.py").exists()
