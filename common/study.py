"""``python -m common.study``: the study grid (see :mod:`common.app.study` and docs/study.md)."""

import sys

from common.app.study import main

if __name__ == "__main__":
    sys.exit(main())
