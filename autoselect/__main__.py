"""`python -m autoselect ...`: the same commands as the `autoselect` console script."""

import sys

from .cli import main

sys.exit(main())
