"""``python -m common.report``: one table over many runs (see :mod:`common.reporting.report`)."""

import sys

from common.reporting.report import main

if __name__ == "__main__":
    sys.exit(main())
