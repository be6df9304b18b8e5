"""`python -m bloodcell.cli`: the same command line as `bloodcell` (tests and benchmarks start the server so)."""

import sys

from bloodcell.cli import main

sys.exit(main())
