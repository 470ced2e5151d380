"""Calibration on several processes with PyTorch's own engine, ``torch.distributed`` (docs/design.md §12).

``torchrun --nproc-per-node N -m coala compress MODEL`` (or any script started by torchrun that calls
``coala.compress``, which joins the process group itself — ``init_from_env`` first to choose the device or the
timeout) runs one process per rank: each rank streams its share of the calibration batches through the blocks,
and after each block's statistics pass the statistics are reduced exactly (``all_reduce_``): R factors up
binomial TSQR trees (⌈log₂ N⌉ rounds; besides its own factors a rank holds one received factor per merge), Gram
matrices and Σ |x| by ``all_reduce`` in their accumulation dtypes, row counts as int64. One process (no torchrun)
is not distributed and nothing here does anything.

Failure handling. Every collective phase starts with ``sync(what)``, a check-in through the rendezvous store
with a deadline (``init_from_env(timeout=)``, default ``COALA_DIST_TIMEOUT`` or 1800 s): a rank that never
arrives is named in a ``DistributedError``; a rank that fails publishes its error (``failure_guard``) and the
others raise one naming it instead of waiting; a rank that dies inside a collective is found by a roll call.

Precision: R and Gram travel and merge in their accumulation dtype (float32 / float64), Σ |x| in float64.
"""

from .reduce import all_reduce_, balance, merge_loads
from .session import (
    DEFAULT_TIMEOUT_S,
    ON_CHECK_IN,
    TIMEOUT_ENV,
    DistributedError,
    barrier,
    device,
    ensure_joined,
    failure_guard,
    init_from_env,
    is_distributed,
    is_main,
    launched,
    phase,
    publish_failure,
    rank,
    shutdown,
    sync,
    world_size,
)
from .transport import broadcast_json, broadcast_tensors, check_same, gather_json

__all__ = ["DEFAULT_TIMEOUT_S", "ON_CHECK_IN", "TIMEOUT_ENV", "DistributedError", "all_reduce_", "balance",
           "barrier", "broadcast_json", "broadcast_tensors", "check_same", "device", "ensure_joined", "failure_guard",
           "gather_json", "init_from_env", "is_distributed", "is_main", "launched", "merge_loads", "phase",
           "publish_failure", "rank", "shutdown", "sync", "world_size"]
