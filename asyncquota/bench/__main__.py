"""``python -m asyncquota.bench``: the same as the ``asyncquota`` command."""

import sys

from ..cli import main

sys.exit(main())
