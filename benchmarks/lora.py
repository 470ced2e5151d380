import sys

from coala.bench.lora import main

sys.exit(main(sys.argv[1:]))
