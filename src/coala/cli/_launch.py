"""torchrun support (docs/design.md §12): ``torchrun --nproc-per-node N -m coala CMD ...`` (CMD: compress, compare
or lora-init; the other commands refuse torchrun) joins the process group (gloo on the CPU, NCCL on CUDA with
device = cuda:LOCAL_RANK), checks that every rank runs the same command line, keeps ranks other than 0 quiet (no
progress bars, no output; their errors are still printed, tagged with the rank) and leaves the group at the end.
Without torchrun nothing happens."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

_RANK_SPECIFIC = {"device", "func", "interrupt_hint", "debug"}
DISTRIBUTED_COMMANDS = ("compress", "compare", "lora-init")


def rank_tag() -> str:
    """" [rank k]" under torchrun, else ""."""
    from coala.distributed import launched

    return f" [rank {os.environ.get('RANK', '?')}]" if launched() else ""


def command_line(args: argparse.Namespace) -> dict:
    """The parsed options that must agree across ranks (plain values; the device is per rank)."""
    plain = (str, int, float, bool, type(None), list, tuple)
    return {k: v for k, v in sorted(vars(args).items()) if k not in _RANK_SPECIFIC and isinstance(v, plain)}


@contextlib.contextmanager
def launched_session(args: argparse.Namespace) -> Iterator[None]:
    """The command's run under torchrun (see the module docstring); a plain run otherwise."""
    from coala import distributed

    if not distributed.launched():
        yield
        return
    if args.command not in DISTRIBUTED_COMMANDS:
        from coala.errors import CoalaError

        raise CoalaError(f"coala {args.command} does not run distributed (only {', '.join(DISTRIBUTED_COMMANDS)} "
                         "do): start it without torchrun", argument="torchrun")
    device = distributed.init_from_env(device=getattr(args, "device", None))
    try:
        with distributed.failure_guard():
            distributed.check_same(command_line(args), "the command line")
            if hasattr(args, "device") and device is not None and device.type == "cuda":
                args.device = str(device)
            if distributed.rank() != 0 and hasattr(args, "progress"):
                args.progress = False
            if distributed.is_main():
                yield
            else:
                with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                    yield
    finally:
        distributed.shutdown()
