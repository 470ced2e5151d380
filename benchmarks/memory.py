"""Peak memory of the streaming R factor over 10⁴..10⁶ rows (see ``coala bench memory --help``)."""

import sys

from coala.bench.memory import main

sys.exit(main(sys.argv[1:]))
