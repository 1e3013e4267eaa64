"""Learning benchmark: run a named suite of scripts x envs x seeds through benchmark/launch.py, then plot it.

    python benchmark/learning.py --suite classic --seeds 3 && python benchmark/plot.py
    python benchmark/learning.py mujoco --seeds 5 -- --track          # flags after `--` go to every run
    python benchmark/learning.py smoke --seeds 2                      # ppo + dqn on CartPole, 4096 steps
    python benchmark/learning.py --resume runs/learning-mujoco-cpu-20261201-120000   # continue a launch

Suites (`--list-suites` prints them): `smoke`; `classic` (ppo, a2c, dqn, c51, r2d1 on CartPole-v1 / Acrobot-v1,
200k steps; sac, td3, ddpg on Pendulum-v1, 30k steps: about 25 minutes for 3 seeds on 2 cores); `mujoco`
(sac, td3, ddpg, ppo on Hopper / HalfCheetah / Walker2d-v5, 1M steps); `mujoco-cpu` (ppo on Hopper /
HalfCheetah / Walker2d-v5, 1M steps, seeds 1-3; td3 and sac on Hopper / HalfCheetah-v5, 300k steps, seeds 1-2:
about 14 CPU-hours, a ppo run about 20 minutes of one core and a td3 or sac run about 90); `atari` (ppo_atari,
a2c, dqn_atari, c51_atari, rainbow_atari, r2d1 on Pong / Breakout / BeamRider, 10M steps). Scripts not in
algos/ yet are skipped with a message. The runs go to a launch directory
(runs/learning-<suite>-<time>, with summary.md); then benchmark/plot.py draws the learning curves into
benchmark/results/learning/<suite>_<env>.png and writes the table into the Learning section of
benchmark/README.md. Exits 1 if a run failed (what finished is still plotted). A launch that was stopped
(Ctrl-C, a killed session) continues with `--resume <launch dir>`: finished runs are kept, interrupted ones
continue from their last checkpoint, so at most the time since each run's last checkpoint is lost.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from common.envs import UsageError

from launch import ALGOS_DIR, _raise_interrupt, grid, launch, split_argv

HERE = Path(__file__).resolve().parent
NOTE_FILE = "benchmark_note.md"
SUITE_FILE = "suite.json"  # the launch's command line, for --resume


@dataclass(frozen=True)
class Group:
    """Scripts x envs at one budget (and flags) inside a suite."""

    scripts: tuple[str, ...]
    env_ids: tuple[str, ...]
    total_timesteps: int
    flags: tuple[str, ...] = ()
    seeds: int = 3
    """seeds 1..N unless --seeds says otherwise"""


SUITES: dict[str, tuple[Group, ...]] = {
    "smoke": (Group(("ppo", "dqn"), ("CartPole-v1",), 4096),),
    "classic": (
        Group(("ppo", "a2c", "dqn", "c51", "r2d1"), ("CartPole-v1", "Acrobot-v1"), 200_000),
        Group(("sac", "td3", "ddpg"), ("Pendulum-v1",), 30_000),
    ),
    "mujoco": (Group(("sac", "td3", "ddpg", "ppo"), ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5"), 1_000_000),),
    # What 2 cores can finish (about 14 CPU-hours, resumable): each script on its defaults. The replay
    # capacity only has to hold the 300k steps (the buffer never wraps, so sampling is the same as with the
    # default 1M), which keeps the replay in the checkpoints small enough to save every 5 minutes.
    "mujoco-cpu": (
        Group(("ppo",), ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5"), 1_000_000),
        Group(("td3", "sac"), ("Hopper-v5", "HalfCheetah-v5"), 300_000,
              ("--buffer-size", "400000", "--checkpoint-replay", "--checkpoint-every-s", "300"), seeds=2),
    ),
    "atari": (
        Group(("ppo_atari", "a2c", "dqn_atari", "c51_atari", "rainbow_atari", "r2d1"),
              ("ALE/Pong-v5", "ALE/Breakout-v5", "ALE/BeamRider-v5"), 10_000_000),
    ),
}


@dataclass
class LearningArgs:
    suite: str = "smoke"
    """the suite to run: smoke | classic | mujoco | atari (also accepted as the first, positional argument)"""
    seeds: int | None = None
    """seeds per (script, env): 1..N (default: each group's own, 3 unless the suite says otherwise)"""
    max_parallel: int | None = None
    """runs at once (default: one per GPU, else one per CPU core)"""
    only: tuple[str, ...] = ()
    """run only these scripts of the suite"""
    total_timesteps: int | None = None
    """override every group's budget (for a quick check of the suite)"""
    output_dir: str | None = None
    """the launch directory (default: runs/learning-<suite>-<time>)"""
    plot_dir: str = str(HERE / "results" / "learning")
    """where the learning-curve PNGs go"""
    readme: str = str(HERE / "README.md")
    """the README whose Learning section gets the results table"""
    list_suites: bool = False
    """print the suites and exit"""
    resume: str | None = None
    """continue the suite of this launch directory: finished runs are kept, interrupted ones resume from
    their checkpoints, the rest start; then everything is plotted. The suite, seeds, scripts and run flags are
    the launch's own; --max-parallel, --plot-dir and --readme may be given again"""


RESUME_KEEPS = ("suite", "seeds", "only", "total_timesteps", "output_dir")  # what a resumed launch keeps as it was


def suite_experiments(suite: str, seeds: list[int] | None = None, only: tuple[str, ...] = (),
                      total_timesteps: int | None = None, extra_flags: tuple[str, ...] = (),
                      algos_dir: Path = ALGOS_DIR):
    """The suite's experiments (seed-major) and the scripts skipped because algos/ does not have them.

    `seeds` None: each group's own seeds 1..group.seeds.
    """
    if suite not in SUITES:
        raise UsageError(f"unknown suite {suite!r}: choose one of {', '.join(SUITES)}")
    if seeds is not None and not seeds:
        raise UsageError("--seeds is the number of seeds per script and env: give 1 or more")
    named = {s for group in SUITES[suite] for s in group.scripts}
    if set(only) - named:
        raise UsageError(f"--only {' '.join(sorted(set(only) - named))}: not in suite {suite!r}, whose scripts are "
                         f"{' '.join(sorted(named))}")
    experiments, skipped = [], []
    for group in SUITES[suite]:
        scripts = [s for s in group.scripts if not only or s in only]
        present = [s for s in scripts if (algos_dir / f"{s}.py").is_file()]
        skipped += [s for s in scripts if s not in present and s not in skipped]
        flags = ("--total-timesteps", str(total_timesteps or group.total_timesteps)) + group.flags + tuple(extra_flags)
        group_seeds = seeds if seeds is not None else list(range(1, group.seeds + 1))
        experiments += grid(present, group.env_ids, group_seeds, common_flags=flags)
    experiments.sort(key=lambda e: e.seed)  # stable: seed-major over all groups
    return experiments, skipped


def load_plot_module():
    """benchmark/plot.py, imported by path (benchmark/ is not a package)."""
    spec = importlib.util.spec_from_file_location("rlsolo_benchmark_plot", HERE / "plot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    own, passed = split_argv(argv)
    if own and not own[0].startswith("-"):  # `learning.py classic ...` = `learning.py --suite classic ...`
        own = ["--suite", *own]
    args = tyro.cli(LearningArgs, args=own, description=__doc__.split("\n\n")[0])
    resume_dir = None
    if args.resume is not None:  # the launch's own command line, saved when it started
        resume_dir, given = Path(args.resume), args
        if not (resume_dir / SUITE_FILE).is_file():
            print(f"error: --resume {resume_dir}: no {SUITE_FILE} there; pass the launch directory of a "
                  "benchmark/learning.py run", file=sys.stderr)
            return 2
        defaults = LearningArgs()
        fixed = [f"--{n.replace('_', '-')}" for n in RESUME_KEEPS if getattr(given, n) != getattr(defaults, n)]
        fixed += ["the run flags after --"] if passed else []
        if fixed:
            print(f"error: --resume continues the launch as it was started (its {SUITE_FILE}): drop "
                  f"{', '.join(fixed)}", file=sys.stderr)
            return 2
        argv = json.loads((resume_dir / SUITE_FILE).read_text())["argv"]
        own, passed = split_argv(argv)
        if own and not own[0].startswith("-"):
            own = ["--suite", *own]
        args = tyro.cli(LearningArgs, args=own)
        args.output_dir = str(resume_dir)
        for name in ("max_parallel", "plot_dir", "readme"):  # given again: these win over the launch's
            if getattr(given, name) != getattr(defaults, name):
                setattr(args, name, getattr(given, name))
    if args.list_suites:
        for name, groups in SUITES.items():
            for g in groups:
                print(f"{name}: {' '.join(g.scripts)} on {' '.join(g.env_ids)}, {g.total_timesteps} steps")
        return 0
    try:
        seeds = None if args.seeds is None else list(range(1, args.seeds + 1))
        experiments, skipped = suite_experiments(args.suite, seeds, args.only, args.total_timesteps, tuple(passed))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for script in skipped:
        print(f"skipping {script}: algos/{script}.py does not exist yet", flush=True)
    if not experiments:
        print(f"error: no script of suite {args.suite!r} exists yet", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir or Path("runs") / time.strftime(f"learning-{args.suite}-%Y%m%d-%H%M%S"))
    if resume_dir is None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / SUITE_FILE).write_text(json.dumps({"argv": argv}) + "\n")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        results = launch(experiments, args.max_parallel, output_dir, resume=resume_dir is not None)
    except KeyboardInterrupt:
        print(f"interrupted; partial results in {output_dir / 'summary.md'}; continue with "
              f"`python benchmark/learning.py --resume {output_dir}`", file=sys.stderr)
        return 130
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ran, note_file = [r for r in results if r.pid is not None], output_dir / NOTE_FILE
    failed = [r for r in results if not r.ok]
    if not ran and note_file.is_file():  # resumed when every run had finished and been reported
        print(f"every run of {output_dir} had finished: nothing ran, and its note, plots and table stay as they are "
              f"(benchmark/plot.py draws them again)")
        return 1 if failed else 0
    from common.logger import git_commit  # imports torch: only once there is something to report

    command = shlex.join(["python", "benchmark/learning.py", *(["--resume", str(output_dir)] if resume_dir else argv)])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    when = f"{time.strftime('%Y-%m-%d %H:%M')}, {machine}, commit {git_commit() or '?'}"
    if note_file.is_file():  # a note of the launch (written then, or by hand since) is kept and added to
        note = f"{note_file.read_text().rstrip()}\n\nContinued with `{command}` ({when}): {len(ran)} of " \
               f"{len(results)} runs ran then."
    else:
        note = f"`{command}` ({when}, {len(results)} runs, launch directory `{output_dir}`)."
        if skipped:
            note += f" Not run (no script yet): {', '.join(skipped)}."
    note_file.write_text(note + "\n")  # benchmark/plot.py reuses it
    plot = load_plot_module()
    # A launch that is one of several a README block was drawn from (a suite run in parts) redraws them all.
    launch_dirs = plot.block_launch_dirs(Path(args.readme), args.suite)
    if output_dir.resolve() not in [d.resolve() for d in launch_dirs]:
        launch_dirs = [output_dir]
    body = plot.report(launch_dirs, args.suite, Path(args.plot_dir), Path(args.readme), plot.launch_notes(launch_dirs))
    print(body)
    if failed:
        print(f"{len(failed)} of {len(results)} runs failed: see {output_dir / 'summary.md'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
