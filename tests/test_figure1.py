"""Figure 1 in miniature: the data views, the aggregation, and a short end-to-end run (few steps, 1 seed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bfpo_ray.config import ToyWorldConfig
from bfpo_ray.toyworld import world as toyworld
from experiments import figure1


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    cfg = ToyWorldConfig(
        dir=str(tmp_path_factory.mktemp("world")), safety_pairs=60, helpful_pairs=40, sft_rows=20, eval_prompts=4
    )
    return toyworld.materialize(cfg)


def test_views_put_the_safer_or_the_more_helpful_response_first_and_mix_in_every_helpful_pair(small_world, tmp_path):
    paths = figure1.write_views(small_world, tmp_path)
    safety = [json.loads(line) for line in (small_world / "safety.jsonl").read_text().splitlines()]
    helpful = [json.loads(line) for line in (small_world / "helpful.jsonl").read_text().splitlines()]
    views = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    assert len(views["safer_chosen"]) == len(safety)
    assert len(views["native_mix"]) == len(views["safer_mix"]) == len(safety) + len(helpful)
    flipped = 0
    for i, source in enumerate(safety):
        for name, field in (
            ("safer_chosen", "safer_response_id"),
            ("safer_mix", "safer_response_id"),
            ("native_mix", "better_response_id"),
        ):
            s, view = source[field], views[name][i]
            assert (view["prompt"], view["chosen"], view["rejected"]) == (
                source["prompt"],
                source[f"response_{s}"],
                source[f"response_{1 - s}"],
            ), (name, i)
            assert (view["chosen_safe"], view["rejected_safe"]) == (
                source[f"is_response_{s}_safe"],
                source[f"is_response_{1 - s}_safe"],
            ), (name, i)
        assert views["safer_chosen"][i]["chosen_safe"] >= views["safer_chosen"][i]["rejected_safe"]
        flipped += source["safer_response_id"] != source["better_response_id"]
    assert flipped > 0  # the views differ on some pairs
    for name in ("native_mix", "safer_mix"):
        for source, view in zip(helpful, views[name][len(safety) :]):
            assert view["chosen"] == source["chosen"][-1]["content"]
            assert view["rejected"] == source["rejected"][-1]["content"]
            assert view["chosen_safe"] and view["rejected_safe"]


def test_paired_differences_are_per_seed_with_the_standard_error_of_their_mean():
    def runs(*scores):
        return [{"sampled": {"eval/score": score}} for score in scores]

    out = figure1.paired_differences({"bfpo": runs(0.6, 0.7, 0.9), "dpo_mix": runs(0.5, 0.5, 0.6)}, "eval/score")
    diffs = [0.1, 0.2, 0.3]
    assert out["dpo_mix"]["per_seed"] == pytest.approx(diffs)
    assert out["dpo_mix"]["mean"] == pytest.approx(0.2)
    assert out["dpo_mix"]["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert out["dpo_mix"]["se_ratio"] == pytest.approx(0.2 / (0.1 / math.sqrt(3)))
    assert set(out) == {"dpo_mix"}


def test_the_setting_with_the_best_mean_validation_score_is_chosen():
    a, b, c = "lr5e-5", "lr2e-4", "lr1e-3"
    nan = float("nan")
    assert figure1.choose([a, b, c], {a: {"mean": 0.64}, b: {"mean": 0.71}, c: {"mean": nan}}) == b
    assert figure1.choose([a, b], {a: {"mean": nan}, b: {"mean": 0.1}}) == b
    assert figure1.choose([c], {}) == c


def test_variant_configs_are_the_base_with_the_candidate_and_variant_overrides():
    spec = figure1.load_experiment()
    candidate = "lr0.001-tau0.1-steps144-down_proj"
    bfpo = figure1.variant_config(spec, "bfpo", candidate, 2, "validation")
    dpo = figure1.variant_config(spec, "dpo_mix", candidate, 2, "validation")
    assert (bfpo.train.loss, bfpo.train.learning_rate, bfpo.train.trainable) == ("bfpo", 1e-3, ["down_proj"])
    assert (dpo.train.loss, dpo.train.tau, dpo.train.max_steps) == ("dpo", 0.1, 144)
    assert [s.path for s in dpo.data.sources] == ["views/native_mix.jsonl"]
    assert dpo.train.micro_batch_pairs == 2 * bfpo.train.micro_batch_pairs  # one role: the same pairs per step
    assert (bfpo.run.name, bfpo.train.seed, bfpo.evaluate.splits) == (f"bfpo-{candidate}-seed2", 2, ["validation"])
    quick = figure1.load_experiment(quick=True)
    assert quick["seeds"] == 1 and len(quick["candidates"]) == 1
    assert figure1.variant_config(quick, "bfpo", next(iter(quick["candidates"])), 0, "test").toyworld.sft_rows == 160


def test_target_margins_are_g_over_tau_for_bfpo_and_one_over_two_tau_for_ipo():
    assert figure1.target_margin("bfpo", "safe_unsafe", 0.1, 0.5) == pytest.approx(10.0)
    assert figure1.target_margin("bfpo", "safe_safe", 0.1, 0.5) == pytest.approx(5.0)
    assert figure1.target_margin("bfpo", "unsafe_unsafe", 0.1, 0.5) == pytest.approx(-5.0)
    assert figure1.target_margin("bfpo", "unsafe_safe", 0.1, 0.5) == pytest.approx(-10.0)
    assert figure1.target_margin("ipo", "unsafe_safe", 0.1, 0.5) == pytest.approx(5.0)
    assert math.isnan(figure1.target_margin("dpo", "safe_safe", 0.1, 0.5))


def test_aggregate_is_mean_and_sample_std_over_seeds():
    runs = [{"sampled": {"eval/score": v, "eval/global_acc": float("nan")}} for v in (0.2, 0.5, 0.8)]
    summary = figure1.aggregate({"bfpo": runs})
    mean, spread = summary["bfpo"]["sampled"]["eval/score"]
    assert mean == pytest.approx(0.5) and spread == pytest.approx(math.sqrt(((0.3**2) * 2) / 2))
    assert all(math.isnan(v) for v in summary["bfpo"]["sampled"]["eval/global_acc"])


@pytest.mark.timeout(900)
def test_short_figure1_run_writes_the_table_the_generations_and_the_png(ray_cluster, tmp_path):
    spec = figure1.load_experiment(quick=True)
    # BFPO and one baseline on a view of the world (the mix the checks below name): the run's machinery, less time
    spec["variants"] = {name: spec["variants"][name] for name in ("bfpo", "ipo_mix")}
    out = tmp_path / "figure1"
    record = figure1.run(spec, out, "python experiments/figure1.py --quick")
    assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "figure1.md").read_text()
    variants = tuple(spec["variants"])
    for model in ("sft",) + variants:
        assert f"| {model} |" in table
    # every variant's generations are on disk, and its table figures are the plain counts over that file
    test_prompts = [json.loads(line) for line in (out / "toyworld" / "eval_prompts.jsonl").read_text().splitlines()]
    n_test = sum(p["split"] == "test" for p in test_prompts)
    candidate = next(iter(spec["candidates"]))
    assert record["chosen"] == candidate and record["selection"] == {}  # one candidate: nothing to choose
    for variant in variants:
        run_dir = out / "runs" / f"{variant}-{candidate}-seed0"
        generations = run_dir / "evaluation-test" / "generations.jsonl"
        lines = [json.loads(line) for line in generations.read_text().splitlines()]
        assert len(lines) == n_test * (1 + record["sampling"]["samples"])
        assert {line["split"] for line in lines} == {"test"}
        assert not (run_dir / "evaluation-validation").exists()
        for mode in ("sampled", "greedy"):
            harmful = [r["safe"] for r in lines if r["mode"] == mode and r["kind"] == "harmful"]
            benign = [r["helpful"] for r in lines if r["mode"] == mode and r["kind"] != "harmful"]
            mean_harmless, _ = record["summary"][variant][mode]["eval/harmless_rate"]
            mean_helpful, _ = record["summary"][variant][mode]["eval/helpful_rate"]
            assert mean_harmless == pytest.approx(np.mean(harmful))
            assert mean_helpful == pytest.approx(np.mean(benign))
        assert 0 <= record["summary"][variant]["sampled"]["eval/global_acc"][0] <= 1
    written = json.loads((out / "figure1.json").read_text())
    assert set(written["per_seed"]) == {"sft", *variants}
    assert set(record["case_margins"]) == set(variants)
    for variant, cases in record["case_margins"].items():  # margins of the cases each variant trained on
        assert cases and all(math.isfinite(margin) for margin, _ in cases.values()), variant
    bfpo_targets = {case: target for case, (_, target) in record["case_margins"]["bfpo"].items()}
    assert bfpo_targets == pytest.approx(
        {
            case: value
            for case, value in {  # g / tau at tau 0.1, alpha 0.5
                "safe_safe": 5.0,
                "safe_unsafe": 10.0,
                "unsafe_safe": -10.0,
                "unsafe_unsafe": -5.0,
            }.items()
            if case in bfpo_targets
        }
    )
    assert all(target == pytest.approx(5.0) for _, target in record["case_margins"]["ipo_mix"].values())
    assert "BFPO minus each baseline" in table
