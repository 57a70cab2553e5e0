"""APTOS 2019 Blindness Detection: diabetic-retinopathy grade 0-4 from a fundus photo.

Usage:
    python test_aptos.py --model clip   --image_path /data/aptos
    python test_aptos.py --model dinov2 --image_path /data/aptos
    python test_aptos.py --model dinov2 --demo          # synthetic data, planted model
    python test_aptos.py --image_path /data/aptos --check_data

Everything shared lives in common/; this file holds only what is particular to APTOS 2019.
"""

import sys

from common.app.cli import main
from common.app.settings import DatasetSpec

DATASET = DatasetSpec(name="aptos", title="APTOS 2019", qwk=True)

if __name__ == "__main__":
    sys.exit(main(DATASET))
