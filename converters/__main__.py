"""``python -m edgeconvert``: the same as the ``edgeconvert`` console script."""

import sys

from .cli import main

sys.exit(main())
