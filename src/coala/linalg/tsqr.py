"""Streaming, mergeable R factor of activations (TSQR).

``RFactor`` holds R (n × n, upper triangular, diag ≥ 0) with RᵀR = XᵀX for every row x seen, plus a buffer
of pending rows. Rows are buffered until a block of ``block_rows`` per lane is full; then R ← R([R; X_b]),
computed in place in R and the buffer (``qr_update.update_r_``). With several lanes (threads), lane i keeps
its own partial R of its share of the blocks, updated side by side with the others; they are merged when R is
read. Memory is O(lanes · (n + block_rows) · n) whatever the number of rows. XᵀX is never formed.

Precision: rows of any floating dtype (bf16/fp16 included) are upcast to ``dtype`` (float32 by default,
or float64) before they enter the buffer; every QR runs in ``dtype``.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from ..errors import CoalaError, CoalaTypeError
from .checks import check_fits, check_mu, flatten_rows
from .dtypes import ACCUMULATION_DTYPES
from .parallel import in_worker, parallel_map, worker_count
from .qr_update import normalize_signs, r_of_stacked, stack_triangle_, update_r_

MAX_LANES = 4  # partial factors per RFactor at most: each costs n² values, and the final merge ≈ n³ flops each


DEVICE_BLOCK_ROWS = 65536  # rows per update off the CPU (see default_block_rows)
DEVICE_BUFFER_BYTES = 2**30  # float32 bytes of that buffer at most (above n = 4096 it holds fewer rows)


def default_block_rows(in_features: int, device: torch.device | str | None = None) -> int:
    """Rows buffered per QR update (per lane).

    CPU (default): the power of two nearest below 2²³ / n, clamped to 4096..8192 for n ≤ 4096 and to 2048 above
    (8192 for n ≤ 1024, 4096 for n ≤ 4096, 2048 above), i.e. a float32 buffer of at most 32 MB, 64 MB for
    2048 < n ≤ 4096. The CPU update exploits the triangle on top of [R; X_b], so its flops ≈ 2·b·n² whatever b;
    b only has to amortise the per-update cost that does not grow with b: ≈ 1000 small torch calls (≈ 5–10 ms at
    n = 1024) and the k × k by k × (n − e) products with T, ≈ PANEL·n² flops (≈ 8 % of a 2048-row update at
    n = 4096). Measured (benchmarks/runtime.py, one thread): at n = 1024, 8192 rows 1.45× the Gram against 1.56×
    for 4096; at n = 576, 8192 best (16384 rows leave the caches); at n = 2048, 2048/4096/8192 rows within noise
    (1.36/1.32/1.33); at n = 4096, 2048/4096/8192 rows 1.27/1.22/1.20 (4096 kept: the buffer doubles again).
    Other devices (one cuSOLVER geqrf of the stacked (n + b) × n matrix per update): as many rows as a float32
    buffer of ``DEVICE_BUFFER_BYTES`` (1 GiB) holds, at most 65,536 and at least 4n. cuSOLVER's geqrf runs far
    below GEMM speed on short stacks, so fewer, taller updates win. On an H200, 262,144 rows in float32
    (docs/results/gpu_stream.md; ``benchmarks/runtime.py --sections gpu`` times it): R / Gram at n = 1024 /
    2048 / 4096 was 42.9 / 16.8 / 9.8 with 4n rows per update, 11.7 / 6.6 / 4.3 with 65,536, and one geqrf of
    all rows 6.2 / 3.8 / 2.5. The buffer grows with the rows it holds, so a few thousand calibration rows never
    allocate the whole of it.
    """
    if device is not None and torch.device(device).type != "cpu":
        return max(4 * in_features, min(DEVICE_BLOCK_ROWS, DEVICE_BUFFER_BYTES // (4 * in_features)))
    rows = 1 << max(0, (2**23 // max(in_features, 1)).bit_length() - 1)
    return min(8192, max(4096 if in_features <= 4096 else 2048, rows))


ROW_PAD = 16  # CPU buffers hold each row in n + 16 values: with a row stride of n = 1024, 1536, 2048, 4096 float32
# values (4 or 6 KiB) the kernel's column accesses of the buffer fall into a few cache sets. Padded, interleaved
# streams on one thread: R / Gram 1.46 → 1.36 (n = 1024), 1.40 → 1.20 (1536), 1.31 → 1.21 (2048), 1.23 → 1.14
# (4096), 576 unchanged (docs/design.md §11)

LANES_BYTES = 2**29  # float32 bytes that the lanes' partial factors and buffers may take (512 MiB)


def default_lanes(in_features: int, device: torch.device | str | None = None) -> int:
    """Partial R factors updated side by side: ``parallel.worker_count()`` on the CPU, at most ``MAX_LANES`` and
    as many as fit ``LANES_BYTES`` (each lane holds an n × n factor and block_rows × n buffered rows: at n = 11008
    one lane alone is ≈ 0.6 GB, while wide inputs need the lanes least, their GEMMs scaling with the threads);
    1 on other devices and for n < 64, where one thread is already fast."""
    if in_features < 64:
        return 1
    per_lane = 4 * in_features * (in_features + default_block_rows(in_features, device))
    return max(1, min(MAX_LANES, worker_count(device), LANES_BYTES // per_lane))


class RFactor:
    """Mergeable streaming R factor of the rows of X (tokens × in_features).

    Args:
        in_features: n, the width of each row.
        dtype: accumulation dtype, torch.float32 (default) or torch.float64.
        device: where R and the buffer live (default: CPU).
        block_rows: rows per QR update and lane (default ``default_block_rows(n, device)``).
        lanes: partial factors updated side by side, one thread each (default ``default_lanes(n, device)``:
            ``torch.get_num_threads()`` on the CPU, at most 4). Lane i takes rows i·b .. (i+1)·b of every
            lanes·b buffered rows; the partial factors are merged (a TSQR tree step) when R is read. The result
            does not depend on the lanes beyond rounding; memory grows by n² + b·n values per extra lane.
        name: used in error messages (e.g. the layer whose inputs these are).
    """

    def __init__(
        self,
        in_features: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        block_rows: int | None = None,
        lanes: int | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise CoalaError(f"in_features must be a positive int, got {in_features!r}", argument="in_features")
        if dtype not in ACCUMULATION_DTYPES.values():
            raise CoalaTypeError(f"RFactor dtype must be torch.float32 or torch.float64, got {dtype}", argument="dtype")
        self.in_features = in_features
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.block_rows = int(block_rows) if block_rows is not None else default_block_rows(in_features, self.device)
        if self.block_rows < 1:
            raise CoalaError(f"block_rows must be >= 1, got {block_rows}", argument="block_rows")
        self.lanes = int(lanes) if lanes is not None else default_lanes(in_features, self.device)
        if self.lanes < 1 or (self.device.type != "cpu" and self.lanes != 1):
            raise CoalaError(f"lanes must be >= 1 (and 1 off the CPU), got {lanes}", argument="lanes")
        self.name = name
        self.num_rows = 0
        self._R = torch.zeros(in_features, in_features, dtype=dtype, device=self.device)
        self._lane_R: list[Tensor | None] = [None] * (self.lanes - 1)  # lanes 1.., allocated on first use
        self._buf: Tensor | None = None  # (≤ lanes·block_rows × n), grown as rows come; QRs work in it in place
        self._fill = 0
        self._R_shared = False  # True once R was handed out: the next in-place update works on a copy
        self._workspace: list[dict[str, Tensor]] = [{} for _ in range(self.lanes)]  # the kernel's scratch per lane
        self._reading = threading.Lock()  # the first read of R folds the pending rows in: one thread at a time

    # ------------------------------------------------------------------ streaming
    def update(self, x: Tensor, mask: Tensor | None = None) -> RFactor:
        """Add the rows of ``x`` (..., in_features); rows where ``mask`` (x.shape[:-1]) is false are skipped."""
        return self.add_rows(flatten_rows(x, self.in_features, mask, where=self.name))

    def add_rows(self, rows: Tensor) -> RFactor:
        """Add already validated rows (N × in_features, any floating dtype); upcast block by block (CoalaError when
        float64 rows exceed a float32 accumulation's range)."""
        rows = rows.detach()  # statistics are data: no autograd graph is kept alive across the stream
        check_fits(rows, self.dtype, "x", self.name)
        self.num_rows += rows.shape[0]
        capacity = self.lanes * self.block_rows
        start = 0
        while start < rows.shape[0]:
            take = min(capacity - self._fill, rows.shape[0] - start)
            self._reserve(self._fill + take, capacity)
            self._buf[self._fill : self._fill + take].copy_(rows[start : start + take])
            self._fill += take
            start += take
            if self._fill == capacity:
                self._flush()
        return self

    def _reserve(self, rows: int, capacity: int) -> None:
        """Make the buffer hold at least ``rows`` rows: it doubles as it fills, up to ``capacity``, so that a
        factor that sees a few thousand rows never allocates a buffer of lanes × block_rows."""
        have = 0 if self._buf is None else self._buf.shape[0]
        if have >= rows:
            return
        size = min(capacity, max(rows, 2 * have, min(capacity, 4096)))
        stride = self.in_features + (ROW_PAD if self.device.type == "cpu" else 0)
        buf = torch.empty(size, stride, dtype=self.dtype, device=self.device)[:, : self.in_features]
        if self._fill:
            buf[: self._fill].copy_(self._buf[: self._fill])
        self._buf = buf

    def _flush(self) -> None:
        """Fold the buffered rows into the lanes' factors (side by side when there are enough rows for each)."""
        fill, self._fill = self._fill, 0
        if not fill:
            return
        if self._R_shared or not self._R.is_contiguous():
            self._R = self._R.contiguous().clone()
            self._R_shared = False
        if in_worker():  # a read from a parallel_map item (a solver thread): lanes would run one after the other
            # here (a nested parallel_map runs inline) and then cost a merge (≈ n³ flops each), so lane 0 takes
            # every row, block_rows at a time
            used = 1
            chunks = [(0, lo, min(fill, lo + self.block_rows)) for lo in range(0, fill, self.block_rows)]
        else:
            # a full buffer always goes to every lane; a partial one when each lane gets min(n, block_rows) rows (the
            # former rule, n rows each, kept every n > block_rows, e.g. n = 4096 with 2048 rows, on one lane for
            # good)
            used = self.lanes if fill >= self.lanes * min(self.in_features, self.block_rows) else 1
            step = -(-fill // used)
            chunks = [(i, i * step, min(fill, (i + 1) * step)) for i in range(used)]
        for i in range(1, used):
            if self._lane_R[i - 1] is None:
                self._lane_R[i - 1] = torch.zeros_like(self._R)

        def run(chunk: tuple[int, int, int]) -> None:
            i, lo, hi = chunk
            R = self._R if i == 0 else self._lane_R[i - 1]
            update_r_(R, self._buf[lo:hi], self._workspace[i])  # R ← R([R; X_b]) in place

        parallel_map(run, chunks, workers=used)

    def _fold_lanes(self) -> None:
        """Flush, then merge every lane's factor into lane 0's (R ← R([R; R_i]), exploiting R_i's triangle)."""
        self._flush()
        parts = [R for R in self._lane_R if R is not None]
        if parts:
            if self._R_shared:
                self._R = self._R.clone()
                self._R_shared = False
            for R in parts:
                stack_triangle_(self._R, R, self._workspace[0])
            self._lane_R = [None] * (self.lanes - 1)

    def merge(self, other: RFactor) -> RFactor:
        """Fold another factor of the same width into this one (a TSQR tree step): R ← R([R₁; R₂])."""
        if not isinstance(other, RFactor):
            raise CoalaTypeError(f"merge expects an RFactor, got {type(other).__name__}", argument="other")
        if other.in_features != self.in_features:
            raise CoalaError(
                f"cannot merge RFactor of in_features={other.in_features} into one of {self.in_features}",
                argument="other",
            )
        self._fold_lanes()
        other_R = other.R.to(device=self.device, dtype=self.dtype, copy=True)
        if self._R_shared:
            self._R, self._R_shared = self._R.clone(), False
        stack_triangle_(self._R, other_R, self._workspace[0])
        self.num_rows += other.num_rows
        return self

    # ------------------------------------------------------------------ results
    @property
    def R(self) -> Tensor:
        """(n × n) upper triangular, diag ≥ 0, RᵀR = XᵀX of all rows seen; in ``dtype`` (CoalaError when it
        overflowed: activations too large for the accumulation dtype)."""
        with self._reading:  # layers that share an input read its R from several solver threads at once
            self._fold_lanes()
            self._R = normalize_signs(self._R)
            self._R_shared = True
        if not bool(torch.isfinite(self._R).all()):
            where = f" of {self.name}" if self.name else ""
            raise CoalaError(f"the R factor{where} overflowed {str(self.dtype).removeprefix('torch.')}: the "
                             "activations are too large for it; accumulate in float64 or rescale them",
                             argument="x", layer=self.name)
        return self._R

    def regularized(self, mu: float) -> Tensor:
        """R factor of [X; √μ I]: the R of [R; √μ I] (2n × n), computed without touching X again."""
        mu = check_mu(mu, self.name)
        return regularize(self.R, mu)

    def require_rows(self) -> None:
        """Raise if no rows were seen (a solve on an empty factor would be meaningless)."""
        if self.num_rows == 0:
            where = f" for {self.name}" if self.name else ""
            raise CoalaError(f"RFactor{where} has seen no rows: run calibration data through it first",
                             layer=self.name)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Tensors and plain numbers only (safe for safetensors + JSON)."""
        return {
            "R": self.R.clone(),
            "num_rows": int(self.num_rows),
            "in_features": self.in_features,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def load_state_dict(self, state: dict) -> RFactor:
        R = state["R"]
        if int(state["in_features"]) != self.in_features or tuple(R.shape) != (self.in_features,) * 2:
            raise ValueError(
                f"state has in_features={state['in_features']} and R of shape {tuple(R.shape)}; "
                f"this RFactor has in_features={self.in_features}"
            )
        if state.get("dtype") not in (None, *ACCUMULATION_DTYPES):
            raise ValueError(f"unknown dtype {state['dtype']!r} in RFactor state")
        self._R = R.detach().to(device=self.device, dtype=self.dtype).triu()
        self._lane_R = [None] * (self.lanes - 1)
        self._R_shared = False
        self.num_rows = int(state["num_rows"])
        self._fill = 0
        return self

    def __repr__(self) -> str:
        return f"RFactor(in_features={self.in_features}, num_rows={self.num_rows}, dtype={self.dtype})"


def regularize(R: Tensor, mu: float) -> Tensor:
    """R factor of [R; √μ I] (so RᵀR + μI without forming it); returns R itself when μ = 0."""
    if mu == 0.0:
        return R
    n = R.shape[1]
    eye = torch.eye(n, dtype=R.dtype, device=R.device) * (mu**0.5)
    return r_of_stacked(R, eye)
