"""Peak memory and wall time of compressing MiniLM (see ``coala bench compress --help``)."""

import sys

from coala.bench.compress import main

sys.exit(main(sys.argv[1:]))
