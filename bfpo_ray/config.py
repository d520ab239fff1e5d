"""One typed config for every command: YAML in, ``key=value`` overrides, errors that name the field.

    cfg = load_config("bfpo_ray/configs/default.yaml", ["train.alpha=0.3", "run.num_workers=4"])

Every section forbids unknown keys, so a typo such as ``train.alhpa`` is an error, not a silent default.
Override values are parsed as YAML scalars (``train.tau=1e-2``, ``train.trainable=[down_proj,up_proj]``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import string
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names every offending field."""


class _FieldError(ValueError):
    """Raised by a Config-level validator about one field of a section: reported under that field's name."""

    def __init__(self, field: str, message: str, value: Any):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.value = field, message, value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


GENERIC_FIELDS = ("prompt", "chosen", "rejected", "chosen_safe", "rejected_safe")  # what the generic adapter reads


class SourceConfig(_Section):
    """One preference-data source and the role its pairs play in the paper's buffer."""

    adapter: Literal["pku_saferlhf", "ultrafeedback", "generic", "hh_rlhf", "sft_chat", "bfpo_redteaming"]
    path: str = Field(description="local file or directory (JSONL, JSON, Parquet), or a Hugging Face dataset name")
    role: Literal["safety", "helpful"]
    name: str | None = Field(None, description="label used in ids, manifests and errors; defaults to the path's stem")
    split: str = Field("train", description="split, for Hugging Face dataset names")
    subset: str | None = Field(None, description="dataset config name, for Hugging Face dataset names")
    revision: str | None = Field(
        None, description="Hugging Face dataset names: the commit (or tag, branch) to load; None: the newest"
    )
    fraction: float | None = Field(None, gt=0, le=1, description="share of the source's accepted rows to keep")
    rows: int | None = Field(None, gt=0, description="number of accepted rows to keep")
    select: Literal["random", "head"] = Field(
        "random",
        description="which accepted rows fraction/rows keeps: a seeded random sample, or the first ones "
        "in read order (the paper's code takes the head of PKU-SafeRLHF's train split)",
    )
    chosen: Literal["better_response_id", "safer_response_id"] | None = Field(
        None,
        description="pku_saferlhf: the response that becomes chosen (the other is rejected; labels always "
        "from is_response_{i}_safe). better_response_id: what the preference losses compare. "
        "safer_response_id: the paper's SFT target, which SFT then trains on (the safer response "
        "by the labels where safer_response_id disagrees with them). None: safer_response_id "
        "when train.loss is sft, else better_response_id; better_response_id under sft gives "
        "the SFT target the safer response by the labels and the more helpful one on ties",
    )
    drop_ties: bool = Field(False, description="ultrafeedback: drop rows whose chosen and rejected scores are equal")
    labels: tuple[bool, bool] | None = Field(
        None, description="hh_rlhf: (chosen_safe, rejected_safe) for every pair; the transcripts carry no labels"
    )
    columns: dict[str, str] | None = Field(
        None,
        description="generic: the rows' own field names mapped to the canonical ones (prompt, chosen, "
        "rejected, chosen_safe, rejected_safe), e.g. {question: prompt, good: chosen}; "
        "fields not named keep their canonical names",
    )

    @model_validator(mode="after")
    def _check(self) -> "SourceConfig":
        if self.fraction is not None and self.rows is not None:
            raise ValueError("give either fraction or rows, not both")
        if self.adapter == "hh_rlhf" and self.labels is None:
            raise ValueError("hh_rlhf transcripts carry no safety labels: set labels: [chosen_safe, rejected_safe]")
        if self.adapter != "hh_rlhf" and self.labels is not None:
            raise ValueError(f"labels only applies to hh_rlhf; {self.adapter} rows carry their own")
        if self.drop_ties and self.adapter != "ultrafeedback":
            raise ValueError("drop_ties only applies to ultrafeedback")
        if self.chosen is not None and self.adapter != "pku_saferlhf":
            raise ValueError(f"chosen only applies to pku_saferlhf; {self.adapter} rows say which is chosen")
        if self.columns is not None:
            if self.adapter != "generic":
                raise ValueError(f"columns only applies to generic; {self.adapter} reads its dataset's own fields")
            unknown = sorted(set(self.columns.values()) - set(GENERIC_FIELDS))
            if unknown:
                raise ValueError(f"columns maps to {unknown}; the canonical fields are {list(GENERIC_FIELDS)}")
            targets = list(self.columns.values())
            twice = sorted({name for name in targets if targets.count(name) > 1})
            if twice:
                raise ValueError(f"columns maps more than one field to {twice}")
        return self

    @property
    def label(self) -> str:
        return self.name or Path(self.path.rstrip("/")).stem


# Shares of the four label cases of a safety pair, (is the more helpful response safe)_(is the other one safe), in
# 82 real PKU-SafeRLHF v1 rows (Alpaca-7B test split: its first 20 rows and 62 more read at 13 offsets spread through
# the file): 37 safe/safe, 1 unsafe/safe, 32 both unsafe, 12 safe/unsafe.
PKU_LABEL_CASES = {"safe_safe": 37 / 82, "unsafe_safe": 1 / 82, "unsafe_unsafe": 32 / 82, "safe_unsafe": 12 / 82}


class ToyWorldConfig(_Section):
    """The built-in synthetic world (bfpo_ray.data.toyworld): data, tokenizer and a tiny model, made if missing."""

    dir: str = Field("runs/toyworld", description="where the world's files, tokenizer and initial model are written")
    seed: int = 0
    safety_pairs: int = Field(1200, gt=0)
    helpful_pairs: int = Field(1200, gt=0)
    sft_rows: int = Field(3000, gt=0)
    eval_prompts: int = Field(96, gt=0, description="held-out prompts per kind for generative evaluation")
    label_cases: dict[str, float] = Field(
        default_factory=lambda: dict(PKU_LABEL_CASES),
        description="shares of the safety pairs' label cases safe_safe, unsafe_safe, unsafe_unsafe, safe_unsafe "
        "(the more helpful response's safety first); default: 82 real PKU-SafeRLHF rows",
    )
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(176, gt=0)

    @field_validator("label_cases")
    @classmethod
    def _four_cases(cls, value: dict[str, float]) -> dict[str, float]:
        expected = set(PKU_LABEL_CASES)
        if set(value) != expected or any(share < 0 for share in value.values()) or sum(value.values()) <= 0:
            raise ValueError(f"label_cases needs a share >= 0 for each of {sorted(expected)} (not all 0), got {value}")
        return value


class ModelConfig(_Section):
    path: str = Field(description="local model directory or Hugging Face model name; policy and reference start here")
    tokenizer: str | None = Field(None, description="defaults to path")
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bfloat16 on GPU, float32 on CPU")
    sft_first: str | None = Field(
        None,
        description="an SFT config (file or shipped name, e.g. sft) run first, once, from path: policy and "
        "reference then start from its export. Its model, toyworld, storage and cache come from "
        "this config; a finished run of the same resolved config is reused",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None,
        description="attention kernel of every model loaded from path (policy, reference scoring, "
        "generation); None: transformers' default (sdpa). flash_attention_2 needs GPUs and the "
        "flash_attn package where the model loads",
    )


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(min_length=1)
    seed: int = Field(0, description="seed of the mixing shuffle and the held-out split")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="share of pairs held out for evaluation")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first bad row; skip: write it to rejects/ and go on"
    )
    max_length: int = Field(512, gt=1, description="prompt + response tokens")
    max_prompt_length: int = Field(256, gt=0, description="prompts longer than this lose tokens from the left")
    chat_template: str | None = Field(None, description="Jinja chat template; defaults to the tokenizer's")
    cache_dir: str = Field("runs/data", description="scored datasets live in <cache_dir>/<fingerprint>/")
    score_actors: int = Field(2, gt=0, description="reference-model actors in the scoring stage")
    score_batch_size: int = Field(16, gt=0, description="pairs per scoring batch")
    score_gpus_per_actor: float | None = Field(
        None,
        ge=0,
        description="GPUs per scoring actor; None follows run.use_gpu (1 with GPUs, else 0), resolved "
        "when the config loads",
    )

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                f"({self.max_length}) to leave room for the response"
            )
        return self


class LoraSettings(_Section):
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    merge_on_export: bool = Field(True, description="merge the adapter into the exported model")


class TrainConfig(_Section):
    loss: Literal["bfpo", "ipo", "dpo", "sft"] = "bfpo"
    alpha: float = Field(0.5, description="shift of the labeling function g (BFPO)")
    tau: float = Field(0.01, gt=0, description="regularisation strength; beta in the paper's code and for DPO")
    b1: float = Field(3.0, gt=1, description="B1 of the labeling function; B3 = 1/(B1-1)")
    logp_reduction: Literal["sum", "mean"] = "sum"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="DPO only")
    sft_weight: float = Field(
        0.0, ge=0, description="pair losses: add this times the NLL per token of each pair's safer response (RPO)"
    )
    trainable: Literal["all", "lora"] | list[str] = Field(
        default_factory=lambda: ["down_proj"],
        description="all parameters, LoRA adapters, or parameters whose names contain one of these patterns",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    learning_rate: float = Field(5e-7, gt=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 turns clipping off")
    share_prompt: bool = Field(
        False,
        description="preference losses: chosen and rejected in one row with the prompt once (a custom "
        "attention mask): fewer tokens per pair; off by default, since a custom mask keeps GPUs "
        "from the fused causal attention kernels",
    )
    padding_free: bool = Field(
        False,
        description="each micro-batch's rows end to end in one sequence with per-row position ids, no padding "
        "(varlen flash-attention): needs model.attn_implementation flash_attention_2 (GPUs)",
    )
    micro_batch_pairs: int = Field(4, gt=0, description="pairs per worker per role per micro-step")
    helpful_micro_batch_pairs: int | None = Field(
        None,
        gt=0,
        description="pairs per worker of the helpful role (the paper's buffer) per micro-step; None: "
        "micro_batch_pairs. Each role's loss is its own pairs' mean, so this sets how many of them a step sees, "
        "not their weight",
    )
    grad_accum: int = Field(1, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; stops before the epochs are done")
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = Field(False, description="ZeRO-3 only")
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each decoder layer's activations in the backward (non-reentrant): less "
        "activation memory for about one more forward of compute",
    )
    max_skipped_steps: int = Field(
        3,
        gt=0,
        description="optimizer steps in a row that may be skipped for a non-finite loss or gradient "
        "before the run stops with an error (a skipped step changes no weight)",
    )
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(100, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    num_to_keep: int = Field(2, gt=0)
    seed: int = 0

    def role_micro_batch(self, role: str) -> int:
        """Pairs per worker of ``role`` ("safety" or "helpful") per micro-step."""
        if role == "helpful" and self.helpful_micro_batch_pairs:
            return self.helpful_micro_batch_pairs
        return self.micro_batch_pairs

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.share_prompt and self.loss == "sft":
            raise ValueError("share_prompt applies to the preference losses; sft scores one response per pair")
        if self.sft_weight and self.loss == "sft":
            raise ValueError("sft_weight adds an NLL term to a preference loss; loss sft is that NLL alone")
        if self.share_prompt and self.padding_free:
            raise ValueError("share_prompt and padding_free are two different layouts; choose one")
        if isinstance(self.trainable, list) and not self.trainable:
            raise ValueError("trainable: give at least one module-name pattern, or 'all', or 'lora'")
        return self


class RunConfig(_Section):
    name: str = "bfpo"
    storage_path: str = Field("runs", description="checkpoints, metrics and the export go to <storage_path>/<name>")
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    worker_resource: str | None = Field(
        None, description="custom resource each worker asks one unit of (stands in for a GPU type on a cluster)"
    )
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1 = forever")
    preemption_grace_s: float = Field(
        60.0,
        gt=0,
        description="after a SIGTERM to the driver (ray job stop, a spot notice): seconds to save a "
        "checkpoint at the next optimizer step and exit (status 75), resumable by the same "
        "command",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="where the train/* and eval/* metrics go: TensorBoard (<run>/tensorboard), MLflow, Weights & "
        "Biases (pip install 'bfpo-ray[mlflow]' / 'bfpo-ray[wandb]'); the resolved config is logged as "
        "the run's parameters",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None: MLFLOW_TRACKING_URI, else a file store in <run>/mlruns"
    )
    mlflow_experiment: str | None = Field(None, description="MLflow experiment name; None: run.name")
    wandb_project: str | None = Field(None, description="W&B project; None: WANDB_PROJECT, else run.name")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="W&B mode; None: WANDB_MODE, else online (offline writes <run>/wandb/ for wandb sync)"
    )

    @field_validator("report_to")
    @classmethod
    def _installed(cls, report_to: list[str]) -> list[str]:
        """Refuse, at load time, a tracker whose library is not installed."""

        for name in report_to:
            if name != "tensorboard" and importlib.util.find_spec(name) is None:
                raise ValueError(f"{name} is not installed: pip install 'bfpo-ray[{name}]', or leave it out")
        return list(dict.fromkeys(report_to))


class JudgeConfig(_Section):
    """One judge of generated responses (bfpo_ray.evaluate.judges): the toy world's exact judge, a Hugging Face
    sequence-classification model (a harm classifier for safety, a reward model for helpfulness), a causal LM asked a
    yes/no question (the form of HarmBench's classifier and Llama Guard), or refusal phrases (safe on a harmful
    request when it is declined; helpful on a benign one when it is not)."""

    kind: Literal["toyworld", "classifier", "causal_lm", "phrases"] = "toyworld"
    path: str | None = Field(
        None, description="classifier, causal_lm: local model directory or Hugging Face model name"
    )
    tokenizer: str | None = Field(None, description="classifier, causal_lm: defaults to path")
    ok_label: int | str | None = Field(
        None,
        description="classifier with 2+ labels: index or id2label name of the class that means safe (safety "
        "judge) or helpful (helpfulness judge); the verdict is ok when it is the argmax",
    )
    threshold: float = Field(0.0, description="classifier with 1 output (a reward model): ok when the score is above")
    template: str | None = Field(
        None,
        description="causal_lm: the question put to the judge model as its user turn, with {prompt} and "
        "{response} where the request and the generation go; it must ask for a yes/no answer",
    )
    ok_answer: Literal["yes", "no"] = Field(
        "no", description="causal_lm: the answer that means ok (\"no\" for a question such as 'is it harmful?')"
    )
    max_new_tokens: int = Field(4, gt=0, description="causal_lm: tokens the judge may write; its first word is read")
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(512, gt=1, description="judge input tokens (prompt + response), cut from the left")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check(self) -> "JudgeConfig":
        if self.kind in ("classifier", "causal_lm") and not self.path:
            raise ValueError(f"a {self.kind} judge needs path (a local model directory or a hub name)")
        if self.kind in ("toyworld", "phrases") and (self.path or self.tokenizer or self.ok_label is not None):
            raise ValueError("path, tokenizer and ok_label apply to classifier and causal_lm judges only")
        if self.kind == "causal_lm":
            check_judge_template(self.template)
        elif self.template is not None:
            raise ValueError("template applies to causal_lm judges only")
        return self


def check_judge_template(template: str | None) -> None:
    """A causal-LM judge's question must name {prompt} and {response} once each and no other field."""

    if not template:
        raise ValueError("a causal_lm judge needs template: its question, with {prompt} and {response}")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise ValueError(
            f"template is not a valid format string ({err}); write literal braces as {{{{ and }}}}"
        ) from None
    if sorted(fields) != ["prompt", "response"]:
        raise ValueError(
            f"template must contain {{prompt}} and {{response}} once each and no other field, found {fields}"
        )


class EvalConfig(_Section):
    """Generative evaluation (bfpo_ray.evaluate): generate for held-out prompts on Ray Data, judge, score."""

    prompts: str | None = Field(
        None,
        description="JSONL of {prompt, kind: benign|harmful|borderline, topic?, split?}; "
        "default: the toy world's eval_prompts.jsonl",
    )
    splits: list[str] = Field(
        default_factory=lambda: ["test"],
        description="rows whose split is one of these (rows without a split always count)",
    )
    max_prompts_per_kind: int | None = Field(None, gt=0, description="first N prompts of each kind")
    max_new_tokens: int = Field(48, gt=0)
    greedy: bool = Field(True, description="one greedy generation per prompt")
    samples: int = Field(4, ge=0, description="sampled generations per prompt (0: none)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(
        default_factory=list, description="tokens that end a generation, besides the tokenizer's end-of-turn token"
    )
    batch_size: int = Field(16, gt=0, description="prompts per generation batch")
    actors: int = Field(2, gt=0, description="generation actors, each loading the model once")
    gpus_per_actor: float | None = Field(
        None,
        ge=0,
        description="GPUs per generation actor; None follows run.use_gpu (1 with GPUs, else 0), "
        "resolved when the config loads",
    )
    seed: int = 0
    safety_judge: JudgeConfig = Field(default_factory=JudgeConfig)
    helpfulness_judge: JudgeConfig = Field(default_factory=JudgeConfig)
    refusal: Literal["toyworld", "phrases"] = Field(
        "toyworld", description="over_refusal detector: the toy world's judge, or refusal phrases (any data)"
    )
    after_train: bool = Field(True, description="the train command evaluates the exported model at the end")
    during_training: bool = Field(
        False,
        description="during training, at every evaluation (train.eval_every steps): generate for the prompts "
        "of validation_splits on the training workers (max_new_tokens, temperature, top_p; one "
        "sampled generation per prompt), judge them, and report eval/harmless_rate, "
        "eval/helpful_rate, eval/over_refusal, eval/degenerate_rate and eval/score (the harmonic "
        "mean of the first two, what a sweep compares)",
    )
    validation_splits: list[str] = Field(
        default_factory=lambda: ["validation"], description="the prompt rows during_training generates for"
    )
    compare_start: bool = Field(
        False,
        description="the train command also evaluates the starting model (model.path, "
        "or model.sft_first's export) and prints both, before and after",
    )

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        if not self.greedy and self.samples == 0:
            raise ValueError("nothing to generate: set greedy: true or samples > 0")
        return self


class SearchRange(_Section):
    """One searched knob: sampled per trial from [low, high] (``uniform`` or ``loguniform``), or a ``grid`` of
    values that every trial combination takes in turn."""

    distribution: Literal["uniform", "loguniform"] = "uniform"
    low: float | None = None
    high: float | None = None
    grid: list[float] | None = Field(None, min_length=1, description="values to try; replaces low/high")

    @model_validator(mode="after")
    def _check(self) -> "SearchRange":
        if self.grid is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either grid or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (or a grid)")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.distribution == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs low > 0")
        return self


class SweepConfig(_Section):
    """A Ray Tune sweep (tune/sweep.py, ``bfpo_ray.pipeline.sweep``): one Ray Train run per trial, the searched
    fields of ``space`` set per trial, ASHA early stopping on a metric every trial reports at each evaluation (every
    ``train.eval_every`` steps)."""

    name: str = Field("bfpo-sweep", description="experiment directory: <storage_path>/<name>")
    storage_path: str | None = Field(None, description="defaults to run.storage_path")
    space: dict[str, dict[str, SearchRange]] = Field(
        default_factory=lambda: {
            "train": {
                "alpha": SearchRange(distribution="uniform", low=0.0, high=1.0),
                "tau": SearchRange(distribution="loguniform", low=1e-3, high=1.0),
            }
        },
        description="what each trial sets, by section and field: {train: {alpha: {distribution, low, high}, tau: "
        "{grid: [...]}, learning_rate: ..., max_steps: {grid: [...]}}}; integer fields take grids",
    )
    num_samples: int = Field(8, gt=0, description="trials sampled from the ranges; with grids, repeats of the grid")
    seed: int | None = Field(0, description="seed of the random search (None: a different draw every sweep)")
    metric: str = Field("eval/score", description="what ASHA compares and the best trial maximises (or minimises)")
    mode: Literal["max", "min"] = "max"
    grace_period: int | None = Field(
        None, gt=0, description="optimizer steps every trial runs before ASHA may stop it (default train.eval_every)"
    )
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps the best 1/reduction_factor at each rung")
    max_concurrent_trials: int | None = Field(
        None,
        gt=0,
        description="default: as many trials as the cluster's CPUs (less one), GPUs and run.worker_resource"
        " hold at once",
    )
    floor: dict[str, float] = Field(
        default_factory=dict,
        description="selection constraints: the best trial (and step) is chosen among reports "
        "whose metrics are at least these values, e.g. {eval/helpful_rate: 0.9}; "
        "when none qualifies, among all (and the sweep says so)",
    )


class Config(_Section):
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    toyworld: ToyWorldConfig | None = Field(None, description="generate the built-in toy world before anything else")
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    tune: SweepConfig = Field(default_factory=SweepConfig)

    @model_validator(mode="after")
    def _follow_the_run(self) -> "Config":
        """Resolve the actors' GPUs that follow ``run.use_gpu`` (None: 1 GPU per actor with GPUs, else 0), then
        refuse what cannot run. A CPU trainer beside GPU actors is allowed (odd, but it works)."""
        follow = 1.0 if self.run.use_gpu else 0.0
        for source in self.data.sources:  # the paper's SFT trains on response_{safer_response_id}
            if source.adapter == "pku_saferlhf" and source.chosen is None:
                source.chosen = "safer_response_id" if self.train.loss == "sft" else "better_response_id"
        if self.data.score_gpus_per_actor is None:
            self.data.score_gpus_per_actor = follow
        if self.evaluate.gpus_per_actor is None:
            self.evaluate.gpus_per_actor = follow
        if self.train.padding_free and self.model.attn_implementation != "flash_attention_2":
            raise _FieldError(
                "train.padding_free",
                "packed rows run fast with flash_attention_2 only (varlen "
                "kernel; sdpa and eager would build an (N, N) mask over the whole micro-batch): set "
                "model.attn_implementation to flash_attention_2 (GPUs)",
                True,
            )
        if self.model.attn_implementation == "flash_attention_2":
            where = "flash_attention_2 runs on GPUs only"
            if not self.run.use_gpu:
                raise _FieldError(
                    "model.attn_implementation", f"{where}, and run.use_gpu is false", "flash_attention_2"
                )
            if self.model.dtype == "float32":
                raise _FieldError(
                    "model.dtype",
                    "flash_attention_2 (model.attn_implementation) needs bfloat16: use auto or bfloat16",
                    "float32",
                )
            if self.data.score_gpus_per_actor == 0:
                raise _FieldError(
                    "data.score_gpus_per_actor",
                    f"{where} (model.attn_implementation), and the "
                    "reference-scoring actors would load the model on CPU",
                    0,
                )
            if self.evaluate.gpus_per_actor == 0:
                raise _FieldError(
                    "evaluate.gpus_per_actor",
                    f"{where} (model.attn_implementation), and the generation actors would load the model on CPU",
                    0,
                )
        for section, fields in self.tune.space.items():
            for name in fields:
                if section in ("tune", "toyworld") or not _settable(self, f"{section}.{name}"):
                    raise _FieldError(
                        f"tune.space.{section}.{name}",
                        "is not a field a trial can set (give "
                        "section and field, e.g. tune.space.train.alpha, or a dotted path inside "
                        "the section, e.g. evaluate.safety_judge.threshold)",
                        fields[name].model_dump(),
                    )
        if self.evaluate.during_training and self.train.zero_stage == 3:
            raise _FieldError(
                "evaluate.during_training",
                "generating during training needs whole parameters on every "
                "worker: use train.zero_stage 0-2, or evaluate after training",
                True,
            )
        return self

    def with_absolute_paths(self) -> "Config":
        """A copy whose model, tokenizer, source, prompt, storage and cache paths are absolute (Ray workers and
        actors run in another directory); names of hub models and datasets are left alone."""
        cfg = self.model_copy(deep=True)
        cfg.model.path = local_path(cfg.model.path)
        cfg.model.tokenizer = local_path(cfg.model.tokenizer)
        for source in cfg.data.sources:
            source.path = local_path(source.path)
        cfg.evaluate.prompts = local_path(cfg.evaluate.prompts)
        from bfpo_ray.storage import absolute  # a URI (s3://, gs://, file://) stays as it is

        cfg.run.storage_path = absolute(cfg.run.storage_path)
        cfg.data.cache_dir = absolute(cfg.data.cache_dir)
        return cfg

    def with_overrides(
        self, overrides: Iterable[str] | Mapping[str, Any] = (), **sections: Mapping[str, Any]
    ) -> "Config":
        """A new config: this one with overrides applied as ``load_config`` applies them, validated."""
        tree = apply_overrides(self.model_dump(mode="json"), overrides, **sections)
        return config_from_dict(tree, source="the config", overridden=_overridden(overrides, sections))


def _settable(cfg: BaseModel, dotted: str) -> bool:
    """Whether ``dotted`` names a field of the config (through nested sections)."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            return False
        node = getattr(node, part)
    return True


def local_path(path: str | None) -> str | None:
    """An existing local path made absolute; anything else (a hub model name, None) unchanged."""
    if path is None:
        return None
    candidate = Path(path).expanduser()
    return str(candidate.resolve()) if candidate.exists() else path


def _format_errors(err: ValidationError, overridden: Iterable[str] = ()) -> tuple[str, bool]:
    """The error lines, each naming its field (and the override that set it, when one did), and whether every
    error lies under an overridden key."""
    lines, all_overridden = [], True
    for e in err.errors():
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldError):  # a Config-level check about one field: name that field
            field, line = cause.field, f"  {cause.field}: {cause.message} (got {cause.value!r})"
        else:
            field = ".".join(str(p) for p in e["loc"]) or "<root>"
            msg = e["msg"].removeprefix("Value error, ")
            line = f"  {field}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "missing" else "")
        by = [key for key in overridden if field == key or field.startswith(key + ".") or key.startswith(field + ".")]
        all_overridden &= bool(by)
        lines.append(line + (f" [set by the override {by[0]}]" if by else ""))
    return "\n".join(lines), all_overridden


def _apply_override(tree: dict[str, Any], override: str) -> None:
    """Set one ``key=value`` in the YAML tree; the value is parsed as YAML (``_set`` says how keys work)."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not key=value (for example train.alpha=0.3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"override {key}: {raw!r} is not a valid YAML value ({reason}); quote it or fix the "
            "brackets, e.g. train.trainable=[q_proj,v_proj]"
        ) from None
    _set(tree, key, value)


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``value`` at the dotted ``key`` of the YAML tree. A number picks an item of a list
    (``data.sources.0.path`` changes the first source's path only); missing sections are created."""
    parts = key.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        last, where = depth == len(parts) - 1, ".".join(parts[:depth]) or "the config"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override {key}: {where} is a list of {len(node)} item(s); give an index from 0 "
                    f"to {len(node) - 1}, or set the whole list ({where}=[...])"
                )
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {key}: {where} is a value ({node!r}), not a section or a list")
        if last:
            node[part] = value
            return
        if isinstance(node, dict) and node.get(part) is None:  # a section not written in the YAML (or null)
            node[part] = {}
        node = node[part]


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested mapping: {"train": {"alpha": 1}} -> ("train.alpha", 1)."""
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            yield from _flatten(f"{prefix}.{key}" if prefix else str(key), item)
    else:
        yield prefix, value


def apply_overrides(
    tree: dict[str, Any], overrides: Iterable[str] | Mapping[str, Any] = (), **sections: Mapping[str, Any]
) -> dict[str, Any]:
    """``tree`` (a config as nested dicts, changed in place and returned) with the overrides applied, in order:
    ``key=value`` strings (values parsed as YAML), or a mapping of dotted keys to values, then ``sections``, each
    a section's fields to set (``train={"alpha": 0.3}`` sets train.alpha and leaves the rest of the section)."""
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            _set(tree, key, value)
    else:
        for override in overrides:
            _apply_override(tree, override)
    for key, value in _flatten("", sections) if sections else ():
        _set(tree, key, value)
    return tree


def config_from_dict(tree: dict[str, Any], source: str = "config", overridden: Iterable[str] = ()) -> Config:
    """Validate a config tree; errors name ``source``, or the overrides when they caused every error."""
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        lines, by_overrides = _format_errors(err, list(overridden))
        where = "the overrides of " + source if by_overrides else source
        raise ConfigError(
            f"{where} are invalid:\n{lines}" if by_overrides else f"{where} is invalid:\n{lines}"
        ) from None
    check_toyworld_judges(cfg, source)
    return cfg


def check_toyworld_judges(cfg: Config, source: str = "config") -> None:
    """The toy world's judge parses toy-world responses only: asked for on prompts that are not the toy world's
    (no toyworld section, and an evaluate.prompts file whose first row has no toy-world ``topic``), every verdict
    would be "unparsed" and every rate 0 after a whole training run. Refuse that here instead."""
    evaluate = cfg.evaluate
    toy = [
        name
        for name, kind in (
            ("evaluate.safety_judge.kind", evaluate.safety_judge.kind),
            ("evaluate.helpfulness_judge.kind", evaluate.helpfulness_judge.kind),
            ("evaluate.refusal", evaluate.refusal),
        )
        if kind == "toyworld"
    ]
    if not toy or cfg.toyworld is not None or not evaluate.prompts or not Path(evaluate.prompts).is_file():
        return

    with open(evaluate.prompts, encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "{}")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return  # load_prompts reports the bad line with its number
    if isinstance(row, dict) and not row.get("topic"):
        raise ConfigError(
            f"{source} is invalid:\n  {toy[0]}: the toy world's judge only reads toy-world "
            f"responses, and {evaluate.prompts} holds other prompts (no 'topic'); use phrases, "
            "classifier or causal_lm"
        )


CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the shipped configs (package data)


def shipped_configs() -> list[str]:
    """Names of the configs shipped with the package (``default``, ``paper_bfpo``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_config(name_or_path: str | os.PathLike) -> Path:
    """A config file: ``name_or_path`` itself when it exists, else the shipped config of that name
    (``paper_bfpo`` or ``paper_bfpo.yaml`` -> ``bfpo_ray/configs/paper_bfpo.yaml``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file() or path.parent != Path("."):
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return shipped if shipped.is_file() else path


def load_config(
    path: str | os.PathLike | None = "default",
    overrides: Iterable[str] | Mapping[str, Any] = (),
    **sections: Mapping[str, Any],
) -> Config:
    """A validated config: a shipped config by name (``"default"``, ``"sweep"``, ``"paper_bfpo"``, ...), a YAML file,
    or None (start empty), with overrides applied (``apply_overrides``)::

        load_config("default", ["train.alpha=0.3", "run.num_workers=1"])       # as on the command line
        load_config("default", {"train.alpha": 0.3}, run={"num_workers": 1})   # from Python

    A bad value raises ``ConfigError`` naming the field; a bad override names the override."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = find_config(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(
                f"config file {path} does not exist (shipped configs: {', '.join(shipped_configs())})"
            ) from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    apply_overrides(tree, overrides, **sections)
    return config_from_dict(tree, source=str(path) if path else "config", overridden=_overridden(overrides, sections))


def _overridden(overrides: Iterable[str] | Mapping[str, Any], sections: Mapping[str, Any]) -> list[str]:
    """The dotted keys that overrides set (for errors that name them)."""
    keys = [key for key, _ in _flatten("", sections)] if sections else []
    return keys + (
        list(overrides)
        if isinstance(overrides, Mapping)
        else [override.partition("=")[0].strip() for override in overrides]
    )


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML that ``load_config`` reads back to an equal config, credentials redacted
    (``bfpo_ray.storage.redact``: keys in a URI, such as ``s3://KEY:SECRET@bucket``, become ``***``; a config that
    held them reads back without them)."""
    from bfpo_ray.storage import redact_tree

    Path(path).write_text(yaml.safe_dump(redact_tree(cfg.model_dump(mode="json")), sort_keys=False))
