"""The ``fxprune`` command line: prune, analyze and list models.

Every command builds its model from a spec (see :func:`fxprune.models.resolve_model`)
in eval mode and feeds it a seeded ``torch.randn`` input of ``--input-shape``.
Errors fxprune raises on purpose print ``error: <message>`` and exit with 2;
anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fxprune.errors import FxpruneError

__all__ = ["main", "build_parser"]

_EPILOG = """\
examples:
  fxprune prune --ratio 0.5 --out pruned_resnet56
  fxprune prune resnet20 --ratio 0.3 --importance l1 --round-to 4 --out r20
  fxprune prune torchvision:resnet50 --ratio 0.5 --global-ranking --out pruned_r50
  fxprune prune mypkg.nets:make_net --input-shape 1,3,64,64 --ignore head --out small
  fxprune analyze torchvision:resnet18
  fxprune models

a MODEL is a built-in name (see 'fxprune models'), torchvision:NAME, or
package.module:factory (a function called with no arguments).
"""

_PRUNE_EPILOG = """\
examples:
  fxprune prune --ratio 0.5 --out pruned_resnet56
  fxprune prune resnet110 --ratio 0.6 --global-ranking --out r110
  fxprune prune torchvision:vgg16_bn --ratio 0.5 --round-to 8 --ignore classifier.6 --out vgg
  fxprune prune resnet20 --out r20 \
      --pipeline "channel-deps,score-magnitude{p=1},select{ratio=0.4},rewrite"

the output folder loads with fxprune.load(DIR), or with plain PyTorch:
  import sys; sys.path.insert(0, "PARENT_OF_DIR"); import DIR; model = DIR.load()
"""


def _input_shape(text: str) -> tuple[int, ...]:
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape; write positive sizes separated by commas, e.g. 1,3,32,32")
    return shape


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a ratio in [0, 1), e.g. 0.5")
    return value


def _budget(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a budget: give a positive number "
                                         f"(e.g. 2e8) or a fraction of the original (e.g. 0.5)")
    return value if value < 1 else int(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="resnet56", metavar="MODEL",
                   help="model spec: built-in name, torchvision:NAME or "
                        "package.module:factory (default: resnet56)")
    p.add_argument("--input-shape", type=_input_shape, metavar="SHAPE",
                   help="example input shape, e.g. 1,3,32,32 (default: 1,3,32,32 for "
                        "built-ins, 1,3,299,299 for inception_v3, else 1,3,224,224)")
    p.add_argument("--token-ids", type=_positive_int, metavar="VOCAB",
                   help="make the example input random token ids in [0, VOCAB) of --input-shape "
                        "(e.g. 1,16) instead of floats: language models")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed for the model's initialization and the example input (default: 0)")
    p.add_argument("--calibrate-bn", type=_positive_int, default=0, metavar="N",
                   help="recompute BatchNorm statistics on N random batches first: an untrained "
                        "model (torchvision's weights=None) can shrink its outputs to nothing, which "
                        "no check can compare. Not for trained models (their statistics are replaced)")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``fxprune`` command."""
    parser = argparse.ArgumentParser(
        prog="fxprune", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Structural pruning of PyTorch models with torch.fx: remove whole "
                    "channels and emit a smaller model as plain PyTorch code.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    prune = sub.add_parser(
        "prune", help="prune a model and save it as source + weights",
        description="Prune a model, check it against the oracle, print the before/after "
                    "table and write the pruned model to a folder.",
        epilog=_PRUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(prune)
    prune.add_argument("--ratio", type=_ratio, default=None,
                       help="fraction of channels removed from each group (default: 0.5, or "
                            "what a --target-* budget needs)")
    prune.add_argument("--target-macs", type=_budget, metavar="N",
                       help="prune until MACs are at most N (a number, or a fraction in (0, 1) "
                            "of the original)")
    prune.add_argument("--target-params", type=_budget, metavar="N",
                       help="prune until parameters are at most N (number or fraction)")
    prune.add_argument("--importance", default="l2", metavar="NAME",
                       help="channel importance criterion: l1, l2, bn-scale, lamp, fpgm, random "
                            "(default: l2; data-driven criteria need the Python API)")
    prune.add_argument("--policy", choices=("inner", "outer", "head_dim", "heads", "both"),
                       default="inner",
                       help="where a view splits channels into heads x head_dim: prune head_dim "
                            "(inner or head_dim, default), whole blocks (outer), whole attention "
                            "heads (heads: an error without heads or for a ratio that is not a "
                            "whole number of heads) or heads then head_dim (both)")
    prune.add_argument("--gqa", choices=("kv_groups", "q_heads"), default="kv_groups",
                       help="grouped-query attention with whole heads: remove whole kv groups "
                            "(default) or the same query heads inside every group")
    prune.add_argument("--isomorphic", action="store_true",
                       help="rank channels globally among groups of identical structure")
    prune.add_argument("--out", required=True, metavar="DIR",
                       help="folder to write the pruned model to (new, empty, or an earlier "
                            "fxprune output)")
    prune.add_argument("--global-ranking", action="store_true",
                       help="rank channels across all groups instead of within each group")
    prune.add_argument("--round-to", type=_positive_int, default=1, metavar="N",
                       help="keep channel counts a multiple of N (default: 1)")
    prune.add_argument("--ignore", action="extend", nargs="+", default=[], metavar="NAME",
                       help="qualified module names whose output channels are kept "
                            "(repeatable)")
    prune.add_argument("--pipeline", metavar="TEXT",
                       help="run this pass pipeline instead of the default, e.g. "
                            "'channel-deps,score-magnitude{p=2},select{ratio=0.5},rewrite'")
    prune.add_argument("--no-verify", action="store_true",
                       help="skip the oracle check of the pruned model")
    _add_frontend_arg(prune)
    prune.set_defaults(func=_cmd_prune)

    analyze = sub.add_parser(
        "analyze", help="print the channel groups of a model",
        description="Trace a model and print its channel groups: which channels are coupled, "
                    "which are pinned and why.",
        epilog="examples:\n  fxprune analyze torchvision:resnet18\n"
               "  fxprune analyze torchvision:vit_b_16 --dot vit.dot   (draw: dot -Tsvg vit.dot -o vit.svg)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(analyze)
    _add_frontend_arg(analyze)
    analyze.add_argument("--dot", metavar="FILE", help="also write the group graph (groups, tensors, "
                         "the ops that couple, mix or pin them) as Graphviz DOT text")
    analyze.add_argument("--svg", metavar="FILE", help="also draw the group graph as SVG (needs "
                         "Graphviz's dot program)")
    analyze.set_defaults(func=_cmd_analyze)

    simplify = sub.add_parser(
        "simplify", help="remove dead channels losslessly and save the smaller model",
        description="Remove the channels that provably carry only a constant (all-zero weight rows, "
                    "zero norm scales, as sparse training leaves them), fold the constant into the "
                    "consumers' biases, check that the outputs are unchanged, print the before/after "
                    "table and, with --out, write the smaller model.",
        epilog="examples:\n  fxprune simplify torchvision:resnet18 --calibrate-bn 2\n"
               "  fxprune simplify mypkg.models:slimmed_net --threshold 1e-6 --out small/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(simplify)
    _add_frontend_arg(simplify)
    simplify.add_argument("--threshold", type=float, default=0.0, metavar="T",
                          help="weights at most T times the largest of their tensor count as zero "
                               "(default: 0, exact; a positive T is no longer lossless and the check "
                               "is then the oracle's only)")
    simplify.add_argument("--out", metavar="DIR", help="folder to write the smaller model to")
    simplify.set_defaults(func=_cmd_simplify)

    models = sub.add_parser("models", help="list the built-in models",
                            description="List the built-in models and their sizes.")
    models.set_defaults(func=_cmd_models)
    return parser


def _add_frontend_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                        help="how the model is captured: symbolic tracing, falling back to "
                             "torch.export where tracing fails (auto, default), or only one of them")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fxprune")
    except Exception:  # running from a source checkout that is not installed
        return "0.1.0"


def _model_and_input(args: argparse.Namespace):
    import torch

    from fxprune.models import calibrate_batchnorm, default_input_shape, resolve_model

    shape = args.input_shape or default_input_shape(args.model)
    torch.manual_seed(args.seed)
    model = resolve_model(args.model).eval()
    vocab = getattr(args, "token_ids", None)
    x = torch.randint(0, vocab, shape) if vocab else torch.randn(shape)
    kind = f" token ids < {vocab}" if vocab else ""
    batches = getattr(args, "calibrate_bn", 0)
    calibrated = f", BatchNorm calibrated on {batches} random batches" if batches else ""
    print(f"model: {args.model} ({type(model).__name__}), input {'x'.join(map(str, shape))}{kind}, "
          f"seed {args.seed}{calibrated}")
    if batches:
        calibrate_batchnorm(model, x, batches, seed=args.seed)
    return model, x


def _cmd_prune(args: argparse.Namespace) -> int:
    from fxprune.io import check_save_target, save

    check_save_target(args.out)  # fail before the work, not after it
    model, x = _model_and_input(args)
    import fxprune

    budget = {k: v for k, v in (("target_macs", args.target_macs), ("target_params", args.target_params))
              if v is not None}
    result = fxprune.prune(model, x, ratio=args.ratio, importance=args.importance,
                           global_ranking=args.global_ranking, round_to=args.round_to,
                           ignore=list(args.ignore), pipeline=args.pipeline, policy=args.policy,
                           isomorphic=args.isomorphic, frontend=args.frontend, gqa=args.gqa,
                           progress=None, **budget)
    if not args.no_verify:
        from fxprune.errors import DegenerateReferenceError

        try:
            check = fxprune.verify(model, result, x)
        except DegenerateReferenceError as exc:  # an untrained model at a small input size
            hint = "--calibrate-bn 4 (an untrained model)" if not args.calibrate_bn else "a larger --input-shape"
            raise DegenerateReferenceError(f"{exc}. From the command line: {hint}; or --no-verify to "
                                           f"write the pruned model without the check") from None
        print(f"verify: {check.summary()}")
    print()
    print(result.report)
    print()
    path = save(result, args.out, example_inputs=x)
    print(f"saved: {path}/ (load with fxprune.load({str(path)!r}) or plain PyTorch, "
          f"see {path / 'module.py'})")
    return 0


def _cmd_simplify(args: argparse.Namespace) -> int:
    from fxprune.io import check_save_target, save

    if args.out:
        check_save_target(args.out)
    model, x = _model_and_input(args)
    import fxprune

    result = fxprune.eliminate_dead_channels(model, x, threshold=args.threshold, frontend=args.frontend)
    if result.plan.n_removed == 0:
        print("no dead channels: every channel carries something that depends on the input")
        return 0
    print(f"removed {result.plan.n_removed} dead channels in {len(result.plan.removed_per_group)} groups; "
          f"outputs checked against the model and the oracle")
    print()
    print(result.report)
    if args.out:
        path = save(result, args.out, example_inputs=x)
        print(f"\nsaved: {path}/")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    model, x = _model_and_input(args)
    import fxprune

    groups = fxprune.analyze(model, x, frontend=args.frontend)
    print(groups)
    if args.dot:
        from fxprune.group_graph import to_dot

        with open(args.dot, "w") as f:
            f.write(to_dot(groups))
        print(f"group graph: {args.dot}")
    if args.svg:
        from fxprune.group_graph import write_svg

        write_svg(groups, args.svg)
        print(f"group graph: {args.svg}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from fxprune.models import BUILTIN_MODELS, default_input_shape
    from fxprune.report import count_params, human

    print(f"{'name':<12}{'params':>8}  input       description")
    for name, factory in BUILTIN_MODELS.items():
        shape = ",".join(map(str, default_input_shape(name)))
        doc = (factory.__doc__ or "").strip().splitlines()[0].split(" (")[0]
        print(f"{name:<12}{human(count_params(factory())):>8}  {shape:<12}{doc}")
    print("\nalso: torchvision:NAME (any torchvision.models name) and package.module:factory")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fxprune`` command line and return its exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 2 for a usage error or an error fxprune raised on purpose.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except FxpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
