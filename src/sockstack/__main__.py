"""``python -m sockstack``: the ``sockstack`` command."""

import sys

from sockstack.cli import main

sys.exit(main())
