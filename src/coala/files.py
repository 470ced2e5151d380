"""File-system helpers for saved folders: normal permissions and an atomic, durable write of a whole folder."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .integrity import replace_dir

__all__ = ["atomic_folder", "normal_modes", "umask"]


def umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_modes(folder: str | os.PathLike) -> None:
    """Give ``folder``, its sub-folders and files the modes ``save_pretrained`` gives: 0777 / 0666 under the
    umask (0755 / 0644 with the usual 022), instead of ``mkdtemp``'s 0700 and the 0600 of files written
    through a private temporary file. Links are left alone."""
    mask = umask()
    root = Path(folder)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = 0o777 if path.is_dir() else 0o666
        if path.is_file() and os.stat(path).st_mode & stat.S_IXUSR:
            mode = 0o777  # keep an executable executable
        os.chmod(path, mode & ~mask)


@contextmanager
def atomic_folder(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it gets normal modes and replaces ``out``
    (an existing ``out`` only with ``overwrite``), on any error it is removed and ``out`` is untouched.

    Raises FileExistsError when ``out`` exists and is a file, or a non-empty folder without ``overwrite``.
    """
    out = Path(os.path.abspath(out))
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"output path {out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"output folder {out} exists and is not empty (pass overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        normal_modes(tmp)
        replace_dir(tmp, out)  # fsynced, then renamed or swapped in (the one implementation, shared with io.py)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
