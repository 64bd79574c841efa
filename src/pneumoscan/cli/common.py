"""What the command modules share: the ``--model`` option, progress, output folders, summaries."""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
from pathlib import Path
from typing import Iterator

EXIT_OUT_OF_SCOPE = 3  # no file failed, but the gate stopped at least one input


def file_error(path: str, err: str) -> str:
    """One failed file as a line: the error, with the path in front unless the error names it already."""
    return err if path in err else f"{path}: {err}"


def print_file_errors(errors) -> None:
    """Each ``(path, error)`` of the files a command could not use, one line each on stderr."""
    for path, err in errors:
        print(f"pneumoscan: error: {file_error(path, err)}", file=sys.stderr)


def progress_enabled() -> bool:
    """Progress bars only on a terminal (they go to stderr; logs and pipes get none), never with -q."""
    return os.environ.get("PNEUMOSCAN_PROGRESS", "1") == "1" and sys.stderr.isatty()


def command_line() -> str:
    """The command as the user typed it (recorded in config.json)."""
    return "pneumoscan " + shlex.join(sys.argv[1:])


def add_model_arg(p, required: bool = False) -> None:
    p.add_argument("--model", default=None, metavar="DIR", required=required,
                   help="model directory" + ("" if required else " (default: the shipped model, or $PNEUMOSCAN_MODEL)"))


def add_val_data_arg(p, use: str = "its val split is used") -> None:
    """``--data``: where a command takes the model's validation split from."""
    p.add_argument("--data", default=None,
                   help=f"training folder or manifest CSV ({use}; default: the model's manifest.csv)")


def positive_int(text: str) -> int:
    import argparse
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def tame_lightning() -> None:
    """Lightning attaches an INFO console handler at import; keep it to warnings unless -vv."""
    import logging

    import lightning  # noqa: F401  (import first: the handler is created then)

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for h in logging.getLogger("lightning").handlers:
            h.setLevel(logging.WARNING)


def is_worker_rank() -> bool:
    """True in the extra processes of multi-device training (Lightning sets their rank variables)."""
    return any(int(os.environ.get(k, "0") or 0) != 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def add_overwrite(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing, non-empty output folder (as a whole, only once the new one is complete)")


def check_out(args, kind: str = "dir") -> Path:
    """Check ``args.out`` before any work: ``model`` = a folder replaced as a whole (empty, new, or
    --overwrite), ``dir`` = a writable folder, ``file`` = a writable file path that is none of the inputs."""
    from ..errors import PneumoscanError
    from ..io import check_new_dir, check_writable

    if not str(args.out).strip():  # '' would resolve to the current folder
        raise PneumoscanError(f"--out is empty; give a {'file name' if kind == 'file' else 'folder'}")
    if kind == "model":
        check_not_an_input(args)
        return check_new_dir(args.out, getattr(args, "overwrite", False))
    if kind == "file":
        check_not_an_input(args, whole_folder=False)  # predict X.jpg --out X.jpg would overwrite the X-ray
    return check_writable(args.out, kind)


def check_not_an_input(args, whole_folder: bool = True) -> None:
    """An output replaced as a whole (a model folder, a file) must not be, nor hold, anything the command reads
    (its models, data, images, weights: every existing path among the arguments) nor the model shipped inside the
    package: ``ensemble a b --out b --overwrite`` would otherwise destroy a member once the new model is in place.
    ``whole_folder``: the output is a folder replaced as a whole, so with ``--overwrite`` an existing one must not lie
    inside an input folder either (``train DATA --out DATA/NORMAL --overwrite`` deleted the images; a new folder,
    or a file written beside the images it reads, is fine)."""
    from ..errors import PneumoscanError
    from ..nets.modeldir import PACKAGE_MODEL

    out = Path(args.out).resolve()
    replacing = getattr(args, "overwrite", False) and out.is_dir() and any(out.iterdir())  # a new folder harms nothing
    named = [("the model shipped inside pneumoscan", PACKAGE_MODEL)]
    for key, value in vars(args).items():
        if key in ("out", "func"):
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (str, os.PathLike)) and str(v) and Path(v).exists():
                named.append((f"the input {v}", Path(v).resolve()))
    for what, path in named:
        if path == out or out in path.parents:
            raise PneumoscanError(f"--out {args.out} {'is' if path == out else 'holds'} {what}; replacing it would "
                                  "destroy it: choose another --out")
        if whole_folder and replacing and path.is_dir() and path in out.parents:
            raise PneumoscanError(f"--out {args.out} lies inside {what}; replacing it would destroy what is there "
                                  "(train DATA --out DATA/NORMAL --overwrite deleted the images): choose a folder "
                                  "outside it")


def check_model_writable(model_dir) -> Path:
    """A model directory that a command rewrites in place: not the shipped model, and writable."""
    from ..errors import PneumoscanError
    from ..nets.modeldir import is_package_model, read_config

    d = Path(model_dir)
    read_config(d)
    if is_package_model(d):
        raise PneumoscanError(f"{d} is the model shipped inside pneumoscan and is read-only; copy it "
                              "(cp -r) and pass the copy with --model")
    if not os.access(d, os.W_OK | os.X_OK) or not os.access(d / "config.json", os.W_OK):
        raise PneumoscanError(f"{d} is not writable; copy the model directory somewhere writable and pass --model")
    from ..io import check_writable

    check_writable(d, "dir", "--model")  # tried, not only asked: a read-only mount passes access() as root
    return d


def check_inputs_exist(*paths) -> None:
    """Missing inputs are reported before anything heavy is imported."""
    from ..errors import DataError

    for p in paths:
        if p is not None and not Path(p).exists():
            raise DataError(f"{p} does not exist; check the path")


@contextlib.contextmanager
def new_model_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder to build a model directory in; it becomes ``out`` (replacing an older model
    there as a whole) with its MODEL_CARD.md once everything in the block has succeeded. Worker
    ranks of multi-device training get a scratch folder that is thrown away."""
    import tempfile

    from ..errors import PneumoscanError
    from ..evaluate.card import write_card
    from ..io import atomic_dir

    if is_worker_rank():
        with tempfile.TemporaryDirectory(prefix="pneumoscan-rank-") as scratch:
            yield Path(scratch)
        return
    with atomic_dir(out, overwrite=overwrite) as tmp:
        yield tmp
        try:
            write_card(tmp, shown_as=Path(out))
        except Exception as e:  # the work is done: keep it rather than throw it away with the temporary folder
            kept = keep_without_card(tmp, Path(out))
            raise PneumoscanError(f"{out}: the model was built but its card could not be written ({type(e).__name__}: "
                                  f"{e}); it is kept, without a card, in {kept}: run 'pneumoscan card --model {kept}', "
                                  f"then move it to {out}") from e


def keep_without_card(tmp: Path, out: Path) -> Path:
    """Move a built model folder whose card failed next to ``out`` as ``OUT.no-card`` (or ``.no-card-2`` ...)."""
    for i in range(1, 1000):
        kept = out.with_name(f"{out.name}.no-card" + (f"-{i}" if i > 1 else ""))
        if not kept.exists():
            os.replace(tmp, kept)
            return kept
    return tmp


def print_model_summary(out) -> None:
    """Two lines: where the model went, and its validation figures (train/finetune/ensemble)."""
    import json

    m = json.loads((Path(out) / "config.json").read_text())
    vm = m.get("val_metrics")
    epochs = f"  best epoch {m['best_epoch']}/{m['epochs_run']}," if "best_epoch" in m else ""
    print(f"model: {out}{epochs} threshold {m['threshold']:.3f}")
    if vm:
        v = vm["normal_vs_pneumonia"]
        print(f"validation ({vm['n']} images): 3-class acc {vm['three_class']['accuracy']:.3f}; normal vs pneumonia "
              f"acc {v['accuracy']:.3f} sens {v['sensitivity']:.3f} spec {v['specificity']:.3f} AUC {v['auc']:.4f}")
