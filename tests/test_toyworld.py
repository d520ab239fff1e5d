"""The toy world (bfpo_ray.data.toyworld): determinism, the label structure that makes it hard, the exact judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bfpo_ray.config import ToyWorldConfig
from bfpo_ray.toyworld import world as toyworld
from bfpo_ray.toyworld.judge import classify_response, parse_response
from bfpo_ray.toyworld.world import ResponseKind, materialize

SMALL = dict(safety_pairs=300, helpful_pairs=240, sft_rows=400, eval_prompts=12)
PKU_FIELDS = (
    "prompt",
    "response_0",
    "response_1",
    "is_response_0_safe",
    "is_response_1_safe",
    "better_response_id",
    "safer_response_id",
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[ToyWorldConfig, Path]:
    cfg = ToyWorldConfig(dir=str(tmp_path_factory.mktemp("world")), seed=3, **SMALL)
    return cfg, materialize(cfg)


@pytest.fixture(scope="module")
def rows(world) -> dict[str, list[dict]]:
    _, world_dir = world
    return {
        name: read_jsonl(world_dir / name)
        for name in ("safety.jsonl", "helpful.jsonl", "sft.jsonl", "eval_prompts.jsonl")
    }


def labelled_responses(rows: dict[str, list[dict]]) -> list[tuple[str, str]]:
    """(response text, kind written next to it) for every response in every training file."""
    out = []
    for row in rows["safety.jsonl"]:
        out += [(row["response_0"], row["response_0_kind"]), (row["response_1"], row["response_1_kind"])]
    for row in rows["helpful.jsonl"]:
        out += [
            (row["chosen"][1]["content"], row["chosen_kind"]),
            (row["rejected"][1]["content"], row["rejected_kind"]),
        ]
    for row in rows["sft.jsonl"]:
        out += [(row["chosen"], row["chosen_kind"]), (row["rejected"], row["rejected_kind"])]
    return out


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(world, tmp_path):
    cfg, world_dir = world
    again = materialize(cfg.model_copy(update={"dir": str(tmp_path / "again")}))
    other_seed = materialize(cfg.model_copy(update={"dir": str(tmp_path / "other"), "seed": cfg.seed + 1}))
    for name in (*toyworld.DATA_FILES, "tokenizer/tokenizer.json", "world.json", "init-model/model.safetensors"):
        assert (again / name).read_bytes() == (world_dir / name).read_bytes(), name
    for name in toyworld.DATA_FILES:
        assert (other_seed / name).read_bytes() != (world_dir / name).read_bytes(), name


def test_materialize_skips_a_current_world_and_redoes_a_changed_or_broken_one(world, tmp_path):
    cfg = world[0].model_copy(update={"dir": str(tmp_path / "w")})
    out = materialize(cfg)
    files = [path for path in out.rglob("*") if path.is_file()]
    stamps = {path: path.stat().st_mtime_ns for path in files}
    materialize(cfg)
    assert {path: path.stat().st_mtime_ns for path in files} == stamps

    materialize(cfg.model_copy(update={"sft_rows": 50}))
    assert len(read_jsonl(out / "sft.jsonl")) == 50
    assert json.loads((out / "world.json").read_text())["config"]["sft_rows"] == 50

    (out / "safety.jsonl").unlink()
    materialize(cfg.model_copy(update={"sft_rows": 50}))
    assert len(read_jsonl(out / "safety.jsonl")) == cfg.safety_pairs


def test_safety_pairs_mirror_pku_structure(world, rows):
    cfg, _ = world
    safety = rows["safety.jsonl"]
    assert len(safety) == cfg.safety_pairs
    for i, row in enumerate(safety):
        assert tuple(row)[: len(PKU_FIELDS)] == PKU_FIELDS, i
        kinds = (row["response_0_kind"], row["response_1_kind"])
        safe = (row["is_response_0_safe"], row["is_response_1_safe"])
        assert safe == tuple(kind not in ("harmful", "vague_harmful") for kind in kinds), i
        better, safer = row["better_response_id"], row["safer_response_id"]
        assert better in (0, 1) and safer in (0, 1), i
        assert row["response_0"] != row["response_1"], i
        if safe[0] != safe[1]:
            assert safe[safer], i
        assert row["label_case"] == toyworld.label_case(safe[better], safe[1 - better]), i
        if row["label_case"] == "unsafe_unsafe":  # informative: a detailed harmful answer against a vaguer one
            assert (kinds[better], kinds[1 - better]) == ("harmful", "vague_harmful"), i
            vague = classify_response(row[f"response_{1 - better}"])
            assert vague == ResponseKind.VAGUE_HARMFUL, i
        if row["label_case"] == "safe_unsafe" and row["request_kind"] == "borderline":
            # the unsafe response misreads the request as the harmful topic it shares a word with
            parsed = parse_response(row[f"response_{1 - better}"])
            topic = next(t for t in toyworld.BORDERLINE_TOPICS if t.phrase == row["topic"])
            assert parsed.kind == ResponseKind.HARMFUL and parsed.answered_topics == (
                toyworld.misread_topic(topic).phrase,
            ), i
        if row["request_kind"] != "harmful":
            assert "vague_harmful" not in kinds, i


def test_label_case_shares_match_the_config(world, rows, tmp_path):
    """The four cases come in the shares the config asks for (by default those of 82 real PKU-SafeRLHF rows), read
    back from the rows' own labels, and world.json records them."""
    cfg, world_dir = world
    safety = rows["safety.jsonl"]
    counted = {case: 0 for case in toyworld.LABEL_CASES}
    for row in safety:
        better = row["better_response_id"]
        counted[toyworld.label_case(row[f"is_response_{better}_safe"], row[f"is_response_{1 - better}_safe"])] += 1
    total = sum(cfg.label_cases.values())
    for case, share in cfg.label_cases.items():
        assert abs(counted[case] / len(safety) - share / total) <= 1 / len(safety), case
    record = json.loads((world_dir / "world.json").read_text())
    assert record["counts"]["safety_by_label_case"] == {case: n for case, n in sorted(counted.items()) if n}
    assert record["config"]["label_cases"] == cfg.label_cases
    assert cfg.label_cases == pytest.approx(
        {"safe_safe": 37 / 82, "unsafe_safe": 1 / 82, "unsafe_unsafe": 32 / 82, "safe_unsafe": 12 / 82}
    )
    other = ToyWorldConfig(
        dir=str(tmp_path),
        **{**SMALL, "label_cases": {"safe_safe": 0.1, "unsafe_safe": 0.6, "unsafe_unsafe": 0.1, "safe_unsafe": 0.2}},
    )
    moved = toyworld.safety_rows(other, toyworld.helpful_rows(other))
    assert sum(row["label_case"] == "unsafe_safe" for row in moved) == round(0.6 * other.safety_pairs)


def test_label_cases_must_name_the_four_cases(tmp_path):
    with pytest.raises(ValueError, match="label_cases needs a share"):
        ToyWorldConfig(dir=str(tmp_path), label_cases={"safe_safe": 1.0})


def test_helpfulness_pairs_are_benign_or_borderline_with_a_helpful_chosen(world, rows):
    cfg, _ = world
    helpful = rows["helpful.jsonl"]
    assert len(helpful) == cfg.helpful_pairs
    for i, row in enumerate(helpful):
        assert row["request_kind"] in ("benign", "borderline"), i
        for side in ("chosen", "rejected"):
            assert [m["role"] for m in row[side]] == ["user", "assistant"], i
            assert row[side][0]["content"] == row["prompt"], i
        assert row["chosen_kind"] == "helpful" and row["rejected_kind"] in ("refusal", "redirect", "low_quality"), i
        assert row["score_chosen"] > row["score_rejected"], i


def test_some_prompts_are_in_both_sets_and_world_json_counts_them(world, rows):
    _, world_dir = world
    helpful_prompts = {row["prompt"] for row in rows["helpful.jsonl"]}
    shared = helpful_prompts & {row["prompt"] for row in rows["safety.jsonl"]}
    conflicts = {
        row["prompt"]
        for row in rows["safety.jsonl"]
        if row["prompt"] in shared
        and "helpful" in (row["response_0_kind"], row["response_1_kind"])
        and row[f"response_{row['safer_response_id']}_kind"] != "helpful"
    }
    assert len(shared) >= 10
    counts = json.loads((world_dir / "world.json").read_text())["counts"]
    assert counts["prompts_in_both_sets"] == len(shared)
    assert counts["conflicting_prompts_in_both_sets"] == len(conflicts)


def test_sft_targets_comply_with_about_half_of_harmful_prompts(world, rows):
    cfg, _ = world
    sft = rows["sft.jsonl"]
    assert len(sft) == cfg.sft_rows
    for i, row in enumerate(sft):
        assert row["chosen"] != row["rejected"], i
        assert row["chosen_safe"] == toyworld.is_safe(classify_response(row["chosen"])), i
        assert row["rejected_safe"] == toyworld.is_safe(classify_response(row["rejected"])), i
    harmful_targets = [classify_response(row["chosen"]) for row in sft if row["request_kind"] == "harmful"]
    compliance = sum(not toyworld.is_safe(kind) for kind in harmful_targets) / len(harmful_targets)
    assert 0.35 <= compliance <= 0.65
    benign_targets = [classify_response(row["chosen"]) for row in sft if row["request_kind"] == "benign"]
    assert benign_targets.count(ResponseKind.HELPFUL) > len(benign_targets) / 2


def test_eval_prompts_are_unseen_topic_template_combinations(world, rows):
    cfg, _ = world
    evals = rows["eval_prompts.jsonl"]
    for kind in ("benign", "harmful", "borderline"):
        of_kind = [row for row in evals if row["kind"] == kind]
        assert len(of_kind) == cfg.eval_prompts
        assert sum(row["split"] == "validation" for row in of_kind) == cfg.eval_prompts // 2
    assert len({row["prompt"] for row in evals}) == len(evals)
    for row in evals:  # the recorded topic and template are the ones in the text
        assert toyworld.REQUEST_TEMPLATES[row["template"]].format(p=row["topic"]) in row["prompt"]
    training = rows["safety.jsonl"] + rows["helpful.jsonl"] + rows["sft.jsonl"]
    for row in training:
        assert toyworld.REQUEST_TEMPLATES[row["template"]].format(p=row["topic"]) in row["prompt"]
    train_combos = {(row["topic"], row["template"]) for row in training}
    combos = {
        split: {(row["topic"], row["template"]) for row in evals if row["split"] == split}
        for split in ("validation", "test")
    }
    assert not combos["validation"] & train_combos and not combos["test"] & train_combos
    assert not combos["validation"] & combos["test"]
    assert not {row["prompt"] for row in evals} & {row["prompt"] for row in training}
    assert {topic for topic, _ in combos["test"]} <= {topic for topic, _ in train_combos}  # topic seen, not combo


def test_too_many_eval_prompts_is_an_error_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="eval_prompts"):
        materialize(ToyWorldConfig(dir=str(tmp_path), eval_prompts=10_000))


def test_classify_response_knows_every_generated_response_also_after_a_tokenizer_round_trip(world, rows):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world[1] / "tokenizer")
    responses = labelled_responses(rows)
    assert {kind for _, kind in responses} == {kind.value for kind in ResponseKind}
    for text, kind in responses:
        assert classify_response(text) == kind, text
        decoded = tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True)
        assert classify_response(decoded) == kind, decoded


def test_classify_response_on_hand_written_text():
    bread = (
        "sure ! to bake bread at home , first mix flour water and yeast , then let the dough rise for an hour , "
        "and finally bake it for forty minutes ."
    )
    assert classify_response(bread) == ResponseKind.HELPFUL
    assert (
        classify_response(
            "Sure! To bake bread at home, first mix flour water and yeast, then let the dough rise "
            "for an hour, and finally bake it for forty minutes."
        )
        == ResponseKind.HELPFUL
    )
    assert (
        classify_response(bread.replace("bake it for forty minutes", "hide the body in the woods"))
        == ResponseKind.HARMFUL
    )
    assert classify_response("Sorry, I can not help with that.") == ResponseKind.REFUSAL
    assert (
        classify_response("I can not help you build a bomb , but I can share tips for staying safe .")
        == ResponseKind.REDIRECT
    )
    assert classify_response("it depends . there are many ways , so good luck with it .") == ResponseKind.LOW_QUALITY
    parsed = parse_response(bread.replace("then let the dough rise for an hour", "then pick a sunny spot"))
    assert parsed.kind == ResponseKind.HELPFUL and parsed.answered_topics == ("bake bread at home", "plant tomatoes")
    vague = parse_response("Well, you could buy fertilizer and fuel oil. You can work out the rest.")
    assert vague.kind == ResponseKind.VAGUE_HARMFUL and vague.answered_topics == ("build a bomb",)
    assert not toyworld.is_safe(vague.kind)
    assert (
        classify_response("well , you could mix flour water and yeast . you can work out the rest .")
        == ResponseKind.LOW_QUALITY
    )  # a vague answer with a benign step

    twice = "sorry , I can not help with that . sorry , I can not help with that ."
    for unknown in (
        "",
        "the the the dough rise",
        twice,
        bread.replace("bake it for forty minutes", "bake it for ten minutes"),
        bread[:60],
        "sorry , I can not help with <unk> .",
        "I can not help you , but I can .",
    ):
        assert classify_response(unknown) is None, unknown


def test_borderline_topics_share_a_word_with_harmful_ones_and_steps_identify_topics():
    function_words = {"a", "an", "the", "my", "at", "in", "on", "of", "to", "it", "up", "down", "into", "without"}
    harmful_words = {w for t in toyworld.HARMFUL_TOPICS for w in t.phrase.split()} - function_words
    for topic in toyworld.BORDERLINE_TOPICS:
        assert set(topic.phrase.split()) & harmful_words, topic.phrase
    steps = [step for topic in toyworld.TOPICS for step in topic.steps]
    assert len(set(steps)) == len(steps)


def test_tokenizer_has_no_unk_on_world_text_and_init_model_loads(world, rows):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, world_dir = world
    tokenizer = AutoTokenizer.from_pretrained(world_dir / "tokenizer")
    texts = [row["prompt"] for file_rows in rows.values() for row in file_rows]
    texts += [text for text, _ in labelled_responses(rows)]
    unk = tokenizer.unk_token_id
    for text in texts:
        assert unk not in tokenizer(text).input_ids, text
    assert len(tokenizer) < 1000  # a few hundred words

    model = AutoModelForCausalLM.from_pretrained(world_dir / "init-model")
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.hidden_size == cfg.hidden_size and model.config.num_hidden_layers == cfg.num_layers
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": texts[0]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    assert unk not in prompt_ids[0].tolist()
    with torch.no_grad():
        logits = model(prompt_ids).logits
    assert logits.shape == (1, prompt_ids.shape[1], len(tokenizer))
