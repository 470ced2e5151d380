"""Streaming R factor vs Gram, monolithic QR, block sizes, per-layer solve (``coala bench runtime --help``)."""

import sys

from coala.bench.runtime import main

sys.exit(main(sys.argv[1:]))
