import sys

from coala.bench.compare import main

sys.exit(main(sys.argv[1:]))
