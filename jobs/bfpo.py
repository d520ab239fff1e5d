"""The BFPO job: prepare and reference-score the data, train on Ray Train + DeepSpeed, export, evaluate.

    ray job submit --working-dir . -- python jobs/bfpo.py --config jobs/configs/default.yaml [key=value ...]
    python jobs/bfpo.py                      # the same on a local Ray cluster, built-in default config

Joins the cluster in RAY_ADDRESS (set by ``ray job submit``) or starts a local one.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a working dir without installing

from bfpo_ray.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
