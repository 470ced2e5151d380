import sys

from coala.cli import main

sys.exit(main())
