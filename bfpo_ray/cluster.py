"""Connecting to Ray: the cluster in RAY_ADDRESS when there is one, else a local one sized for Ray Data + Train."""
from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Start or join Ray once per process.

    A local cluster gets more logical CPUs than cores (at least 4): Ray Data needs CPUs of its own beside the
    train workers, and with exactly as many logical CPUs as two 1-CPU workers the pipeline starves. It runs the
    dashboard: besides the UI, it serves the State API that Ray Train's placement-group cleaner asks whether a
    run's controller is alive; without it, the workers' placement group of a run that is killed (a Tune trial
    stopped by ASHA) is never removed and its CPUs stay held.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        log.info("joined the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return
    num_cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
    ray.init(num_cpus=num_cpus, include_dashboard=True)
    log.info("started a local Ray cluster with %d logical CPUs", num_cpus)
