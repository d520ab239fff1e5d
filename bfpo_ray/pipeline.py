"""The pipeline: the one place that runs the stages, for the command line, ``jobs/bfpo.py``, the Tune trials, the
experiments and notebooks.

    from bfpo_ray import load_config, pipeline

    cfg = load_config("default", train={"alpha": 0.3})     # a shipped name or a YAML file, plus overrides
    result = pipeline.run(cfg)                             # start model -> prepare -> train -> export -> evaluate
    print(result.report)                                   # the before/after table the job prints

    data = pipeline.prepare(cfg)                           # Prepared: the scored dataset and its manifest
    trained = pipeline.train(cfg, data)                    # Trained: run directory, export, last metrics
    evaluation = pipeline.evaluate(cfg, trained.export_dir)  # Evaluation: judged generations, metrics
    outcome = pipeline.sweep(load_config("sweep"))         # SweepOutcome: Ray Tune over tune.space, ASHA

Every stage reuses finished work: ``start_model`` makes the toy world once and reuses a finished
``model.sft_first`` stage of the same config and data; ``prepare`` reuses a dataset of the same fingerprint;
``train`` reuses a finished run of the same model, data and train settings (``<run>/finished.json``), and resumes
an unfinished one from its newest checkpoint; ``evaluate`` reuses an evaluation of the same model files, prompts and
settings (``<out>/metrics.json``). Each says so in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from bfpo_ray import objectives, storage
from bfpo_ray import sweep as sweeps
from bfpo_ray.cluster import init_ray
from bfpo_ray.config import Config, ConfigError, dump_config, load_config
from bfpo_ray.data.schema import MANIFEST
from bfpo_ray.evaluate.run import (
    GENERATIONS_FILE,
    METRICS_FILE,
    START_DIR,
    EvalResult,
    evaluate_model,
    evaluation_report,
    has_eval_prompts,
    preference_metrics,
    prompts_path,
)
from bfpo_ray.evaluate.validation import GenerativeValidation
from bfpo_ray.models import resolve_dtype
from bfpo_ray.prepare.dataset import build as build_dataset
from bfpo_ray.prepare.fingerprint import model_identity
from bfpo_ray.toyworld.world import materialize as materialize_world
from bfpo_ray.train import launch
from bfpo_ray.train.engine import export_checkpoint
from bfpo_ray.train.loop import EXPORT_DIR
from bfpo_ray.train.tracking import (
    evaluation_files,
    evaluation_metrics,
    log_evaluation,
    tracking_settings,
    tune_callbacks,
)

log = logging.getLogger(__name__)

FINISHED_RECORD = "finished.json"  # in a run directory: the inputs of a run that trained to its end and exported
EXPORT_SOURCE = "export_source.json"  # in an export of a checkpoint (pipeline.export): what it was made of


@dataclass
class Prepared:
    dataset_dir: Path | str  # <data.cache_dir>/<fingerprint>: a local path, or a URI
    manifest: dict  # counts, splits, files, timings (manifest.json)


@dataclass
class Trained:
    run_dir: str  # <run.storage_path>/<run.name>: a local path, or a URI
    export_dir: str  # the exported Hugging Face model directory
    checkpoint: str | None  # the newest checkpoint
    metrics: dict[str, float]  # the last reported train/* and eval/* metrics
    reused: bool = False  # a finished run of the same inputs, not trained again


@dataclass
class Evaluation:
    result: EvalResult  # metrics per generation mode, the output directory, the number of generations
    preference: dict[str, float] = field(default_factory=dict)  # eval/global_acc, ... on held-out pairs
    start: EvalResult | None = None  # the starting model's, with compare_start
    reused: bool = False

    @property
    def report(self) -> str:
        return evaluation_report(self.result, self.preference, start=self.start)


@dataclass
class RunResult:
    config: Config  # the config the run trained with (its model.path is the start model)
    data: Prepared
    trained: Trained
    evaluation: Evaluation | None
    report: str  # what the job prints: paths, final metrics, the evaluation table


# ---------------------------------------------------------------------------------------------------- stages


def start_model(cfg: Config) -> Config:
    """``cfg`` with its starting model made: the toy world written when the config has one, then the
    ``model.sft_first`` stage (``sft_stage``) trained (or reused) from ``model.path``; the returned config's
    ``model.path`` is that stage's export and ``model.sft_first`` is cleared, so the run's config.yaml names the model
    it started from. A finished run of the stage is reused while its config and data stay the same; a differently
    configured one is trained again from scratch."""
    if cfg.toyworld is not None:  # first: the world's model and data paths exist only after it
        materialize_world(cfg.toyworld)
    if cfg.model.sft_first is None:
        return cfg
    stage = sft_stage(cfg)
    local = storage.local_dir(stage.run.storage_path)
    if local is None:
        raise ConfigError("model.sft_first needs a local run.storage_path (its export is the next stage's model)")
    run_dir = local / stage.run.name
    data = prepare(stage)
    if _finished(stage, data) is None and run_dir.exists():  # an unfinished or differently configured run
        shutil.rmtree(run_dir)
    trained = train(stage, data, label="sft_first")
    out = cfg.model_copy(deep=True)
    out.model.path, out.model.sft_first = trained.export_dir, None
    return out


def sft_stage(cfg: Config) -> Config:
    """The config of ``cfg``'s ``model.sft_first`` stage: the SFT config it names, with cfg's model, toy world,
    storage path, data cache and workers (number, GPUs, CPUs, custom resource) and no evaluation. Its run is named
    by the SFT config, with the number of workers and ``-gpu`` appended when they differ from that config's (they
    change the trained weights): a job with other workers trains a stage of its own beside the shared one instead
    of replacing it under the runs that started from it."""
    stage = load_config(cfg.model.sft_first)
    if stage.train.loss != "sft" or stage.model.sft_first is not None:
        raise ConfigError(
            f"model.sft_first={cfg.model.sft_first!r} must name a config with train.loss: sft and "
            f"no model.sft_first of its own"
        )
    stage.model = cfg.model.model_copy(update={"sft_first": None})
    if stage.toyworld is not None and cfg.toyworld is not None:  # the stage's sources follow cfg's toy world
        for source in stage.data.sources:
            if Path(source.path).is_relative_to(stage.toyworld.dir):
                source.path = str(Path(cfg.toyworld.dir) / Path(source.path).relative_to(stage.toyworld.dir))
    stage.toyworld = cfg.toyworld
    stage.data.cache_dir, stage.run.storage_path = cfg.data.cache_dir, cfg.run.storage_path
    own = (stage.run.num_workers, stage.run.use_gpu)
    for name in ("num_workers", "use_gpu", "cpus_per_worker", "worker_resource"):  # the job's workers
        setattr(stage.run, name, getattr(cfg.run, name))
    if (stage.run.num_workers, stage.run.use_gpu) != own:
        stage.run.name += f"-{stage.run.num_workers}w" + ("-gpu" if stage.run.use_gpu else "")
    stage.evaluate.after_train = False
    return stage.with_absolute_paths()


def prepare(cfg: Config) -> Prepared:
    """The scored dataset of ``cfg`` (``bfpo_ray.prepare.dataset.build``), made or reused; the reference is scored only
    when the objective needs one. The start model must exist (``start_model``)."""
    if cfg.toyworld is not None:
        materialize_world(cfg.toyworld)
    dataset_dir = build_dataset(cfg, score_reference=objectives.build(cfg.train).needs_reference)
    return Prepared(dataset_dir, json.loads(storage.read_text(storage.join(dataset_dir, MANIFEST))))


def _run_dir(cfg: Config) -> str:
    return storage.join(storage.absolute(cfg.run.storage_path), cfg.run.name)


def _training_inputs(cfg: Config, data: Prepared) -> dict:
    """What a finished run's weights depend on: the start model, the train settings, the data, the workers."""
    return {
        "model": cfg.model.model_dump(mode="json"),
        "start_model": model_identity(cfg.model.path),
        "train": cfg.train.model_dump(mode="json"),
        "data": data.manifest["fingerprint"],
        "workers": [cfg.run.num_workers, cfg.run.use_gpu],
    }


def _finished(cfg: Config, data: Prepared, other_inputs: bool = False) -> dict | None:
    """The record of a finished run of the same inputs in cfg's run directory, or None. ``other_inputs``: a
    finished run of other inputs there is a ConfigError naming what differs (resuming it would train nothing and
    label its weights with the new settings)."""
    record = storage.join(_run_dir(cfg), FINISHED_RECORD)
    if not storage.exists(record):
        return None
    saved = json.loads(storage.read_text(record))
    inputs = _training_inputs(cfg.with_absolute_paths(), data)
    for section in ("model", "train"):  # a record older than a config field: that field had its default
        fields = type(getattr(cfg, section)).model_fields
        recorded = saved.get("inputs", {}).get(section, {})
        for name in fields.keys() - recorded.keys():
            default = fields[name].get_default(call_default_factory=True)
            recorded[name] = default.model_dump(mode="json") if hasattr(default, "model_dump") else default
    if saved.get("inputs") == inputs:
        return saved
    if other_inputs:
        before = saved.get("inputs", {})
        changed = [
            f"{section}.{name} {before.get(section, {}).get(name)!r} -> {value!r}"
            for section in ("model", "train")
            for name, value in inputs[section].items()
            if before.get(section, {}).get(name) != value
        ] + [name for name in ("start_model", "data", "workers") if before.get(name) != inputs[name]]
        raise ConfigError(
            f"{storage.redact(_run_dir(cfg))} holds a finished run of other settings ({'; '.join(changed)}): "
            f"give this one its own run.name, or remove that directory to train it again"
        )
    return None


def train(cfg: Config, data: Prepared | None = None, callbacks: list | None = None, label: str = "train") -> Trained:
    """Train on ``data`` (prepared here when None) with ``cfg.run.num_workers`` DeepSpeed workers on Ray Train
    (``bfpo_ray.train.launch``), the export written by rank 0 at the end. A finished run of the same inputs is
    reused (one line says so), one of other inputs is a ConfigError; an unfinished one resumes from its newest
    checkpoint. ``callbacks``: Ray Train
    callbacks (a Tune trial passes TuneReportCallback)."""
    data = data or prepare(cfg)
    run_dir = _run_dir(cfg)
    export_dir = storage.join(run_dir, EXPORT_DIR)
    finished = _finished(cfg, data, other_inputs=callbacks is None)
    if finished is not None and callbacks is None:
        print(f"{label}: reusing {export_dir} (a finished run of the same model, data and settings)")
        return Trained(run_dir, export_dir, finished["checkpoint"], finished["metrics"], reused=True)
    validation = GenerativeValidation.from_config(cfg) if cfg.evaluate.during_training else None
    if callbacks is None:
        print(f"{label}: training {storage.redact(run_dir)}")
    result = launch.train(cfg, data.dataset_dir, callbacks=callbacks, validation=validation)
    checkpoint = storage.join(run_dir, Path(result.checkpoint.path).name) if result.checkpoint else None
    metrics = {name: value for name, value in (result.metrics or {}).items() if isinstance(value, (int, float))}
    record = {
        "inputs": _training_inputs(cfg.with_absolute_paths(), data),
        "checkpoint": storage.redact(checkpoint) if checkpoint else None,
        "metrics": metrics,
    }
    storage.write_text(storage.join(run_dir, FINISHED_RECORD), json.dumps(record, indent=1) + "\n")
    return Trained(run_dir, export_dir, checkpoint, metrics)


def export(cfg: Config, checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """A Hugging Face model directory from ``checkpoint`` (a <run>/checkpoint_<step> directory) with the run's model
    and train settings, in this process; ``out`` defaults to <run>/exports/<checkpoint name>. An export there of the
    same checkpoint files and settings is reused (``EXPORT_SOURCE`` records them)."""
    checkpoint = Path(checkpoint).resolve()
    if not checkpoint.is_dir():
        raise ConfigError(f"--checkpoint {checkpoint} is not a directory")
    cfg = cfg.with_absolute_paths()
    out = Path(out) if out is not None else checkpoint.parent / "exports" / checkpoint.name
    dtype = resolve_dtype(cfg.model.dtype, cfg.run.use_gpu)
    # the export's own record: the same checkpoint files and settings again reuse it, so the files keep the
    # identity an evaluation of them is keyed by (bfpo_ray.prepare.fingerprint.model_identity: sizes and mtimes)
    source = {
        "checkpoint": model_identity(str(checkpoint)),  # its .pt files: names, sizes, mtimes
        "model": cfg.model.model_dump(mode="json"),
        "trainable": cfg.train.trainable,
        "lora": cfg.train.lora.model_dump(mode="json"),
        "dtype": str(dtype),
    }
    record = out / EXPORT_SOURCE
    if record.is_file() and json.loads(record.read_text()) == source and model_identity(str(out))["weights"]:
        print(f"export: reusing {out} (an export of the same checkpoint files and settings)")
        return out
    record.unlink(missing_ok=True)
    export_checkpoint(checkpoint, cfg.model, cfg.train, out, dtype)
    record.write_text(json.dumps(source, indent=2) + "\n")
    return out


def _evaluation_key(cfg: Config, model_dir: Path, prompts: Path | None) -> dict:
    digest = hashlib.sha256(prompts.read_bytes()).hexdigest() if prompts and prompts.is_file() else None
    return {
        "model": model_identity(str(model_dir)),
        "evaluate": cfg.evaluate.model_dump(mode="json"),
        "prompts": digest,
    }


def _evaluate_once(cfg: Config, model_dir: Path, out_dir: Path) -> tuple[EvalResult, bool]:
    """``evaluate_model``, or the evaluation in ``out_dir`` when it was made of the same model files, prompts and
    settings."""
    key = _evaluation_key(cfg, model_dir, prompts_path(cfg))
    metrics_file = out_dir / METRICS_FILE
    if metrics_file.is_file():
        saved = json.loads(metrics_file.read_text())
        if saved.get("key") == key:
            lines = (out_dir / GENERATIONS_FILE).read_text(encoding="utf-8").count("\n")
            return EvalResult(saved["metrics"], out_dir, lines), True
    result = evaluate_model(cfg, model_dir, out_dir, key=key)
    return result, False


def evaluate(
    cfg: Config,
    model: str | Path | None = None,
    out_dir: str | Path | None = None,
    data: Prepared | None = None,
    preference: dict | None = None,
    compare_start: bool | None = None,
) -> Evaluation:
    """Generate for the held-out prompts with ``model`` (default: the run's export) on Ray, judge, score; with
    ``data``, preference accuracies on its held-out pairs too (unless ``preference`` holds them already); with
    ``compare_start`` (default ``evaluate.compare_start``) the starting model ``cfg.model.path`` the same way, into
    ``<out_dir>/start``; ``out_dir`` defaults to ``evaluation`` beside the model directory. A remote model directory
    is downloaded, a remote output directory uploaded. An evaluation (in a local ``out_dir``) of unchanged model
    files, prompts and settings is reused."""
    model = storage.absolute(model) if model is not None else storage.join(_run_dir(cfg), EXPORT_DIR)
    shown = storage.absolute(out_dir) if out_dir is not None else storage.join(storage.parent(model), "evaluation")
    compare_start = cfg.evaluate.compare_start if compare_start is None else compare_start
    with storage.fetched_dir(model) as model_dir, storage.staged_dir(shown) as out:
        if preference is None:
            preference = preference_metrics(model_dir, data.dataset_dir, cfg) if data is not None else {}
        start = _evaluate_once(cfg, Path(cfg.model.path), out / START_DIR)[0] if compare_start else None
        result, reused = _evaluate_once(cfg, Path(model_dir), out)
    if reused:
        print(f"evaluate: reusing {shown} (the same model files, prompts and settings)")
    result.out_dir = shown
    return Evaluation(result, preference, start, reused)


def run(cfg: Config) -> RunResult:
    """The job: ``start_model`` -> ``prepare`` -> ``train`` (rank 0 exports) -> ``evaluate`` (when
    ``evaluate.after_train`` and the config names evaluation prompts), each reusing finished work."""
    cfg = start_model(cfg)
    data = prepare(cfg)
    trained = train(cfg, data)
    lines = [summary(cfg, data, trained)]
    evaluation = None
    if cfg.evaluate.after_train and not has_eval_prompts(cfg):
        lines.append("evaluation skipped: no evaluation prompts (set evaluate.prompts, or evaluate.after_train=false)")
    elif cfg.evaluate.after_train:
        preference = {
            name: value
            for name, value in trained.metrics.items()
            if name in ("eval/global_acc", "eval/safety_acc", "eval/help_acc")
        }
        evaluation = evaluate(
            cfg, trained.export_dir, storage.join(trained.run_dir, "evaluation"), preference=preference
        )
        lines.append(evaluation.report)
        if not evaluation.reused:  # the trackers get eval/* and the table, generations and metrics as artifacts
            start = evaluation.start.metrics if evaluation.start is not None else None
            log_evaluation(
                cfg,
                launch.tracking_dir(cfg),
                evaluation_metrics(evaluation.result.metrics, start),
                evaluation_files(evaluation.result.out_dir),
                step=int(trained.metrics.get("train/step", 0)),
                table=evaluation.report,
            )
    return RunResult(cfg, data, trained, evaluation, storage.redact("\n".join(lines)))


def summary(cfg: Config, data: Prepared, trained: Trained) -> str:
    """Where a finished run put everything, then its final metrics."""
    run_dir = trained.run_dir
    lines = [
        "",
        f"BFPO run {'reused' if trained.reused else 'finished'}",
        f"  scored data   {data.dataset_dir}",
        f"  run directory {run_dir}",
        f"  config        {storage.join(run_dir, launch.CONFIG_FILE)}",
        f"  checkpoint    {trained.checkpoint or '(none)'}",
        f"  export        {trained.export_dir}",
    ]
    tracking_dir = launch.tracking_dir(cfg)
    if "tensorboard" in cfg.run.report_to:
        lines.append(f"  tensorboard   {tracking_dir / 'tensorboard'}")
    if "mlflow" in cfg.run.report_to:
        lines.append(f"  mlflow        {tracking_settings(cfg, tracking_dir)['mlflow_tracking_uri']}")
    if "wandb" in cfg.run.report_to:
        lines.append(f"  wandb         {tracking_dir / 'wandb'}")
    lines += ["", "final metrics"]
    lines += [
        f"  {name:<24} {value:.4g}"
        for name, value in sorted(trained.metrics.items())
        if name.startswith(("train/", "eval/"))
    ]
    return storage.redact("\n".join(lines))  # no credentials of a URI or the environment in what is printed


# ---------------------------------------------------------------------------------------------------- sweep


def run_trial(params: dict, *, cfg: dict, dataset_dir: str, manifest: dict, runs_dir: str) -> None:
    """Tune trainable: train with this trial's ``params`` (``tune.space`` fields, nested by section). The Train run
    is named by the trial id, so a restored sweep resumes an interrupted trial from its own last checkpoint."""
    trial_cfg = sweeps.trial_config(Config.model_validate(cfg), params, tune.get_context().get_trial_id(), runs_dir)
    train(trial_cfg, Prepared(dataset_dir, manifest), callbacks=[TuneReportCallback()])


def sweep(cfg: Config, progress: bool = True) -> sweeps.SweepOutcome:
    """Prepare and score the data once, then run (or resume) the sweep ``cfg.tune`` describes: one Ray Train run
    per trial with the ``tune.space`` fields set, ASHA stopping the weak trials at their evaluations; choose the
    best report (``sweep.choose``), write the results and the best config into the experiment directory."""
    started = time.perf_counter()
    spec = cfg.tune
    cfg = start_model(cfg)
    data = prepare(cfg)
    cfg = cfg.with_absolute_paths()
    datasets = launch.find_datasets(data.dataset_dir)
    sweeps.check_sweepable(cfg, datasets)
    max_steps = sweeps.planned_steps(cfg, datasets)
    storage_dir = storage.local_dir(spec.storage_path or cfg.run.storage_path)
    if storage_dir is None:  # the results table, best config and trial runs are written with local file calls
        raise ConfigError(
            f"tune.storage_path / run.storage_path {spec.storage_path or cfg.run.storage_path!r}: a "
            f"sweep needs a local (or shared, NFS) directory or a file:// URI, not a remote URI"
        )
    experiment_dir = storage_dir / spec.name
    init_ray()
    per_trial = sweeps.trial_resources(cfg)
    max_concurrent = spec.max_concurrent_trials or sweeps.concurrent_trials(per_trial, ray.cluster_resources())
    log.info(
        "[sweep] %s: up to %d steps per trial, %s per trial, up to %d trial(s) at once",
        experiment_dir,
        max_steps,
        per_trial,
        max_concurrent,
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            cfg=cfg.model_dump(mode="json"),
            dataset_dir=str(data.dataset_dir),
            manifest=data.manifest,
            runs_dir=str(experiment_dir / sweeps.TRAIN_RUNS_DIR),
        ),
        {"CPU": sweeps.DRIVER_CPUS},
    )
    if tune.Tuner.can_restore(str(experiment_dir)):
        log.info("[sweep] resuming %s (finished trials are kept)", experiment_dir)
        tuner = tune.Tuner.restore(
            str(experiment_dir), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        # ASHA stops a trial that reaches max_t at once, which would cut the trial's export after its last
        # report; one step more than any trial runs lets finished trials end by themselves.
        scheduler = ASHAScheduler(
            time_attr=sweeps.STEP,
            max_t=max_steps + 1,
            grace_period=spec.grace_period or cfg.train.eval_every,
            reduction_factor=spec.reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=sweeps.param_space(cfg),
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                scheduler=scheduler,
                # Tune ignores max_concurrent_trials beside a search_alg given here
                search_alg=BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent),
                num_samples=spec.num_samples,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=str(storage_dir),
                verbose=1 if progress else 0,
                callbacks=tune_callbacks(cfg, experiment_dir),
            ),
        )
    results = tuner.fit()

    rows, reports = sweeps.trial_rows(results, max_steps, spec.metric)
    best, met_floor = sweeps.choose(reports, spec.metric, spec.mode, spec.floor)
    sweeps.write_csv(experiment_dir / sweeps.RESULTS_CSV, rows)
    sweeps.write_csv(experiment_dir / sweeps.REPORTS_CSV, reports)
    best_config = None
    if best is not None and not any(row["status"] == sweeps.UNFINISHED for row in rows):
        trial = next(row for row in rows if row["trial"] == best["trial"])
        params: dict = {}
        for key in (key for key in trial if "." in key):
            section, name = key.split(".", 1)
            params.setdefault(section, {})[name] = trial[key]
        best_cfg = sweeps.trial_config(cfg, params, f"{spec.name}-best", cfg.run.storage_path)
        best_cfg.train.max_steps = int(best["step"])
        best_cfg.train.log_every = cfg.train.log_every
        best_config = experiment_dir / sweeps.BEST_CONFIG
        dump_config(best_cfg, best_config)
    outcome = sweeps.SweepOutcome(
        experiment_dir, rows, reports, best, best_config, max_steps, time.perf_counter() - started, met_floor
    )
    (experiment_dir / sweeps.RESULTS_MD).write_text(sweeps.report(outcome, spec.metric) + "\n")
    return outcome
