"""``python -m sockstack.cli``: the ``sockstack`` command (how --workers starts its processes)."""

import sys

from sockstack.cli import main

sys.exit(main())
