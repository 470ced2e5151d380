"""The paper's Figure 1 (see ``coala bench stability --help``)."""

import sys

from coala.bench.stability import main

sys.exit(main(sys.argv[1:]))
