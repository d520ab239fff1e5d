"""The lost-node drill of ``tests/test_cluster_faults.py``, in a process of its own: a Ray cluster of its own (a head
and two worker nodes, each its own raylet, from ``ray.cluster_utils.Cluster``), two training workers on the two worker
nodes (one unit of the custom resource ``trainer`` per worker node, ``run.worker_resource=trainer``), checkpoints and
data on the S3-compatible server the test runs.

Rank 1 pauses at the start of ``--pause-step`` once Ray Train has committed the checkpoints before it
(``BFPO_PAUSE_AT``, set by the test); this script then removes that worker's node (its raylet and every process on
it die at once), adds a replacement node, and lets the run go on: Ray Train (``run.max_failures=1``) restarts the
worker group on the surviving and the new node from the last committed checkpoint. Training runs in a thread: a
node is added from the main thread (Ray registers a SIGTERM handler for it).

    python tests/cluster_lost_node.py --model DIR --dataset S3_URI --storage S3_URI --marker FILE --out FILE.json

The environment sets BFPO_SAMPLE_LOG and BFPO_PAUSE_AT, and RAY_TMPDIR (a directory of its own: the cluster writes
its address file there, so no other ``ray.init()`` on the machine joins it).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import traceback
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_config  # noqa: E402

from bfpo_ray.train import hooks  # noqa: E402
from bfpo_ray.train.launch import train  # noqa: E402

NODE_RESOURCE = "trainer"
# a removed node is declared dead after about 1.5 s (the defaults: 3 s x 5 health checks)
HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
PAUSE_TIMEOUT_S = 480


def fault_config(model: Path, storage_uri: str, name: str):
    """The run of the drill: test_cluster_faults.fault_config's settings on two nodes that carry ``trainer``."""
    cfg = make_config(
        model, Path("unused"), name, max_failures=1, epochs=1, checkpoint_every=2, log_every=1, num_to_keep=10
    )
    cfg.run.storage_path, cfg.run.worker_resource = storage_uri, NODE_RESOURCE
    return cfg


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("--model", "--dataset", "--storage", "--marker", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--name", default="lost-node")
    args = parser.parse_args()
    record: dict = {"started": time.time()}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False, "_system_config": HEALTH_CHECKS},
    )
    try:
        workers = [cluster.add_node(num_cpus=1, resources={NODE_RESOURCE: 1}) for _ in range(2)]
        record["worker_nodes"] = [node.node_id for node in workers]
        ray.init(address=cluster.address)
        outcome: dict = {}

        def run() -> None:
            try:
                result = train(fault_config(Path(args.model), args.storage, args.name), args.dataset)
                outcome["metrics"] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
            except BaseException:  # reported in the record, for the test to show
                outcome["error"] = traceback.format_exc()

        trainer = threading.Thread(target=run)
        trainer.start()
        marker = Path(args.marker)
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while not marker.exists() and trainer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if marker.exists():
            paused = json.loads(marker.read_text())
            node = next(node for node in cluster.worker_nodes if node.node_id == paused["node"])
            record["lost_node"] = paused["node"]
            record["fault_time"] = time.time()
            cluster.remove_node(node, allow_graceful=False)  # the raylet and every process of the node
            record["removed_s"] = time.time() - record["fault_time"]
            replacement = cluster.add_node(num_cpus=1, resources={NODE_RESOURCE: 1})
            record["replacement_node"] = replacement.node_id
            record["replaced_s"] = time.time() - record["fault_time"]
            Path(str(marker) + hooks.GO_SUFFIX).write_text("")  # had another node been removed, go on
        trainer.join()
        record.update(outcome)
    finally:
        record["finished"] = time.time()
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        ray.shutdown()
        cluster.shutdown()
    return 0 if "metrics" in record else 1


if __name__ == "__main__":
    sys.exit(main())
