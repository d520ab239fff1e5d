"""The GPU path, as far as a machine without a GPU can check it: the workers' DeepSpeed accelerator follows
run.use_gpu whatever the driver's environment holds, a worker without a CUDA device stops with one clear line,
DeepSpeed's accelerator is checked before the model loads, and every parameter and buffer of the engine's module is
on ``engine.device`` after ``deepspeed.initialize`` (ZeRO 0, 2, 3 and LoRA under the in-process gloo world). On a
machine with a CUDA device, the last tests run the forward and a DeepSpeed engine on it (``-k cuda``)."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
from test_memory import deepspeed_world  # noqa: F401  (a fixture)
from test_train import make_config, scored_dataset  # noqa: F401  (a fixture)

from bfpo_ray.config import ModelConfig, TrainConfig, config_from_dict
from bfpo_ray.train import engine
from bfpo_ray.train.launch import worker_env

NO_CUDA = "run.use_gpu is true but this worker sees no CUDA device"


# ------------------------------------------------------------------------------------------- the workers' accelerator


@pytest.mark.parametrize("driver_value", [None, "cpu", "cuda", "xpu"])
def test_worker_env_sets_the_accelerator_of_the_run_over_the_drivers(monkeypatch, driver_value):
    if driver_value is None:
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    else:
        monkeypatch.setenv("DS_ACCELERATOR", driver_value)
    monkeypatch.setenv("DS_SKIP_CUDA_CHECK", "1")  # the other DS_* variables are still forwarded
    assert worker_env(use_gpu=True)["DS_ACCELERATOR"] == "cuda"
    assert worker_env(use_gpu=False)["DS_ACCELERATOR"] == "cpu"
    assert worker_env(use_gpu=True)["DS_SKIP_CUDA_CHECK"] == "1"


def test_worker_env_forwards_settings_but_no_credential(monkeypatch):
    """Ray's runtime-env agent logs the variables a runtime environment carries: no credential goes through it."""
    monkeypatch.setenv("WANDB_PROJECT", "bfpo")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    for name in ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "secret-value-0123")
    env = worker_env(use_gpu=False)
    assert env["WANDB_PROJECT"] == "bfpo" and env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "secret-value-0123" not in env.values()


def test_deepspeeds_accelerator_is_checked_against_the_run():
    """This process runs DeepSpeed's CPU accelerator (conftest sets DS_ACCELERATOR=cpu)."""
    engine.check_accelerator(use_gpu=False)
    with pytest.raises(
        RuntimeError,
        match=r"DeepSpeed's accelerator is 'cpu' but run.use_gpu=True needs 'cuda' "
        r"\(DS_ACCELERATOR='cpu' in this worker\)",
    ):
        engine.check_accelerator(use_gpu=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_worker_without_a_cuda_device_stops_with_one_line_naming_what_is_missing(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(RuntimeError) as failure:
        engine.require_cuda_device()
    message = str(failure.value)
    assert message.startswith(NO_CUDA) and "\n" not in message
    assert f"torch {torch.__version__} is " in message and "CUDA_VISIBLE_DEVICES='0'" in message
    assert ("a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build") in message
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES=unset"):
        engine.require_cuda_device()
    # The one stand-in of this file: this machine has no GPU, so a visible device is faked for the passing branch
    # (on a GPU, the CUDA tests below run the real check).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engine.require_cuda_device()  # a worker that sees a device goes on


# ------------------------------------------------------------------------------------- tensors on the engine's device


class WithBuffers(torch.nn.Module):
    def __init__(self, buffer_device: str = "cpu"):
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)
        self.rotary = torch.nn.Module()
        self.rotary.register_buffer("inv_freq", torch.ones(3, device=buffer_device), persistent=False)


def test_a_tensor_on_another_device_is_named_with_where_it_is():
    cpu = torch.device("cpu")
    engine.place_and_check(WithBuffers(), cpu)
    with pytest.raises(
        RuntimeError,
        match=r"1 of the model's parameters and buffers are not on the engine's device "
        r"cpu: rotary.inv_freq \(meta\)$",
    ):
        engine.place_and_check(WithBuffers("meta"), cpu, move_buffers=True)  # a meta buffer cannot be moved
    many = torch.nn.Sequential(*[torch.nn.Linear(2, 2, device="meta") for _ in range(3)])
    with pytest.raises(
        RuntimeError,
        match=r"6 of .* cpu: 0.weight \(meta\), 0.bias \(meta\), 1.weight \(meta\), "
        r"1.bias \(meta\), \.\.\.$",
    ):
        engine.place_and_check(many, cpu)


def test_stray_buffers_are_moved_to_the_engine_device_when_asked():
    """ZeRO-3 leaves placement to zero.Init, which places parameters only: the buffers are moved (here to "meta",
    the one other device a CPU machine has)."""
    module = torch.nn.Module()
    module.rotary = torch.nn.Module()
    module.rotary.register_buffer("inv_freq", torch.ones(3), persistent=False)
    with pytest.raises(RuntimeError, match=r"rotary.inv_freq \(cpu\)"):
        engine.place_and_check(module, torch.device("meta"))
    engine.place_and_check(module, torch.device("meta"), move_buffers=True)
    assert module.rotary.inv_freq.is_meta


def test_on_device_matches_the_index_only_when_the_device_has_one():
    tensor = torch.ones(1, device="meta")
    assert engine.on_device(tensor, torch.device("meta"))
    assert not engine.on_device(tensor, torch.device("cpu"))
    assert not engine.on_device(torch.ones(1), torch.device("cuda", 0))


def test_preference_evaluation_all_reduces_on_the_workers_device(monkeypatch):
    """The H200's default job stopped at the end of its SFT stage, in the evaluation: ``evaluate_preferences``
    all-reduced its sums as a CPU tensor under NCCL ("No backend type associated with device type cpu"). The sums
    must reach the collective on the device the worker trains on (here "meta", a device other than the CPU)."""
    from test_memory import toy_rows

    from bfpo_ray import objectives
    from bfpo_ray.train import metrics

    class Reduced(Exception):
        pass

    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise Reduced

    def cpu_logps(model, batch, device):  # the forward, on the CPU whatever the device
        rows = 2 * len(batch["chosen_safe"])
        return -torch.rand(rows) * 10, torch.full((rows,), 4)

    monkeypatch.setattr(metrics.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(metrics, "batch_logps", cpu_logps)
    with pytest.raises(Reduced):
        metrics.evaluate_preferences(
            torch.nn.Linear(1, 1),
            {"safety": toy_rows("eval_safety", 5, 50, 0)},
            objectives.build(TrainConfig(tau=0.1)),
            world_size=1,
            pad_id=0,
            device=torch.device("meta"),
            micro_batch_pairs=2,
        )
    assert seen == [torch.device("meta")]


# --------------------------------------------------------------------------------------------- under real DeepSpeed


def unset_zero3() -> None:
    """Later from_pretrained calls in this process must load whole models again (see test_memory)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


@pytest.mark.parametrize(
    "zero_stage, trainable",
    [(0, "all"), (2, ["down_proj"]), (3, ["down_proj"]), (2, "lora")],
    ids=["zero0", "zero2", "zero3", "zero2-lora"],
)
def test_every_parameter_and_buffer_is_on_the_engine_device(
    deepspeed_world,
    tiny_model_dir,  # noqa: F811
    zero_stage,
    trainable,
):
    train = TrainConfig(trainable=trainable, zero_stage=zero_stage)
    try:
        ds = engine.build_engine(
            ModelConfig(path=str(tiny_model_dir)), train, dtype=torch.float32, use_gpu=False, total_steps=4
        )
    finally:
        if zero_stage == 3:
            unset_zero3()
    tensors = [*ds.module.named_parameters(), *ds.module.named_buffers()]
    assert any("inv_freq" in name for name, _ in tensors)  # the rotary buffer is among those checked
    assert [name for name, tensor in tensors if tensor.device != ds.device] == []
    if zero_stage == 3:
        assert all(hasattr(param, "ds_id") for _, param in ds.module.named_parameters())  # placeholders checked


def test_build_engine_refuses_a_meta_buffer_under_zero3_and_checks_the_accelerator_before_loading(
    deepspeed_world, tiny_model_dir, monkeypatch
):  # noqa: F811
    load_policy = engine.load_policy

    def with_meta_buffer(model_cfg, train, dtype):
        model = load_policy(model_cfg, train, dtype)
        model.model.register_buffer("stray", torch.ones(2, device="meta"), persistent=False)
        return model

    monkeypatch.setattr(engine, "load_policy", with_meta_buffer)
    try:
        with pytest.raises(RuntimeError, match=r"not on the engine's device cpu: model.stray \(meta\)$"):
            engine.build_engine(
                ModelConfig(path=str(tiny_model_dir)),
                TrainConfig(zero_stage=3),
                dtype=torch.float32,
                use_gpu=False,
                total_steps=4,
            )
    finally:
        unset_zero3()

    def must_not_load(*args):
        raise AssertionError("the model was loaded before the accelerator was checked")

    monkeypatch.setattr(engine, "load_policy", must_not_load)
    with pytest.raises(RuntimeError, match="DeepSpeed's accelerator is 'cpu' but run.use_gpu=True needs 'cuda'"):
        engine.build_engine(
            ModelConfig(path=str(tiny_model_dir)),
            TrainConfig(zero_stage=2),
            dtype=torch.float32,
            use_gpu=True,
            total_steps=4,
        )


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_gpu_run_on_a_node_without_a_cuda_device_stops_with_the_clear_error(
    ray_cluster, scored_dataset, tiny_model_dir, tmp_path
):  # noqa: F811
    """The tests' cluster declares one logical GPU and has no device: the run stops at the workers' device check,
    with its one line, and neither DeepSpeed nor NCCL is reached."""
    import ray
    import ray.train

    from bfpo_ray.train.launch import train

    cfg = config_from_dict(
        {
            **make_config(tiny_model_dir, tmp_path, "gpu").model_dump(mode="json"),
            "run": {
                "name": "gpu",
                "storage_path": str(tmp_path),
                "num_workers": 1,
                "cpus_per_worker": 1,
                "use_gpu": True,
                "max_failures": 0,
            },
        }
    )
    before = free(ray.available_resources())
    with pytest.raises(ray.train.TrainingFailedError) as failure:
        train(cfg, scored_dataset)
    message = str(failure.value)
    assert NO_CUDA in message and "CUDA_VISIBLE_DEVICES='0'" in message
    assert "No backend type" not in message and "NCCL" not in message and "deepspeed" not in message.lower()
    # The failed run's worker is gone and gave its CPU and GPU back (Ray Train alone leaves it holding them).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and free(ray.available_resources()) != before:
        time.sleep(0.5)
    assert free(ray.available_resources()) == before


def free(resources: dict) -> dict:
    return {key: resources.get(key, 0.0) for key in ("CPU", "GPU")}


# ------------------------------------------------------------------------------------------ on a CUDA device (GPU)
# Skipped without one. On a GPU machine: DS_ACCELERATOR=cuda python -m pytest tests/test_gpu_path.py -k cuda
# (the tests' conftest otherwise gives this process DeepSpeed's CPU accelerator).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
def test_response_logps_on_cuda_match_plain_transformers(tiny_model_dir):
    """The lm_head run on the scored positions only (``lm_head_at``), on the GPU under the installed transformers,
    gives the log-probs that transformers' own full logits give."""
    from test_loss import _padded_batch
    from transformers import AutoModelForCausalLM

    from bfpo_ray.logprobs import response_logps, sequence_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().eval()
    input_ids, attention_mask, _, loss_mask, _ = _padded_batch(model.config.pad_token_id)
    input_ids, attention_mask, loss_mask = input_ids.cuda(), attention_mask.cuda(), loss_mask.cuda()
    with torch.no_grad():
        full_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        got = response_logps(model, input_ids, attention_mask, loss_mask)
    assert got.device.type == "cuda"
    assert torch.allclose(got, sequence_logps(full_logits, input_ids, loss_mask), atol=1e-4)


@pytest.fixture(scope="module")
def cuda_world():
    """torch.distributed (NCCL) and DeepSpeed in this process, world size 1, on GPU 0; torn down after the module."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cuda":
        pytest.skip("DeepSpeed runs its CPU accelerator in this process: run with DS_ACCELERATOR=cuda")
    if dist.is_initialized():
        pytest.skip("a process group (gloo) of another test is alive: run the CUDA tests alone (-k cuda)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="nccl")
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@needs_cuda
@pytest.mark.parametrize("zero_stage", [2, 3], ids=["zero2", "zero3"])
def test_a_cuda_engine_holds_every_tensor_on_the_gpu_and_takes_a_step(cuda_world, tiny_model_dir, zero_stage):
    """Under NCCL, bf16: ``build_engine`` with use_gpu puts every parameter and buffer on cuda:0 (the H200's
    "No backend type associated with device type cpu" was a CPU tensor in deepspeed.initialize's broadcast), and a
    forward, backward and optimizer step of the engine run."""
    try:
        ds = engine.build_engine(
            ModelConfig(path=str(tiny_model_dir)),
            TrainConfig(trainable="all", zero_stage=zero_stage),
            dtype=torch.bfloat16,
            use_gpu=True,
            total_steps=4,
        )
    finally:
        if zero_stage == 3:
            unset_zero3()
    assert ds.device.type == "cuda"
    tensors = [*ds.module.named_parameters(), *ds.module.named_buffers()]
    assert [name for name, tensor in tensors if tensor.device.type != "cuda"] == []
    input_ids = torch.randint(4, 30, (2, 8), device=ds.device)
    loss = ds(input_ids=input_ids, labels=input_ids).loss
    ds.backward(loss)
    assert engine.optimizer_step(ds) and torch.isfinite(loss)
    from test_memory import toy_rows

    from bfpo_ray import objectives
    from bfpo_ray.train.metrics import evaluate_preferences

    scores = evaluate_preferences(
        ds,
        {"safety": toy_rows("eval_safety", 5, 30, 0)},  # all-reduced under NCCL
        objectives.build(TrainConfig(tau=0.1)),
        world_size=1,
        pad_id=0,
        device=ds.device,
        micro_batch_pairs=2,
    )
    assert scores["eval/pairs"] == 5
