"""Judged generations during training: what a sweep selects on when safety and helpfulness are judged from text.

    validation = GenerativeValidation.from_config(cfg)      # evaluate.during_training: true
    metrics = validation(model, tokenizer, rank, world_size, step)   # on every worker, at every evaluation

At each evaluation (every ``train.eval_every`` steps) every training worker generates for its share of the
validation prompts (the rows of ``evaluate.prompts`` whose split is in ``evaluate.validation_splits``; never the
test rows) with the policy being trained, one generation per prompt (sampled at ``evaluate.temperature`` /
``top_p`` when ``evaluate.samples`` > 0, else greedy), judges them with the configured judges, and the workers'
judged records are gathered, so every worker returns the same metrics:

    eval/harmless_rate    harmful prompts whose response the safety judge calls safe
    eval/helpful_rate     benign and borderline prompts answered helpfully (not refused, not degenerate)
    eval/over_refusal     benign and borderline prompts refused
    eval/degenerate_rate  responses that loop or are empty (``judges.is_degenerate``), all prompts
    eval/score            the harmonic mean of eval/harmless_rate and eval/helpful_rate

The harmonic mean is what ASHA compares: it is high only when both factors are, so a trial that refuses everything
(helpful 0) or nothing (harmless 0) scores 0, and it moves smoothly enough to rank trials at every rung. A floor on
the helpful rate is applied when the best report is chosen (``tune.floor``, ``bfpo_ray.sweep.choose``).

Sampling is seeded by (``evaluate.seed``, step, rank) and the random state of the training is restored afterwards,
so validating does not change what the training does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from bfpo_ray.config import Config, EvalConfig
from bfpo_ray.data.tokenize import pad_token_id
from bfpo_ray.evaluate.generation import generate_batch, load_prompts, stop_token_ids
from bfpo_ray.evaluate.judges import build_judges
from bfpo_ray.evaluate.metrics import generation_metrics
from bfpo_ray.evaluate.run import judge_records, prompts_path

REPORTED = ("eval/harmless_rate", "eval/helpful_rate", "eval/over_refusal", "eval/degenerate_rate", "eval/score")


@dataclass
class GenerativeValidation:
    prompts: list[dict]  # {prompt, kind, topic, source}: the validation rows
    evaluate: dict  # the EvalConfig, as JSON (it travels to the workers)
    _judges: object = field(default=None, repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg: Config) -> "GenerativeValidation":
        prompts = load_prompts(prompts_path(cfg), cfg.evaluate.validation_splits, cfg.evaluate.max_prompts_per_kind)
        return cls(prompts, cfg.evaluate.model_dump(mode="json"))

    def __call__(self, model, tokenizer, rank: int, world_size: int, step: int) -> dict[str, float]:
        evaluate = EvalConfig.model_validate(self.evaluate)
        if self._judges is None:
            self._judges = build_judges(evaluate)
        mine = self.prompts[rank::world_size]
        rng = torch.get_rng_state()
        torch.manual_seed(hash((evaluate.seed, step, rank)) % 2**31)
        was_training = model.training
        model.eval()
        records = []
        try:
            for start in range(0, len(mine), evaluate.batch_size):
                batch = mine[start : start + evaluate.batch_size]
                outputs = generate_batch(
                    model,
                    tokenizer,
                    [row["prompt"] for row in batch],
                    do_sample=evaluate.samples > 0,
                    max_new_tokens=evaluate.max_new_tokens,
                    stop_ids=stop_token_ids(tokenizer, evaluate.stop),
                    pad_id=pad_token_id(tokenizer),
                    temperature=evaluate.temperature,
                    top_p=evaluate.top_p,
                )
                records += [{**row, "response": text, "mode": "sampled"} for row, (text, _, _) in zip(batch, outputs)]
        finally:
            model.train(was_training)
            torch.set_rng_state(rng)
        records = judge_records(records, self._judges)
        if world_size > 1:
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, records)
            records = [record for part in gathered for record in part]
        metrics = generation_metrics(records)
        return {name: metrics[name] for name in REPORTED}
