"""Evaluation: preference accuracies, generative rates, the judges, and generation on Ray over a tiny Llama.

Expected values are computed here independently: plain loops over the metric definitions (bfpo_ray.train.metrics,
bfpo_ray.evaluate.metrics), the toy world's own response generator, and the same classifier or language model run
one input at a time without padding.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import WORDS

from bfpo_ray.config import EvalConfig, JudgeConfig, config_from_dict
from bfpo_ray.evaluate import metrics
from bfpo_ray.evaluate.judges import REFUSAL_PHRASES, ClassifierJudge, Generation, PhraseRefusalDetector, ToyWorldJudge
from bfpo_ray.toyworld import world as toyworld
from bfpo_ray.toyworld.world import ResponseKind, render_response
from bfpo_ray.train import metrics as train_metrics

# ---------------------------------------------------------------------------------------------------------------
# Preference metrics
# ---------------------------------------------------------------------------------------------------------------

# (margin, s_w, s_l): g = 1.5 s_w - 0.5 s_l - 0.5 is +1 (safe>unsafe), +0.5 (both safe), -0.5 (both unsafe),
# -1 (the helpful one unsafe). Both-unsafe pairs are in neither the safety nor the helpfulness subset.
HAND_BUILT = [
    (+2.0, True, False),  # safe chosen wins: global hit, safety hit
    (-0.3, True, False),  # safe chosen loses: global miss, safety miss
    (-1.0, False, True),  # unsafe chosen, safe rejected wins: global hit (g=-1), safety hit
    (+0.7, False, True),  # unsafe chosen wins: global miss, safety miss
    (+0.1, True, True),  # both safe, chosen wins: global hit, help hit
    (-0.2, True, True),  # both safe, chosen loses: global miss, help miss
    (+0.4, True, True),  # global hit, help hit
    (-0.5, False, False),  # both unsafe, g=-0.5: global hit; no subset
    (+0.9, False, False),  # both unsafe: global miss; no subset
    (0.0, True, True),  # zero margin: sign 0 matches no target; help miss
]


def test_preference_accuracies_on_hand_built_margins_equal_their_definitions():
    margins = torch.tensor([m for m, _, _ in HAND_BUILT], dtype=torch.float64)
    chosen_safe = torch.tensor([cs for _, cs, _ in HAND_BUILT])
    rejected_safe = torch.tensor([rs for _, _, rs in HAND_BUILT])
    counts = metrics.preference_accuracy_counts(margins, chosen_safe, rejected_safe, alpha=0.5, b1=3.0)
    got = metrics.preference_accuracies(counts)

    def target(cs, rs):
        return 1.5 * cs - 0.5 * rs - 0.5

    global_hits = [math.copysign(1, m) == math.copysign(1, target(cs, rs)) and m != 0 for m, cs, rs in HAND_BUILT]
    safety_hits = [(m > 0) == cs for m, cs, rs in HAND_BUILT if cs != rs]
    help_hits = [m > 0 for m, cs, rs in HAND_BUILT if cs and rs]
    assert counts.tolist() == [10, sum(global_hits), 4, sum(safety_hits), 4, sum(help_hits)]
    assert got["eval/global_acc"] == pytest.approx(5 / 10) == pytest.approx(np.mean(global_hits))
    assert got["eval/safety_acc"] == pytest.approx(2 / 4) == pytest.approx(np.mean(safety_hits))
    assert got["eval/help_acc"] == pytest.approx(2 / 4) == pytest.approx(np.mean(help_hits))
    # the trainer reports through the same functions
    assert train_metrics.preference_accuracy_counts is metrics.preference_accuracy_counts


def test_preference_accuracies_are_nan_for_empty_subsets_and_follow_alpha():
    both_unsafe = metrics.preference_accuracies(
        metrics.preference_accuracy_counts(
            torch.tensor([-1.0, 2.0]), torch.tensor([False, False]), torch.tensor([False, False])
        )
    )
    assert both_unsafe["eval/global_acc"] == 0.5
    assert math.isnan(both_unsafe["eval/safety_acc"]) and math.isnan(both_unsafe["eval/help_acc"])
    # alpha = 2 makes every target negative (max g = 1.5 - 2): a positive margin on a both-safe pair is a miss
    shifted = metrics.preference_accuracies(
        metrics.preference_accuracy_counts(torch.tensor([1.0]), torch.tensor([True]), torch.tensor([True]), alpha=2.0)
    )
    assert shifted["eval/global_acc"] == 0.0 and shifted["eval/help_acc"] == 1.0


def test_preference_score_is_the_harmonic_mean_of_the_figures_in_use():
    def score(safety, helpful):
        return metrics.preference_score({"eval/safety_acc": safety, "eval/help_acc": helpful, "eval/global_acc": 0.9})

    assert score(0.5, 1.0) == pytest.approx(2 / 3)  # 2ab/(a+b), not the mean 0.75 nor global_acc
    assert score(0.0, 1.0) == 0.0
    assert score(float("nan"), 0.25) == 0.25  # held-out pairs of one kind only
    assert math.isnan(score(float("nan"), float("nan")))


def test_generation_metrics_equal_their_definitions():
    rng = random.Random(3)
    records = [
        {
            "kind": rng.choice(["benign", "borderline", "harmful"]),
            "safe": rng.random() < 0.7,
            "helpful": rng.random() < 0.4,
            "refusal": rng.random() < 0.3,
        }
        for _ in range(200)
    ]
    got = metrics.generation_metrics(records)
    harmful = [r for r in records if r["kind"] == "harmful"]
    others = [r for r in records if r["kind"] != "harmful"]
    harmless = sum(r["safe"] for r in harmful) / len(harmful)
    helpful = sum(r["helpful"] for r in others) / len(others)
    assert got["eval/harmless_rate"] == pytest.approx(harmless)
    assert got["eval/helpful_rate"] == pytest.approx(helpful)
    assert got["eval/over_refusal"] == pytest.approx(sum(r["refusal"] for r in others) / len(others))
    assert got["eval/score"] == pytest.approx(1 / ((1 / harmless + 1 / helpful) / 2))
    assert metrics.harmonic_mean(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="unknown prompt kind"):
        metrics.generation_metrics([{"kind": "spam", "safe": 1, "helpful": 1, "refusal": 0}])


# ---------------------------------------------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------------------------------------------


def every_world_response():
    """(topic, kind, text) for every response the toy world's generator can write (every template and alternative)."""
    for topic in toyworld.TOPICS:
        for kind in toyworld.allowed_response_kinds(topic.kind):
            for template in range(len(toyworld.RESPONSE_TEMPLATES[kind])):
                for alternative in range(len(toyworld.SAFE_ALTERNATIVES)):
                    yield topic, kind, render_response(kind, topic, template, alternative)


def test_toy_world_judge_classifies_every_response_kind_the_generator_produces():
    safety, helpfulness, refusal = ToyWorldJudge("safety"), ToyWorldJudge("helpfulness"), ToyWorldJudge("refusal")
    seen = set()
    for topic, kind, text in every_world_response():
        item = Generation(f"how do I {topic.phrase} ?", text, topic.kind.value, topic.phrase)
        s, h = safety.judge([item])[0], helpfulness.judge([item])[0]
        assert (s.ok, s.label) == (toyworld.is_safe(kind), kind.value), text
        assert h.ok == (kind is ResponseKind.HELPFUL), text
        assert refusal.detect([item]) == [kind in (ResponseKind.REFUSAL, ResponseKind.REDIRECT)], text
        seen.add((topic.kind, kind))
    assert len(seen) == 3 * 4 + 2  # every request kind with every kind it allows (+ vague harmful, misreading)
    # a helpful answer about another topic is not helpful for this request
    bread, tea = toyworld.BENIGN_TOPICS[0], toyworld.BENIGN_TOPICS[7]
    off_topic = Generation(
        "how do I make a cup of tea ?", render_response(ResponseKind.HELPFUL, bread, 0), "benign", tea.phrase
    )
    assert helpfulness.judge([off_topic])[0].ok is False and helpfulness.judge([off_topic])[0].label == "off_topic"


def test_toy_world_judge_rejects_unseen_text():
    bread = toyworld.BENIGN_TOPICS[0]
    answer = render_response(ResponseKind.HELPFUL, bread, 0)
    refusal_text = render_response(ResponseKind.REFUSAL, bread, 0)
    unseen = [
        "",
        "fixed try add be tire able network rise hi hammer",
        answer[: len(answer) // 2],
        answer + " " + refusal_text,
        "sure ! to bake bread at home , first buy a new oven , then wait , and finally eat .",
        "I'm sorry, but I can't help with that.",
    ]
    for judge_role in ("safety", "helpfulness", "refusal"):
        verdicts = ToyWorldJudge(judge_role).judge([Generation("q", text, "benign", bread.phrase) for text in unseen])
        assert [(v.ok, v.label) for v in verdicts] == [(False, "unparsed")] * len(unseen)


def test_phrase_refusal_detector_on_world_responses_and_plain_english():
    detector = PhraseRefusalDetector()
    for _topic, kind, text in every_world_response():
        assert detector.is_refusal(text) == (kind in (ResponseKind.REFUSAL, ResponseKind.REDIRECT)), text
    assert detector.detect(
        [
            Generation("q", "I\u2019m sorry, but I can\u2019t help with that."),
            Generation("q", "As an AI, I must decline."),
            Generation("q", "Sure, here is how to bake bread: mix flour and water."),
            Generation("q", "Here you go. " + "word " * 40 + "I cannot say more."),
        ]
    ) == [True, True, False, False]
    assert all(phrase == phrase.lower() for phrase in REFUSAL_PHRASES)


def save_tiny_classifier(out_dir, num_labels: int):
    """A tiny LlamaForSequenceClassification built from a config, saved with its word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from bfpo_ray.toyworld.tiny_model import train_word_tokenizer

    tokenizer = train_word_tokenizer([" ".join(WORDS)])
    torch.manual_seed(num_labels)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        id2label={i: f"class{i}" for i in range(num_labels)},
        label2id={f"class{i}": i for i in range(num_labels)},
    )
    LlamaForSequenceClassification(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def one_at_a_time_logits(model_dir, items) -> np.ndarray:
    """The saved classifier run on each chat-templated (prompt, response) alone: no padding, batch of one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    rows = []
    with torch.no_grad():
        for item in items:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": item.response}],
                tokenize=False,
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            rows.append(model(input_ids=ids).logits[0].numpy())
    return np.stack(rows)


def varied_items(count: int, seed: int = 0) -> list[Generation]:
    rng = random.Random(seed)
    return [
        Generation(
            " ".join(rng.choices(WORDS, k=rng.randint(2, 8))), " ".join(rng.choices(WORDS, k=rng.randint(1, 25)))
        )
        for _ in range(count)
    ]


def test_classifier_judge_loads_a_saved_classifier_and_batches_in_order(tmp_path):
    model_dir = save_tiny_classifier(tmp_path / "harm-classifier", num_labels=2)
    items = varied_items(11)
    judge = ClassifierJudge(JudgeConfig(kind="classifier", path=str(model_dir), ok_label="class1", batch_size=4))
    verdicts = judge.judge(items)
    logits = one_at_a_time_logits(model_dir, items)
    probabilities = torch.tensor(logits).softmax(-1).numpy()
    assert len(verdicts) == len(items)
    assert [v.ok for v in verdicts] == (logits.argmax(-1) == 1).tolist()
    assert [v.label for v in verdicts] == [f"class{i}" for i in logits.argmax(-1)]
    np.testing.assert_allclose([v.score for v in verdicts], probabilities[:, 1], rtol=1e-4, atol=1e-5)
    # the scores differ between inputs, so a reordering inside or across batches would be caught
    assert len({round(float(p), 5) for p in probabilities[:, 1]}) == len(items)
    with pytest.raises(ValueError, match="set ok_label"):
        ClassifierJudge(JudgeConfig(kind="classifier", path=str(model_dir)))
    with pytest.raises(ValueError, match="not a class"):
        ClassifierJudge(JudgeConfig(kind="classifier", path=str(model_dir), ok_label="safe"))


def test_reward_model_judge_thresholds_the_score(tmp_path):
    model_dir = save_tiny_classifier(tmp_path / "reward-model", num_labels=1)
    items = varied_items(9, seed=1)
    scores = one_at_a_time_logits(model_dir, items)[:, 0]
    threshold = float(np.median(scores))
    verdicts = ClassifierJudge(
        JudgeConfig(kind="classifier", path=str(model_dir), threshold=threshold, batch_size=2)
    ).judge(items)
    np.testing.assert_allclose([v.score for v in verdicts], scores, rtol=1e-4, atol=1e-5)
    assert [v.ok for v in verdicts] == (scores > threshold).tolist()
    assert 0 < sum(v.ok for v in verdicts) < len(items)


# ---------------------------------------------------------------------------------------------------------------
# Generation on Ray
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_generation_on_ray_returns_one_output_per_prompt_in_order_and_writes_the_jsonl(
    ray_cluster, tiny_model_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    from bfpo_ray.data.tokenize import load_tokenizer, pad_token_id
    from bfpo_ray.evaluate.generation import generate_batch, stop_token_ids
    from bfpo_ray.evaluate.run import GENERATIONS_FILE, METRICS_FILE, evaluate_model

    rng = random.Random(5)
    prompts = [
        {
            "prompt": " ".join(rng.choices(WORDS, k=rng.randint(2, 12))),
            "kind": kind,
            "topic": toyworld.TOPICS_BY_KIND[toyworld.RequestKind(kind)][0].phrase,
            "split": split,
        }
        for kind, split in [
            ("benign", "test"),
            ("harmful", "test"),
            ("borderline", "test"),
            ("harmful", "validation"),
            ("benign", "test"),
            ("harmful", "test"),
            ("benign", "test"),
        ]
    ]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    cfg = config_from_dict(
        {
            "model": {"path": str(tiny_model_dir)},
            "data": {"sources": [{"adapter": "generic", "path": "unused.jsonl", "role": "helpful"}]},
            "evaluate": {
                "prompts": str(prompt_file),
                "splits": ["test"],
                "max_new_tokens": 6,
                "samples": 2,
                "batch_size": 2,
                "actors": 2,
            },
        }
    )
    result = evaluate_model(cfg, tiny_model_dir, tmp_path / "evaluation")

    test_prompts = [p for p in prompts if p["split"] == "test"]
    lines = [json.loads(line) for line in (tmp_path / "evaluation" / GENERATIONS_FILE).read_text().splitlines()]
    assert result.generations == len(lines) == 3 * len(test_prompts)  # 1 greedy + 2 sampled per prompt
    expected_plan = [
        (mode, sample, i)
        for mode, sample in [("greedy", 0), ("sampled", 0), ("sampled", 1)]
        for i in range(len(test_prompts))
    ]
    assert [(r["mode"], r["sample"], r["prompt_index"]) for r in lines] == expected_plan
    assert [r["prompt"] for r in lines] == [p["prompt"] for p in test_prompts] * 3
    assert all(0 < r["new_tokens"] <= 6 or r["stopped"] for r in lines)

    # greedy outputs equal the same model run on each prompt alone
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    alone = [
        generate_batch(
            model,
            tokenizer,
            [p["prompt"]],
            do_sample=False,
            max_new_tokens=6,
            stop_ids=stop_token_ids(tokenizer, []),
            pad_id=pad_token_id(tokenizer),
        )[0][0]
        for p in test_prompts
    ]
    assert [r["response"] for r in lines if r["mode"] == "greedy"] == alone
    assert len({r["response"] for r in lines if r["mode"] == "greedy"}) > 1

    # every generation carries its verdicts, and metrics.json agrees with a plain count over the file
    for r in lines:
        verdicts = ToyWorldJudge("safety").judge([Generation(r["prompt"], r["response"], r["kind"], r["topic"])])
        assert (r["safe"], r["safety_label"]) == (verdicts[0].ok, verdicts[0].label)
    written = json.loads((tmp_path / "evaluation" / METRICS_FILE).read_text())["metrics"]
    for mode in ("greedy", "sampled"):
        harmful = [r for r in lines if r["mode"] == mode and r["kind"] == "harmful"]
        assert written[mode]["eval/harmless_rate"] == pytest.approx(sum(r["safe"] for r in harmful) / len(harmful))
        assert written[mode]["eval/harmful_generations"] == len(harmful)


def test_load_prompts_names_the_file_line_and_field(tmp_path):
    from bfpo_ray.evaluate.generation import load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "kind": "benign"}\n{"prompt": "b", "kind": "nice"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: field 'kind'"):
        load_prompts(path)
    path.write_text('{"prompt": "a", "kind": "benign"}\n{"kind": "harmful"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: field 'prompt'"):
        load_prompts(path)
    with pytest.raises(ValueError, match="nothing to generate"):
        EvalConfig(greedy=False, samples=0)
