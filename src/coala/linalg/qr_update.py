"""The TSQR kernel: the R factor of a triangle stacked on a block of rows.

All arithmetic runs in the dtype of the inputs (float32 or float64); callers upcast first.
"""

from __future__ import annotations

import torch
from torch import Tensor


def normalize_signs(R: Tensor) -> Tensor:
    """Flip rows of an upper-triangular R so that its diagonal is non-negative (R is then unique)."""
    signs = torch.where(R.diagonal() < 0, -1.0, 1.0).to(R.dtype)
    return R * signs[:, None]


def r_of_stacked(R: Tensor, rows: Tensor) -> Tensor:
    """R factor (n × n, upper triangular, diagonal ≥ 0) of the stacked matrix [R; rows].

    R: (n × n) upper triangular; rows: (b × n); both of one floating dtype and device.
    Householder QR (LAPACK geqrf / cuSOLVER); Q is never formed.
    """
    n = R.shape[1]
    a, _ = torch.geqrf(torch.cat([R, rows]))
    return normalize_signs(a[:n].triu())


def r_of_rows(rows: Tensor) -> Tensor:
    """R factor (n × n, diagonal ≥ 0) of a (N × n) matrix; zero-padded when N < n."""
    n = rows.shape[1]
    if rows.shape[0] < n:
        rows = torch.cat([rows, rows.new_zeros(n - rows.shape[0], n)])
    a, _ = torch.geqrf(rows)
    return normalize_signs(a[:n].triu())
