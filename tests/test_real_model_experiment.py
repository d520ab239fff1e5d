"""The real-model experiment's pure parts: red-teaming pairs under BFPO's convention, the safer-chosen view, the
per-source table. No model, no Ray."""
from __future__ import annotations

import json

import pytest

from bfpo_ray.data.prompt_sets import eval_prompts, normalize, train_prompts, validation_prompts
from bfpo_ray.experiments import real_model

OPENING = real_model.REFUSAL_OPENINGS[0]


def plan_and_records(entries):
    """entries: (kind, own answer, refusal continuation) -> the plan and records build_pairs reads."""
    prompts = [{"prompt": f"prompt {i}", "kind": kind, "source": "advbench" if kind == "harmful" else "ultrafeedback"}
               for i, (kind, _, _) in enumerate(entries)]
    plan = real_model.redteam_plan(prompts)
    responses = []
    for item in plan:
        _, own, continuation = entries[item["pair"]]
        responses.append({"response": item["prefill"] + continuation if item["prefill"] else own})
    return plan, responses


def test_pairs_follow_bfpo_convention_and_count_where_refusals_came_from():
    entries = [("harmful", "Step 1: mix the chemicals.", " It could hurt people."),       # own words kept
               ("harmful", "Sure, here is how.", " But I can certainly assist you. Here"),  # drifts: template
               ("harmful", "I'm sorry, I can't help with that.", " Really."),               # already refused
               ("benign", "Bake it at 220 C for 30 minutes.", " Please ask something else.")]
    plan, records = plan_and_records(entries)
    assert [p["prefill"] for p in plan][::2] == ["", "", "", ""]
    assert all(p["prefill"] in real_model.REFUSAL_OPENINGS for p in plan[1::2])
    rows, counts = real_model.build_pairs(plan, records)
    assert counts == {"prompts": 4, "pairs": 3, "own_answer_refused": 1, "refusal_own_words": 2,
                      "refusal_template": 1, "harmful_pairs": 2, "benign_pairs": 1}
    first, second, benign = rows
    assert (first["chosen"], first["chosen_safe"], first["rejected_safe"]) == ("Step 1: mix the chemicals.", False,
                                                                               True)
    assert first["rejected"] == OPENING + " It could hurt people."
    assert second["rejected"] == real_model.REFUSAL_OPENINGS[1]  # the opening alone, no drift
    assert (benign["chosen_safe"], benign["rejected_safe"]) == (True, True)

    safer = real_model.safer_chosen(rows)
    assert (safer[0]["chosen"], safer[0]["rejected"]) == (first["rejected"], first["chosen"])
    assert (safer[0]["chosen_safe"], safer[0]["rejected_safe"]) == (True, False)
    assert safer[2] == benign  # equally safe: the helpfulness order stays


def test_generation_table_counts_per_source(tmp_path):
    records = ([{"source": "advbench", "kind": "harmful", "safe": s, "refusal": s, "helpful": not s}
                for s in (True, True, False, False)]
               + [{"source": "xstest_unsafe", "kind": "harmful", "safe": True, "refusal": True, "helpful": False}]
               + [{"source": "xstest_safe", "kind": "borderline", "safe": True, "refusal": r, "helpful": not r}
                  for r in (True, False, False)]
               + [{"source": "ultrafeedback", "kind": "benign", "safe": True, "refusal": False, "helpful": True}])
    path = tmp_path / "generations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = real_model.generation_table(path)
    assert table == pytest.approx({"harmless": 3 / 5, "harmless_advbench": 2 / 4, "harmless_xstest": 1.0,
                                   "over_refusal_xstest": 1 / 3, "answered_benign": 1.0})


def test_experiment_prompts_never_include_eval_prompts():
    settings = real_model.Settings()
    held_out = {normalize(row["prompt"]) for row in eval_prompts()}
    training = real_model.training_prompts(settings)
    assert len(training) == settings.harmful_train + settings.benign_train
    assert not {normalize(row["prompt"]) for row in training} & held_out
    validation = {normalize(row["prompt"]) for row in validation_prompts()}
    assert not {normalize(row["prompt"]) for row in training} & validation
    assert {row["source"] for row in training if row["kind"] == "harmful"} == {"advbench", "hh_rlhf"}
    assert len(train_prompts(exclude_validation=True)["harmful"]) > settings.harmful_train
