"""Direct calls into the LAPACK that torch itself links (MKL on x86 CPU builds), for the QR kernel's leaves.

``torch.geqrf`` copies its input into a fresh column-major tensor and returns another one; the streaming QR
kernel (``qr_update``) factors hundreds of narrow column panels per update, in place in its own column-major
scratch, so it calls LAPACK ``?geqrf`` on that scratch through ctypes instead (no allocation, no copy).

MKL threads small LAPACK calls badly: with two threads a geqrf of a tall 16-column panel is several times slower
than with one (fork/join per reflector), and a thread shared with another process makes it worse.
``single_threaded()`` runs the calls of the current thread on one MKL thread (``mkl_set_num_threads_local``);
the large GEMMs outside it keep every thread. ``svd`` is the SVD of every solve (COALA and the baselines) with
that policy for matrices narrower than 2048.

Availability: the symbols are looked up once in the loaded ``libtorch_cpu`` (MKL builds export the Fortran
LAPACK entry points, LP64); a self-check against ``torch.geqrf`` on a small matrix guards against an ABI
mismatch (e.g. 64-bit integers). Anything missing or wrong: ``geqrf_`` returns False and the caller falls back
to ``torch.geqrf``; ``single_threaded()`` does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["SVD_ONE_THREAD_BELOW", "available", "can_set_threads", "geqrf_", "set_thread_local_threads",
           "single_threaded", "svd"]

SVD_ONE_THREAD_BELOW = 2048  # min(out, in) below which ``svd`` runs on one MKL thread

_STATE: dict[str, object] = {}


def _library() -> ctypes.CDLL | None:
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


def _load() -> dict[str, object]:
    if _STATE:
        return _STATE
    _STATE["geqrf"] = {}
    _STATE["threads"] = None
    lib = _library()
    if lib is not None:
        p = ctypes.c_void_p
        for dtype, symbol in ((torch.float32, "sgeqrf_"), (torch.float64, "dgeqrf_")):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.argtypes = [p] * 8
                fn.restype = None
                _STATE["geqrf"][dtype] = fn
        setter = getattr(lib, "MKL_Set_Num_Threads_Local", None)  # the C interface (by value)
        if setter is not None:
            setter.argtypes = [ctypes.c_int]
            setter.restype = ctypes.c_int
            _STATE["threads"] = setter
        for dtype in list(_STATE["geqrf"]):
            if not _self_check(dtype):
                del _STATE["geqrf"][dtype]
    return _STATE


def _self_check(dtype: torch.dtype) -> bool:
    """geqrf_ of a small matrix equals torch.geqrf's (same LAPACK: bit for bit up to a tiny tolerance)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 9, dtype=dtype, generator=g)  # row-major 5 × 9 = column-major 9 × 5, ld 9
    ref, tau_ref = torch.geqrf(A.T.contiguous())
    a, tau = A.clone(), torch.zeros(5, dtype=dtype)
    if not _call(a.T, tau, torch.empty(64 * 5, dtype=dtype)):
        return False
    return bool(torch.allclose(a.T, ref, atol=1e-5) and torch.allclose(tau, tau_ref, atol=1e-5))


def _call(A: Tensor, tau: Tensor, work: Tensor) -> bool:
    fn = _STATE["geqrf"].get(A.dtype)
    if fn is None:
        return False
    m, n = A.shape
    ints = [ctypes.c_int(v) for v in (m, n, A.stride(1), work.numel(), 0)]
    ref = ctypes.byref
    fn(ref(ints[0]), ref(ints[1]), A.data_ptr(), ref(ints[2]), tau.data_ptr(), work.data_ptr(), ref(ints[3]),
       ref(ints[4]))
    if ints[4].value != 0:
        raise RuntimeError(f"LAPACK geqrf failed with info = {ints[4].value}")
    return True


def available(dtype: torch.dtype) -> bool:
    """Whether ``geqrf_`` can factor ``dtype`` (float32 / float64) in place."""
    return dtype in _load()["geqrf"]


def geqrf_(A: Tensor, tau: Tensor, work: Tensor) -> bool:
    """In place: LAPACK geqrf of the column-major (m × n) view ``A`` (stride (1, ld), ld ≥ m, on the CPU).

    Afterwards A holds R on and above the diagonal and the Householder vectors below it (unit diagonal
    implied), exactly as ``torch.geqrf`` returns them; ``tau`` (≥ n values, contiguous) receives the scalars.
    ``work``: contiguous scratch of the same dtype, ≥ 64·n values. Returns False (nothing done) when no LAPACK
    is reachable for A's dtype.
    """
    if not available(A.dtype):
        return False
    if A.stride(0) != 1 or A.stride(1) < max(A.shape[0], 1) or A.device.type != "cpu":
        raise ValueError("geqrf_ needs a column-major CPU view (stride (1, ld) with ld >= rows)")
    return _call(A, tau, work)


def can_set_threads() -> bool:
    """Whether MKL's per-thread thread count can be set (``set_thread_local_threads``)."""
    return _load()["threads"] is not None


def set_thread_local_threads(count: int) -> int:
    """MKL calls of the current thread use ``count`` threads (0: the process-wide setting again); returns the
    previous per-thread setting (0 when there was none, or when MKL is not reachable)."""
    setter = _load()["threads"]
    return int(setter(int(count))) if setter is not None else 0


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """MKL calls of the current thread run on one thread inside the block (other threads are not affected)."""
    setter = _load()["threads"]
    if setter is None:
        yield
        return
    previous = setter(1)
    try:
        yield
    finally:
        setter(previous)


def svd(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(M, full_matrices=False)`` (U, S, Vh), the SVD of every solve; on one MKL thread when
    ``min(M.shape) < SVD_ONE_THREAD_BELOW`` on the CPU: MKL's threaded gesdd is several times slower than one
    thread on such matrices (1536 × 576 on this project's 2-core machine: 0.10 s on one thread, 0.7 s on two)."""
    if M.device.type == "cpu" and min(M.shape) < SVD_ONE_THREAD_BELOW:
        with single_threaded():
            return torch.linalg.svd(M, full_matrices=False)
    return torch.linalg.svd(M, full_matrices=False)
