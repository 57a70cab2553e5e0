"""Pacemaker (Howard et al., JACC:EP 2019): pacemaker/defibrillator model (45 classes) from a chest X-ray.

Usage:
    python test_pacemaker.py --model clip   --image_path /data/pacemaker
    python test_pacemaker.py --model dinov2 --image_path /data/pacemaker
    python test_pacemaker.py --model dinov2 --demo          # synthetic data, planted model
    python test_pacemaker.py --image_path /data/pacemaker --check_data

Everything shared lives in common/; this file holds only what is particular to Pacemaker.
"""

import sys

from common.app.cli import main
from common.app.settings import DatasetSpec

DATASET = DatasetSpec(name="pacemaker", title="Pacemaker", manufacturer=True)

if __name__ == "__main__":
    sys.exit(main(DATASET))
