#!/usr/bin/env python
"""Accuracy of the pruning criteria and regularizers on a synthetic CIFAR-like task.

The script makes its own data (no downloads): 10 classes of 32x32 colour images,
each class an oriented grating of its own orientation, frequency and tint, at a
random phase, contrast and position, under a distractor grating and Gaussian
noise. It trains a CIFAR ResNet-20 on the CPU, then for every criterion
(``l1``, ``l2`` and every ``score-*`` pass registered in ``fxprune.known_passes()``)
prunes it to half the MACs with ``fxprune.prune(target_macs=0.5)``, checks the
result with ``fxprune.verify`` and fine-tunes it for as many epochs as the base
training. Each regularizer (slimming, group lasso, growing regularization)
continues training the base model with its penalty first, then prunes to the
same budget and fine-tunes. It prints one table of test accuracies.

    python tools/bench_criteria.py              # about 5-10 minutes on 2 cores
    python tools/bench_criteria.py --quick      # 16x16 images, fewer samples: about a minute

The activation-aware criteria (wanda, flap, activation) also run with adaptive
allocation and bias compensation (``adaptive=True, compensate="bias"``); a ResNet's
3x3 convs are padded, so only the consumers that can fold a mean are compensated.

Every run starts from the same base model and data order; accuracies of a few
percent apart are within noise on this small test set.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time

import torch
import torch.nn.functional as F

import fxprune
from fxprune.models import resnet20
from fxprune.passes_base import make_pass

REGULARIZERS = ("slimming", "group-lasso", "growing-reg")


# -- data --------------------------------------------------------------------------
def make_dataset(n: int, size: int, seed: int, noise: float = 1.8) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``size`` x ``size`` and their labels (10 classes, balanced)."""
    gen = torch.Generator().manual_seed(seed)
    cls_gen = torch.Generator().manual_seed(1234)  # the classes are the same for every split
    angle = torch.arange(10) * math.pi / 10
    freq = torch.tensor([2.0, 3.0, 4.0, 2.5, 3.5] * 2)
    tint = F.normalize(torch.rand(10, 3, generator=cls_gen) + 0.2, dim=1)
    y = torch.arange(n) % 10
    y = y[torch.randperm(n, generator=gen)]
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def grating(labels, amplitude):
        phase = torch.rand(n, 1, 1, generator=gen) * 2 * math.pi
        a, f = angle[labels][:, None, None], freq[labels][:, None, None]
        wave = torch.sin(2 * math.pi * f * (xx * torch.cos(a) + yy * torch.sin(a)) + phase)
        cx, cy = (torch.rand(2, n, 1, 1, generator=gen) * 0.6 + 0.2)
        window = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.12)  # a blob at a random position
        return amplitude[:, None, None, None] * tint[labels][:, :, None, None] * (wave * window)[:, None]

    contrast = torch.rand(n, generator=gen) * 1.0 + 0.75
    distractor = (y + torch.randint(1, 10, (n,), generator=gen)) % 10
    x = grating(y, contrast) + grating(distractor, contrast * 0.5)
    x = x + noise * torch.randn(n, 3, size, size, generator=gen)
    return x, y


# -- training ------------------------------------------------------------------------
def batches(x, y, batch_size, seed):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


def train(model, data, epochs, *, lr, batch_size, seed, reg=None):
    """SGD with momentum and a cosine learning rate; ``reg.step()`` after every backward."""
    x, y = data
    steps = epochs * math.ceil(len(x) / batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for epoch in range(epochs):
        for xb, yb in batches(x, y, batch_size, seed + epoch):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            if reg is not None:
                reg.step()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, data, batch_size=500):
    model.eval()
    x, y = data
    hits = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
               for i in range(0, len(x), batch_size))
    return 100.0 * hits / len(x)


# -- the runs --------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    method: str
    macs: float = float("nan")
    params: float = float("nan")
    sparse: float | None = None
    pruned: float = float("nan")
    tuned: float = float("nan")
    err: float = float("nan")
    seconds: float = 0.0
    note: str = ""


def criteria(selected=None) -> list[str]:
    found = ["l1", "l2"] + [p[len("score-"):] for p in fxprune.known_passes()
                            if p.startswith("score-") and p != "score-magnitude"]
    return [c for c in found if selected is None or c in selected]


def data_driven(name: str) -> bool:
    if name in ("l1", "l2"):
        return False
    return "data" in {f.name for f in dataclasses.fields(make_pass(f"score-{name}", {}))}


def finish(row, base, result, example, splits, args, started):
    """Verify, measure, fine-tune and fill ``row`` for one pruning result."""
    row.err = fxprune.verify(base, result, example).max_rel_err
    row.macs = result.report.macs_ratio
    row.params = result.report.params_ratio
    row.pruned = accuracy(result.module, splits["test"])
    tuned = train(result.module, splits["train"], args.epochs, lr=args.lr / 2, batch_size=args.batch_size,
                  seed=args.seed + 100)
    row.tuned = accuracy(tuned, splits["test"])
    row.seconds = time.perf_counter() - started
    return row


ACTIVATION_AWARE = ("wanda", "flap", "activation")  # also run with adaptive allocation and bias compensation


def run_criterion(name, base, example, calib, splits, args, variant=None):
    started = time.perf_counter()
    row = Row(name if variant is None else f"{name} adaptive+bias")
    extra = dict(data=calib) if data_driven(name) else {}
    if variant is not None:
        extra.update(adaptive=True, compensate="bias", data=calib)
    try:
        result = fxprune.prune(base, example, importance=name, target_macs=args.target_macs,
                               global_ranking=args.global_ranking and variant is None, **extra)
    except fxprune.FxpruneError as exc:
        row.note = f"{type(exc).__name__}: {exc}"[:60]
        return row
    return finish(row, base, result, example, splits, args, started)


def run_regularizer(name, base, example, ratio, splits, args):
    started = time.perf_counter()
    model = copy.deepcopy(base)
    steps = args.reg_epochs * math.ceil(len(splits["train"][0]) / args.batch_size)
    if name == "slimming":
        reg = fxprune.regularize.Slimming(model, example, reg=args.slimming_reg)
    elif name == "group-lasso":
        reg = fxprune.regularize.GroupLasso(model, example, reg=args.group_lasso_reg)
    else:  # the ceiling is reached after 70% of the steps
        reg = fxprune.regularize.GrowingReg(model, example, ratio=ratio, delta=1.0 / max(1, int(0.7 * steps)),
                                            interval=1, ceiling=1.0,
                                            select_options=dict(global_ranking=args.global_ranking))
    train(model, splits["train"], args.reg_epochs, lr=args.lr / 2, batch_size=args.batch_size,
          seed=args.seed + 50, reg=reg)
    row = Row(f"{name} (+{args.reg_epochs} ep)", sparse=accuracy(model, splits["test"]))
    budget = dict(ratio=ratio) if name == "growing-reg" else dict(target_macs=args.target_macs)
    result = reg.prune(**budget, global_ranking=args.global_ranking)
    return finish(row, model, result, example, splits, args, started)


def fmt(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>{spec.split('.')[0]}}"
    return format(v, spec)


def table(rows, base_acc):
    head = (f"{'method':<26}{'MACs':>7}{'params':>8}{'base':>7}{'sparse':>8}{'pruned':>8}{'tuned':>7}"
            f"{'oracle':>9}{'sec':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.method:<26}{fmt(r.macs, '7.3f')}{fmt(r.params, '8.3f')}{base_acc:7.1f}"
                     f"{fmt(r.sparse, '8.1f')}{fmt(r.pruned, '8.1f')}{fmt(r.tuned, '7.1f')}"
                     f"{fmt(r.err, '9.1e')}{r.seconds:6.0f}" + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--quick", action="store_true", help="16x16 images, 2000 samples, less noise, 2 epochs")
    p.add_argument("--train-size", type=int, default=4000, help="training images (default 4000)")
    p.add_argument("--test-size", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--image-size", type=int, default=32, help="image side (default 32)")
    p.add_argument("--noise", type=float, default=1.8, help="std of the pixel noise (default 1.8)")
    p.add_argument("--epochs", type=int, default=3, help="base training epochs = fine-tune epochs (default 3)")
    p.add_argument("--reg-epochs", type=int, default=2, help="sparse-training epochs of the regularizers")
    p.add_argument("--lr", type=float, default=0.05, help="base learning rate (fine-tuning uses half)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--target-macs", type=float, default=0.5, help="MACs budget, a fraction (default 0.5)")
    p.add_argument("--global-ranking", action="store_true", help="rank channels across groups")
    p.add_argument("--criteria", nargs="*", default=None, help="only these criteria (default: all found)")
    p.add_argument("--regularizers", nargs="*", default=list(REGULARIZERS), choices=REGULARIZERS)
    p.add_argument("--slimming-reg", type=float, default=3e-3, help="L1 factor of slimming")
    p.add_argument("--group-lasso-reg", type=float, default=3e-2, help="factor of group lasso")
    p.add_argument("--calib-batches", type=int, default=4, help="calibration batches for data-driven criteria")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on shared cores more threads are much slower)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.image_size, args.noise = 2000, 500, 16, 0.4
        args.epochs, args.reg_epochs = 2, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    splits = {"train": make_dataset(args.train_size, args.image_size, args.seed + 1, args.noise),
              "test": make_dataset(args.test_size, args.image_size, args.seed + 2, args.noise)}
    base = train(resnet20(), splits["train"], args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    base_acc = accuracy(base, splits["test"])
    print(f"base ResNet-20: {base_acc:.1f}% test accuracy after {args.epochs} epochs on "
          f"{args.train_size} {args.image_size}x{args.image_size} images ({time.perf_counter() - t0:.0f}s)",
          flush=True)
    example = splits["test"][0][:4]
    calib = list(batches(*splits["train"], args.batch_size, args.seed + 7))[:args.calib_batches]
    rows = []
    for name in criteria(args.criteria):
        for variant in (None, "adaptive") if name in ACTIVATION_AWARE else (None,):
            rows.append(run_criterion(name, base, example, calib, splits, args, variant))
            print(f"  {rows[-1].method}: tuned {fmt(rows[-1].tuned, '.1f')}% ({rows[-1].seconds:.0f}s)", flush=True)
    control = Row("unpruned (+ft)", macs=1.0, params=1.0, seconds=time.perf_counter())
    control.tuned = accuracy(train(copy.deepcopy(base), splits["train"], args.epochs, lr=args.lr / 2,
                                   batch_size=args.batch_size, seed=args.seed + 100), splits["test"])
    control.seconds = time.perf_counter() - control.seconds
    rows.insert(0, control)
    ratio = fxprune.prune(base, example, target_macs=args.target_macs,
                          global_ranking=args.global_ranking).budget.ratio
    for name in args.regularizers:
        rows.append(run_regularizer(name, base, example, ratio, splits, args))
        print(f"  {name}: tuned {fmt(rows[-1].tuned, '.1f')}% ({rows[-1].seconds:.0f}s)", flush=True)
    print()
    print(f"test accuracy (%) on {args.test_size} images; MACs/params: fraction of the base kept; "
          f"pruned/tuned: before/after {args.epochs} fine-tune epoch(s); sparse: after the "
          f"regularizer's training; oracle: fxprune.verify relative error")
    print(table(rows, base_acc))
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
