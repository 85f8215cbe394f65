"""``python -m reempathy``: the ``reempathy`` command (``torchrun -m reempathy run …`` uses it)."""

import sys

from reempathy.cli import main

sys.exit(main())
