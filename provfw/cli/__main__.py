"""``python -m provfw.cli``: the same as the ``provfw`` command."""

import sys

from provfw.cli import main

sys.exit(main())
