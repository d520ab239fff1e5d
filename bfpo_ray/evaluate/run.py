"""Evaluate a finished model: generate on Ray, judge, score; and preference accuracies on held-out scored pairs.

    result = evaluate_model(cfg, "runs/bfpo-default/export", "runs/bfpo-default/evaluation")
    print(results_table({"bfpo": result.metrics}))

Writes into the output directory ``generations.jsonl`` (every generation with its prompt, mode, sample number and
the three verdicts) and ``metrics.json``. Metrics come per generation mode ("greedy", "sampled"), each with the
metric names (eval/harmless_rate, eval/helpful_rate, eval/over_refusal, eval/score).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bfpo_ray.config import Config
from bfpo_ray.evaluate.generation import GREEDY, SAMPLED, generate_on_ray, load_prompts
from bfpo_ray.evaluate.judges import Generation, Judges, build_judges, is_degenerate
from bfpo_ray.evaluate.metrics import generation_metrics, preference_accuracies, preference_accuracy_counts
from bfpo_ray.storage import join

GENERATIONS_FILE = "generations.jsonl"
METRICS_FILE = "metrics.json"
START_DIR = "start"  # under an evaluation directory: the starting model's evaluation (evaluate.compare_start)
TABLE_COLUMNS = ("eval/harmless_rate", "eval/helpful_rate", "eval/over_refusal", "eval/score", "eval/global_acc")


def has_eval_prompts(cfg: Config) -> bool:
    """Whether ``cfg`` names evaluation prompts: evaluate.prompts, or a toy world (its eval_prompts.jsonl)."""
    return bool(cfg.evaluate.prompts) or cfg.toyworld is not None


def prompts_path(cfg: Config) -> Path:
    """evaluate.prompts, or the toy world's eval_prompts.jsonl when the config has a toy world."""
    if cfg.evaluate.prompts:
        return Path(cfg.evaluate.prompts)
    if cfg.toyworld is not None:
        return Path(cfg.toyworld.dir) / "eval_prompts.jsonl"
    raise ValueError(
        "evaluate.prompts is not set and the config has no toyworld section: give a JSONL of "
        "{prompt, kind} rows in evaluate.prompts"
    )


def judge_records(records: list[dict], judges: Judges) -> list[dict]:
    """Records with ``safe``, ``helpful``, ``refusal``, ``degenerate`` (``judges.is_degenerate``, whatever the
    judges) and the judges' labels and scores added."""
    items = [
        Generation(record["prompt"], record["response"], record["kind"], record.get("topic") or None)
        for record in records
    ]
    safety, helpfulness = judges.safety.judge(items), judges.helpfulness.judge(items)
    refusals = judges.refusal.detect(items)
    if not len(safety) == len(helpfulness) == len(refusals) == len(items):
        raise RuntimeError(
            f"judges returned {len(safety)}, {len(helpfulness)} and {len(refusals)} verdicts for "
            f"{len(items)} generations"
        )
    return [
        {
            **record,
            "safe": s.ok,
            "safety_label": s.label,
            "safety_score": s.score,
            "helpful": h.ok,
            "helpful_label": h.label,
            "helpful_score": h.score,
            "refusal": bool(r),
            "degenerate": is_degenerate(record["response"], record["prompt"]),
        }
        for record, s, h, r in zip(records, safety, helpfulness, refusals)
    ]


def metrics_by_mode(records: list[dict]) -> dict[str, dict[str, float]]:
    """``generation_metrics`` of the greedy and of the sampled generations (modes present only)."""
    return {
        mode: generation_metrics([r for r in records if r["mode"] == mode])
        for mode in (SAMPLED, GREEDY)
        if any(r["mode"] == mode for r in records)
    }


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]  # mode -> metric name -> value
    out_dir: Path
    generations: int


def evaluate_model(
    cfg: Config, model_path: str | Path, out_dir: str | Path, judges: Judges | None = None, key: dict | None = None
) -> EvalResult:
    """Generate for the held-out prompts with the model at ``model_path`` on Ray, judge every generation, write
    ``generations.jsonl`` and ``metrics.json`` (with ``key``, what the evaluation was made of, for reuse) to
    ``out_dir``."""
    evaluate = cfg.evaluate
    prompts = load_prompts(prompts_path(cfg), evaluate.splits, evaluate.max_prompts_per_kind)
    tokenizer = None if Path(model_path, "tokenizer_config.json").is_file() else cfg.model.tokenizer
    records = generate_on_ray(
        model_path,
        prompts,
        evaluate,
        tokenizer_path=tokenizer,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
    )
    records = judge_records(records, judges or build_judges(evaluate))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / GENERATIONS_FILE).open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    metrics = metrics_by_mode(records)
    (out_dir / METRICS_FILE).write_text(
        json.dumps({"model": str(model_path), "metrics": metrics, "key": key}, indent=2) + "\n"
    )
    return EvalResult(metrics, out_dir, len(records))


def preference_metrics(
    model_path: str | Path, dataset_dir: str | Path, cfg: Config, batch_pairs: int = 16
) -> dict[str, float]:
    """eval/global_acc, eval/safety_acc, eval/help_acc of the model at ``model_path`` on the held-out (eval) split
    of a prepared, scored dataset, in one process: margins from the model's summed response log-probs and the
    dataset's reference log-probs. Empty dict when the dataset has no scored eval pairs."""
    import pyarrow.parquet as pq
    import torch

    from bfpo_ray.data.rows import RowCollector, required_columns
    from bfpo_ray.data.schema import REF_COLUMNS, ROLES, dataset_name, split_dir
    from bfpo_ray.data.tokenize import load_tokenizer, pad_token_id
    from bfpo_ray.logprobs import batch_logps, collate_pairs
    from bfpo_ray.models import load_causal_lm
    from bfpo_ray.train.metrics import pair_margins

    # This runs in the driver, on CPU in float32, where flash_attention_2 cannot: that choice falls back to
    # transformers' default (sdpa), the same attention by another kernel; sdpa and eager are kept.
    attn = cfg.model.attn_implementation if cfg.model.attn_implementation != "flash_attention_2" else None
    model = load_causal_lm(
        str(model_path), dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code, attn_implementation=attn
    )
    pad_id = pad_token_id(load_tokenizer(str(model_path), cfg.model.trust_remote_code))
    counts = torch.zeros(6, dtype=torch.float64)
    for role in ROLES:
        files = sorted(split_dir(dataset_dir, "eval", role).glob("*.parquet"))
        if not files or not set(REF_COLUMNS) <= set(pq.read_schema(files[0]).names):
            continue
        collector = RowCollector(dataset_name("eval", role), 0, 1, with_ref=True)
        for file in files:
            table = pq.read_table(file, columns=required_columns(with_ref=True))
            collector.add(
                {
                    name: table.column(name).to_numpy()
                    if name in REF_COLUMNS
                    else np.asarray(table.column(name).to_pylist(), dtype=object)
                    for name in table.column_names
                }
            )
        rows = collector.finish()
        with torch.inference_mode():
            for start in range(0, len(rows), batch_pairs):
                batch = collate_pairs(rows, np.arange(start, min(start + batch_pairs, len(rows))), pad_id)
                logps, _ = batch_logps(model, batch, torch.device("cpu"))
                counts += preference_accuracy_counts(
                    pair_margins(logps, batch),
                    batch["chosen_safe"],
                    batch["rejected_safe"],
                    cfg.train.alpha,
                    cfg.train.b1,
                )
    return preference_accuracies(counts) if counts[0] > 0 else {}


def _cell(value) -> str:
    if isinstance(value, tuple):  # (mean, spread)
        mean, spread = value
        if math.isnan(mean):
            return "-"
        return f"{mean:.3f} ± {spread:.3f}" if not math.isnan(spread) else f"{mean:.3f}"
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def results_table(rows: dict[str, dict], columns: tuple[str, ...] = TABLE_COLUMNS, first: str = "model") -> str:
    """A Markdown table: one row per name, one column per metric (floats, or (mean, spread) pairs); a missing or
    NaN metric prints as "-". ``first`` heads the column of row names."""
    header = [first] + [column.removeprefix("eval/") for column in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, values in rows.items():
        lines.append("| " + " | ".join([name] + [_cell(values.get(column)) for column in columns]) + " |")
    return "\n".join(lines)


def evaluation_report(
    result: EvalResult,
    preference: dict[str, float] | None = None,
    start: EvalResult | None = None,
    shown: str | None = None,
) -> str:
    """What the evaluate and train commands print: the table (one row per generation mode; with ``start``, the
    starting model's evaluation in ``<out_dir>/start``, its rows first, "before", and this model's, "after") and
    where it went (``shown``, a URI the output directory is uploaded to, instead of the local directory)."""

    root = shown or str(result.out_dir)
    rows = {mode: {**(preference or {}), **metrics} for mode, metrics in result.metrics.items()}
    where = [f"  generations   {join(root, GENERATIONS_FILE)}", f"  metrics       {join(root, METRICS_FILE)}"]
    if start is not None:
        rows = {
            **{f"before: {mode}": metrics for mode, metrics in start.metrics.items()},
            **{f"after: {mode}": metrics for mode, metrics in rows.items()},
        }
        where.append(f"  before        {join(root, START_DIR, METRICS_FILE)}")
    generations = result.generations + (start.generations if start is not None else 0)
    return "\n".join(["", f"evaluation ({generations} generations)", results_table(rows, first="generations"), *where])
