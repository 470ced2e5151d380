"""Independent pieces of CPU tensor work run side by side, one thread each (docs/design.md §11).

Small LAPACK calls and the narrow panels of the QR kernel do not speed up with more threads: MKL forks and
joins for every reflector, and on a machine whose cores are shared a second thread often makes them slower
(a 1536 × 576 SVD: 0.10 s on one thread, 0.7 s on two busy ones). What scales is running *independent* work
at once: the R factors of different row blocks (``RFactor`` lanes, merged at the end), or the SVDs of different
matrices. ``parallel_map`` does that on a pool of worker threads, each pinned to one thread for torch's OpenMP
loops and for MKL, so that the process never runs more compute threads than ``torch.get_num_threads()``.
torch releases the GIL inside its operators, so the workers run in parallel.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from . import lapack

__all__ = ["in_worker", "parallel_map", "worker_count"]

T = TypeVar("T")
R = TypeVar("R")

_LOCK = threading.Lock()
_POOL: dict[tuple[int, int], ThreadPoolExecutor] = {}
_INSIDE = threading.local()  # .active is True in a thread that runs a parallel_map item
_OMP: list = []


def _omp_setter() -> Callable[[int], object] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch uses (a per-thread setting), or None."""
    if not _OMP:
        fn = None
        lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
        for name in ("libgomp.so.1", "libiomp5.so", "libomp.so", "libgomp-a34b3233.so.1"):
            path = os.path.join(lib_dir, name)
            if os.path.exists(path):
                try:
                    fn = ctypes.CDLL(path).omp_set_num_threads
                    fn.argtypes, fn.restype = [ctypes.c_int], None
                except (OSError, AttributeError):
                    fn = None
                break
        _OMP.append(fn)
    return _OMP[0]


def _pin_to_one_thread() -> None:
    """Initializer of a worker: torch's OpenMP loops and MKL run on this thread alone."""
    torch.get_num_threads()  # torch's lazy per-thread setup first (it sets this thread's OpenMP/MKL counts)
    setter = _omp_setter()
    if setter is not None:
        setter(1)
    lapack.set_thread_local_threads(1)


def worker_count(device: torch.device | str | None = None) -> int:
    """How many pieces of work ``parallel_map`` runs at once: ``torch.get_num_threads()`` on the CPU when the
    workers can be pinned to one thread each, else 1 (and 1 on other devices)."""
    if device is not None and torch.device(device).type != "cpu":
        return 1
    if _omp_setter() is None or not lapack.can_set_threads():
        return 1
    return max(1, torch.get_num_threads())


def in_worker() -> bool:
    """Whether the calling thread is running a ``parallel_map`` item (a nested ``parallel_map`` runs inline there)."""
    return bool(getattr(_INSIDE, "active", False))


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]``, run on up to ``workers`` pinned threads (default ``worker_count()``).

    With one worker or one item, everything runs in the calling thread, unchanged. So does a call made from inside
    an item (nested work: e.g. a solver thread reading an R factor whose lanes fold in parallel): its thread is
    already pinned to one compute thread, and submitting to a pool whose workers all wait for it would deadlock.
    The first exception raised by ``fn`` is re-raised here (after the items already started have finished).
    """
    workers = worker_count() if workers is None else int(workers)
    workers = min(workers, len(items))
    if workers <= 1 or in_worker():
        return [fn(x) for x in items]
    with _LOCK:
        key = (os.getpid(), workers)  # a forked child inherits the pool object but not its threads
        pool = _POOL.get(key)
        if pool is None:
            pool = _POOL[key] = ThreadPoolExecutor(workers, thread_name_prefix="coala-linalg",
                                                   initializer=_pin_to_one_thread)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()  # per thread: the workers take
    # the caller's (an in-place update of a tensor made in inference mode is refused outside it)

    def call(x: T) -> R:
        _INSIDE.active = True
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return fn(x)
        finally:
            _INSIDE.active = False

    return list(pool.map(call, items))
