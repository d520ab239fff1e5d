"""Figure 1 in miniature: the data views, the aggregation, and a short end-to-end run (few steps, 1 seed)."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from bfpo_ray.experiments import figure1
from bfpo_ray.config import ToyWorldConfig
from bfpo_ray.data import toyworld


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    cfg = ToyWorldConfig(dir=str(tmp_path_factory.mktemp("world")), safety_pairs=60, helpful_pairs=40,
                         sft_rows=20, eval_prompts=4)
    return toyworld.materialize(cfg)


def test_views_put_the_safer_response_first_and_mix_in_every_helpful_pair(small_world, tmp_path):
    paths = figure1.write_views(small_world, tmp_path)
    safety = [json.loads(line) for line in (small_world / "safety.jsonl").read_text().splitlines()]
    helpful = [json.loads(line) for line in (small_world / "helpful.jsonl").read_text().splitlines()]
    safer = [json.loads(line) for line in paths["safer_chosen"].read_text().splitlines()]
    mix = [json.loads(line) for line in paths["naive_mix"].read_text().splitlines()]
    assert len(safer) == len(safety) and len(mix) == len(safety) + len(helpful)
    flipped = 0
    for source, view in zip(safety, safer):
        s = source["safer_response_id"]
        assert (view["prompt"], view["chosen"], view["rejected"]) == (source["prompt"], source[f"response_{s}"],
                                                                      source[f"response_{1 - s}"])
        assert (view["chosen_safe"], view["rejected_safe"]) == (source[f"is_response_{s}_safe"],
                                                                source[f"is_response_{1 - s}_safe"])
        assert view["chosen_safe"] >= view["rejected_safe"]
        flipped += s != source["better_response_id"]
    assert flipped > 0  # the view differs from the helpfulness labels on some pairs
    for source, view in zip(helpful, mix[len(safety):]):
        assert view["chosen"] == source["chosen"][-1]["content"]
        assert view["rejected"] == source["rejected"][-1]["content"]
        assert view["chosen_safe"] and view["rejected_safe"]


def test_aggregate_is_mean_and_sample_std_over_seeds():
    runs = [{"sampled": {"eval/score": v, "eval/global_acc": float("nan")}} for v in (0.2, 0.5, 0.8)]
    summary = figure1.aggregate({"bfpo": runs})
    mean, spread = summary["bfpo"]["sampled"]["eval/score"]
    assert mean == pytest.approx(0.5) and spread == pytest.approx(math.sqrt(((0.3 ** 2) * 2) / 2))
    assert all(math.isnan(v) for v in summary["bfpo"]["sampled"]["eval/global_acc"])


@pytest.mark.timeout(900)
def test_short_figure1_run_writes_the_table_the_generations_and_the_png(ray_cluster, tmp_path):
    settings = replace(figure1.QUICK, out=str(tmp_path / "figure1"))
    record = figure1.run(settings, "python -m bfpo_ray figure1 --quick")
    out = tmp_path / "figure1"
    assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "figure1.md").read_text()
    for model in ("sft",) + figure1.VARIANTS:
        assert f"| {model} |" in table
    # every variant's generations are on disk, and its table figures are the plain counts over that file
    test_prompts = [json.loads(line) for line in (out / "toyworld" / "eval_prompts.jsonl").read_text().splitlines()]
    n_test = sum(p["split"] == "test" for p in test_prompts)
    for variant in figure1.VARIANTS:
        generations = out / "runs" / figure1.run_name(variant, 0, settings) / "evaluation" / "generations.jsonl"
        lines = [json.loads(line) for line in generations.read_text().splitlines()]
        assert len(lines) == n_test * (1 + settings.samples)
        for mode in ("sampled", "greedy"):
            harmful = [r["safe"] for r in lines if r["mode"] == mode and r["kind"] == "harmful"]
            benign = [r["helpful"] for r in lines if r["mode"] == mode and r["kind"] != "harmful"]
            mean_harmless, _ = record["summary"][variant][mode]["eval/harmless_rate"]
            mean_helpful, _ = record["summary"][variant][mode]["eval/helpful_rate"]
            assert mean_harmless == pytest.approx(np.mean(harmful))
            assert mean_helpful == pytest.approx(np.mean(benign))
        assert 0 <= record["summary"][variant]["sampled"]["eval/global_acc"][0] <= 1
    written = json.loads((out / "figure1.json").read_text())
    assert set(written["per_seed"]) == {"sft", *figure1.VARIANTS}
