"""Ray Tune sweep over the fields of tune.space (default: BFPO's alpha and tau) with ASHA early stopping.

    python tune/sweep.py [--config sweep] [key=value ...]           # the same as: python -m bfpo_ray tune ...
    ray job submit --working-dir . -- python tune/sweep.py --config bfpo_ray/configs/sweep.yaml

Joins the cluster in RAY_ADDRESS (set by ``ray job submit``) or starts a local one. Running the same command again
resumes an interrupted sweep (Tuner.restore). From Python: ``bfpo_ray.pipeline.sweep(load_config("sweep"))``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a working dir without installing

from bfpo_ray.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
