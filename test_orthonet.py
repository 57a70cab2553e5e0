"""OrthoNet (Patel et al., Radiology:AI 2021): hip/knee implant model (12 classes) from an X-ray.

Usage:
    python test_orthonet.py --model clip   --image_path /data/orthonet
    python test_orthonet.py --model dinov2 --image_path /data/orthonet
    python test_orthonet.py --model dinov2 --demo          # synthetic data, planted model
    python test_orthonet.py --image_path /data/orthonet --check_data

Everything shared lives in common/; this file holds only what is particular to OrthoNet.
"""

import sys

from common.app.cli import main
from common.app.settings import DatasetSpec

DATASET = DatasetSpec(name="orthonet", title="OrthoNet")

if __name__ == "__main__":
    sys.exit(main(DATASET))
