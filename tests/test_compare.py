"""benchmark/compare.py: runs against a published anchor's seeds, and the committed anchor files."""

import json
import math

import numpy as np
import pytest
from conftest import ROOT, load_benchmark

ANCHORS = ROOT / "benchmark" / "results" / "anchors"


def load_compare():
    return load_benchmark("compare")


def test_permutation_p_counts_the_splits_at_or_below_the_observed_difference():
    compare = load_compare()
    # Pooled 0, 1, 2, 3 split into two pairs: differences of means -2, -1, 0, 0, 1, 2 over the six splits.
    assert compare.permutation_p(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == (pytest.approx(1 / 6), 6, True)
    assert compare.permutation_p(np.array([1.0, 2.0]), np.array([0.0, 3.0])) == (pytest.approx(4 / 6), 6, True)
    assert compare.permutation_p(np.array([2.0, 3.0]), np.array([0.0, 1.0]))[0] == pytest.approx(1.0)


def test_permutation_p_samples_splits_when_there_are_too_many(monkeypatch):
    compare = load_compare()
    rng = np.random.default_rng(3)
    runs, anchor = rng.normal(0.0, 1.0, 5), rng.normal(0.8, 1.0, 10)
    exact, splits, is_exact = compare.permutation_p(runs, anchor)
    assert (splits, is_exact) == (math.comb(15, 5), True) and 0.01 < exact < 0.5
    monkeypatch.setattr(compare, "MAX_EXACT_SPLITS", 10)
    sampled, splits, is_exact = compare.permutation_p(runs, anchor, samples=200_000)
    assert (splits, is_exact) == (200_000, False)
    assert sampled == pytest.approx(exact, abs=0.005)
    assert compare.permutation_p(runs, anchor, samples=200_000)[0] == sampled  # seeded: repeatable


def _run(launch, script, env_id, seed, final, evals):
    run_dir = launch / f"{script}__{env_id}__{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"script": script, "env_id": env_id, "seed": seed}))
    rows = "".join(f"{step},1.0,5.0,\n{step},1.0,,{value}\n" for step, value in evals)
    (run_dir / "progress.csv").write_text("global_step,wall_time_s,charts/episodic_return,eval/episodic_return\n"
                                          + rows)
    (run_dir / "summary.json").write_text(json.dumps({"global_step": 300, "final_eval_return": final}))


def test_compare_reports_final_and_window_means_against_the_anchor(tmp_path):
    compare = load_compare()
    launch = tmp_path / "launch"
    _run(launch, "sac", "Hopper-v5", 1, 10.0, [(100, 1.0), (200, 3.0), (300, 10.0)])
    _run(launch, "sac", "Hopper-v5", 2, 20.0, [(100, 2.0), (200, 5.0), (300, 20.0)])
    _run(launch, "sac", "Hopper-v5", 3, 30.0, [(300, 30.0)])  # no curve: left out of the window
    _run(launch, "td3", "Hopper-v5", 1, 999.0, [(300, 999.0)])  # another script: ignored
    anchor = tmp_path / "anchor.json"
    anchor.write_text(json.dumps({"name": "A", "source": "s", "metric": "m", "env_id": "Hopper-v3",
                                  "step_offset": 50, "steps": [100, 200, 300],
                                  "seeds": [[0.0, 40.0, 40.0], [0.0, 60.0, 60.0]]}))
    args = compare.CompareArgs(launch_dirs=(str(launch),), script="sac", env_id="Hopper-v5", anchor=str(anchor),
                               window=(200, 300), plot=str(tmp_path / "curves.png"))
    lines = compare.compare(args).splitlines()
    assert lines[0].startswith("sac on Hopper-v5, 3 seeds (1, 2, 3) against A, 2 seeds")
    assert lines[1] == ("final evaluation: runs 20.0 ± 8.2, median 20.0 (1: 10, 2: 20, 3: 30)")
    assert lines[2] == "  anchor at its step 300, environment step 350: 50.0 ± 10.0, median 50.0 (#0: 40, #1: 60)"
    assert lines[3].startswith("  difference of means -30.0; permutation p = 0.100 (10 splits, all)")
    # Seed 1: mean(3, 10) = 6.5, seed 2: mean(5, 20) = 12.5; the anchor's rows 200 and 300: 40 and 60.
    assert lines[4].startswith("window [200, 300], mean of each seed's evaluations (2 each): runs 9.5 ± 3.0")
    assert lines[5] == "  anchor (2 rows each): 50.0 ± 10.0, median 50.0 (#0: 40, #1: 60)"
    assert lines[6].startswith("  difference of means -40.5; permutation p = 0.167 (6 splits, all)")
    assert lines[7] == f"curves: {tmp_path / 'curves.png'}" and (tmp_path / "curves.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no row at step 250"):
        compare.compare(compare.CompareArgs(launch_dirs=(str(launch),), script="sac", env_id="Hopper-v5",
                                            anchor=str(anchor), step=250))


def test_compare_tells_flag_variants_apart_and_leaves_out_runs_without_a_final_evaluation(tmp_path):
    compare = load_compare()
    launch = tmp_path / "launch"
    _run(launch, "sac", "Hopper-v5", 1, 10.0, [(300, 10.0)])
    _run(launch, "sac", "Hopper-v5", 2, float("nan"), [(300, 20.0)])  # --eval-episodes 0
    anchor = tmp_path / "anchor.json"
    anchor.write_text(json.dumps({"name": "A", "source": "s", "metric": "m", "env_id": "Hopper-v3", "step_offset": 0,
                                  "steps": [300], "seeds": [[40.0], [60.0]]}))
    args = compare.CompareArgs(launch_dirs=(str(launch),), script="sac", env_id="Hopper-v5", anchor=str(anchor))
    lines = compare.compare(args).splitlines()
    assert lines[0].startswith("sac on Hopper-v5, 1 seeds (1) against A")
    assert lines[1] == "left out, with no final evaluation: seeds 2"
    assert lines[2].startswith("final evaluation: runs 10.0 ± 0.0") and "p = 0.333" in lines[4]
    variants = tmp_path / "variants"
    for variant, final in (("lr=1", 100.0), ("lr=2", 200.0)):  # one seed under two flag sets
        _run(variants, "sac", "Hopper-v5", 1, final, [(300, final)])
        (variants / "sac__Hopper-v5__1").rename(variants / f"sac__Hopper-v5__1__{variant}")
    with pytest.raises(SystemExit, match=r"runs of its flag variants: --variant lr=1, --variant lr=2"):
        compare.compare(compare.CompareArgs(launch_dirs=(str(variants),), script="sac", env_id="Hopper-v5",
                                            anchor=str(anchor)))
    lines = compare.compare(compare.CompareArgs(launch_dirs=(str(variants),), script="sac", env_id="Hopper-v5",
                                                anchor=str(anchor), variant="lr=2")).splitlines()
    assert lines[1].startswith("final evaluation: runs 200.0 ± 0.0")
    _run(variants, "sac", "Hopper-v5", 1, 10.0, [(300, 10.0)])
    (variants / "sac__Hopper-v5__1").rename(variants / "sac_hopper_rerun")  # a run named by hand, same seed
    _run(variants, "sac", "Hopper-v5", 1, 10.0, [(300, 10.0)])
    with pytest.raises(SystemExit, match="are both seed 1"):
        compare.compare(compare.CompareArgs(launch_dirs=(str(variants),), script="sac", env_id="Hopper-v5",
                                            anchor=str(anchor)))


@pytest.mark.parametrize("name, mean, std", [
    ("tianshou-sac-Hopper-v3", 3388.0, 115.0), ("tianshou-sac-HalfCheetah-v3", 9059.0, 1051.0),
    ("td3-authors-Hopper-v1", 2410.0, 900.0), ("td3-authors-HalfCheetah-v1", 7697.0, 727.0)])
def test_anchor_files_give_the_published_numbers_at_300k(name, mean, std):
    compare = load_compare()
    anchor = json.loads((ANCHORS / f"{name}.json").read_text())
    assert len(anchor["seeds"]) == 10 and all(len(s) == len(anchor["steps"]) for s in anchor["seeds"])
    values = compare.anchor_row(anchor, 300_000)
    assert values.mean() == pytest.approx(mean, abs=0.5) and values.std() == pytest.approx(std, abs=0.5)
