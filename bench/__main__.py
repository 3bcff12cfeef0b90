"""`python -m bench`: run the PatchMerger benchmark suite (see bench/suite.py for options)."""

import sys

from .suite import main

sys.exit(main())
