"""Ray Tune sweep over BFPO's alpha and tau with ASHA early stopping (bfpo_ray.sweep does the work).

    python tune/sweep.py [--config bfpo_ray/configs/sweep.yaml] [key=value ...]
    ray job submit --working-dir . -- python tune/sweep.py --config bfpo_ray/configs/sweep.yaml

Joins the cluster in RAY_ADDRESS (set by ``ray job submit``) or starts a local one. Running the same command again
resumes an interrupted sweep (Tuner.restore).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a working dir without installing

from bfpo_ray.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
