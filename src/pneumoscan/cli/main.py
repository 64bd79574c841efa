"""Command line: ``pneumoscan COMMAND ...``. Each command lives in ``pneumoscan.cli.<name>`` and is a
thin layer over the Python API (its options come from the config dataclasses, :mod:`.flags`);
errors a user can fix become one line ``pneumoscan: error: ...`` and exit 2."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import warnings

from .. import INTENDED_USE, __version__
from ..errors import PneumoscanError

ORDER = ["run", "data", "extract", "train", "evaluate", "predict", "compare", "finetune", "pretrain", "ensemble", "soup", "qat",
         "threshold", "calibrate", "scope_suite", "adapt", "robustness", "explain", "visualize", "export", "serve", "card",
         "check", "cache", "bench", "backbones"]
NOT_COMMANDS = {"main", "common", "flags"}  # modules of this package that are not commands


class OneLineParser(argparse.ArgumentParser):
    """argparse's refusals in the project's form: one line naming the option and the value, exit 2, with a pointer
    to --help instead of the whole usage block above it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="pneumoscan",
        description="Pediatric chest X-ray classifier: normal / bacterial / viral pneumonia.",
        epilog=INTENDED_USE)
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    package = sys.modules[__package__]
    names = {m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")} - NOT_COMMANDS
    for name in [n for n in ORDER if n in names] + sorted(names - set(ORDER)):
        try:
            importlib.import_module(f"{__package__}.{name}").register(sub)
        except ImportError as e:  # an optional dependency is missing: the command says so when used
            _unavailable(sub, name, e)
    _verbosity_everywhere(parser)
    return parser


def _verbosity_everywhere(parser: argparse.ArgumentParser) -> None:
    """-q and -v work after the command too (``pneumoscan train ... -q``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names = {o for a in sub._actions for o in a.option_strings}
                if "-q" not in names:
                    sub.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                                     help="only warnings and errors; no progress bars")
                if "-v" not in names:
                    sub.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                                     help="more log output (-vv for debug)")
                _verbosity_everywhere(sub)


def _unavailable(sub, name: str, err: Exception) -> None:
    def fail(_args) -> int:
        raise PneumoscanError(f"command {name!r} is unavailable: {err}; reinstall pneumoscan with its dependencies")

    sub.add_parser(name, help=f"(unavailable: {err})").set_defaults(func=fail)


_CHATTY = ("lightning", "pytorch_lightning", "onnx_ir", "onnxscript", "torch.onnx", "torch._dynamo", "torch.export")


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Library INFO chatter (Lightning, the ONNX exporter's passes) stays out of the CLI's output."""
    return record.levelno >= logging.WARNING or not record.name.startswith(_CHATTY)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:  # libraries set their own loggers to INFO: keep their chatter out of our output
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_libraries)
    # Lightning 2.6 warns about its own use of a deprecated torch API on every fit: not actionable here.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    os.environ.setdefault("PNEUMOSCAN_PROGRESS", "0" if args.quiet else "1")
    try:
        rc = args.func(args)
    except PneumoscanError as e:
        print(f"pneumoscan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pneumoscan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # the file system refused mid-run (a full disk, a path that vanished): one line, not a trace
        if args.verbose > 1:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"pneumoscan: error: {where}{e.strerror or e}; check the path and the free space (-vv: the traceback)",
              file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
