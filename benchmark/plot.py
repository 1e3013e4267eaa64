"""Learning curves and a results table from launch directories (benchmark/launch.py, benchmark/learning.py).

    python benchmark/plot.py runs/learning-classic-20250101-120000 [more launch dirs] --name classic

Every run directory inside the launch directories (one with a config.json) is read: its training episodes
(episodes.csv, or where a run has none the `charts/episodic_return` rows of progress.csv; wall-clock time from
progress.csv) and summary.json. Runs are grouped by script and flag variant (the `__<variant>` part of a
run directory's name that `launch.py --variants` gives). For each environment, one PNG with two panels,
episodic return against environment steps and against wall-clock time: per group, the mean over seeds (line)
and their min-max range (band) of each run's mean over its last 100 episodes, wherever a run has data. The
markdown table (per group and env: seeds, final deterministic eval return mean ± std over seeds, mean of the
last 100 training episodes, the published result where ANCHORS has one, SPS, wall time) goes into
benchmark/README.md, in the "Learning" section, between the markers `<!-- learning:NAME:begin -->` and
`<!-- learning:NAME:end -->`, with the launch directories it was made from; the rest of the file is left as
it is.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tyro

from launch import read_summary, variant_of

HERE = Path(__file__).resolve().parent
RETURN = "charts/episodic_return"
SECTION_BEGIN, SECTION_END = "<!-- learning:begin -->", "<!-- learning:end -->"


@dataclass
class Run:
    """One run directory: its script, env and seed, training curve and summary."""

    path: Path
    script: str
    env_id: str
    seed: int
    steps: np.ndarray  # [N] global_step at the end of each training episode (or logged episodic return)
    wall_time_s: np.ndarray  # [N]
    returns: np.ndarray  # [N]
    summary: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The script, and the flag variant of a run launched with `--variants` (from its directory's name)."""
        variant = variant_of(self.path.name)
        return f"{self.script} [{variant}]" if variant else self.script


def read_run(run_dir: Path) -> Run:
    """Read config.json, episodes.csv (else progress.csv's episodic-return rows) and summary.json of a run."""
    config = json.loads((run_dir / "config.json").read_text())
    script = config.get("script") or run_dir.name.split("__")[0]
    logged, steps, returns = [], [], []
    if (run_dir / "progress.csv").is_file():
        with open(run_dir / "progress.csv", newline="") as f:
            for row in csv.DictReader(f):
                logged.append((float(row["global_step"]), float(row["wall_time_s"])))
                if row.get(RETURN):
                    steps.append(logged[-1][0])
                    returns.append(float(row[RETURN]))
    if (run_dir / "episodes.csv").is_file():
        with open(run_dir / "episodes.csv", newline="") as f:
            episodes = [(float(row["global_step"]), float(row["return"])) for row in csv.DictReader(f)]
        steps, returns = [s for s, _ in episodes], [r for _, r in episodes]
    steps = np.array(steps)
    times = np.interp(steps, *np.array(logged).T) if logged else np.full(len(steps), math.nan)
    summary = read_summary(run_dir)
    return Run(run_dir, script, config["env_id"], int(config["seed"]), steps, times, np.array(returns), summary)


def find_runs(launch_dirs: list[Path]) -> list[Run]:
    """Every run directory (with a config.json) directly inside the launch directories."""
    return [read_run(d) for launch_dir in launch_dirs for d in sorted(Path(launch_dir).iterdir())
            if (d / "config.json").is_file()]


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start): [N] -> [N]."""
    if len(values) == 0:
        return values
    cumulative = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[start]) / (index - start)


def seed_band(curves: list[tuple[np.ndarray, np.ndarray]], n_points: int = 200):
    """Mean, min and max over runs of curves (x [N], y [N]) on a grid of x, each point over the runs that have
    data there (a run still under way, or stopped, leaves the others' curves whole)."""
    curves = [(x, y) for x, y in curves if len(x) > 0 and np.isfinite(x).all()]
    if not curves:
        return None
    start, end = min(x[0] for x, _ in curves), max(x[-1] for x, _ in curves)
    grid = np.linspace(start, end, n_points) if end > start else np.array([end])
    values = np.stack([np.where((grid >= x[0]) & (grid <= x[-1]), np.interp(grid, x, y), np.nan) for x, y in curves])
    return grid, np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)


def step_label(steps: float) -> str:
    """A short axis label for a step count: 0, 500, 50k, 1.5M."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(steps) >= scale:
            return f"{steps / scale:g}{suffix}"
    return f"{steps:g}"


def plot_env(env_id: str, runs: list[Run], path: Path, smoothing: int = 100) -> Path:
    """Draw return vs steps and vs wall time for every group on `env_id` (mean over seeds, min-max band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    by_label: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_label[run.label].append(run)
    for i, (label, script_runs) in enumerate(sorted(by_label.items())):
        script = script_runs[0].script
        color = f"C{i}"
        for ax, x_of in zip(axes, (lambda r: r.steps, lambda r: r.wall_time_s)):
            band = seed_band([(x_of(r), moving_average(r.returns, smoothing)) for r in script_runs])
            if band is None:
                continue
            grid, mean, low, high = band
            seeds = sum(len(x_of(r)) > 0 for r in script_runs)
            ax.plot(grid, mean, color=color, label=f"{label} ({seeds} seed{'s' if seeds != 1 else ''})")
            ax.fill_between(grid, low, high, color=color, alpha=0.2, linewidth=0)
        anchor = ANCHORS.get((script, env_id))
        finished = [r.summary["global_step"] for r in script_runs if r.summary]
        if anchor is not None and finished:  # the published result, at the budget these runs trained for
            axes[0].errorbar([max(finished)], [anchor[0]], yerr=[anchor[1]], fmt="*", markersize=12, capsize=4,
                             color=color, label=f"{label}: {anchor[2].split(',')[0]}")
    axes[0].set_xlabel("environment steps")
    axes[0].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: step_label(x)))
    axes[1].set_xlabel("wall time (s)")
    for ax in axes:
        ax.set_ylabel("episodic return")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    fig.suptitle(f"{env_id}: training episodic return, mean and min-max over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# Published results to compare with: (script, env) -> (mean, std, source and metric).
CLEANRL_PPO = "CleanRL ppo_continuous_action, 1M steps, v4, last 100 training episodes, 3 seeds"
TIANSHOU_SAC = "Tianshou SAC, 300k steps, v3, test return, 10 seeds"
TD3_PAPER = "TD3 authors' curves, 300k steps, v1, evaluation, 10 seeds"
ANCHORS: dict[tuple[str, str], tuple[float, float, str]] = {
    ("ppo", "Hopper-v5"): (2382.9, 271.7, CLEANRL_PPO),
    ("ppo", "HalfCheetah-v5"): (1442.6, 46.0, CLEANRL_PPO),
    ("ppo", "Walker2d-v5"): (2288.0, 571.8, CLEANRL_PPO),
    ("sac", "Hopper-v5"): (3388.0, 115.0, TIANSHOU_SAC),
    ("sac", "HalfCheetah-v5"): (9059.0, 1051.0, TIANSHOU_SAC),
    ("td3", "Hopper-v5"): (2410.0, 900.0, TD3_PAPER),
    ("td3", "HalfCheetah-v5"): (7697.0, 727.0, TD3_PAPER),
}


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if values else "-"


def results_table(runs: list[Run]) -> str:
    """Markdown table per (env, script and variant): seeds finished, final eval return mean ± std over seeds,
    last 100 training episodes, SPS, wall time."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.env_id, run.label)].append(run)
    anchored = any((group[0].script, env_id) in ANCHORS for (env_id, _), group in groups.items())
    lines = ["| env | script | seeds | steps | final eval return | last 100 training episodes |"
             + (" published | published metric |" if anchored else "") + " SPS | wall time (s) |",
             "|---|---|---|---|---|---|" + ("---|---|" if anchored else "") + "---|---|"]
    for (env_id, label), group in sorted(groups.items()):
        done = [r.summary for r in group if r.summary]
        steps = f"{int(np.mean([s['global_step'] for s in done]))}" if done else "-"
        sps = f"{np.mean([s['sps'] for s in done]):.0f}" if done else "-"
        wall = f"{np.mean([s['wall_time_s'] for s in done]):.0f}" if done else "-"
        final = _mean_std([s.get("final_eval_return", math.nan) for s in done])
        last100 = _mean_std([s.get("train_return_last100", math.nan) for s in done])
        anchor = ""
        if anchored:
            mean, std, source = ANCHORS.get((group[0].script, env_id), (math.nan, math.nan, "-"))
            anchor = f" {_fmt_anchor(mean, std)} | {source} |"
        lines.append(f"| {env_id} | {label} | {len(done)}/{len(group)} | {steps} | {final} | {last100} |{anchor} "
                     f"{sps} | {wall} |")
    return "\n".join(lines) + "\n"


def _fmt_anchor(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{mean:.1f} ± {std:.1f}"


def update_readme(text: str, name: str, body: str) -> str:
    """`text` with the block `name` of the Learning section set to `body` (added, with the section, if absent)."""
    begin, end = f"<!-- learning:{name}:begin -->", f"<!-- learning:{name}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        pattern = re.escape(begin) + r".*?" + re.escape(end)
        return re.sub(pattern, lambda _: block, text, count=1, flags=re.S)
    entry = f"### {name}\n\n{block}\n\n"
    if SECTION_BEGIN in text and SECTION_END in text:
        return text.replace(SECTION_END, entry + SECTION_END, 1)
    prefix = text.rstrip() + "\n\n" if text.strip() else ""
    return f"{prefix}## Learning\n\n{SECTION_BEGIN}\n{entry}{SECTION_END}\n"


def env_slug(env_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", env_id)


LAUNCH_DIRS = re.compile(r"<!-- launch directories: (.*?) -->")


def launch_notes(launch_dirs: list[Path]) -> str:
    """Each launch directory's benchmark_note.md (benchmark/learning.py writes them), or its name."""
    return "\n\n".join((d / "benchmark_note.md").read_text().strip() if (d / "benchmark_note.md").is_file()
                       else f"Runs: `{d}`." for d in launch_dirs)


def block_launch_dirs(readme: Path, name: str) -> list[Path]:
    """The launch directories that the README's block `name` was made from (none if it has no such block)."""
    text = readme.read_text() if readme.is_file() else ""
    begin, end = f"<!-- learning:{name}:begin -->", f"<!-- learning:{name}:end -->"
    block = re.search(re.escape(begin) + r"(.*?)" + re.escape(end), text, flags=re.S)
    listed = LAUNCH_DIRS.search(block.group(1)) if block else None
    return [readme.parent / d for d in json.loads(listed.group(1))] if listed else []


def report(launch_dirs: list[Path], name: str, plot_dir: Path, readme: Path | None, note: str = "") -> str:
    """Plot every env of the launch directories into plot_dir, put the table in `readme` (with the launch
    directories, relative to it); returns the body."""
    runs = find_runs(launch_dirs)
    if not runs:
        raise SystemExit(f"no run directories (with config.json) in {', '.join(map(str, launch_dirs))}")
    by_env: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_env[run.env_id].append(run)
    images = {env_id: plot_env(env_id, env_runs, plot_dir / f"{name}_{env_slug(env_id)}.png")
              for env_id, env_runs in sorted(by_env.items())}
    base = readme.parent if readme is not None else plot_dir
    body = (note.strip() + "\n\n" if note.strip() else "") + results_table(runs) + "\n"
    body += "\n".join(f"![{env_id}]({Path(os.path.relpath(path, base)).as_posix()})" for env_id, path in images.items())
    listed = [Path(os.path.relpath(Path(d).resolve(), base.resolve())).as_posix() for d in launch_dirs]
    body += f"\n\n<!-- launch directories: {json.dumps(listed)} -->"
    if readme is not None:
        readme.write_text(update_readme(readme.read_text() if readme.is_file() else "", name, body))
    return body


@dataclass
class PlotArgs:
    launch_dirs: tyro.conf.Positional[tuple[str, ...]] = ()
    """launch directories (of benchmark/launch.py or benchmark/learning.py); default: the newest runs/learning-*"""
    name: str | None = None
    """name of the results: PNG file prefix and README block (default: the suite of a runs/learning-<suite>-*
    directory, else "results")"""
    plot_dir: str = str(HERE / "results" / "learning")
    """where the PNGs go"""
    readme: str = str(HERE / "README.md")
    """the README whose Learning section gets the table"""


def newest_learning_dir(runs_dir: Path = Path("runs")) -> Path:
    """The most recent launch directory of benchmark/learning.py (runs/learning-<suite>-<time>)."""
    candidates = sorted((d for d in runs_dir.glob("learning-*") if d.is_dir()), key=lambda d: d.stat().st_mtime)
    if not candidates:
        raise SystemExit(f"no {runs_dir}/learning-* directory: run benchmark/learning.py first, or name the "
                         "launch directories to plot")
    return candidates[-1]


def suite_of(launch_dir: Path) -> str | None:
    """`classic` for runs/learning-classic-20261121-120000, else None."""
    match = re.fullmatch(r"learning-(.+)-\d{8}-\d{6}", launch_dir.name)
    return match.group(1) if match else None


if __name__ == "__main__":
    args = tyro.cli(PlotArgs)
    launch_dirs = [Path(d) for d in args.launch_dirs] or [newest_learning_dir()]
    name = args.name or suite_of(launch_dirs[0]) or "results"
    body = report(launch_dirs, name, Path(args.plot_dir), Path(args.readme), note=launch_notes(launch_dirs))
    print(body)
