"""Fault injection for the reliability tests: crash a writer at a given write step, and a read-only folder.

``killed_at(step, fn)`` forks; the child sets ``COALA_KILL_AT_WRITE_STEP=step`` (``coala.integrity.fault_point``
then SIGKILLs it at that step: no cleanup, no ``finally``, like a power cut of the process) and runs ``fn``.
Forking keeps this fast: the child inherits the imported torch / transformers and the built models.
"""

from __future__ import annotations

import os
import signal
import subprocess
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from coala import integrity

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="fault injection forks a child process")


def killed_at(step: int, fn: Callable[[], object]) -> bool:
    """Run ``fn`` in a forked child that is SIGKILLed at write step ``step``; True when it was killed, False when
    ``fn`` finished first (the child failing in any other way fails the test)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.environ[integrity.KILL_ENV] = str(step)
            integrity.reset_write_steps()
            fn()
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, f"the child failed at step {step} (exit {os.WEXITSTATUS(status)})"
    return False


def every_step(fn: Callable[[], object], check: Callable[[int], None], limit: int = 100) -> int:
    """Kill ``fn`` at write step 1, 2, ... and call ``check(step)`` after each, until ``fn`` runs to the end;
    returns the number of write steps."""
    for step in range(1, limit):
        if not killed_at(step, fn):
            return step - 1
        check(step)
    raise AssertionError(f"still writing after {limit} steps")


@contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` (root only; skips the test where mounting is not allowed)."""
    if getattr(os, "geteuid", lambda: 1)() != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              check=False)
    except FileNotFoundError:  # no mount command
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("a tmpfs cannot be mounted here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """A folder nothing can be written in: mode 0o555, or (root ignores modes) a read-only tmpfs mounted there."""
    path.mkdir()
    if getattr(os, "geteuid", lambda: 1)() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    with _tmpfs(path, "ro,size=64k"):
        yield path


@contextmanager
def full_disk(path: Path, size_kib: int = 32) -> Iterator[Path]:
    """A folder on a file system of ``size_kib`` KiB (a small tmpfs): writing more fails with ENOSPC."""
    path.mkdir()
    with _tmpfs(path, f"size={size_kib}k"):
        yield path
