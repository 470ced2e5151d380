"""The ``coala`` command line. Each sub-command lives in its own module of this package and exposes
``add_parser(subparsers)`` (which registers the command and sets ``func``, and optionally ``interrupt_hint``)
and is discovered automatically.

Errors: a ``coala.CoalaError`` and the other errors of bad input (ValueError, TypeError, FileNotFoundError,
KeyError, OSError) print one line ``coala CMD: error: ...`` and exit with status 2; anything else prints one line
saying so and exits with 1; Ctrl-C prints one line (with the sub-command's ``interrupt_hint``) and exits with
130. ``--debug`` (before or after the sub-command) also prints the traceback. Under torchrun, compress, compare
and lora-init run distributed and the other commands refuse (``coala.cli._launch``); error lines carry the rank.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, KeyError, OSError)  # CoalaError is a ValueError
DEBUG_HELP = "print the full traceback when the command fails"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coala", description="Context-aware low-rank approximation (COALA) of neural networks."
    )
    from coala.version import __version__

    parser.add_argument("--version", action="version", version=f"coala {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").add_parser(sub)
    for command in sub.choices.values():  # `coala compress ... --debug` works as well as `coala --debug compress`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False))
    from coala.cli._launch import launched_session, rank_tag

    tag = rank_tag()  # " [rank k]" under torchrun
    try:
        with launched_session(args):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None)
        print(f"coala {args.command}{tag}: interrupted{hint(args) if hint else ''}", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(f"coala {args.command}{tag}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        from coala.resume import SimulatedInterruption

        if isinstance(err, SimulatedInterruption):  # the tests' crash hook: a crash prints nothing
            raise
        if debug:
            traceback.print_exc()
        print(f"coala {args.command}{tag}: unexpected error: {type(err).__name__}: {_one_line(err)[:500]} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
