"""Cluster scale: cluster.yaml / cluster.local.yaml against Ray's schema and each other, the paper-scale recipes,
and a real autoscaling run on one machine (Ray's fake_multinode provider).

The autoscaling test starts a Ray head of its own (free ports, its own --temp-dir, a token of its own) and ends
it by killing exactly the processes that carry that token in their environment: every process the head, its
autoscaler and the fake nodes started inherits it, and no other process on the machine has it. (``ray stop``
would end every Ray process of this user on the machine, other tests' clusters included.)
"""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray_heads import RAY, free_ports, head_env, small_world_overrides

from bfpo_ray.config import load_config
from bfpo_ray.models import resolve_dtype
from bfpo_ray.train.engine import deepspeed_config

REPO = Path(__file__).resolve().parents[1]
CLOUD = REPO / "cluster.yaml"
LOCAL = REPO / "cluster.local.yaml"
RECIPES = sorted(glob.glob(str(REPO / "bfpo_ray" / "configs" / "paper_*.yaml")))
STANDIN = "A100_STANDIN"  # the custom resource that stands in for an A100 in cluster.local.yaml
WORKER_TYPE = "ray.worker.a100"
A100_GPUS = {"p4d.24xlarge": 8, "p4de.24xlarge": 8, "a2-highgpu-8g": 8, "a2-ultragpu-8g": 8}  # public specs


def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------- cluster configs


@pytest.mark.parametrize("path", [CLOUD, LOCAL], ids=["cluster.yaml", "cluster.local.yaml"])
def test_cluster_config_validates_against_ray_schema(path):
    from ray.autoscaler._private.util import validate_config

    config, schema = load_yaml(path), ray_schema()
    jsonschema.validate(config, schema)
    validate_config(copy.deepcopy(config))  # the schema plus Ray's own checks (head type exists, min <= max, ...)
    typo = copy.deepcopy(config)
    typo["available_node_types"][WORKER_TYPE]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):  # the schema does catch a misspelt key
        jsonschema.validate(typo, schema)


def test_cloud_config_survives_the_defaults_ray_up_fills_in():
    """What ``ray up`` does before it contacts AWS: merge the provider's defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(load_yaml(CLOUD))
    validate_config(prepared)
    assert prepared["available_node_types"][WORKER_TYPE]["node_config"]["InstanceType"] in A100_GPUS


def test_node_types_agree_and_the_standin_maps_to_the_gpu():
    cloud, local = load_yaml(CLOUD), load_yaml(LOCAL)
    assert (
        set(cloud["available_node_types"]) == set(local["available_node_types"]) == {"ray.head.default", WORKER_TYPE}
    )
    assert cloud["head_node_type"] == local["head_node_type"] == "ray.head.default"
    assert local["provider"]["type"] == "fake_multinode" and cloud["provider"]["type"] in ("aws", "gcp")

    cloud_head = cloud["available_node_types"]["ray.head.default"]["resources"]
    local_head = local["available_node_types"]["ray.head.default"]["resources"]
    assert cloud_head.get("CPU") == 0 and not cloud_head.get("GPU")  # the cloud head runs no task at all
    assert STANDIN not in local_head and not local_head.get("GPU")  # the local head: CPUs, no training resource

    cloud_worker = cloud["available_node_types"][WORKER_TYPE]
    local_worker = local["available_node_types"][WORKER_TYPE]
    instance = cloud_worker["node_config"].get("InstanceType") or cloud_worker["node_config"].get("machineType")
    assert cloud_worker["resources"]["GPU"] == A100_GPUS[instance] == 8
    assert local_worker["resources"][STANDIN] == 1 and not local_worker["resources"].get("GPU")
    assert local_worker["resources"]["CPU"] == 1  # two fit on a 2-core machine with Ray Data
    for worker in (cloud_worker, local_worker):
        assert worker["min_workers"] == 0 and worker["max_workers"] >= 1
    assert cloud["max_workers"] >= cloud_worker["max_workers"] and local["max_workers"] >= 2
    assert 0 < local["idle_timeout_minutes"] <= 1 and cloud["idle_timeout_minutes"] >= 5


def test_cloud_config_installs_tested_versions_and_keeps_the_dashboard_private():
    cloud = load_yaml(CLOUD)
    setup = cloud["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "pip install torch==2.13.0" in c)
    project_at = next(i for i, c in enumerate(setup) if "pip install -c constraints.txt -e ." in c)
    assert torch_at < project_at
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text().splitlines()

    assert cloud["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token reaches every node
    for commands in (cloud["head_start_ray_commands"], cloud["worker_start_ray_commands"]):
        starts = [c for c in commands if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    mount = next(c for c in setup if "/mnt/shared" in c)  # the shared storage: the Ray user's, no one else's
    assert 'chown "$(id -u):$(id -g)" /mnt/shared' in mount and mount.endswith("chmod 700 /mnt/shared")
    assert "777" not in CLOUD.read_text() and "a+w" not in CLOUD.read_text()
    head_start = " ".join(cloud["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in CLOUD.read_text()


# ---------------------------------------------------------------------------------------------- recipes


def test_there_are_three_paper_recipes():
    assert [Path(p).stem for p in RECIPES] == ["paper_bfpo", "paper_bfpo_redteam", "paper_sft"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: Path(p).stem)
def test_recipe_loads_validates_and_gives_zero3_bf16(path):
    cfg = load_config(path)
    ds = deepspeed_config(cfg.train, dtype=resolve_dtype(cfg.model.dtype, cfg.run.use_gpu), use_gpu=cfg.run.use_gpu)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert cfg.run.use_gpu and cfg.model.dtype == "bfloat16"
    assert cfg.train.trainable == ["down_proj"]
    assert (cfg.train.learning_rate, cfg.train.lr_schedule, cfg.train.warmup_ratio, cfg.train.epochs) == (
        5e-7,
        "cosine",
        0.1,
        1,
    )
    pairs_per_step = 16 if Path(path).stem == "paper_bfpo_redteam" else 32  # the authors' redteaming.sh: 16
    assert cfg.train.micro_batch_pairs * cfg.train.grad_accum * cfg.run.num_workers == pairs_per_step
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        cfg.train.micro_batch_pairs,
        cfg.train.grad_accum,
    )
    assert cfg.data.score_gpus_per_actor > 0
    # Generative evaluation after training needs prompts of its own outside the toy world: off unless given.
    assert not cfg.evaluate.after_train or cfg.evaluate.prompts or cfg.toyworld


def test_bfpo_recipes_follow_the_paper():
    bfpo, redteam = (
        load_config(REPO / "bfpo_ray" / "configs" / f"{name}.yaml") for name in ("paper_bfpo", "paper_bfpo_redteam")
    )
    for cfg in (bfpo, redteam):
        assert (cfg.train.loss, cfg.train.tau, cfg.train.alpha, cfg.train.logp_reduction) == ("bfpo", 0.01, 0.5, "sum")
        assert (cfg.data.max_length, cfg.data.max_prompt_length) == (1024, 512)
    assert redteam.model.path == "HuggingFaceH4/zephyr-7b-beta"
    roles = {s.role: s for s in bfpo.data.sources}
    assert (roles["safety"].adapter, roles["safety"].rows) == ("pku_saferlhf", 30000)
    assert (roles["helpful"].adapter, roles["helpful"].path, roles["helpful"].rows) == (
        "ultrafeedback",
        "HuggingFaceH4/ultrafeedback_binarized",
        30000,
    )
    sft = load_config(REPO / "bfpo_ray" / "configs" / "paper_sft.yaml")
    assert bfpo.model.path == str(Path(sft.run.storage_path) / sft.run.name / "export")  # BFPO starts from the SFT


def test_sft_recipe_mixes_ultrachat_and_a_fifth_of_pku_in_one_stream():
    sft = load_config(REPO / "bfpo_ray" / "configs" / "paper_sft.yaml")
    assert sft.model.path == "mistralai/Mistral-7B-v0.1" and sft.train.loss == "sft"
    by_adapter = {s.adapter: s for s in sft.data.sources}
    assert by_adapter["sft_chat"].path == "HuggingFaceH4/ultrachat_200k"
    assert by_adapter["pku_saferlhf"].fraction == 0.2
    assert len({s.role for s in sft.data.sources}) == 1  # one role: one stream, the sources' natural proportion


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: Path(p).stem)
def test_recipe_chat_template_is_zephyrs_with_an_exact_generation_prompt(path, caplog):
    from bfpo_ray.data.tokenize import end_of_turn_suffix
    from bfpo_ray.toyworld.tiny_model import train_word_tokenizer

    template = load_config(path).data.chat_template
    tokenizer = train_word_tokenizer(["a question and an answer"])
    eos = tokenizer.eos_token
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rendered = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)
    assert rendered == f"<|system|>\n{eos}\n<|user|>\nq{eos}\n<|assistant|>\na{eos}\n"
    with caplog.at_level(logging.WARNING, logger="bfpo_ray.data.tokenize"):
        assert end_of_turn_suffix(tokenizer, template) == f"{eos}\n"
    assert not caplog.records  # the generation prompt is exactly the text before an assistant reply


# ---------------------------------------------------------------------------------------------- local autoscaling


def processes_with_env(name: str, value: str) -> dict[int, str]:
    """{pid: command line} of this user's processes whose environment holds ``name=value`` (Linux /proc)."""
    wanted = f"{name}={value}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours
            continue
    return found


def kill_processes_with_env(name: str, value: str, grace_s: float = 8.0) -> None:
    """SIGTERM the processes carrying ``name=value``, wait, then SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in processes_with_env(name, value):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while processes_with_env(name, value) and time.monotonic() < deadline:
            time.sleep(0.5)


def list_nodes(dashboard: str, env: dict) -> list[dict]:
    """``ray list nodes`` (state API, through the dashboard): every node the cluster has had, ALIVE or DEAD."""
    out = subprocess.run(
        [RAY, "list", "nodes", "--address", dashboard, "--format", "json", "--detail", "--limit", "100"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def alive_standin_nodes(nodes: list[dict]) -> list[dict]:
    return [n for n in nodes if n["state"] == "ALIVE" and n["resources_total"].get(STANDIN)]


@pytest.fixture
def fake_autoscaling_head(tmp_path):
    """A head started from cluster.local.yaml with RAY_FAKE_CLUSTER=1: the real autoscaler, fake worker nodes."""
    gcs, dashboard, client, agent = free_ports(4)
    config = load_yaml(LOCAL)
    config["provider"]["gcs_address"] = f"{ray.util.get_node_ip_address()}:{gcs}"  # the head's port, not 6379
    config["idle_timeout_minutes"] = 0.25  # the scale-down watched below, sooner than the file's minute
    config_path = tmp_path / "cluster.local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    token = secrets.token_hex(16)
    env = head_env(token)
    # Short on purpose: Ray's sockets live under it, and AF_UNIX paths stop at 107 bytes (pytest's tmp_path is longer).
    temp_dir = Path(tempfile.mkdtemp(prefix="bfpo-ray-", dir="/tmp"))
    try:
        started = subprocess.run(
            [
                RAY,
                "start",
                "--head",
                f"--port={gcs}",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent}",
                f"--num-cpus={config['available_node_types']['ray.head.default']['resources']['CPU']}",
                "--object-store-memory=1000000000",
                "--disable-usage-stats",
                f"--temp-dir={temp_dir}",
                f"--autoscaling-config={config_path}",
            ],
            env={**env, "RAY_FAKE_CLUSTER": "1"},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert started.returncode == 0, (started.stdout + started.stderr)[-4000:]
        yield {
            "dashboard": f"http://127.0.0.1:{dashboard}",
            "env": env,
            "token": token,
            "monitor_log": temp_dir / "session_latest" / "logs" / "monitor.log",
        }
    finally:
        kill_processes_with_env("RAY_AUTH_TOKEN", token)
        shutil.rmtree(temp_dir, ignore_errors=True)


def summed_events(log: str, verb: str) -> int:
    """Nodes of WORKER_TYPE the autoscaler reported adding or removing, summed over its event lines."""
    pattern = {
        "Adding": rf"Adding (\d+) node\(s\) of type {re.escape(WORKER_TYPE)}\.",
        "Removing": rf"Removing (\d+) nodes of type {re.escape(WORKER_TYPE)} \(idle\)",
    }[verb]
    return sum(int(n) for n in re.findall(pattern, log))


def dead_worker_logs(log_dir: Path, job_log: str, lines: int = 40) -> str:
    """What Ray's own logs say about each worker process the job log reports dead (``pid: N``): its log files'
    tails and the raylet's lines naming it. Ray's error message only lists possible causes."""
    found = []
    for pid in sorted(set(re.findall(r"\bpid: (\d+)", job_log))):
        own = sorted(log_dir.glob(f"*-{pid}.*")) + sorted(log_dir.glob(f"*_{pid}.log"))  # worker-*-<pid>.err, ...
        for path in own + sorted(log_dir.glob("raylet*.out")):
            text = path.read_text(errors="replace").splitlines()
            if "raylet" in path.name:
                text = [line for line in text if pid in line]
            if text:
                found.append(f"--- {path.name} ({pid})\n" + "\n".join(text[-lines:]))
    return "\n".join(found)


def raylets(token: str) -> int:
    return sum(1 for cmd in processes_with_env("RAY_AUTH_TOKEN", token).values() if "/raylet/raylet " in cmd)


RAY_WORKER_DIED = "The actor is dead because its worker process has died"


def submit_and_watch(
    dashboard: str, env: dict, token: str, overrides: list[str], log_path: Path
) -> tuple[int, str, dict[str, dict], int]:
    """``ray job submit`` the default job with ``overrides``, watching the cluster while it runs (the nodes may
    already be idle-removed when a long job ends): (exit code, job log, STANDIN nodes seen alive, most raylets)."""
    with log_path.open("w") as log_file:
        job = subprocess.Popen(
            [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(REPO), "--"]
            + ["python", "jobs/bfpo.py", *overrides],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        workers: dict[str, dict] = {}
        most_raylets, deadline = 0, time.monotonic() + 600
        while job.poll() is None and time.monotonic() < deadline:
            most_raylets = max(most_raylets, raylets(token))
            try:
                workers.update({n["node_id"]: n for n in alive_standin_nodes(list_nodes(dashboard, env))})
            except (subprocess.SubprocessError, json.JSONDecodeError):  # a busy dashboard: ask again next time
                pass
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.wait(timeout=5)  # look again in 5 s, or go on as soon as the job ends
        if job.poll() is None:
            job.kill()
        job.wait(timeout=30)
    return job.returncode, log_path.read_text(), workers, most_raylets


def dead_node_ids(nodes: list[dict]) -> set[str]:
    return {n["node_id"] for n in nodes if n["state"] == "DEAD"}


def wait_for_no_standin_nodes(dashboard: str, env: dict, timeout_s: float = 300) -> list[dict]:
    """Wait for the autoscaler to remove the idle worker nodes; the nodes as last listed."""
    deadline = time.monotonic() + timeout_s
    while alive_standin_nodes(nodes := list_nodes(dashboard, env)) and time.monotonic() < deadline:
        time.sleep(3)
    return nodes


@pytest.mark.timeout(900)
def test_local_autoscaling_job(fake_autoscaling_head, tmp_path):
    head = fake_autoscaling_head
    dashboard, env, token = head["dashboard"], head["env"], head["token"]
    nodes = list_nodes(dashboard, env)
    assert len(nodes) == 1 and STANDIN not in nodes[0]["resources_total"]  # the head alone, no training resource
    assert raylets(token) == 1

    runs = tmp_path / "runs"
    overrides = [
        *small_world_overrides(runs),
        "model.sft_first=null",  # the subject is the cluster: one training run, one evaluation
        "evaluate.compare_start=false",
        "evaluate.samples=1",
        "train.max_steps=4",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "train.eval_every=4",
        f"run.worker_resource={STANDIN}",
        "run.num_workers=2",
    ]
    monitor_log = head["monitor_log"]
    for attempt in (1, 2):
        events_from, dead_before = len(monitor_log.read_text()), dead_node_ids(list_nodes(dashboard, env))
        returncode, job_log, workers, most_raylets = submit_and_watch(
            dashboard, env, token, overrides, tmp_path / f"job-{attempt}.log"
        )
        if returncode == 0 or attempt == 2 or RAY_WORKER_DIED not in job_log:
            break
        # Seen once in CI: the TrainController's worker process died before it ran (Ray: "worker unexpectedly exits
        # with a connection error code 2"). Seen on a development machine too, the process's log ending in "Intel
        # oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so": torch's bundled oneMKL prints that line when the
        # process's working directory no longer exists (a matmul after `import torch` in a removed directory prints
        # it too). Keep what the logs say about that process, wait for the idle nodes to go, and submit the same job
        # again, as its user would.
        warnings.warn(
            f"a Ray worker process died under the job; submitting it again\n"
            f"{dead_worker_logs(monitor_log.parent, job_log)}\n{job_log[-2000:]}",
            stacklevel=1,
        )
        wait_for_no_standin_nodes(dashboard, env)
    assert returncode == 0 and "succeeded" in job_log, (
        job_log[-4000:] + "\n" + dead_worker_logs(monitor_log.parent, job_log)
    )
    assert (runs / "bfpo-default" / "export" / "model.safetensors").is_file()

    # The workers asked for A100_STANDIN, which only worker nodes have: the autoscaler launched two of them.
    assert len(workers) == 2, workers
    assert all(n["resources_total"]["CPU"] == 1 and n["resources_total"][STANDIN] == 1 for n in workers.values())
    assert most_raylets == 3  # the head's and one per fake node, all carrying this head's token
    assert summed_events(monitor_log.read_text()[events_from:], "Adding") == 2

    # idle_timeout_minutes: 0.25 -> the autoscaler removes them seconds after the job.
    nodes = wait_for_no_standin_nodes(dashboard, env)
    assert not alive_standin_nodes(nodes), nodes
    assert dead_node_ids(nodes) - dead_before == set(workers)
    assert summed_events(monitor_log.read_text()[events_from:], "Removing") == 2
    deadline = time.monotonic() + 30
    while raylets(token) != 1 and time.monotonic() < deadline:  # the fake nodes' raylets are gone, the head's stays
        time.sleep(1)
    assert raylets(token) == 1


QUIET_AFTER_IMPORTS = """
import logging, sys, huggingface_hub, ray.data
if sys.argv[1] == "transformers":
    import transformers
from bfpo_ray.cluster import configure_output
configure_output(verbose_output=False)
import transformers
print(transformers.utils.logging.is_progress_bar_enabled(), logging.getLogger("ray.data").getEffectiveLevel())
"""


@pytest.mark.parametrize("first", ["huggingface_hub", "transformers"])
def test_a_quiet_command_silences_libraries_its_script_imported_first(first):
    """A script that imports Ray Data and huggingface_hub (or transformers) before ``configure_output``
    (experiments/real_model.py) still shows no weight-loading bars and no Ray Data INFO lines."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_DATA_LOG_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS")}
    done = subprocess.run(
        [sys.executable, "-c", QUIET_AFTER_IMPORTS, first],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert done.stdout.split() == ["False", str(logging.WARNING)], done.stdout + done.stderr
