"""Save a pruned model as Python source plus weights; load it back.

:func:`save` writes a folder that is an importable Python package::

    pruned_resnet56/
        __init__.py    re-exports load() and the model class from module.py
        module.py      the model: a torch.nn.Module subclass whose forward is
                       the GraphModule's generated code, and load()
        weights.pt     {"state_dict": ..., "extra": ...}, loadable with
                       torch.load(..., weights_only=True)
        fxprune.json   manifest: format version, class name, sha256 of every
                       file, example input shapes
        report.json    the PruneReport, when a PruneResult was saved

Loading needs only torch (and whatever modules define the model's classes,
for a pruned torchvision model nothing but torch); fxprune is not needed.
The plain-PyTorch recipe::

    import sys
    sys.path.insert(0, "/path/to")          # the folder that holds pruned_resnet56/
    import pruned_resnet56
    model = pruned_resnet56.load()          # or .load(device="cuda")

or, without touching ``sys.path`` (any folder name works)::

    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "pruned_resnet56", "/path/to/pruned_resnet56/module.py")
    saved = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(saved)
    model = saved.load()

:func:`load` does the same after checking the manifest and checksums, and
raises :class:`~fxprune.errors.LoadError` naming the broken file. Loading
runs the folder's ``module.py``: only load folders you trust.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from fxprune._codegen import SaveError, emit_module
from fxprune._util import as_tuple
from fxprune.errors import LoadError

__all__ = ["save", "load", "check_save_target", "SaveError", "FORMAT_VERSION"]

FORMAT_VERSION = 1
MANIFEST = "fxprune.json"
_FORMAT = "fxprune-saved-model"
_OWN_FILES = ("__init__.py", "module.py", "weights.pt", "report.json", MANIFEST)
_INIT = '''"""{cls}, saved by fxprune: ``load()`` builds it with plain PyTorch (no fxprune)."""

from .module import {cls}, load  # noqa: F401
'''


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fxprune_version() -> str:
    try:
        from importlib.metadata import version

        return version("fxprune")
    except Exception:  # not installed (e.g. run from a source checkout)
        return "unknown"


def check_save_target(path: str | os.PathLike) -> Path:
    """Check that :func:`save` may write to `path` and return it as a Path.

    `path` may be missing, an empty folder, or a folder an earlier
    :func:`save` wrote (it is overwritten).

    Raises
    ------
    SaveError
        If `path` is a file, or a non-empty folder fxprune did not write.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SaveError(f"{path} is a file; pass a folder path for the saved model")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).is_file():
        raise SaveError(f"{path} is a non-empty folder that fxprune did not write; "
                        "pass a new or empty folder")
    return path


def _graph_module(obj: Any) -> torch.fx.GraphModule:
    module = obj.module if hasattr(obj, "module") and not isinstance(obj, torch.nn.Module) else obj
    if isinstance(module, torch.fx.GraphModule):
        return module
    if isinstance(module, torch.nn.Module):
        raise SaveError(f"save() takes a torch.fx.GraphModule or a PruneResult, got a plain "
                        f"{type(module).__name__}; trace it first "
                        "(torch.fx.symbolic_trace(model)) or pass fxprune.prune's result")
    raise SaveError(f"save() takes a torch.fx.GraphModule or a PruneResult, "
                    f"got {type(obj).__name__}")


def _check_round_trip(gm: torch.fx.GraphModule, path: Path, inputs: tuple) -> None:
    """Load the folder back and require identical outputs on `inputs` (bit-exact on CPU)."""
    if gm.training:
        return  # dropout and batch statistics make train-mode outputs differ run to run
    device = next((t.device for t in gm.state_dict().values()), torch.device("cpu"))
    loaded = load(path, device=device)
    with torch.no_grad():
        expected, got = tree_leaves(gm(*inputs)), tree_leaves(loaded(*inputs))

    def equal(a, b) -> bool:
        if not isinstance(a, torch.Tensor):
            return a == b
        if a.device.type == "cpu":
            return torch.equal(a, b)
        # accelerator kernels may pick another algorithm for the second module
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    same = len(expected) == len(got) and all(equal(a, b) for a, b in zip(expected, got))
    if not same:
        raise SaveError(f"the model loaded back from {path} gives different outputs than "
                        "the saved one; please report this as an fxprune bug")


def save(result_or_module: Any, path: str | os.PathLike, *,
         example_inputs: Any = None, check: bool = True) -> Path:
    """Write a model as a folder of Python source plus weights.

    Parameters
    ----------
    result_or_module : torch.fx.GraphModule or PruneResult
        The model, or any object whose ``.module`` is a GraphModule; an
        object's ``.report`` (with ``to_dict()``) is written to report.json.
    path : str or os.PathLike
        The folder to write: new, empty, or written by an earlier save.
    example_inputs : torch.Tensor or tuple, optional
        Recorded in the manifest; with `check`, the folder is loaded back and
        must reproduce the model's outputs on them bit for bit.
    check : bool
        Run that round-trip check (eval-mode models only).

    Returns
    -------
    pathlib.Path
        The folder written.

    Raises
    ------
    SaveError
        If the input is not a GraphModule, `path` is not a valid target, or
        the model holds something that cannot be written as source.
    """
    gm = _graph_module(result_or_module)
    path = check_save_target(path)
    emitted = emit_module(gm)
    inputs = None if example_inputs is None else as_tuple(example_inputs)
    report = getattr(result_or_module, "report", None)
    path.mkdir(parents=True, exist_ok=True)
    for name in _OWN_FILES:  # never leave a stale file of an earlier save behind
        (path / name).unlink(missing_ok=True)
    (path / "module.py").write_text(emitted.source)
    (path / "__init__.py").write_text(_INIT.format(cls=emitted.class_name))
    torch.save({"state_dict": emitted.state_dict, "extra": emitted.extra}, path / "weights.pt")
    files = ["__init__.py", "module.py", "weights.pt"]
    if report is not None and hasattr(report, "to_dict"):
        (path / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        files.append("report.json")
    manifest = {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "class_name": emitted.class_name,
        "fxprune_version": _fxprune_version(),
        "torch_version": torch.__version__,
        "files": {name: _sha256(path / name) for name in files},
        "input_shapes": None if inputs is None else [
            list(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs],
        "input_dtypes": None if inputs is None else [
            str(x.dtype) if isinstance(x, torch.Tensor) else None for x in inputs],
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if inputs is not None and check:
        _check_round_trip(gm, path, inputs)
    return path


def _read_manifest(path: Path) -> dict:
    if not path.exists():
        raise LoadError(f"{path} does not exist; pass the folder that fxprune.save wrote")
    if not path.is_dir():
        raise LoadError(f"{path} is not a folder; pass the folder that fxprune.save wrote, "
                        "not a file inside it")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise LoadError(f"{manifest_path} is missing, so {path} is not a folder written by "
                        "fxprune.save; save the model again")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(f"{manifest_path} is not valid JSON ({exc}); "
                        "save the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise LoadError(f"{manifest_path} is not an fxprune manifest; save the model again")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        hint = ("upgrade fxprune" if isinstance(version, int) and version > FORMAT_VERSION
                else "save the model again")
        raise LoadError(f"{manifest_path} has format version {version!r}, this fxprune reads "
                        f"version {FORMAT_VERSION}; {hint}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not {"module.py", "weights.pt"} <= files.keys():
        raise LoadError(f"{manifest_path} does not list module.py and weights.pt; "
                        "save the model again")
    return manifest


def _verify_files(path: Path, files: dict) -> None:
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise LoadError(f"{file} is missing; the folder is incomplete: copy the whole "
                            "folder again or save the model again")
        if _sha256(file) != digest:
            raise LoadError(f"{file} does not match its sha256 checksum in {MANIFEST}: the "
                            "file changed or is corrupt after saving; save the model again")


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a folder written by :func:`save`.

    Parameters
    ----------
    path : str or os.PathLike
        The saved folder.
    device : str or torch.device
        Where to put the model's tensors.

    Returns
    -------
    torch.nn.Module
        The saved model (an instance of the class in ``module.py``), whose
        outputs equal the saved module's bit for bit.

    Raises
    ------
    LoadError
        If the folder is missing, incomplete, of another format version, a
        file fails its checksum, or the weights or code cannot be loaded.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    _verify_files(path, manifest["files"])
    weights = path / "weights.pt"
    try:
        tensors = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoadError(f"{weights} cannot be loaded ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); "
                        "save the model again") from exc
    if not isinstance(tensors, dict) or not {"state_dict", "extra"} <= tensors.keys():
        raise LoadError(f"{weights} does not hold fxprune weights (a dict with 'state_dict' "
                        "and 'extra'); save the model again")
    source = path / "module.py"
    name = f"_fxprune_saved_{manifest['files']['module.py'][:16]}"
    try:
        spec = importlib.util.spec_from_file_location(name, source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:
        raise LoadError(f"{source} cannot be imported ({type(exc).__name__}: {exc}); "
                        "install the packages it imports or save the model again") from exc
    try:
        return module.load(device=device, tensors=tensors)
    except Exception as exc:
        if "loading state_dict" in str(exc):
            detail = " ".join(str(exc).split())
            raise LoadError(f"{weights} does not match the model in {source} ({detail}); "
                            "save the model again") from exc
        raise LoadError(f"{source} failed to build the model ({type(exc).__name__}: {exc}); "
                        "save the model again") from exc
