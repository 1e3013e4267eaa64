"""Run a grid of experiments (scripts x env ids x seeds x flag variants) over the machine's cores and GPUs.

    python benchmark/launch.py --scripts ppo dqn --env-ids CartPole-v1 --seeds 1 2 --total-timesteps 20000 \\
        --max-parallel 2 -- --eval-episodes 5          # flags after `--` go to every run
    python benchmark/launch.py ... --output-dir runs/sweep --resume   # the same command, continued after a stop

Each run gets a slot: a share of the CPU cores (its CPU affinity and OMP_NUM_THREADS) and, where there are
GPUs, one GPU (CUDA_VISIBLE_DEVICES), round-robin. Runs wait in grid order, seed-major (every script and
env of the first seed, then of the second ...), until a slot is free. Each run writes `<launch dir>/<run>/`:
the script's run directory (config.json, progress.csv, checkpoint.pt, summary.json) and its stdout.log and
stderr.log. The table of results (script, env, seed, flags, exit code, final eval return +- std, SPS, wall
time) is printed at the end and kept up to date in summary.md and summary.csv. The launcher exits 1 if a
run failed. Ctrl-C (or SIGTERM) sends SIGINT to every run's process group, kills what is left after
`--grace-s` seconds and writes the table of what finished; a launcher killed outright takes its runs with it.

From Python, for sweeps:

    experiments = grid(["ppo"], ["CartPole-v1"], seeds=[1, 2, 3],
                       variants=[["--learning-rate", "1e-3"], ["--learning-rate", "3e-4"]])
    results = launch(experiments, max_parallel=2, output_dir="runs/lr-sweep")
"""

from __future__ import annotations

import csv
import ctypes
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from common.envs import UsageError

ALGOS_DIR = Path(__file__).resolve().parent.parent / "algos"
SUMMARY_COLUMNS = ["script", "env_id", "seed", "flags", "exit_code", "final_eval_return", "final_eval_return_std",
                   "sps", "wall_time_s", "start_time", "end_time", "cores", "gpu", "run_dir"]


@dataclass(frozen=True)
class Experiment:
    """One run: `python <script> --env-id ENV --seed SEED <flags>`."""

    script: str
    """a script of algos/ by name ("ppo"), or the path of a script file"""
    env_id: str
    seed: int
    flags: tuple[str, ...] = ()
    """extra command-line flags of this run"""
    variant: str = ""
    """what tells this run from others of the same script, env and seed (in its name and the table)"""

    @property
    def name(self) -> str:
        """The run directory's name: <script>__<env>__<seed>, then the variant if there is one."""
        parts = [Path(self.script).stem, self.env_id.replace("/", "-").replace(":", "-"), str(self.seed)]
        if self.variant:
            parts.append(re.sub(r"[^A-Za-z0-9.=+-]+", "_", self.variant.replace("--", ""))[:80].strip("_"))
        return "__".join(parts)


def variant_of(run_name: str) -> str:
    """The flag variant in the name of a run directory (`Experiment.name`): "" where it has none, or where the
    name is the one a script gives itself (<script>__<env>__<seed>__<time>-<pid>)."""
    variant = "__".join(run_name.split("__")[3:])
    return "" if re.fullmatch(r"\d{8}-\d{6}-\d+", variant) else variant


@dataclass(frozen=True)
class Slot:
    """Where a run executes: CPU cores (affinity) and a GPU index (None: no GPU)."""

    index: int
    cores: tuple[int, ...]
    gpu: str | None = None


@dataclass
class Result:
    """What became of one experiment; `returncode` is None if it never ran (launch interrupted first)."""

    experiment: Experiment
    run_dir: Path
    returncode: int | None = None
    start_time: float = math.nan
    end_time: float = math.nan
    slot: Slot | None = None
    pid: int | None = None
    summary: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def wall_time_s(self) -> float:
        return self.end_time - self.start_time


# --------------------------------------------------------------------------------------------------
# Pure planning
# --------------------------------------------------------------------------------------------------


def grid(scripts: Sequence[str], env_ids: Sequence[str], seeds: Sequence[int],
         variants: Sequence[Sequence[str]] = ((),), common_flags: Sequence[str] = ()) -> list[Experiment]:
    """Every (script, env, seed, variant), in queueing order: seed-major, then script, env, variant.

    Each run's flags are `common_flags` followed by its variant's flags.
    """
    return [
        Experiment(script, env_id, seed, tuple(common_flags) + tuple(variant), shlex.join(variant))
        for seed in seeds for script in scripts for env_id in env_ids for variant in (variants or ((),))
    ]


def variant_flags(text: str) -> list[str]:
    """Flags of a variant written `name=value switch` (or as flags, `--name value`): ['--name', 'value', ...]."""
    flags: list[str] = []
    after_flag = False  # a bare token right after a `--flag` is its value
    for token in shlex.split(text):
        if token.startswith("-") or after_flag:
            flags.append(token)
        elif "=" in token:
            name, value = token.split("=", 1)
            flags += [f"--{name}", value]
        else:
            flags.append(f"--{token}")
        after_flag = token.startswith("-")
    return flags


def plan_slots(n_slots: int, cores: Sequence[int], gpus: Sequence[str] = ()) -> list[Slot]:
    """Split `cores` into `n_slots` contiguous, near-equal shares; slot i gets GPU gpus[i % len(gpus)].

    With more slots than cores, slots share cores round-robin (slot i gets core i % len(cores)).
    """
    if n_slots < 1 or not cores:
        raise ValueError(f"need at least one slot and one core, got {n_slots} slots and cores {list(cores)}")
    cores = sorted(cores)
    if n_slots >= len(cores):
        shares = [(cores[i % len(cores)],) for i in range(n_slots)]
    else:
        size, extra = divmod(len(cores), n_slots)
        bounds = [i * size + min(i, extra) for i in range(n_slots + 1)]
        shares = [tuple(cores[bounds[i]:bounds[i + 1]]) for i in range(n_slots)]
    return [Slot(i, shares[i], gpus[i % len(gpus)] if gpus else None) for i in range(n_slots)]


def available_cores() -> list[int]:
    """The CPU cores this process may run on (all of them where affinity is not supported)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def visible_gpus() -> list[str]:
    """GPU ids a child may be given: CUDA_VISIBLE_DEVICES' entries if set, else 0..device_count-1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [g.strip() for g in listed.split(",") if g.strip()]
        return [] if ids[:1] == ["-1"] else ids
    if not Path("/proc/driver/nvidia/gpus").is_dir() and shutil.which("nvidia-smi") is None:
        return []  # no NVIDIA driver: no need to import torch (seconds) to find no GPU
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def script_path(script: str) -> Path:
    """The file of `script`: algos/<script>.py for a name, else the path itself; UsageError if missing."""
    path = Path(script) if script.endswith(".py") or "/" in script else ALGOS_DIR / f"{script}.py"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in ALGOS_DIR.glob("*.py")))
        raise UsageError(f"unknown script {script!r}: no file {path} (scripts in algos/: {known})")
    return path


def run_command(experiment: Experiment, output_dir: Path, group: str | None = None,
                python: str = sys.executable) -> list[str]:
    """The command line of one run, writing its run directory to <output_dir>/<experiment.name>."""
    command = [python, str(script_path(experiment.script)), "--env-id", experiment.env_id,
               "--seed", str(experiment.seed), "--output-dir", str(output_dir), "--run-name", experiment.name]
    if group is not None:
        command += ["--wandb-group", group]
    return command + list(experiment.flags)


def child_environment(slot: Slot, base: dict[str, str]) -> dict[str, str]:
    """The environment of a run in `slot`: OMP_NUM_THREADS = its cores (unless set), its GPU if it has one."""
    env = dict(base)
    env.setdefault("OMP_NUM_THREADS", str(len(slot.cores)))
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu
    return env


# --------------------------------------------------------------------------------------------------
# Summary table
# --------------------------------------------------------------------------------------------------


def shared_flags(experiments: Sequence[Experiment]) -> tuple[str, ...]:
    """The longest run of leading flags that every experiment has (shown once, not in every row)."""
    if not experiments:
        return ()
    first = experiments[0].flags
    n = 0
    while n < len(first) and all(len(e.flags) > n and e.flags[n] == first[n] for e in experiments):
        n += 1
    while 0 < n < len(first) and not first[n].startswith("--"):  # not a flag without its value
        n -= 1
    return first[:n]


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def summary_rows(results: Sequence[Result]) -> list[dict]:
    """One dict per result with SUMMARY_COLUMNS (numbers as numbers, NaN where unknown)."""
    rows = []
    for r in results:
        e = r.experiment
        rows.append({
            "script": Path(e.script).stem, "env_id": e.env_id, "seed": e.seed, "flags": shlex.join(e.flags),
            "exit_code": "" if r.returncode is None else r.returncode,
            "final_eval_return": float(r.summary.get("final_eval_return", math.nan)),
            "final_eval_return_std": float(r.summary.get("final_eval_return_std", math.nan)),
            "sps": float(r.summary.get("sps", math.nan)),  # a run's own wall time counts every process of it
            "wall_time_s": round(float(r.summary.get("wall_time_s", r.wall_time_s)), 2),
            "start_time": round(r.start_time, 3), "end_time": round(r.end_time, 3),
            "cores": " ".join(map(str, r.slot.cores)) if r.slot else "", "gpu": (r.slot.gpu or "") if r.slot else "",
            "run_dir": str(r.run_dir),
        })
    return rows


def format_table(results: Sequence[Result]) -> str:
    """A markdown table of the results; the flags every run shares are listed once above it."""
    common = shared_flags([r.experiment for r in results])
    lines = [f"flags of every run: `{shlex.join(common)}`", ""] if common else []
    lines += ["| script | env | seed | flags | exit code | final eval return | SPS | wall time (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for r, row in zip(results, summary_rows(results)):
        flags = r.experiment.variant or shlex.join(r.experiment.flags[len(common):]) or "-"
        code = "not run" if r.returncode is None else str(r.returncode)
        ret = "-" if math.isnan(row["final_eval_return"]) else \
            f"{row['final_eval_return']:.2f} ± {_fmt(row['final_eval_return_std'])}"
        lines.append(f"| {row['script']} | {row['env_id']} | {row['seed']} | {flags} | {code} | {ret} | "
                     f"{_fmt(row['sps'], 0)} | {_fmt(row['wall_time_s'], 1)} |")
    return "\n".join(lines) + "\n"


def write_summary(results: Sequence[Result], output_dir: Path) -> None:
    """Write summary.md and summary.csv of `results` into `output_dir`."""
    (output_dir / "summary.md").write_text(format_table(results))
    with open(output_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(summary_rows(results))


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _in_slot(cores: tuple[int, ...]):
    """preexec_fn of a run: pin it to its cores, let SIGINT stop it and let it die with the launcher (Linux)."""

    def pin() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # stoppable by SIGINT, even from a launcher in the background
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    return pin


def _signal_group(pid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _stop(running: Iterable[tuple[subprocess.Popen, Result]], grace_s: float) -> None:
    """SIGINT every run's process group, wait up to grace_s for them, then SIGKILL what is left."""
    running = list(running)
    for proc, _ in running:
        _signal_group(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + grace_s
    with suppress(KeyboardInterrupt):  # a second Ctrl-C: kill now
        while any(proc.poll() is None for proc, _ in running) and time.monotonic() < deadline:
            time.sleep(0.05)
    for proc, result in running:
        _signal_group(proc.pid, signal.SIGKILL)
        result.returncode = proc.wait()
        result.end_time = time.time()


def _read_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def read_summary(run_dir: Path) -> dict:
    """A run's summary.json ({} if it has none yet); a number it writes as null (none exists) reads as NaN."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: math.nan if v is None else v for k, v in summary.items()}


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"[launch] {message}", flush=True)


def resume_command(experiment: Experiment, run_dir: Path, python: str = sys.executable) -> list[str]:
    """The command line that continues an interrupted run from its checkpoint (its config.json has the flags)."""
    return [python, str(script_path(experiment.script)), "--resume", str(run_dir)]


def launch(experiments: Sequence[Experiment], max_parallel: int | None = None, output_dir: str | Path | None = None,
           cores: Sequence[int] | None = None, gpus: Sequence[str] | None = None, group: str | None = None,
           grace_s: float = 10.0, quiet: bool = False, resume: bool = False) -> list[Result]:
    """Run `experiments`, at most `max_parallel` at once (default: one per GPU, else one per core).

    Writes every run under `output_dir` (default runs/launch-<time>), and summary.md / summary.csv there.
    `group` (default: the launch directory's name) is each run's --wandb-group. On KeyboardInterrupt the
    runs are stopped, the summary is written, and the exception propagates. With `resume`, a run whose
    directory has a summary.json is finished and not run again, and one with a checkpoint continues from it
    (`--resume`); the others start afresh. One launch at a time runs in a directory, and one that holds a
    launch is only continued (`resume`), never launched into again.
    """
    for experiment in experiments:
        script_path(experiment.script)
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise UsageError("two experiments have the same script, env, seed and flags: remove the duplicates")
    if max_parallel is not None and max_parallel < 1:
        raise UsageError(f"--max-parallel must be at least 1, got {max_parallel}")
    output_dir = Path(output_dir or Path("runs") / time.strftime("launch-%Y%m%d-%H%M%S"))
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "launch.lock", "a") as lock:  # held while the launch runs, released when it ends
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another launch is running in {output_dir}: wait for it to end, or stop it") from None
        return _launch(experiments, max_parallel, output_dir, cores, gpus, group, grace_s, quiet, resume)


def _launch(experiments: Sequence[Experiment], max_parallel: int | None, output_dir: Path,
            cores: Sequence[int] | None, gpus: Sequence[str] | None, group: str | None, grace_s: float, quiet: bool,
            resume: bool) -> list[Result]:
    # The launch's runs and their flags: a resumed launch must be the same one, since its runs keep theirs.
    plan, planned = output_dir / "launch.json", [[e.script, e.env_id, e.seed, list(e.flags)] for e in experiments]
    if not resume and plan.is_file():
        raise UsageError(f"{output_dir} holds a launch already: continue it with --resume, or choose another "
                         "--output-dir")
    if resume and plan.is_file() and json.loads(plan.read_text()) != planned:
        raise UsageError(f"--resume {output_dir}: these runs or their flags are not the launch's (its launch.json): "
                         "give the launch's own command line, or another --output-dir")
    plan.write_text(json.dumps(planned) + "\n")
    cores = sorted(cores if cores is not None else available_cores())
    gpus = list(gpus if gpus is not None else visible_gpus())
    if max_parallel is None:
        max_parallel = len(gpus) or len(cores)
    slots = plan_slots(max(1, min(max_parallel, len(experiments))), cores, gpus)
    group = group or output_dir.name
    results = [Result(e, output_dir / e.name) for e in experiments]
    if resume:
        earlier = {Path(row["run_dir"]).resolve(): row for row in _read_rows(output_dir / "summary.csv")}
        for result in results:
            result.summary = read_summary(result.run_dir)
            if result.summary:  # finished in an earlier launch: its row of that launch's table, where there is one
                row = earlier.get(result.run_dir.resolve(), {})
                result.returncode, result.end_time = 0, (result.run_dir / "summary.json").stat().st_mtime
                result.start_time = result.end_time - float(result.summary.get("wall_time_s", 0.0))
                with suppress(KeyError, ValueError):
                    result.start_time, result.end_time = float(row["start_time"]), float(row["end_time"])
                if row.get("cores"):
                    result.slot = Slot(-1, tuple(map(int, row["cores"].split())), row.get("gpu") or None)
    pending = [i for i, result in enumerate(results) if result.returncode is None]
    free = list(slots)
    running: dict[int, tuple[subprocess.Popen, Result]] = {}
    described = "; ".join(f"slot {s.index}: cores {list(s.cores)}, gpu {s.gpu or '-'}" for s in slots)
    _say(quiet, f"{len(results)} runs in {output_dir}, {len(slots)} at a time ({described})")
    try:
        while pending or running:
            while pending and free:
                i, slot = pending.pop(0), free.pop(0)
                result = results[i]
                result.run_dir.mkdir(parents=True, exist_ok=True)
                resuming = resume and (result.run_dir / "checkpoint.pt").is_file()
                command = resume_command(result.experiment, result.run_dir) if resuming else \
                    run_command(result.experiment, output_dir, group)
                with open(result.run_dir / "command.txt", "a" if resuming else "w") as f:
                    f.write(shlex.join(command) + "\n")
                mode = "ab" if resuming else "wb"
                with open(result.run_dir / "stdout.log", mode) as out, open(result.run_dir / "stderr.log", mode) as err:
                    proc = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                            env=child_environment(slot, dict(os.environ)), start_new_session=True,
                                            preexec_fn=_in_slot(slot.cores))
                result.slot, result.pid, result.start_time = slot, proc.pid, time.time()
                running[i] = (proc, result)
                _say(quiet, f"{'resume' if resuming else 'start'} {i + 1}/{len(results)} {result.experiment.name} "
                            f"(pid {proc.pid}, slot {slot.index})")
            time.sleep(0.1)
            for i, (proc, result) in list(running.items()):
                if proc.poll() is None:
                    continue
                result.end_time, result.returncode = time.time(), proc.returncode
                _signal_group(proc.pid, signal.SIGKILL)  # whatever the run left behind
                del running[i]
                free.append(result.slot)
                free.sort(key=lambda s: s.index)
                result.summary = read_summary(result.run_dir)
                _report(result, i, len(results), quiet)
                write_summary(results, output_dir)
    except KeyboardInterrupt:
        _say(quiet, f"interrupted: stopping {len(running)} running runs")
        _stop(running.values(), grace_s)
        for _, result in running.values():
            result.summary = read_summary(result.run_dir)
        write_summary(results, output_dir)
        raise
    write_summary(results, output_dir)
    return results


def failure_line(stderr: str) -> str:
    """What a failed run's stderr says went wrong, on one line: its last line, or the title and first paragraph
    of the boxed message that a command-line parse error ends with."""
    lines = stderr.strip().splitlines()
    if not lines or not lines[-1].lstrip().startswith("╰"):
        return lines[-1].strip() if lines else ""
    top = max((i for i, line in enumerate(lines) if line.lstrip().startswith("╭")), default=len(lines) - 1)
    paragraph = []
    for line in lines[top + 1:-1]:
        text = line.strip().strip("│").strip()
        if not text or set(text) <= {"─"}:
            break
        paragraph.append(text)
    return ": ".join(part for part in (lines[top].strip(" ╭─╮"), " ".join(paragraph)) if part)


def _report(result: Result, i: int, n: int, quiet: bool) -> None:
    name = result.experiment.name
    if result.ok:
        ret = result.summary.get("final_eval_return", math.nan)
        _say(quiet, f"done {i + 1}/{n} {name}: final eval return {_fmt(ret)}, {result.wall_time_s:.1f} s")
        return
    try:
        last = failure_line((result.run_dir / "stderr.log").read_text(errors="replace"))
    except OSError:
        last = ""
    _say(quiet, f"FAILED {i + 1}/{n} {name}: exit code {result.returncode} ({last}); "
                f"see {result.run_dir / 'stderr.log'}")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


@dataclass
class LaunchArgs:
    scripts: tuple[str, ...]
    """scripts to run: names in algos/ (ppo dqn ...) or paths of script files"""
    env_ids: tuple[str, ...] = ("CartPole-v1",)
    """environment ids"""
    seeds: tuple[int, ...] = (1,)
    """seeds"""
    total_timesteps: int | None = None
    """--total-timesteps of every run (default: each script's own)"""
    variants: tuple[str, ...] = ()
    """flag sets to compare, each one quoted string of name=value (e.g. 'learning-rate=1e-3 n-envs=4' 'n-envs=8')"""
    max_parallel: int | None = None
    """runs at once (default: one per GPU, else one per CPU core); the cores are shared out between them"""
    output_dir: str | None = None
    """the launch directory (default: runs/launch-<time>)"""
    wandb_group: str | None = None
    """W&B group of every run (default: the launch directory's name)"""
    grace_s: float = 10.0
    """on Ctrl-C, seconds the runs get to stop before they are killed"""
    resume: bool = False
    """continue the launch in --output-dir (give the same command line): runs that wrote summary.json are
    kept, interrupted ones continue from their checkpoints, the others start"""
    dry_run: bool = False
    """print the commands and exit"""


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split the command line at the first `--`: (launcher flags, flags for every run)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: parse, run the grid, print the table; returns the exit code."""
    import tyro

    own, passed = split_argv(sys.argv[1:] if argv is None else argv)
    args = tyro.cli(LaunchArgs, args=own, description=__doc__.split("\n\n")[0])
    try:
        common = (["--total-timesteps", str(args.total_timesteps)] if args.total_timesteps is not None else []) + passed
        variants = [variant_flags(v) for v in args.variants] or [[]]
        experiments = grid(args.scripts, args.env_ids, args.seeds, variants, common)
        if args.resume and (args.output_dir is None or not Path(args.output_dir).is_dir()):
            raise UsageError(f"--resume continues the launch in --output-dir: pass the directory of an earlier launch "
                             f"(got {args.output_dir})")
        output_dir = Path(args.output_dir or Path("runs") / time.strftime("launch-%Y%m%d-%H%M%S"))
        if args.dry_run:
            for e in experiments:
                print(shlex.join(run_command(e, output_dir, args.wandb_group or output_dir.name)))
            return 0
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            results = launch(experiments, args.max_parallel, output_dir, group=args.wandb_group, grace_s=args.grace_s,
                             resume=args.resume)
        except KeyboardInterrupt:
            print(f"interrupted; partial results in {output_dir / 'summary.md'}", file=sys.stderr)
            return 130
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print()
    print(format_table(results), end="")
    print(f"\nsummary: {output_dir / 'summary.md'}, {output_dir / 'summary.csv'}")
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(results)} runs failed", file=sys.stderr)
        return 1
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
