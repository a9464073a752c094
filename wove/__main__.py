"""``python -m wove``: the command line."""

import sys

from wove.cli import main

sys.exit(main())
