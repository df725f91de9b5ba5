#!/usr/bin/env python
"""Fuzz fxprune with random networks from fxprune.testing for a while.

Every example is a network drawn from a strategy (CNN DAGs, attention blocks,
recurrent nets, conv-stem/attention hybrids) with a fresh random seed (not
derandomized, unlike the CI tests), pruned at a drawn ratio (and, for attention,
a drawn head policy), then checked: the pruned graph lints, fxprune.verify (the
oracle) passes, the user's model is untouched and the pruned model runs with
the original's output shapes. A failure is shrunk by Hypothesis to a minimal
network before it is reported.

    python tools/fuzz.py --minutes 5                       # every strategy, 5 minutes
    python tools/fuzz.py --minutes 1 --strategy attention --seed 7
    python tools/fuzz.py --minutes 10 --strategy cnn --ratio 0.9
    python tools/fuzz.py --examples 200 --strategy recurrent --no-shrink
    python tools/fuzz.py --strategy cnn --replay 1234567   # a failing batch again, from its report

At the end it prints, per strategy, the examples run and the failures, then each
distinct failure: its shrunk example (the drawn configuration with its torch
seed, the module, the prune options), the error, and the command that replays
it. The exit status is 1 if anything failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

import fxprune
from fxprune import testing

try:
    import hypothesis
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    sys.exit("tools/fuzz.py needs Hypothesis: pip install 'fxprune[testing]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fxprune.__file__)))
STRATEGIES = {
    "cnn": testing.cnn_dags,
    "attention": testing.attention_blocks,
    "recurrent": testing.recurrent_nets,
    "mixed": testing.mixed_nets,
}


def _options(family: str):
    """Prune options drawn with each network, per family: (network, options) pairs."""
    nets = STRATEGIES[family]
    if family == "attention":
        def with_policy(policy):
            blocks = nets(min_heads=2) if policy == "both" else nets()
            return st.tuples(blocks, st.fixed_dictionaries({"policy": st.just(policy),
                                                            "gqa": st.sampled_from(["kv_groups", "q_heads"])}))
        return st.sampled_from(["inner", "outer", "both"]).flatmap(with_policy)
    if family == "mixed":
        return st.tuples(nets(), st.fixed_dictionaries({"policy": st.sampled_from(["inner", "outer"])}))
    return st.tuples(nets(), st.just({}))


def check(model: torch.nn.Module, inputs: tuple, options: dict) -> None:
    """Prune ``model`` and check the result; raise on anything wrong."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = fxprune.prune(model, inputs, **options)
    result.module.graph.lint()
    fxprune.verify(model, result, inputs)
    after = model.state_dict()
    changed = [k for k, v in before.items() if k not in after or not torch.equal(after[k], v)]
    if changed or after.keys() != before.keys():
        raise AssertionError(f"prune modified the user's model: {changed or 'its state_dict keys'}")
    with torch.no_grad():
        ref, got = model(*inputs), result.module(*inputs)
    ref_shapes = [tuple(t.shape) for t in pytree.tree_leaves(ref)]
    got_shapes = [tuple(t.shape) for t in pytree.tree_leaves(got)]
    if ref_shapes != got_shapes:
        raise AssertionError(f"the pruned model's outputs have shapes {got_shapes}, the original's {ref_shapes}")


@dataclass
class Failure:
    strategy: str
    error: str
    example: str
    options: dict
    config: dict
    hypothesis_seed: int
    notes: list[str] = field(default_factory=list)
    count: int = 1


@dataclass
class Stats:
    examples: int = 0
    failures: int = 0
    seconds: float = 0.0


def _describe(e: BaseException) -> str:
    """The error and where in fxprune (or passes/) it was raised, innermost last."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if f"{os.sep}fxprune{os.sep}" in f.filename or f"{os.sep}passes{os.sep}" in f.filename]
    shown = (ours or frames)[-4:]
    if frames and frames[-1] not in shown:  # where it was raised, outside fxprune (torch, the model)
        shown.append(frames[-1])
    where = "".join(f"  at {_short(f.filename)}:{f.lineno} in {f.name}\n" for f in shown)
    return f"{where}{type(e).__name__}: {e}"


def _short(filename: str) -> str:
    if filename.startswith(ROOT + os.sep):
        return os.path.relpath(filename, ROOT)
    parts = filename.split(os.sep)
    return os.sep.join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else filename


def _signature(strategy: str, error: str) -> str:
    """Failures that differ only in numbers are the same bug."""
    first = error.strip().splitlines()[-1] if error.strip() else error
    return strategy + ":" + re.sub(r"[-+]?\d[\d.e+-]*", "N", first)


def run_batch(family: str, batch_seed: int, args, stats: Stats, deadline: float) -> Failure | None:
    """One Hypothesis run of up to ``args.batch`` examples; returns its (shrunk) failure."""
    last: dict = {}
    ratios = st.sampled_from(args.ratio)

    phases = [Phase.generate] if args.no_shrink else [Phase.generate, Phase.shrink]

    @hypothesis.seed(batch_seed)
    @hypothesis.settings(max_examples=args.batch, deadline=None, derandomize=False, database=None,
                         phases=phases, report_multiple_bugs=False, print_blob=True,
                         suppress_health_check=list(HealthCheck))
    @given(case=_options(family), ratio=ratios)
    def fuzz(case, ratio):
        (drawn, options) = case
        model, inputs = drawn
        options = {"ratio": ratio, "importance": args.importance, **options}
        generating = not last.get("failed")
        if generating and time.monotonic() > deadline:
            return  # out of time: the rest of the batch passes without running
        t = time.monotonic()
        try:
            check(model, inputs, options)
        except Exception as e:
            last.update(failed=True, error=_describe(e), example=repr(drawn), options=options,
                        config=dict(model.drawn_config))
            raise
        finally:
            if generating:
                stats.examples += 1
                stats.seconds += time.monotonic() - t
                _progress(args, force=False)

    try:
        fuzz()
    except Exception as e:
        if not last.get("failed"):  # Hypothesis itself failed (e.g. a flaky test)
            last.update(error=f"{type(e).__name__}: {e}", example="(see the notes)", options={}, config={})
        return Failure(family, last["error"], last["example"], last["options"], last["config"], batch_seed,
                       list(getattr(e, "__notes__", [])))
    return None


_STATE: dict = {}


def _progress(args, force: bool) -> None:
    now = time.monotonic()
    if not force and now - _STATE.get("printed", 0.0) < (0.5 if _STATE["tty"] else 30.0):
        return
    _STATE["printed"] = now
    elapsed = now - _STATE["start"]
    parts = [f"{name} {s.examples}" + (f" ({s.failures} failed)" if s.failures else "")
             for name, s in _STATE["stats"].items()]
    limit = f"/{_STATE['limit'] / 60:.1f} min" if _STATE["limit"] else ""
    line = f"[{elapsed / 60:5.1f}{limit}] " + ", ".join(parts)
    if _STATE["tty"]:
        sys.stderr.write("\r" + line[:shutil_columns() - 1].ljust(shutil_columns() - 1))
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def shutil_columns() -> int:
    import shutil

    return shutil.get_terminal_size((100, 20)).columns


def _ratio(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < r < 1.0:
        raise argparse.ArgumentTypeError(f"a ratio is in (0, 1), not {r}")
    return r


def _positive(kind):
    def parse(text: str):
        v = kind(text)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return v
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="tools/fuzz.py",
        description="Fuzz fxprune.prune + fxprune.verify with random networks from fxprune.testing "
                    "(new random seeds every run) for a given time, and report every failure, shrunk "
                    "to a minimal network.",
        epilog="Exit status: 0 when nothing failed, 1 when something did, 2 for bad arguments. "
               "Examples: 'tools/fuzz.py --minutes 5', 'tools/fuzz.py --minutes 2 --strategy attention "
               "--seed 3', 'tools/fuzz.py --strategy cnn --ratio 0.9 --examples 300'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=_positive(float), default=5.0,
                   help="how long to fuzz (new examples stop after it; a failure being shrunk finishes)")
    p.add_argument("--examples", type=_positive(int), default=None,
                   help="stop after this many examples in all, even before --minutes")
    p.add_argument("--strategy", choices=[*STRATEGIES, "all"], default="all",
                   help="which network family to draw: cnn (conv DAGs), attention (attention blocks), "
                        "recurrent (LSTM/GRU/RNN), mixed (conv stem + attention/MLP), or all in turn")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for the sequence of Hypothesis seeds (default: a random one, printed), so "
                        "that a run can be repeated")
    p.add_argument("--ratio", type=_ratio, nargs="+", default=[0.25, 0.5, 0.7], metavar="R",
                   help="pruning ratios to draw from")
    p.add_argument("--importance", default="l2", help="fxprune.prune's importance criterion")
    p.add_argument("--batch", type=_positive(int), default=10,
                   help="examples per Hypothesis run (each run has its own seed)")
    p.add_argument("--no-shrink", action="store_true",
                   help="report failures as found, without shrinking them (faster)")
    p.add_argument("--threads", type=_positive(int), default=1,
                   help="torch intra-op threads (the networks are tiny: 1 is fastest)")
    p.add_argument("--max-failures", type=_positive(int), default=20,
                   help="stop after this many failures")
    p.add_argument("--replay", type=int, default=None, metavar="HYPOTHESIS_SEED",
                   help="run the one batch with this Hypothesis seed (as a report prints it, with the "
                        "same --strategy, --ratio, --importance and --batch) and report its failure again")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    logging.getLogger("torch").setLevel(logging.CRITICAL)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    families = list(STRATEGIES) if args.strategy == "all" else [args.strategy]
    stats = {f: Stats() for f in families}
    failures: dict[str, Failure] = {}
    start = time.monotonic()
    deadline = start + args.minutes * 60
    _STATE.update(start=start, limit=args.minutes * 60, stats=stats, tty=sys.stderr.isatty())
    print(f"fuzzing {', '.join(families)} for {args.minutes:g} min (--seed {seed}), ratios "
          f"{args.ratio}, torch {torch.__version__}, fxprune {fxprune.__version__}", file=sys.stderr)
    n_failed = 0
    if args.replay is not None:
        if len(families) != 1:
            print("--replay needs the --strategy the failure was found with", file=sys.stderr)
            return 2
        deadline = math.inf
    try:
        turn = 0
        while time.monotonic() < deadline and n_failed < args.max_failures:
            if args.examples is not None and sum(s.examples for s in stats.values()) >= args.examples:
                break
            family = families[turn % len(families)]
            turn += 1
            batch_seed = rng.getrandbits(64) if args.replay is None else args.replay
            failure = run_batch(family, batch_seed, args, stats[family], deadline)
            if failure is not None:
                stats[family].failures += 1
                n_failed += 1
                key = _signature(family, failure.error)
                if key in failures:
                    failures[key].count += 1
                else:
                    failures[key] = failure
                    if _STATE["tty"]:
                        sys.stderr.write("\n")
                    print(f"FAILURE in {family}: {failure.error.strip().splitlines()[-1]}", file=sys.stderr)
            if args.replay is not None:
                break
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    _progress(args, force=True)
    if _STATE["tty"]:
        sys.stderr.write("\n")
    report(stats, failures, seed, time.monotonic() - start, args)
    return 1 if failures else 0


def report(stats: dict[str, Stats], failures: dict[str, Failure], seed: int, seconds: float, args) -> None:
    print(f"\n{'strategy':<10} {'examples':>9} {'failures':>9} {'s/example':>10}")
    for name, s in stats.items():
        per = f"{s.seconds / s.examples:.3f}" if s.examples else "-"
        print(f"{name:<10} {s.examples:>9} {s.failures:>9} {per:>10}")
    total = sum(s.examples for s in stats.values())
    print(f"{'total':<10} {total:>9} {sum(s.failures for s in stats.values()):>9}   in {seconds / 60:.1f} min, "
          f"--seed {seed}")
    for i, f in enumerate(failures.values(), 1):
        print(f"\n=== failure {i}: {f.strategy} (seen {f.count}x; hypothesis seed {f.hypothesis_seed}) ===")
        if f.config:
            print(f"configuration: {f.config}")
        print(f"prune options: {f.options}")
        print(f"example (shrunk): {f.example}")
        print(f"error:\n{f.error}")
        if f.example == "(see the notes)":
            print("\n".join(f.notes))
        ratios = " ".join(str(r) for r in args.ratio)
        print(f"replay: python tools/fuzz.py --strategy {f.strategy} --ratio {ratios} --importance "
              f"{args.importance} --batch {args.batch} --replay {f.hypothesis_seed}")
    if not failures:
        print("\nno failures")


if __name__ == "__main__":
    sys.exit(main())
