"""Durable writes and integrity checks of the files coala writes and reads.

- ``atomic_write``: a file goes to a temporary name in its folder, is fsynced, renamed into place, and the
  folder is fsynced: after a crash or a power loss the file is the old one or the complete new one.
- ``replace_dir``: a finished temporary folder (every file and the folder fsynced) takes the place of another;
  an existing one is swapped atomically where the OS can (Linux ``renameat2(RENAME_EXCHANGE)``).
- ``safetensors_header``: the tensor list of a ``.safetensors`` file, after checking that the header parses and
  the data section is complete (a truncated or empty file raises ``CoalaFileError`` naming it);
  ``sha256_file`` / ``check_sha256``: the checksum coala records for every weights file and verifies on load.
- ``check_model_class``: a saved folder's ``coala.json`` class and its ``config.json`` describe one model.
- ``fault_point``: the fault-injection hook of the tests. With ``COALA_KILL_AT_WRITE_STEP=k`` in the
  environment, the process kills itself (SIGKILL: no cleanup runs) at the k-th write step (1-based); every
  step of the save and checkpoint paths calls it, so a test can crash the writer between any two steps.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from .errors import CoalaError, CoalaFileError

__all__ = ["KILL_ENV", "WRITE_ERRORS", "atomic_write", "check_file", "check_model_class", "check_sha256",
           "fault_point", "fsync_dir", "fsync_tree", "replace_dir", "reset_write_steps", "safetensors_header",
           "sha256_file", "write_steps"]

KILL_ENV = "COALA_KILL_AT_WRITE_STEP"
WRITE_ERRORS = (OSError, SafetensorError)  # what a failed write raises (safetensors reports ENOSPC as its own)
_steps = 0


def fault_point(label: str) -> None:
    """One write step (``label`` says which): counted while ``COALA_KILL_AT_WRITE_STEP`` is set, and the
    process is killed with SIGKILL when the count reaches its value (a testing hook, like
    ``COALA_INTERRUPT_AFTER_BLOCK``)."""
    global _steps
    target = os.environ.get(KILL_ENV)
    if target is None:
        return
    _steps += 1
    if _steps == int(target):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def write_steps() -> int:
    """Write steps counted so far in this process (only while ``COALA_KILL_AT_WRITE_STEP`` is set)."""
    return _steps


def reset_write_steps() -> None:
    global _steps
    _steps = 0


# ---------------------------------------------------------------------------------------------- durable writes
def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the folder's entries (a rename, a new file) durable; a no-op where folders cannot be opened."""
    if os.name != "posix":
        return
    fsync_file(path)


def fsync_tree(folder: Path) -> None:
    """fsync every file below ``folder``, then every folder (deepest first)."""
    dirs = []
    for root, _, files in os.walk(folder):
        dirs.append(root)
        for name in files:
            fsync_file(os.path.join(root, name))
    for d in reversed(dirs):
        fsync_dir(d)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """``write(tmp)`` to a temporary sibling of ``path``, fsync it, rename it to ``path``, fsync the folder.
    An OSError (disk full, permissions) becomes a CoalaFileError naming ``path``; no temporary file is left."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        write(tmp)
        fsync_file(tmp)
        fault_point(f"{path.name} written")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, WRITE_ERRORS) and not isinstance(err, CoalaError):
            raise CoalaFileError(f"could not write {path}: {err}", path=path) from err
        raise
    fault_point(f"{path.name} renamed")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the OS or file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, out: Path) -> None:
    """Make the finished folder ``tmp`` durable and move it to ``out`` (a sibling). An existing ``out`` is
    swapped atomically with it (Linux), else moved aside first (a crash between the two renames leaves the
    old folder in ``.NAME.old-*``), and removed afterwards."""
    fsync_tree(tmp)
    fault_point("folder written")
    if not out.exists():
        os.replace(tmp, out)
        fsync_dir(out.parent)
        fault_point("folder renamed")
        return
    if _exchange(tmp, out):
        fsync_dir(out.parent)
        fault_point("folders swapped")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    fault_point("old folder moved aside")
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)
        shutil.rmtree(old, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    fault_point("folder renamed")
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- checks
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def check_sha256(path: Path, expected: str, recorded_in: Path) -> None:
    """CoalaFileError naming ``path`` when its SHA-256 is not the one ``recorded_in`` holds."""
    if sha256_file(path) != expected:
        raise CoalaFileError(
            f"{path} is damaged or was changed after it was saved: its SHA-256 differs from the one recorded in "
            f"{recorded_in}; copy or save the model again (coala.load(..., verify=False) skips this check)",
            path=path)


def check_file(path: Path, sha256: str | None, recorded_in: Path) -> None:
    """CoalaFileError naming ``path`` unless it is complete (for a ``.safetensors`` file: a header describing
    exactly its data) and, with ``sha256``, unchanged since that checksum was recorded in ``recorded_in``."""
    if path.suffix == ".safetensors":
        safetensors_header(path)
    if sha256 is not None:
        check_sha256(path, sha256, recorded_in)


_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
             "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape"}} of a .safetensors file, after checking that its header parses and
    that the data section holds exactly the bytes the header describes; CoalaFileError naming the file
    (empty, truncated, not a safetensors file) otherwise."""
    path = Path(path)

    def damaged(why: str) -> CoalaFileError:
        return CoalaFileError(f"{path} is damaged ({why}): it is not a complete safetensors file", path=path)

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 1 << 28):  # safetensors headers are at most 100 MB
            raise damaged(f"truncated: the header needs {n} bytes, the file holds {size - 8} after its length"
                          if n <= 1 << 28 else f"a header length of {n} bytes is not plausible")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise damaged(f"the header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise damaged("the header is not a JSON object")
    data, end, out = size - 8 - n, 0, {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in spec["data_offsets"])
            shape, dtype = [int(d) for d in spec["shape"]], str(spec["dtype"])
        except (KeyError, TypeError, ValueError):
            raise damaged(f"bad header entry for {name!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= stop or (dtype in _ITEMSIZE and stop - begin != numel * _ITEMSIZE[dtype]):
            raise damaged(f"bad data offsets of {name!r}")
        end = max(end, stop)
        out[name] = {"dtype": dtype, "shape": shape}
    if end != data:
        raise damaged(f"truncated: the header describes {end} bytes of tensor data, the file holds {data}"
                      if end > data else f"{data - end} unexpected bytes after the tensor data")
    return out


def check_model_class(cls: type, config, meta_path: Path) -> None:
    """CoalaError when the model class recorded in ``coala.json`` (``cls``) is for another kind of model than
    the saved ``config.json`` describes (e.g. a Llama class and a BERT config: the files of two models mixed)."""
    wanted = getattr(getattr(cls, "config_class", None), "model_type", None)
    found = getattr(config, "model_type", None)
    if wanted and found and wanted != found:
        raise CoalaError(
            f"{meta_path} records model class {cls.__name__} (a {wanted!r} model), but "
            f"{meta_path.parent / 'config.json'} describes a {found!r} model ({type(config).__name__}): the folder "
            "mixes the files of two models; save the compressed model again", path=meta_path)
