"""The BFPO job: prepare and reference-score the data, train on Ray Train + DeepSpeed, export, evaluate.

    ray job submit --working-dir . -- python jobs/bfpo.py --config paper_bfpo [key=value ...]
    python jobs/bfpo.py                      # the same on a local Ray cluster, shipped default config
    python jobs/bfpo.py --verbose            # with Ray's and DeepSpeed's INFO logs

``--config`` takes a YAML file or the name of a config shipped in bfpo_ray/configs/. Joins the cluster in
RAY_ADDRESS (set by ``ray job submit``) or starts a local one. Same as ``python -m bfpo_ray train``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a working dir without installing

from bfpo_ray.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
