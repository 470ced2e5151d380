"""Sentence-embedding fidelity of compressed MiniLM per ratio and allocation (see ``coala bench fidelity --help``)."""

import sys

from coala.bench.fidelity import main

sys.exit(main(sys.argv[1:]))
