"""``python -m common.studyreport``: a study's report again (see :mod:`common.reporting.studyreport`)."""

import sys

from common.reporting.studyreport import main

if __name__ == "__main__":
    sys.exit(main())
