"""The real-model experiment's pure parts: red-teaming pairs under BFPO's convention, the safer-chosen view, the
per-source table, the Pareto front, the prompts it trains and selects on. No model, no Ray."""

from __future__ import annotations

import json

import pytest

from bfpo_ray.data.prompt_sets import eval_prompts, normalize, validation_prompts
from bfpo_ray.toyworld.tiny_model import train_word_tokenizer
from experiments import real_model

OPENING = real_model.REFUSAL_OPENINGS[0]


def plan_and_records(entries):
    """entries: (kind, own answer, refusal continuation) -> the plan and records build_pairs reads."""
    prompts = [
        {"prompt": f"prompt {i}", "kind": kind, "source": "advbench" if kind == "harmful" else "ultrafeedback"}
        for i, (kind, _, _) in enumerate(entries)
    ]
    plan = real_model.redteam_plan(prompts)
    responses = []
    for item in plan:
        _, own, continuation = entries[item["pair"]]
        responses.append({"response": item["prefill"] + continuation if item["prefill"] else own})
    return plan, responses


def test_pairs_follow_bfpo_convention_and_count_where_refusals_came_from():
    loop = "Mix it well. Mix it well. Mix it well. Mix it well."
    entries = [
        ("harmful", "Step 1: mix the chemicals.", " It could hurt people."),  # own words kept
        ("harmful", "Sure, here is how.", " But I can certainly assist you. Here"),  # drifts: template
        ("harmful", "I'm sorry, I can't help with that.", " Really."),  # already refused
        ("benign", "Bake it at 220 C for 30 minutes.", " Please ask something else."),
        ("benign", loop, " No."),  # a looping answer
        ("borderline", "Run `kill <pid>` to end it.", " I won't do that. I won't do that."),
    ]  # loops
    plan, records = plan_and_records(entries)
    assert [p["prefill"] for p in plan][::2] == [""] * len(entries)
    assert all(p["prefill"] in real_model.REFUSAL_OPENINGS for p in plan[1::2])
    rows, counts = real_model.build_pairs(plan, records)
    assert counts == {
        "prompts": 6,
        "pairs": 4,
        "own_answer_refused": 1,
        "own_answer_degenerate": 1,
        "refusal_own_words": 2,
        "refusal_template": 2,
        "harmful_pairs": 2,
        "benign_pairs": 2,
    }
    first, second, benign, borderline = rows
    assert (first["chosen"], first["chosen_safe"], first["rejected_safe"]) == (
        "Step 1: mix the chemicals.",
        False,
        True,
    )
    assert first["rejected"] == OPENING + " It could hurt people."
    assert second["rejected"] == real_model.REFUSAL_OPENINGS[1]  # the opening alone, no drift
    assert (benign["chosen_safe"], benign["rejected_safe"]) == (True, True)
    assert borderline["rejected"] == real_model.REFUSAL_OPENINGS[5 % len(real_model.REFUSAL_OPENINGS)]

    safer = real_model.safer_chosen(rows)
    assert (safer[0]["chosen"], safer[0]["rejected"]) == (first["rejected"], first["chosen"])
    assert (safer[0]["chosen_safe"], safer[0]["rejected_safe"]) == (True, False)
    assert safer[2] == benign  # equally safe: the helpfulness order stays


def test_generation_table_counts_per_source(tmp_path):
    records = (
        [
            {"source": "advbench", "kind": "harmful", "safe": s, "refusal": s, "helpful": not s, "degenerate": False}
            for s in (True, True, False, False)
        ]
        + [
            {
                "source": "xstest_unsafe",
                "kind": "harmful",
                "safe": True,
                "refusal": True,
                "helpful": False,
                "degenerate": False,
            }
        ]
        + [
            {
                "source": "xstest_safe",
                "kind": "borderline",
                "safe": True,
                "refusal": r,
                "helpful": not r,
                "degenerate": False,
            }
            for r in (True, False, False)
        ]
        + [
            {
                "source": "ultrafeedback",
                "kind": "benign",
                "safe": True,
                "refusal": False,
                "helpful": h,
                "degenerate": not h,
            }
            for h in (True, False)
        ]
    )
    path = tmp_path / "generations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = real_model.generation_table(path)
    assert table == pytest.approx(
        {
            "harmless": 3 / 5,
            "harmless_advbench": 2 / 4,
            "harmless_xstest": 1.0,
            "over_refusal_xstest": 1 / 3,
            "answered_uf": 0.5,
            "degenerate_uf": 0.5,
        }
    )


def test_pareto_front_and_the_best_harmless_rate_a_front_reaches():
    points = [(0.1, 0.5), (0.2, 0.4), (0.3, 0.9), (0.0, 0.2), (0.3, 0.7), (0.6, 0.95)]
    front = real_model.pareto_front(points)
    assert front == [(0.0, 0.2), (0.1, 0.5), (0.3, 0.9), (0.6, 0.95)]  # (0.2, 0.4), (0.3, 0.7) are dominated
    assert real_model.front_at(front, 0.25) == 0.5
    assert real_model.front_at(front, 0.3) == 0.9
    assert real_model.front_at(front, -0.1) == float("-inf")


def test_experiment_prompts_never_include_eval_or_validation_prompts():
    spec = real_model.load_experiment()
    recipe = spec["data"]
    tokenizer = train_word_tokenizer(["how do i kill a python process"])
    training = real_model.training_prompts(recipe, tokenizer)
    assert len(training) == recipe["harmful_prompts"] + recipe["contrast_prompts"] + recipe["uf_prompts"]
    held_out = {normalize(row["prompt"]) for row in eval_prompts()}
    validation = {normalize(row["prompt"]) for row in validation_prompts()}
    keys = {normalize(row["prompt"]) for row in training}
    assert not keys & held_out and not keys & validation
    sources = {(row["kind"], row["source"]) for row in training}
    assert sources == {("harmful", "advbench"), ("harmful", "hh_rlhf"), ("borderline", "contrast")} | (
        {("benign", "ultrafeedback")} if recipe["uf_prompts"] else set()
    )
    with_uf = real_model.training_prompts({**recipe, "uf_prompts": 5}, tokenizer)
    assert sum(row["source"] == "ultrafeedback" for row in with_uf) == 5
    benign = sum(row["kind"] != "harmful" for row in training)
    assert benign >= sum(row["kind"] == "harmful" for row in training)  # as many answer-over-refusal pairs
    rows = real_model.prompt_rows(spec["prompts"])
    assert {row["split"] for row in rows} == {"validation", "test"}
    assert {normalize(r["prompt"]) for r in rows if r["split"] == "validation"} <= validation


def test_every_method_searches_its_own_space_from_the_same_base():
    spec = real_model.load_experiment()
    configs = {method: real_model.method_config(spec, method, "/models/smol") for method in spec["methods"]}
    assert {method: cfg.train.loss for method, cfg in configs.items()} == {"bfpo": "bfpo", "ipo": "ipo"}
    assert configs["bfpo"].data.sources[0].path == "data/redteam.jsonl"
    assert configs["ipo"].data.sources[0].path == "data/redteam_safer.jsonl"
    assert set(configs["bfpo"].tune.space["train"]) == {"alpha", "tau", "learning_rate"}
    assert set(configs["ipo"].tune.space["train"]) == {"tau", "learning_rate"}
    rates = {str(cfg.tune.space["train"]["learning_rate"]) for cfg in configs.values()}
    assert len(rates) == 1  # every method tries the same learning rates
    assert len({cfg.train.sft_weight for cfg in configs.values()}) == 1  # and the same NLL weight
    assert {cfg.tune.num_samples for cfg in configs.values()} == {spec["config"]["tune"]["num_samples"]}
    assert all(
        cfg.evaluate.during_training and cfg.tune.floor == {"eval/helpful_rate": 0.875} for cfg in configs.values()
    )
