"""``python -m bench``: the benchmark suite, run from the repository root (see __init__.py)."""

import sys

from bench import main

sys.exit(main())
