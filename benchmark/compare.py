"""A script's seeds against a published anchor's own seeds: final evaluations, a window of evaluations, and a
permutation test of the difference of means.

    python benchmark/compare.py benchmark/results/learning/mujoco-cpu/qpg-starts10k \\
        benchmark/results/learning/mujoco-cpu/hopper-extra benchmark/results/learning/mujoco-cpu/sac-hopper-45 \\
        --script sac --env-id Hopper-v5 --anchor benchmark/results/anchors/tianshou-sac-Hopper-v3.json

An anchor file (benchmark/results/anchors/*.json) holds a published run's per-seed evaluation curves: `steps`
[S], `seeds` [n][S], and `step_offset`, the environment steps its step count leaves out (Tianshou counts from
the end of its 10,000 random steps). The run directories are those of `script` on `env_id` directly inside the
launch directories; with several runs of one seed, the last directory named wins. Runs of one seed in one launch
directory (flag variants of `launch.py --variants`) are told apart with --variant. A run whose final
evaluation is not a number (`--eval-episodes 0`) is left out, and said so.

- Final: each run's `final_eval_return` (summary.json) against the anchor's row at --step (in the anchor's own
  count; default: the runs' `global_step`).
- Window (--window A B): per seed, the mean of its evaluations at steps in [A, B]: the `eval/episodic_return`
  rows of progress.csv, which a run launched with --eval-every logs, against the mean of the anchor's rows in
  [A, B]. Runs with fewer than two evaluations in the window are left out of it.
- --plot PATH: each run's evaluation curve over the anchor's seeds (mean and min-max), against environment
  steps, into a PNG.
- p: the share of the ways to split the pooled per-seed values into groups of the two sizes whose difference of
  means (runs minus anchor) is at most the observed one. A small p says the runs are below the anchor by more
  than the seeds' spread explains; near 0.5 they are level with it. Every split is counted up to 2,000,000 of
  them, otherwise 1,000,000 random ones (seeded, so the printed value is repeatable).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import tyro

from launch import read_summary, variant_of

EVAL = "eval/episodic_return"
MAX_EXACT_SPLITS = 2_000_000


@dataclass
class CompareArgs:
    launch_dirs: tyro.conf.Positional[tuple[str, ...]]
    """launch directories holding the runs (<script>__<env>__<seed> directories)"""
    script: str
    """the script whose runs are compared (sac, td3, ppo ...)"""
    env_id: str
    """the environment of those runs"""
    anchor: str
    """the anchor's JSON file (benchmark/results/anchors/)"""
    step: int | None = None
    """the anchor's row for the final evaluations, in its own step count (default: the runs' global_step)"""
    window: tuple[int, int] | None = None
    """compare the mean evaluation over steps in [A, B] too (runs launched with --eval-every)"""
    plot: str | None = None
    """draw the runs' evaluation curves over the anchor's seeds into this PNG (against environment steps)"""
    variant: str = ""
    """the flag variant to compare, of launches with several (the `__<variant>` end of its run directories)"""


@dataclass
class SeedRun:
    seed: int
    final: float
    global_step: int
    eval_steps: np.ndarray  # [E] steps of the eval/episodic_return rows, one per step (the last wins)
    eval_returns: np.ndarray  # [E]


def read_seed_runs(launch_dirs: list[Path], script: str, env_id: str, variant: str = "") -> dict[int, SeedRun]:
    """The finished runs of `script` on `env_id` (and flag `variant`) by seed (a later launch directory
    replaces an earlier seed; two in one launch directory are an error)."""
    runs: dict[int, SeedRun] = {}
    variants: set[str] = set()
    for launch_dir in launch_dirs:
        seen: dict[int, Path] = {}
        for run_dir in sorted(Path(launch_dir).iterdir()):
            config_path, summary_path = run_dir / "config.json", run_dir / "summary.json"
            if not (config_path.is_file() and summary_path.is_file()):
                continue
            config = json.loads(config_path.read_text())
            if (config.get("script") or run_dir.name.split("__")[0]) != script or config.get("env_id") != env_id:
                continue
            variants.add(variant_of(run_dir.name))
            if variant_of(run_dir.name) != variant:
                continue
            if int(config["seed"]) in seen:
                raise SystemExit(f"{seen[int(config['seed'])].name} and {run_dir.name} in {launch_dir} are both seed "
                                 f"{config['seed']}: name the flag variant to compare with --variant")
            seen[int(config["seed"])] = run_dir
            summary = read_summary(run_dir)
            evals: dict[int, float] = {}
            with open(run_dir / "progress.csv", newline="") as f:
                for row in csv.DictReader(f):
                    if row.get(EVAL):
                        evals[int(row["global_step"])] = float(row[EVAL])
            steps = np.array(sorted(evals), dtype=np.int64)
            runs[int(config["seed"])] = SeedRun(int(config["seed"]), float(summary["final_eval_return"]),
                                                int(summary["global_step"]), steps,
                                                np.array([evals[s] for s in steps.tolist()]))
    if not runs and variants - {variant}:
        raise SystemExit(f"no {script} runs on {env_id} of --variant {variant!r}, but runs of its flag variants: "
                         + ", ".join(f"--variant {v}" for v in sorted(variants)))
    return dict(sorted(runs.items()))


def anchor_row(anchor: dict, step: int) -> np.ndarray:
    """The anchor's per-seed values [n] at `step` (its own step count)."""
    if step not in anchor["steps"]:
        raise SystemExit(f"the anchor {anchor['name']} has no row at step {step}: pick one of its steps "
                         f"({anchor['steps'][0]}, {anchor['steps'][1]}, ... {anchor['steps'][-1]})")
    i = anchor["steps"].index(step)
    return np.array([seed[i] for seed in anchor["seeds"]])


def anchor_window(anchor: dict, start: int, end: int) -> tuple[np.ndarray, int]:
    """Per seed [n], the mean of the anchor's rows at steps in [start, end]; and how many rows that is."""
    rows = [i for i, s in enumerate(anchor["steps"]) if start <= s <= end]
    if not rows:
        raise SystemExit(f"the anchor {anchor['name']} has no row in [{start}, {end}]")
    return np.array([np.mean([seed[i] for i in rows]) for seed in anchor["seeds"]]), len(rows)


def permutation_p(runs: np.ndarray, anchor: np.ndarray, samples: int = 1_000_000,
                  seed: int = 0) -> tuple[float, int, bool]:
    """One-sided p of mean(runs) - mean(anchor) under exchangeable labels; (p, splits counted, all of them)."""
    pooled = np.concatenate([runs, anchor]).astype(np.float64)
    n, total = len(runs), len(runs) + len(anchor)
    observed = runs.mean() - anchor.mean()
    if math.comb(total, n) <= MAX_EXACT_SPLITS:
        groups = np.array(list(combinations(range(total), n)), dtype=np.int64)
        exact = True
    else:
        rng = np.random.default_rng(seed)
        groups = np.argsort(rng.random((samples, total)), axis=1)[:, :n]
        exact = False
    sums = pooled[groups].sum(1)
    differences = sums / n - (pooled.sum() - sums) / (total - n)
    # A relative tolerance: a split whose difference equals the observed one up to rounding counts as "at most".
    p = float(np.mean(differences <= observed + 1e-9 * max(1.0, abs(observed))))
    return p, len(groups), exact


def plot_curves(runs: dict[int, SeedRun], anchor: dict, env_id: str, script: str, path: Path) -> Path:
    """Each run's evaluations (a line per seed) over the anchor's seeds (mean and min-max band), against
    environment steps (the anchor's steps plus its offset), up to the runs' last step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max(int(r.eval_steps[-1]) for r in runs.values() if len(r.eval_steps))
    steps = np.array(anchor["steps"]) + anchor["step_offset"]
    keep = steps <= end
    values = np.array(anchor["seeds"])[:, keep]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps[keep], values.mean(0), color="black", label=f"{anchor['name']}: mean of {len(values)} seeds")
    ax.fill_between(steps[keep], values.min(0), values.max(0), color="black", alpha=0.15, linewidth=0,
                    label="its min-max over seeds")
    for i, (seed, run) in enumerate(runs.items()):
        if len(run.eval_steps) >= 2:
            ax.plot(run.eval_steps, run.eval_returns, color=f"C{i % 10}", linewidth=1, label=f"{script} seed {seed}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("evaluation return")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(f"{script} on {env_id}: deterministic evaluations against {anchor['name']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def describe(values: np.ndarray, labels: list[str]) -> str:
    """'mean ± std (population), median; per seed' of one group."""
    per_seed = ", ".join(f"{label}: {v:.0f}" for label, v in zip(labels, values))
    return f"{values.mean():.1f} ± {values.std():.1f}, median {np.median(values):.1f} ({per_seed})"


def compare(args: CompareArgs) -> str:
    anchor = json.loads(Path(args.anchor).read_text())
    runs = read_seed_runs([Path(d) for d in args.launch_dirs], args.script, args.env_id, args.variant)
    unevaluated = [seed for seed, r in runs.items() if not math.isfinite(r.final)]
    runs = {seed: r for seed, r in runs.items() if math.isfinite(r.final)}
    if not runs:
        raise SystemExit(f"no finished {args.script} runs on {args.env_id} with a final evaluation in "
                         f"{', '.join(args.launch_dirs)}")
    steps = {r.global_step for r in runs.values()}
    if args.step is None and len(steps) > 1:
        raise SystemExit(f"the runs trained for different numbers of steps ({sorted(steps)}): pass --step")
    step = args.step if args.step is not None else steps.pop()
    anchor_labels = [f"#{i}" for i in range(len(anchor["seeds"]))]
    seeds = list(runs)
    lines = [f"{args.script} on {args.env_id}, {len(runs)} seeds ({', '.join(map(str, seeds))}) against "
             f"{anchor['name']}, {len(anchor['seeds'])} seeds ({anchor['source']}; {anchor['metric']})"]
    if unevaluated:
        lines.append(f"left out, with no final evaluation: seeds {', '.join(map(str, unevaluated))}")

    finals = np.array([r.final for r in runs.values()])
    anchor_final = anchor_row(anchor, step)
    p, splits, exact = permutation_p(finals, anchor_final)
    offset = f", environment step {step + anchor['step_offset']}" if anchor["step_offset"] else ""
    lines += [f"final evaluation: runs {describe(finals, [str(s) for s in seeds])}",
              f"  anchor at its step {step}{offset}: {describe(anchor_final, anchor_labels)}",
              f"  difference of means {finals.mean() - anchor_final.mean():+.1f}; permutation p = {p:.3f} "
              f"({splits} splits, {'all' if exact else 'random'})"]

    if args.window is not None:
        start, end = args.window
        windowed = {s: r.eval_returns[(r.eval_steps >= start) & (r.eval_steps <= end)] for s, r in runs.items()}
        windowed = {s: v for s, v in windowed.items() if len(v) >= 2}
        anchor_means, anchor_rows = anchor_window(anchor, start, end)
        if not windowed:
            lines.append(f"window [{start}, {end}]: no run has two evaluations in it (launch with --eval-every)")
        else:
            means = np.array([v.mean() for v in windowed.values()])
            counts = sorted({len(v) for v in windowed.values()})
            p, splits, exact = permutation_p(means, anchor_means)
            lines += [f"window [{start}, {end}], mean of each seed's evaluations ({'/'.join(map(str, counts))} "
                      f"each): runs {describe(means, [str(s) for s in windowed])}",
                      f"  anchor ({anchor_rows} rows each): {describe(anchor_means, anchor_labels)}",
                      f"  difference of means {means.mean() - anchor_means.mean():+.1f}; permutation p = {p:.3f} "
                      f"({splits} splits, {'all' if exact else 'random'})"]
    if args.plot is not None:
        if not any(len(r.eval_steps) >= 2 for r in runs.values()):
            raise SystemExit("--plot draws evaluation curves: no run has two evaluations (launch with --eval-every)")
        lines.append(f"curves: {plot_curves(runs, anchor, args.env_id, args.script, Path(args.plot))}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(compare(tyro.cli(CompareArgs)))
