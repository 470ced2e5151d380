"""Who this process is in a distributed run, joining the process group, and the check-ins that turn a missing,
dead or failed rank into a ``DistributedError`` naming it (docs/design.md §12)."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import time
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from ..errors import CoalaError

TIMEOUT_ENV = "COALA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
ROLL_CALL_S = 10.0  # how long survivors wait for each other after a collective failed
ON_CHECK_IN: list[Callable[[str], None]] = []  # called with ``what`` as a rank checks in (benchmarks time phases)


class DistributedError(CoalaError):
    """A distributed run cannot go on: ranks disagree, a rank failed, died or did not arrive in time. ``ranks``
    lists the ranks at fault (also named in the message)."""

    def __init__(self, message: str, *, ranks: Iterable[int] = (), shared: bool = False, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.ranks = sorted(set(ranks))
        self.shared = shared  # every rank raises it alike, or it reports another rank's fault: not re-published


class _Session:
    store = None  # the rendezvous store under a "coala/" prefix, None when unknown
    timeout_s = DEFAULT_TIMEOUT_S
    step = 0
    depth = 0  # nesting of ``collective`` phases
    device: torch.device | None = None
    owned = False  # the process group was created here (shutdown destroys it)


_S = _Session()


# ---------------------------------------------------------------------------------------------- who am I
def launched() -> bool:
    """True when the environment describes more than one process (torchrun sets WORLD_SIZE, RANK, …)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def is_distributed(group=None) -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that prints, shows progress and writes files."""
    return rank() == 0


def device() -> torch.device | None:
    """The compute device ``init_from_env`` chose for this rank (None: not initialised here)."""
    return _S.device


def _timeout_s(timeout: float | datetime.timedelta | None) -> float:
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV, "")
        try:
            timeout = float(text) if text else DEFAULT_TIMEOUT_S
        except ValueError:
            raise CoalaError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds", argument=TIMEOUT_ENV) from None
    if not timeout > 0:
        raise CoalaError(f"the distributed timeout must be > 0 seconds, got {timeout}", argument="timeout")
    return float(timeout)


def init_from_env(*, device: str | torch.device | None = None, backend: str | None = None,
                  timeout: float | datetime.timedelta | None = None) -> torch.device | None:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); a no-op returning None for one process. Returns this rank's compute device.

    device: "cuda" (→ cuda:LOCAL_RANK), "cpu", or None (cuda:LOCAL_RANK when CUDA is available, else the CPU).
    backend: default NCCL for CUDA, gloo for the CPU. timeout: seconds (or a timedelta) any rank waits for the
    others, in collectives and check-ins (default ``COALA_DIST_TIMEOUT`` or 1800 s). An already initialised
    process group is used as it is.
    """
    _S.timeout_s = _timeout_s(timeout)
    if not launched() and not dist.is_initialized():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CoalaError("device cuda asked for, but CUDA is not available", argument="device")
        dev = torch.device("cuda", dev.index if dev.index is not None else local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    _S.device = dev
    if dist.is_initialized():  # the caller's own group
        _store()
        return dev
    delta = datetime.timedelta(seconds=_S.timeout_s)
    store, r, w = next(dist.rendezvous("env://", timeout=delta))
    store.set_timeout(delta)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=r, world_size=w,
                            timeout=delta, device_id=dev if backend == "nccl" else None)
    _S.store, _S.owned, _S.step = dist.PrefixStore("coala", store), True, 0
    atexit.register(shutdown)
    return dev


def ensure_joined(device: str | torch.device | None = None) -> None:
    """Under torchrun, join the process group unless that was done (``init_from_env`` with this compute device,
    which picks the backend); nothing otherwise. What ``coala.compress`` & co. call first, so that a script
    started by torchrun needs no call of its own."""
    if launched() and not (dist.is_available() and dist.is_initialized()):
        init_from_env(device=device)


def shutdown() -> None:
    """Leave the process group created by ``init_from_env`` (nothing for a group created elsewhere; also run at
    exit). Rank 0 first waits (at most a minute) until every rank has left: outside torchrun the rendezvous store
    lives in rank 0's process, and the others may still be reading it after their last check-in."""
    store = _S.store
    if _S.owned and store is not None and is_distributed():
        with contextlib.suppress(Exception):
            store.add("left", 1)
            deadline = time.monotonic() + min(_S.timeout_s, 60.0)
            while rank() == 0 and int(store.add("left", 0)) < world_size() and time.monotonic() < deadline:
                time.sleep(0.01)
    if _S.owned and dist.is_initialized():
        dist.destroy_process_group()
    _S.store, _S.owned, _S.step, _S.device = None, False, 0, None


# ---------------------------------------------------------------------------------------------- check-ins
def _store():
    """The rendezvous store (keys under "coala/"); for a group initialised elsewhere, the default group's store
    when torch exposes it, else None (then there are no check-ins, only the backend's own timeout)."""
    if _S.store is None and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            _S.store = dist.PrefixStore("coala", dist.distributed_c10d._get_default_store())
    return _S.store


def _get(store, key: str) -> str | None:
    return store.get(key).decode(errors="replace") if store.check([key]) else None


def _raise_if_failed(store) -> None:
    if int(store.add("failed", 0)) == 0:
        return
    for r in range(world_size()):
        msg = _get(store, f"error/{r}")
        if msg is not None and r != rank():
            raise DistributedError(f"rank {r} failed: {msg}", ranks=[r], shared=True)


def _lost_store(err: BaseException) -> DistributedError:
    host = "the torchrun agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0"
    return DistributedError(f"rank {rank()} lost the rendezvous store hosted by {host} ({short(err)}): "
                            "that process died", ranks=[] if host != "rank 0" else [0], shared=True)


def short(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def sync(what: str) -> None:
    """Wait until every rank has reached this point (named ``what`` in errors). Raises ``DistributedError``
    naming a rank that published a failure, or the ranks that did not arrive within the timeout.

    Through the store: each rank counts itself in; the last one sets the step's "done" key, which the others
    wait for (woken at once). A failing rank sets the next step's key too (``publish_failure``), so that the
    others wake and raise its error instead of waiting for the timeout."""
    store = _store() if is_distributed() else None
    if store is None:
        return
    for hook in ON_CHECK_IN:
        hook(what)
    _S.step += 1
    step, me, n = _S.step, rank(), world_size()
    try:
        store.set(f"at/{me}", f"{step}|{what}")
        if int(store.add(f"arrived/{step}", 1)) == n:
            store.set(f"done/{step}", "1")
        _raise_if_failed(store)
        if not store.check([f"done/{step}"]):
            try:
                store.wait([f"done/{step}"], datetime.timedelta(seconds=_S.timeout_s))
            except dist.DistStoreError:
                _raise_if_failed(store)
                raise _late(store, what, step) from None
        _raise_if_failed(store)
        if me == 0 and step > 2:  # every rank has passed step - 1: nobody reads step - 2's keys any more
            with contextlib.suppress(Exception):
                store.delete_key(f"arrived/{step - 2}")
                store.delete_key(f"done/{step - 2}")
    except DistributedError:
        raise
    except (RuntimeError, OSError) as err:
        raise _lost_store(err) from err


def _late(store, what: str, step: int) -> DistributedError:
    late = []
    for r in range(world_size()):
        seen = _get(store, f"at/{r}")
        if seen is None or int(seen.split("|", 1)[0]) < step:
            late.append((r, "nothing yet" if seen is None else seen.split("|", 1)[1]))
    names = ", ".join(f"rank {r} (last at: {where})" for r, where in late)
    return DistributedError(f"timed out after {_S.timeout_s:g} s waiting at '{what}' for {names}: it died or hangs "
                            f"(raise the timeout with {TIMEOUT_ENV} if it is only slow)", ranks=[r for r, _ in late],
                            shared=True)


def barrier(what: str = "barrier") -> None:
    """``sync`` for callers: every rank waits here (a no-op in one process)."""
    sync(what)


def publish_failure(err: BaseException) -> None:
    """Tell the other ranks that this one failed (they raise a DistributedError naming it instead of waiting)."""
    store = _store() if is_distributed() else None
    if store is None or (isinstance(err, DistributedError) and err.shared):
        return
    text = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {short(err)}"
    with contextlib.suppress(Exception):
        store.set(f"error/{rank()}", text)
        store.add("failed", 1)
        store.set(f"done/{_S.step + 1}", "1")  # wakes the ranks waiting at the check-in this rank will not reach


@contextlib.contextmanager
def failure_guard() -> Iterator[None]:
    """Publish any exception leaving the with (``publish_failure``) and re-raise it."""
    try:
        yield
    except BaseException as err:
        publish_failure(err)
        raise


@contextlib.contextmanager
def phase(what: str, group=None) -> Iterator[None]:
    """A phase of collectives: one check-in first (of the whole world; none for a sub-group, none inside another
    phase); a collective that fails (a peer died) becomes a DistributedError naming the ranks that did not
    answer a roll call."""
    if group is None and _S.depth == 0:
        sync(what)
    _S.depth += 1
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:
        raise _roll_call(what, err) from err
    finally:
        _S.depth -= 1


def _roll_call(what: str, err: BaseException) -> DistributedError:
    store = _store()
    if store is None:
        return DistributedError(f"a collective failed during '{what}': {short(err)}", shared=True)
    try:
        _raise_if_failed(store)
        key = f"alive/{_S.step}/"
        store.set(key + str(rank()), "1")
        deadline = time.monotonic() + min(ROLL_CALL_S, _S.timeout_s)
        missing = list(range(world_size()))
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([key + str(r)])]
            time.sleep(0.05)
        _raise_if_failed(store)
    except DistributedError as failed:
        return failed
    except (RuntimeError, OSError) as lost:
        return _lost_store(lost)
    names = ", ".join(f"rank {r}" for r in missing) or "no rank (all answered)"
    return DistributedError(f"a collective failed during '{what}' ({short(err)}); not answering: {names}",
                            ranks=missing, shared=True)


def comm_device(group=None) -> torch.device:
    """Where tensors must be for the group's backend: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_rank(group, r: int) -> int:
    """The global rank of rank ``r`` of ``group`` (None: the world)."""
    return r if group is None else dist.get_global_rank(group, r)
