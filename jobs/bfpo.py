"""The BFPO job: prepare and reference-score the data, train on Ray Train + DeepSpeed, export, evaluate.

    ray job submit --working-dir . -- python jobs/bfpo.py --config paper_bfpo [key=value ...]
    python jobs/bfpo.py                      # the same on a local Ray cluster, shipped default config
    python jobs/bfpo.py --verbose            # with Ray's and DeepSpeed's INFO logs

``--config`` takes a YAML file or the name of a config shipped in bfpo_ray/configs/. Joins the cluster in
RAY_ADDRESS (set by ``ray job submit``) or starts a local one. Same as ``python -m bfpo_ray train``, except that a
job submitted with a working directory, which runs in Ray's temporary copy of it, writes its relative outputs
(run.storage_path, data.cache_dir, the toy world) under ~/ray_results/bfpo-ray and says so first
(``bfpo_ray.cluster.job_output_overrides``, applied by the command line to every command).

A job's ``python`` is the one on the PATH of the Ray head: start the head from the project's environment (activate
it first). Run by a python without the project's packages, this script says so in one line and exits with status 2.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a working dir without installing

try:
    from bfpo_ray.__main__ import main  # noqa: E402
except ModuleNotFoundError as err:  # a python without the project's environment (a head started outside it)
    print(
        f"error: {sys.executable} cannot import {err.name!r}: run the job with the project's environment's "
        f"python (activate the environment before `ray start`, so that a job's `python` is its python)",
        file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
