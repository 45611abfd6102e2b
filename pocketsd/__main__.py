"""``python -m pocketsd``: the same as the ``pocketsd`` command."""

import sys

from pocketsd.cli import main

sys.exit(main())
