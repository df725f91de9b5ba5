#!/usr/bin/env python
"""Latency of compiled pruned models against the compiled original, every ratio side by
side in one run: eager original, eager pruned, compiled original (``torch.compile``,
inductor on CPU by default) and compiled pruned (``torch.compile(model,
backend=fxprune.backend(ratio=r, then=...))``), at each batch size.

    python tools/bench_compile.py                                   # the issue's table (slow on CPU)
    python tools/bench_compile.py --models resnet18 --batch 1 --ratios 0.3 0.5 --repeat 10
    python tools/bench_compile.py --models resnet50 --then eager     # the backend without inductor
    python tools/bench_compile.py --via prune                        # torch.compile(fxprune.prune(...).module)

Models are torchvision's with ``weights=None`` in eval mode (latency does not depend
on the weights), run under ``torch.inference_mode``. Each cell is the median of
``--repeat`` timed runs after ``--warmup`` untimed ones, in milliseconds; ``x`` is the
speedup over the compiled original (eager columns: over the eager original). "params"
counts what the compiled pruned graph holds. A graph the backend did not prune is
marked with the reason (see fxprune.backend). Compile times (first call) are printed
below the table. Machines are noisy: compare the columns of one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fxprune

DEFAULT_MODELS = ["resnet50", "mobilenet_v2", "vit_b_16", "convnext_tiny"]


def build(name: str) -> torch.nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None).eval()


def latency(fn, x, warmup: int, repeat: int) -> float:
    """Median milliseconds of ``fn(x)``."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)


def first_call(fn, x) -> float:
    """Seconds of the first call (the compile, for a compiled model)."""
    t = time.perf_counter()
    with torch.inference_mode():
        fn(x)
    return time.perf_counter() - t


def _backend_name(column: str) -> str:
    return "eager" if column == "compiled-eager" else column


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bench(name: str, batch: int, ratios: list[float], args) -> tuple[dict, list[str]]:
    model = build(name)
    size = 224 if args.size is None else args.size
    x = torch.randn(batch, 3, size, size)
    cells: dict[str, tuple[float, str]] = {}
    notes: list[str] = []
    torch._dynamo.reset()
    base_eager = latency(model, x, args.warmup, args.repeat)
    cells["eager orig"] = (base_eager, f"{params(model) / 1e6:.1f}M")
    pruned = {r: fxprune.prune(model, x, ratio=r, report=False).module for r in ratios}
    for r, m in pruned.items():
        ms = latency(m, x, args.warmup, args.repeat)
        cells[f"eager r={r}"] = (ms, f"{base_eager / ms:.2f}x {params(m) / 1e6:.1f}M")
    if args.then == "eager":
        args.then = "compiled-eager"  # a column name apart from the eager ones
    compiled = torch.compile(model, backend=_backend_name(args.then), dynamic=False)
    notes.append(f"{name} b={batch}: compile original {first_call(compiled, x):.1f}s")
    base = latency(compiled, x, args.warmup, args.repeat)
    cells[f"{args.then} orig"] = (base, f"{params(model) / 1e6:.1f}M")
    for r in ratios:
        torch._dynamo.reset()
        if args.via == "prune":
            be = None
            fn = torch.compile(pruned[r], backend=_backend_name(args.then), dynamic=False)
        else:
            be = fxprune.backend(ratio=r, then=_backend_name(args.then), verify=False)
            fn = torch.compile(model, backend=be, dynamic=False)
        notes.append(f"{name} b={batch}: compile r={r} {first_call(fn, x):.1f}s")
        ms = latency(fn, x, args.warmup, args.repeat)
        if be is None:
            held = params(pruned[r])
            why = ""
        else:
            held = sum(rec.params_after if rec.reason is None else params(rec.module) for rec in be.records)
            why = "; ".join(f"graph {rec.index} unpruned: {rec.reason}" for rec in be.records if rec.reason)
            if why:
                notes.append(f"{name} b={batch} r={r}: {why}")
        cells[f"{args.then} r={r}"] = (ms, f"{base / ms:.2f}x {held / 1e6:.1f}M" + (" (!)" if why else ""))
    torch._dynamo.reset()
    return cells, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5])
    ap.add_argument("--then", default="inductor", help="the backend after pruning (default inductor)")
    ap.add_argument("--via", choices=["backend", "prune"], default="backend",
                    help="compiled pruned: through fxprune's torch.compile backend (default), or "
                         "torch.compile of fxprune.prune's module")
    ap.add_argument("--size", type=int, default=None, help="image size (default 224)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, notes = [], []
    for name in args.models:
        for batch in args.batch:
            cells, n = bench(name, batch, args.ratios, args)
            rows.append((name, batch, cells))
            notes.extend(n)
            print(f"done {name} batch {batch}", flush=True)
    cols = list(rows[0][2])
    head = ["model", "batch"] + [f"{c} ms" for c in cols]
    table = [head] + [[name, str(b)] + [f"{cells[c][0]:.1f} ({cells[c][1]})" for c in cols]
                      for name, b, cells in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.then}, "
          f"compiled pruned via {args.via}")
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
