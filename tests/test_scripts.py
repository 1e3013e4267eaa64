"""Script behaviour: run directory contents, bad input, continuous actions, Dict observations, resume after
SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, read_progress, read_summary, run_script

from common.evaluate import evaluate_run

SCRIPTS = ["ppo", "dqn"]
DICT_ENV = "tests.memory_envs:DictCartPole-v0"  # nested Dict: uint8 pixels, float vectors, a Tuple of a Discrete
DICT_BOX_ENV = "tests.memory_envs:DictPendulum-v0"  # Dict of float vectors, continuous actions
REPLAY_SMOKE = ["--total-timesteps", "1000", "--learning-starts", "200"]
ON_POLICY_SMOKE = ["--total-timesteps", "512", "--num-steps", "32"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_the_shared_flags(script):
    out = run_script(script, "--help", timeout=120).stdout
    for flag in ["--env-id", "--seed", "--total-timesteps", "--sampler", "--n-envs", "--track", "--resume"]:
        assert flag in out


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_env_id_is_a_one_line_error(script):
    proc = run_script(script, "--env-id", "NoSuchEnv-v0", check=False, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "NoSuchEnv-v0" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_dqn_refuses_continuous_actions():
    proc = run_script("dqn", "--env-id", "Pendulum-v1", check=False, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "discrete" in proc.stderr


def test_uneven_worker_split_is_refused():
    proc = run_script("ppo", "--sampler", "parallel-cpu", "--n-envs", "3", "--n-workers", "2", check=False, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--n-envs 3" in proc.stderr


def test_run_directory_has_config_progress_checkpoint_and_summary(run_in):
    _, run_dir, summary = run_in("ppo", "--total-timesteps", "2048", "--eval-episodes", "3", "--seed", "3")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["seed"] == 3 and config["total_timesteps"] == 2048
    for key in ["global_step", "wall_time_s", "sps", "final_eval_return", "final_eval_return_std"]:
        assert key in summary
    assert summary["global_step"] >= 2048 and summary["sps"] > 0
    rows = read_progress(run_dir)
    assert rows and {"global_step", "losses/policy_loss", "charts/episodic_return"} <= set(rows[0]) | set(rows[-1])
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["global_step"] == summary["global_step"]


def test_ppo_continuous_actions_run_a_gaussian_policy(run_in):
    _, run_dir, summary = run_in("ppo", "--env-id", "Pendulum-v1", "--total-timesteps", "4096", "--eval-episodes", "2")
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert "log_std" in checkpoint["model"]  # the Gaussian head was built and trained
    assert -2000 < summary["final_eval_return"] < 0  # Pendulum returns are negative, 200 steps each


@pytest.mark.parametrize(("script", "env_id", "flags"), [
    ("dqn", DICT_ENV, REPLAY_SMOKE),
    ("c51", DICT_ENV, REPLAY_SMOKE),
    ("r2d1", DICT_ENV, ["--total-timesteps", "1600", "--learning-starts", "800"]),
    ("ppo", DICT_ENV, ON_POLICY_SMOKE),
    ("ppo", DICT_BOX_ENV, ON_POLICY_SMOKE),  # the continuous preset normalises observations, leaf by leaf
    ("a2c", DICT_ENV, ON_POLICY_SMOKE),
    ("ppo_atari_lstm", DICT_ENV, ON_POLICY_SMOKE),  # the vector preset normalises observations, leaf by leaf
    ("ddpg", DICT_BOX_ENV, REPLAY_SMOKE),
    ("td3", DICT_BOX_ENV, REPLAY_SMOKE),
    ("sac", DICT_BOX_ENV, REPLAY_SMOKE),
])
def test_vector_scripts_take_dict_observations(run_in, script, env_id, flags):
    _, run_dir, summary = run_in(script, "--env-id", env_id, *flags, "--eval-episodes", "1", "--seed", "1")
    assert summary["global_step"] >= int(flags[1])
    # load_policy rebuilds the network from the Dict space for common.evaluate: the same return.
    episodes = evaluate_run(run_dir)
    assert np.mean([e.ret for e in episodes]) == pytest.approx(summary["final_eval_return"])
    if (script, env_id) in [("ppo", DICT_BOX_ENV), ("ppo_atari_lstm", DICT_ENV)]:  # presets that normalise
        model = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
        counts = [value for key, value in model.items() if key.startswith("obs_norm.stats.") and key.endswith(".count")]
        assert len(counts) == 2 and min(counts) >= 256, model.keys()  # statistics per float leaf, from every batch


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigkill_then_resume_finishes_the_budget(tmp_path, script):
    total = 12_000
    cmd = [sys.executable, str(ROOT / "algos" / f"{script}.py"), "--total-timesteps", str(total),
           "--output-dir", str(tmp_path), "--run-name", "killed", "--checkpoint-every-s", "0.5",
           "--eval-episodes", "2", "--save-model"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        killed_at = None
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "checkpoint.pt").exists():
                step = torch.load(run_dir / "checkpoint.pt", weights_only=True)["global_step"]
                if step >= total // 3:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = step
                    break
            time.sleep(0.2)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at is not None, f"no checkpoint past a third of the budget: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "summary.json").exists()

    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    resumed = run_script(script, "--resume", str(run_dir), timeout=600)
    summary = read_summary(run_dir)
    assert summary["global_step"] >= total
    # What the killed process logged after its checkpoint is logged once, by the resumed one.
    rows = read_progress(run_dir)
    for column in ("global_step", "wall_time_s"):
        values = [float(row[column]) for row in rows]
        assert values == sorted(values), column
    episode_steps = [int(line.split(",")[0]) for line in (run_dir / "episodes.csv").read_text().splitlines()[1:]]
    assert episode_steps == sorted(episode_steps)
    assert saved["wall_time_s"] < summary["wall_time_s"] == pytest.approx(float(rows[-1]["wall_time_s"]), abs=1.0)
    assert f"resumed from step {killed_at}" in resumed.stdout or "resumed from step" in resumed.stdout
    # The resumed process only ran the rest of the budget.
    first_logged = int(resumed.stdout.split("resumed from step ")[1].split()[0])
    assert first_logged >= killed_at and summary["global_step"] - first_logged < total


# Replay scripts on classic control, with collects that end on every multiple of 200 steps.
WARM_UP_RUNS = {
    "dqn": ["--env-id", "CartPole-v1"],
    "c51": ["--env-id", "CartPole-v1"],
    "r2d1": ["--env-id", "CartPole-v1", "--n-envs", "2", "--num-steps", "25", "--replay-ratio", "0.05",
             "--eval-epsilon", "0.2"],  # an evaluation that draws random actions
    "ddpg": ["--env-id", "Pendulum-v1"],
    "td3": ["--env-id", "Pendulum-v1"],
    "sac": ["--env-id", "Pendulum-v1"],
}


@pytest.mark.parametrize("script", list(WARM_UP_RUNS))
def test_the_warm_up_logs_and_evaluates_as_training_does(run_in, script):
    flags = [*WARM_UP_RUNS[script], "--total-timesteps", "1000", "--learning-starts", "800", "--eval-episodes", "1"]
    _, run_dir, evaluated = run_in(script, *flags, "--eval-every", "200", "--log-every-s", "0", run_name="evaluated")
    rows = read_progress(run_dir)
    assert [int(row["global_step"]) for row in rows if row["eval/episodic_return"]] == [200, 400, 600, 800, 1000]
    assert int(next(row["global_step"] for row in rows if row["charts/SPS"])) < 200  # a progress line per collect
    # Evaluations draw from a generator of their own: the training episodes are those of a run without them.
    _, plain_dir, plain = run_in(script, *flags, run_name="plain")
    assert (run_dir / "episodes.csv").read_text() == (plain_dir / "episodes.csv").read_text()
    assert evaluated["final_eval_return"] == plain["final_eval_return"]
