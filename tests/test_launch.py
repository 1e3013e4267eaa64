"""benchmark/launch.py (slots, queueing, summary table, failures, Ctrl-C) and benchmark/learning.py + plot.py."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, default_sigint, load_benchmark, read_summary

from common.envs import UsageError

from launch import (
    Experiment,
    Result,
    Slot,
    child_environment,
    format_table,
    grid,
    launch,
    plan_slots,
    split_argv,
    variant_flags,
    visible_gpus,
)

# A stand-in for an algos/ script: records what the launcher gave it, sleeps, writes summary.json.
FAKE_SCRIPT = """
import argparse, json, os, signal, subprocess, sys, time
from pathlib import Path

parser = argparse.ArgumentParser()
for flag in ["--env-id", "--output-dir", "--run-name", "--wandb-group"]:
    parser.add_argument(flag)
parser.add_argument("--seed", type=int)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--fail-seed", type=int)
parser.add_argument("--ignore-sigint", action="store_true")
parser.add_argument("--grandchild", action="store_true")
parser.add_argument("--resume")
parser.add_argument("--wait-for")  # a file: the run ends once it exists (instead of after --sleep)
args = parser.parse_args()
if args.resume:  # a launch resumed: the run continues in its directory and says so in its summary
    summary = {"global_step": 10, "wall_time_s": 0.0, "sps": 100.0, "final_eval_return": -1.0}
    (Path(args.resume) / "summary.json").write_text(json.dumps(summary))
    sys.exit(0)
run_dir = Path(args.output_dir) / args.run_name
if args.ignore_sigint:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
if args.grandchild:
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
seen = {"cores": sorted(os.sched_getaffinity(0)), "omp": os.environ.get("OMP_NUM_THREADS"),
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "group": args.wandb_group}
(run_dir / "seen.json").write_text(json.dumps(seen))
try:
    time.sleep(args.sleep)
    while args.wait_for and not Path(args.wait_for).exists():
        time.sleep(0.05)
except KeyboardInterrupt:  # a script stops cleanly on SIGINT (it checkpoints)
    (run_dir / "interrupted").write_text("")
    sys.exit(130)
if args.seed == args.fail_seed:
    sys.exit("boom")
summary = {"global_step": 10, "wall_time_s": args.sleep, "sps": 100.0, "final_eval_return": float(args.seed),
           "final_eval_return_std": 0.5}
(run_dir / "summary.json").write_text(json.dumps(summary))
"""


@pytest.fixture
def fake_script(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text(FAKE_SCRIPT)
    return str(path)


def launcher(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.Popen([sys.executable, str(ROOT / "benchmark" / "launch.py"), *args], cwd=ROOT, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def max_concurrent(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, change in events:  # at equal times an end (-1) sorts before a start (+1)
        running += change
        peak = max(peak, running)
    return peak


def process_groups() -> dict[int, str]:
    """pgid -> state of every live process (zombies excluded)."""
    groups = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            groups[int(fields[2])] = fields[0]
    return groups


# ---------------------------------------------------------------------------------------------- planning


def test_grid_is_seed_major_with_common_then_variant_flags():
    experiments = grid(["ppo", "dqn"], ["CartPole-v1", "ALE/Pong-v5"], [1, 2], [[], ["--lr", "1"]], ["--x", "3"])
    assert len(experiments) == 16
    assert [e.seed for e in experiments] == [1] * 8 + [2] * 8
    assert [(e.script, e.env_id) for e in experiments[:4:2]] == [("ppo", "CartPole-v1"), ("ppo", "ALE/Pong-v5")]
    assert experiments[0].flags == ("--x", "3") and experiments[1].flags == ("--x", "3", "--lr", "1")
    assert experiments[1].variant == "--lr 1"
    assert experiments[0].name == "ppo__CartPole-v1__1" and experiments[3].name == "ppo__ALE-Pong-v5__1__lr_1"
    assert len({e.name for e in experiments}) == 16


@pytest.mark.parametrize(("n_slots", "cores", "expected"), [
    (2, [0, 1, 2, 3], [(0, 1), (2, 3)]),
    (2, [0, 1, 2, 3, 4], [(0, 1, 2), (3, 4)]),
    (3, [0, 1, 2, 3, 4, 5, 6], [(0, 1, 2), (3, 4), (5, 6)]),
    (2, [9, 2, 5, 7], [(2, 5), (7, 9)]),
    (3, [0, 1], [(0,), (1,), (0,)]),
    (1, [0, 1], [(0, 1)]),
])
def test_plan_slots_shares_cores_contiguously(n_slots, cores, expected):
    slots = plan_slots(n_slots, cores)
    assert [s.cores for s in slots] == expected
    assert [s.index for s in slots] == list(range(n_slots)) and all(s.gpu is None for s in slots)


def test_plan_slots_gives_gpus_round_robin():
    assert [s.gpu for s in plan_slots(5, list(range(10)), ["0", "1"])] == ["0", "1", "0", "1", "0"]
    assert [s.gpu for s in plan_slots(2, [0, 1], ["3", "5", "7"])] == ["3", "5"]
    with pytest.raises(ValueError):
        plan_slots(0, [0])


def test_child_environment_sets_threads_and_gpu():
    env = child_environment(Slot(0, (2, 3, 4), "1"), {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": "1"}
    env = child_environment(Slot(1, (0,), None), {"OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert env == {"OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "0,1"}


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == []


def test_command_line_helpers():
    assert split_argv(["--scripts", "ppo", "--", "--track", "--n-envs", "4"]) == (["--scripts", "ppo"],
                                                                                  ["--track", "--n-envs", "4"])
    assert split_argv(["--scripts", "ppo"]) == (["--scripts", "ppo"], [])
    assert variant_flags("learning-rate=1e-3 norm-obs --n-envs 4") == ["--learning-rate", "1e-3", "--norm-obs",
                                                                       "--n-envs", "4"]


def test_format_table_lists_shared_flags_once():
    a = Experiment("ppo", "CartPole-v1", 1, ("--total-timesteps", "100", "--lr", "1"), "--lr 1")
    b = Experiment("dqn", "CartPole-v1", 2, ("--total-timesteps", "100"))
    results = [Result(a, Path("x"), 0, 10.0, 22.5, Slot(0, (0,)), 1, {"final_eval_return": 9.5,
                                                                     "final_eval_return_std": 1.25, "sps": 1234.4}),
               Result(b, Path("y"))]
    table = format_table(results)
    assert table.startswith("flags of every run: `--total-timesteps 100`")
    assert "| ppo | CartPole-v1 | 1 | --lr 1 | 0 | 9.50 ± 1.25 | 1234 | 12.5 |" in table
    assert "| dqn | CartPole-v1 | 2 | - | not run | - | - | - |" in table
    assert math.isnan(results[1].wall_time_s) and not results[1].ok
    # A flag is never shared without its value; a run's wall time is its summary's (all its processes) if it has one.
    c = Experiment("ppo", "CartPole-v1", 3, ("--total-timesteps", "200", "--lr", "1"))
    results[0].summary["wall_time_s"] = 40.0
    table = format_table(results + [Result(c, Path("z"))])
    assert not table.startswith("flags of every run")
    assert "| ppo | CartPole-v1 | 1 | --lr 1 | 0 | 9.50 ± 1.25 | 1234 | 40.0 |" in table
    assert "| ppo | CartPole-v1 | 3 | --total-timesteps 200 --lr 1 | not run |" in table


# ---------------------------------------------------------------------------------------------- running


def test_launch_pins_each_run_to_its_slot_and_queues_the_rest(tmp_path, fake_script, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = sorted(os.sched_getaffinity(0))
    experiments = grid([fake_script], ["CartPole-v1"], [1, 2, 3, 4, 5], common_flags=["--sleep", "0.5", "--grandchild"])
    results = launch(experiments, max_parallel=2, output_dir=tmp_path / "launch", gpus=["0", "1"], quiet=True)
    slots = {s.index: s for s in plan_slots(2, cores, ["0", "1"])}
    assert [r.experiment for r in results] == experiments and all(r.ok for r in results)
    for r in results:
        seen = json.loads((r.run_dir / "seen.json").read_text())
        assert tuple(seen["cores"]) == r.slot.cores == slots[r.slot.index].cores
        assert seen["omp"] == str(len(r.slot.cores)) and seen["gpu"] == r.slot.gpu
        assert seen["group"] == "launch"
        assert r.summary["final_eval_return"] == r.experiment.seed
        assert (r.run_dir / "stdout.log").is_file() and (r.run_dir / "stderr.log").is_file()
    intervals = [(r.start_time, r.end_time) for r in results]
    assert max_concurrent(intervals) == 2
    assert [r.experiment.seed for r in sorted(results, key=lambda r: r.start_time)] == [1, 2, 3, 4, 5]
    assert not set(process_groups()) & {r.pid for r in results}, "a run's grandchild outlived it"
    rows = read_csv(tmp_path / "launch" / "summary.csv")
    assert [int(row["seed"]) for row in rows] == [1, 2, 3, 4, 5] and {row["exit_code"] for row in rows} == {"0"}


def test_a_failed_run_is_in_the_table_and_the_exit_code(tmp_path, fake_script):
    out = tmp_path / "launch"
    proc = launcher("--scripts", fake_script, "--seeds", "1", "2", "--max-parallel", "2", "--output-dir", str(out),
                    "--", "--fail-seed", "2")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert "FAILED 2/2" in stdout and "boom" in stdout and "1 of 2 runs failed" in stderr
    rows = {int(row["seed"]): row for row in read_csv(out / "summary.csv")}
    assert rows[1]["exit_code"] == "0" and rows[2]["exit_code"] == "1"
    assert "| fake | CartPole-v1 | 2 | - | 1 | - |" in (out / "summary.md").read_text()


def test_unknown_script_is_a_one_line_error(tmp_path):
    proc = launcher("--scripts", "no_such_algo", "--output-dir", str(tmp_path / "x"))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and stderr.strip().count("\n") == 0 and "no_such_algo" in stderr


def test_cli_resume_keeps_finished_runs_continues_interrupted_ones_and_starts_the_rest(tmp_path, fake_script):
    out = tmp_path / "launch"
    finished, interrupted = out / "fake__CartPole-v1__1", out / "fake__CartPole-v1__2"
    finished.mkdir(parents=True)
    interrupted.mkdir()
    (finished / "summary.json").write_text(json.dumps({"global_step": 10, "wall_time_s": 1.0, "sps": 10.0,
                                                       "final_eval_return": 7.0, "final_eval_return_std": 0.0}))
    (interrupted / "checkpoint.pt").write_bytes(b"")
    proc = launcher("--scripts", fake_script, "--seeds", "1", "2", "3", "--max-parallel", "2", "--output-dir",
                    str(out), "--resume")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    said = [line.split()[1:3] for line in stdout.splitlines() if line.split()[1:2] in (["start"], ["resume"])]
    assert sorted(said) == [["resume", "2/3"], ["start", "3/3"]], stdout
    assert "--resume" in (interrupted / "command.txt").read_text()
    rows = {int(row["seed"]): row for row in read_csv(out / "summary.csv")}
    assert {seed: float(row["final_eval_return"]) for seed, row in rows.items()} == {1: 7.0, 2: -1.0, 3: 3.0}
    assert {row["exit_code"] for row in rows.values()} == {"0"}

    proc = launcher("--scripts", fake_script, "--output-dir", str(tmp_path / "never-launched"), "--resume")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and stderr.strip().count("\n") == 0 and "--output-dir" in stderr
    # A resumed launch is the same launch: its finished runs would not run the new flags, only be listed with them.
    for changed in (["--seeds", "1", "2", "3", "--", "--sleep", "1"], ["--seeds", "1", "2"]):
        proc = launcher("--scripts", fake_script, "--max-parallel", "2", "--output-dir", str(out), "--resume", *changed)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2 and stderr.strip().count("\n") == 0 and "launch.json" in stderr, stderr
    proc = launcher("--scripts", fake_script, "--max-parallel", "0", "--output-dir", str(tmp_path / "zero"))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--max-parallel must be at least 1" in stderr


def test_a_launch_directory_takes_one_launch_at_a_time_and_is_only_continued(tmp_path, fake_script):
    out, release = tmp_path / "launch", tmp_path / "release"
    first = launcher("--scripts", fake_script, "--seeds", "1", "2", "--max-parallel", "1", "--output-dir", str(out),
                     "--", "--wait-for", str(release))  # its runs last until the test releases them
    try:
        deadline = time.monotonic() + 60
        while not (out / "fake__CartPole-v1__1" / "seen.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        again = launcher("--scripts", fake_script, "--seeds", "1", "2", "--max-parallel", "1", "--output-dir",
                         str(out), "--resume", "--", "--wait-for", str(release))
        _, stderr = again.communicate(timeout=120)
        assert again.returncode == 2 and "another launch is running in" in stderr, stderr
        assert first.poll() is None
    finally:
        release.touch()
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    rows = {row["run_dir"]: row for row in read_csv(out / "summary.csv")}
    plan = (out / "launch.json").read_text()
    # Launched into again (not resumed), with other flags: refused before anything is written.
    proc = launcher("--scripts", fake_script, "--seeds", "1", "2", "--output-dir", str(out), "--", "--sleep", "9")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "holds a launch already: continue it with --resume" in stderr, stderr
    assert (out / "launch.json").read_text() == plan
    # Resumed with nothing left to run: every run keeps its row of the launch that ran it.
    proc = launcher("--scripts", fake_script, "--seeds", "1", "2", "--max-parallel", "1", "--output-dir", str(out),
                    "--resume", "--", "--wait-for", str(release))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    for row in read_csv(out / "summary.csv"):
        assert {k: row[k] for k in ("start_time", "end_time", "cores", "wall_time_s")} == \
            {k: rows[row["run_dir"]][k] for k in ("start_time", "end_time", "cores", "wall_time_s")}
        assert row["cores"] != ""


def test_ctrl_c_stops_every_run_and_its_children(tmp_path, fake_script):
    out = tmp_path / "launch"
    proc = launcher("--scripts", fake_script, "--seeds", "1", "2", "--variants", "ignore-sigint", "grandchild",
                    "--max-parallel", "3", "--grace-s", "1", "--output-dir", str(out), "--", "--sleep", "600",
                    "--grandchild", preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("*/seen.json"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list(out.glob("*/seen.json"))) == 3
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()  # a launcher that outlived the test takes its runs with it (their parent-death signal)
    assert proc.returncode == 130, stderr
    assert time.monotonic() - started < 15
    pids = {int(line.split("(pid ")[1].split(",")[0]) for line in stdout.splitlines() if "] start " in line}
    assert len(pids) == 3 and not set(process_groups()) & pids, "a run (or its child) survived Ctrl-C"
    rows = read_csv(out / "summary.csv")
    assert sorted(row["exit_code"] != "0" for row in rows) == [True] * 4
    assert sum(row["exit_code"] == "" for row in rows) == 1  # the fourth never started


def test_a_launch_started_in_the_background_stops_its_runs_cleanly(tmp_path, fake_script):
    # A shell's background job (`nohup ... &`) starts with SIGINT ignored, and its children would inherit that.
    out = tmp_path / "launch"
    proc = launcher("--scripts", fake_script, "--max-parallel", "1", "--grace-s", "30", "--output-dir", str(out),
                    "--", "--sleep", "600", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("*/seen.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and time.monotonic() - started < 20
    assert (out / "fake__CartPole-v1__1" / "interrupted").is_file()
    assert read_csv(out / "summary.csv")[0]["exit_code"] == "130"


def test_cli_runs_ppo_and_dqn_two_at_a_time(tmp_path):
    out = tmp_path / "launch-cli"
    proc = launcher("--scripts", "ppo", "dqn", "--env-ids", "CartPole-v1", "--seeds", "1", "2",
                    "--total-timesteps", "2048", "--max-parallel", "2", "--output-dir", str(out),
                    "--", "--eval-episodes", "2")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout + stderr
    names = [f"{script}__CartPole-v1__{seed}" for script in ("ppo", "dqn") for seed in (1, 2)]
    for name in names:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["global_step"] >= 2048 and "final_eval_return" in summary
        config = json.loads((out / name / "config.json").read_text())
        assert config["eval_episodes"] == 2 and config["wandb_group"] == "launch-cli"
    table = (out / "summary.md").read_text()
    for script in ("ppo", "dqn"):
        for seed in (1, 2):
            assert f"| {script} | CartPole-v1 | {seed} | - | 0 | " in table
            assert f"| {script} | CartPole-v1 | {seed} |" in stdout
    rows = read_csv(out / "summary.csv")
    assert len(rows) == 4 and all(float(row["sps"]) > 0 for row in rows)
    assert max_concurrent([(float(r["start_time"]), float(r["end_time"])) for r in rows]) == 2


# ---------------------------------------------------------------------------------------------- benchmark


def test_suites_skip_missing_scripts(tmp_path):
    learning = load_benchmark("learning")
    (tmp_path / "ppo.py").write_text("")
    experiments, skipped = learning.suite_experiments("classic", [1, 2], algos_dir=tmp_path)
    assert {e.script for e in experiments} == {"ppo"} and "ddpg" in skipped and "ppo" not in skipped
    assert [e.seed for e in experiments] == [1, 1, 2, 2]
    assert experiments[0].flags == ("--total-timesteps", "200000")


def test_plot_helpers():
    plot = load_benchmark("plot")
    assert np.allclose(plot.moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])
    grid_x, mean, low, high = plot.seed_band([(np.array([0.0, 10.0]), np.array([0.0, 10.0])),
                                              (np.array([0.0, 5.0]), np.array([2.0, 2.0]))], n_points=6)
    both = grid_x <= 5.0  # where the second curve ends, the first goes on alone
    assert grid_x[-1] == 10.0 and np.allclose(mean[both], (grid_x[both] + 2) / 2)
    assert np.allclose((high - low)[both], np.abs(grid_x[both] - 2))
    assert np.allclose(mean[~both], grid_x[~both]) and np.allclose(low[~both], high[~both])
    text = "# Benchmarks\n\n## Speed\n\nmine\n"
    once = plot.update_readme(text, "classic", "table 1")
    assert once.startswith(text.rstrip()) and "## Learning" in once and "table 1" in once
    twice = plot.update_readme(plot.update_readme(once, "mujoco", "table 2"), "classic", "table 3")
    assert "table 1" not in twice and "table 2" in twice and "table 3" in twice and "mine" in twice
    assert twice.count("## Learning") == 1 and twice.index("classic") < twice.index("mujoco")
    assert [plot.step_label(x) for x in (0, 500, 125_000, 1_500_000)] == ["0", "500", "125k", "1.5M"]


def test_learning_smoke_suite_plots_curves_and_writes_the_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## Throughput\n\nsomeone else's section\n")
    launch_dir = tmp_path / "runs" / "learning-smoke-20261121-120000"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(
        [sys.executable, "benchmark/learning.py", "--suite", "smoke", "--seeds", "2", "--max-parallel", "2",
         "--output-dir", str(launch_dir), "--plot-dir", str(tmp_path / "plots"), "--readme", str(readme),
         "--", "--eval-episodes", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list(launch_dir.glob("*/summary.json"))) == 4
    png = tmp_path / "plots" / "smoke_CartPole-v1.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert "someone else's section" in text and "## Learning" in text
    for script in ("ppo", "dqn"):
        assert f"| CartPole-v1 | {script} | 2/2 | 4096 |" in text
    assert "![CartPole-v1](plots/smoke_CartPole-v1.png)" in text

    # `python benchmark/plot.py` alone redraws the newest runs/learning-* directory, keeping learning.py's note.
    png.unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark" / "plot.py"), "--plot-dir", str(tmp_path / "plots"),
                           "--readme", str(readme)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert png.stat().st_size > 10_000 and readme.read_text().count("### smoke") == 1
    assert "benchmark/learning.py --suite smoke --seeds 2" in readme.read_text()


def test_async_speed_rates_cover_the_training_window_only(tmp_path):
    async_speed = load_benchmark("async_speed")
    from common.logger import save_checkpoint

    rows = [(500, 1.0), (1000, 2.0), (3000, 6.0), (5000, 10.0)]  # start-up before step 1000 is left out
    (tmp_path / "progress.csv").write_text("global_step,wall_time_s,losses/x\n"
                                           + "".join(f"{s},{t},\n" for s, t in rows))
    save_checkpoint(tmp_path, {"n_updates": 1600})
    (tmp_path / "config.json").write_text(json.dumps({"learning_starts": 1000}))  # as the run was given it
    rates = async_speed.window_rates(tmp_path)
    assert rates.samples_per_s == pytest.approx(4000 / 8.0) and rates.updates_per_s == pytest.approx(1600 / 8.0)
    assert rates.total == pytest.approx(700.0)


def test_learning_suite_resume_keeps_finished_runs_and_continues_the_interrupted_one(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    flags = ["--suite", "smoke", "--seeds", "2", "--max-parallel", "1", "--plot-dir", str(tmp_path / "plots"),
             "--readme", str(tmp_path / "README.md"), "--", "--eval-episodes", "2", "--checkpoint-every-s", "0.2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = subprocess.run([sys.executable, "benchmark/learning.py", "--output-dir", str(whole), *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # Kill the launch outright while its second run is under way and has checkpointed.
    proc = subprocess.Popen([sys.executable, "benchmark/learning.py", "--output-dir", str(cut), *flags],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    interrupted = None
    while interrupted is None and time.monotonic() < deadline and proc.poll() is None:
        runs = sorted(d for d in cut.glob("*__*") if d.is_dir())
        finished = [d for d in runs if (d / "summary.json").exists()]
        started = [d for d in runs if (d / "checkpoint.pt").exists() and not (d / "summary.json").exists()]
        if finished and started:
            interrupted = started[0]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert interrupted is not None, "the launch never had a finished run and a checkpointed one at once"
    time.sleep(1.0)  # the runs die with the launcher (parent-death signal)
    kept = {d.name: (d / "summary.json").stat().st_mtime_ns for d in cut.glob("*/") if (d / "summary.json").exists()}
    assert kept and interrupted.name not in kept

    refused = subprocess.run([sys.executable, "benchmark/learning.py", "--resume", str(cut), "--seeds", "3"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "continues the launch as it was started (its suite.json): drop --seeds" in \
        refused.stderr, refused.stderr
    # The README block was drawn from both launches (a suite run in parts): resuming one redraws it from both.
    readme = tmp_path / "parts" / "README.md"
    readme.parent.mkdir()
    load_benchmark("plot").report([whole, cut], "smoke", tmp_path / "plots", readme)
    proc = subprocess.run([sys.executable, "benchmark/learning.py", "--resume", str(cut), "--readme", str(readme)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| CartPole-v1 | ppo | 4/4 | 4096 |" in readme.read_text()
    assert '<!-- launch directories: ["../whole", "../cut"] -->' in readme.read_text()
    assert "`python benchmark/learning.py --resume" in (cut / "benchmark_note.md").read_text()
    assert any(line.startswith("[launch] resume ") and interrupted.name in line for line in proc.stdout.splitlines())
    for name, mtime in kept.items():  # finished runs are not run again
        assert (cut / name / "summary.json").stat().st_mtime_ns == mtime
    resumed_from = [int(line.split()[3]) for line in (interrupted / "stdout.log").read_text().splitlines()
                    if line.startswith("resumed from step")]
    assert len(resumed_from) == 1 and 0 < resumed_from[0] < 4096
    summaries = {d.name: read_summary(d) for d in cut.glob("*/") if (d / "summary.json").exists()}
    reference = {d.name: read_summary(d) for d in whole.glob("*/") if (d / "summary.json").exists()}
    assert set(summaries) == set(reference) and len(summaries) == 4
    for name in summaries:
        assert summaries[name]["global_step"] == 4096
        if name != interrupted.name:  # seeded runs that were not cut off end exactly as in the whole launch
            assert summaries[name]["final_eval_return"] == reference[name]["final_eval_return"], name
    # Resumed again, with nothing left to run: the note, plots and tables stay as they are.
    (cut / "benchmark_note.md").write_text("written by hand\n")
    before = readme.read_text()
    proc = subprocess.run([sys.executable, "benchmark/learning.py", "--resume", str(cut), "--readme", str(readme)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "nothing ran" in proc.stdout, proc.stdout + proc.stderr
    assert readme.read_text() == before and (cut / "benchmark_note.md").read_text() == "written by hand\n"


def test_results_table_and_curves_name_the_published_anchor(tmp_path):
    plot = load_benchmark("plot")
    for seed, (final, last100) in enumerate([(2500.0, 2400.0), (2700.0, 2200.0)], start=1):
        run_dir = tmp_path / "launch" / f"ppo__Hopper-v5__{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps({"env_id": "Hopper-v5", "seed": seed, "script": "ppo"}))
        (run_dir / "progress.csv").write_text("global_step,wall_time_s,charts/episodic_return\n"
                                              + "".join(f"{s},{s / 1000},{s / 400}\n" for s in range(0, 10**6, 10**4)))
        (run_dir / "summary.json").write_text(json.dumps({
            "global_step": 10**6, "sps": 1000.0, "wall_time_s": 1000.0, "final_eval_return": final,
            "final_eval_return_std": 10.0, "train_return_last100": last100}))
    body = plot.report([tmp_path / "launch"], "mujoco-cpu", tmp_path / "plots", tmp_path / "README.md")
    row = next(line for line in body.splitlines() if line.startswith("| Hopper-v5 | ppo |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:8] == ["2/2", "1000000", "2600.00 ± 100.00", "2300.00 ± 100.00", "2382.9 ± 271.7",
                          plot.CLEANRL_PPO]
    assert (tmp_path / "plots" / "mujoco-cpu_Hopper-v5.png").stat().st_size > 10_000


def test_learning_suite_names_what_it_refuses():
    learning = load_benchmark("learning")
    with pytest.raises(UsageError, match="--only pppo: not in suite 'smoke', whose scripts are dqn ppo"):
        learning.suite_experiments("smoke", only=("ppo", "pppo"))
    with pytest.raises(UsageError, match="--seeds is the number of seeds per script and env: give 1 or more"):
        learning.suite_experiments("smoke", seeds=[])


def _progress_run(launch: Path, name: str, seed: int, episodes: list[tuple[int, float]], final: float | None = None):
    run_dir = launch / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"env_id": "CartPole-v1", "seed": seed, "script": "ppo"}))
    (run_dir / "progress.csv").write_text("global_step,wall_time_s,charts/episodic_return\n0,0.0,\n"
                                          f"{episodes[-1][0]},{episodes[-1][0] / 100},1.0\n")
    (run_dir / "episodes.csv").write_text("global_step,return,length\n" + "".join(f"{s},{r},1\n" for s, r in episodes))
    if final is not None:
        summary = {"global_step": episodes[-1][0], "sps": 1.0, "wall_time_s": 1.0, "final_eval_return": final,
                   "final_eval_return_std": 0.0}
        (run_dir / "summary.json").write_text(json.dumps(summary))


def test_plots_read_each_episode_group_flag_variants_and_keep_curves_whole(tmp_path):
    plot = load_benchmark("plot")
    launch = tmp_path / "launch"
    _progress_run(launch, "ppo__CartPole-v1__1", 1, [(s, float(s)) for s in range(10, 1010, 10)], final=5.0)
    _progress_run(launch, "ppo__CartPole-v1__2", 2, [(10, 1.0), (20, 3.0)])  # still under way
    _progress_run(launch, "ppo__CartPole-v1__1__lr=1", 1, [(10, 7.0), (1000, 7.0)], final=9.0)
    _progress_run(launch, "ppo__CartPole-v1__3__20261205-070000-4242", 3, [(10, 1.0), (1000, 1.0)], final=2.0)
    runs = {run.path.name: run for run in plot.find_runs([launch])}
    first = runs["ppo__CartPole-v1__1"]
    assert first.returns.tolist() == [float(s) for s in range(10, 1010, 10)]  # episodes.csv: one per episode
    assert first.wall_time_s[[0, -1]].tolist() == pytest.approx([0.1, 10.0])  # progress.csv's clock at their steps
    assert {run.label for run in runs.values()} == {"ppo", "ppo [lr=1]"}
    grid, mean, low, high = plot.seed_band([(r.steps, r.returns) for r in (first, runs["ppo__CartPole-v1__2"])])
    assert grid[[0, -1]].tolist() == [10.0, 1000.0] and mean[-1] == 1000.0  # the short run does not cut it
    assert (mean[0], low[0], high[0]) == (5.5, 1.0, 10.0)
    table = plot.results_table(list(runs.values()))
    assert "| CartPole-v1 | ppo | 2/3 | 1000 | 3.50 ± 1.50 |" in table  # a run named by its script: no variant
    assert "| CartPole-v1 | ppo [lr=1] | 1/1 | 1000 | 9.00 ± 0.00 |" in table


def test_a_run_refused_on_its_command_line_is_reported_by_its_error_not_a_box_border(tmp_path):
    proc = launcher("--scripts", "dqn", "--seeds", "1", "--output-dir", str(tmp_path / "launch"), "--",
                    "--total-timesteps", "abc")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    failed = next(line for line in stdout.splitlines() if line.startswith("[launch] FAILED 1/1"))
    assert "Value error: Error parsing --total-timesteps: invalid literal for int() with base 10: 'abc'" in failed, \
        failed


def test_sampler_throughput_fits_the_workers_to_the_envs_and_refuses_unknown_configs():
    throughput = load_benchmark("sampler_throughput")
    workers = {(kind, cores): throughput.workers_of(kind, throughput.Args(n_envs=8, n_workers=cores))
               for kind in ("parallel-cpu", "alternating-gpu") for cores in (3, 8, 16)}
    assert workers == {("parallel-cpu", 3): 2, ("parallel-cpu", 8): 8, ("parallel-cpu", 16): 8,
                       ("alternating-gpu", 3): 2, ("alternating-gpu", 8): 4, ("alternating-gpu", 16): 4}
    import tyro

    with pytest.raises(SystemExit):
        tyro.cli(throughput.Args, args=["--configs", "gym-sinc"])
