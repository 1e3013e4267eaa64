"""Q-function policy gradient scripts (ddpg.py, td3.py, sac.py): learning, MuJoCo, samplers, compile, errors, resume."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import read_progress, read_summary, run_script

from common.evaluate import evaluate_run

SCRIPTS = ["sac", "td3", "ddpg"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_pendulum_reaches_minus_250(run_in, script):
    _, _, summary = run_in(script, "--env-id", "Pendulum-v1", "--total-timesteps", "15000", "--seed", "1")
    assert summary["global_step"] >= 15_000
    assert summary["final_eval_return"] >= -250, summary


@pytest.mark.parametrize("script", ["sac", "td3"])
def test_hopper_end_to_end(run_in, script):
    _, run_dir, summary = run_in(script, "--env-id", "Hopper-v5", "--total-timesteps", "2000",
                                 "--learning-starts", "1000", "--eval-episodes", "2")
    assert summary["global_step"] == 2000 and math.isfinite(summary["final_eval_return"])
    rows = read_progress(run_dir)
    columns = set(rows[-1])
    assert {"losses/qf_loss", "losses/actor_loss", "charts/episodic_return", "charts/SPS"} <= columns
    assert all(math.isfinite(float(row["losses/qf_loss"])) for row in rows if row.get("losses/qf_loss"))
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["global_step"] == 2000 and checkpoint["n_updates"] == 1001  # replay ratio 1 from step 1000
    assert checkpoint["actor"]["net.0.weight"].shape[0] == 256  # the MuJoCo default width
    # common.evaluate rebuilds the actor through load_policy and reproduces the final evaluation.
    episodes = evaluate_run(run_dir)
    assert np.mean([e.ret for e in episodes]) == pytest.approx(summary["final_eval_return"], rel=1e-6)


@pytest.mark.parametrize("sampler,n_envs", [("parallel-cpu", 2), ("alternating-gpu", 4)])
def test_parallel_samplers_and_replay_ratio(run_in, sampler, n_envs):
    total, learning_starts, ratio = 1400, 1000, 0.5
    _, run_dir, summary = run_in("td3", "--sampler", sampler, "--n-workers", "2", "--n-envs", str(n_envs),
                                 "--total-timesteps", str(total), "--learning-starts", str(learning_starts),
                                 "--replay-ratio", str(ratio), "--eval-episodes", "2")
    assert summary["global_step"] == total and math.isfinite(summary["final_eval_return"])
    # Updates per environment step, whatever the number of envs: collects of n_envs steps from learning_starts.
    collects = len([step for step in range(n_envs, total + 1, n_envs) if step >= learning_starts])
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["n_updates"] == collects * n_envs * ratio


def test_compile_smoke(run_in):
    _, _, summary = run_in("sac", "--compile", "--total-timesteps", "1100", "--learning-starts", "1000",
                           "--eval-episodes", "1")
    assert summary["global_step"] == 1100 and math.isfinite(summary["final_eval_return"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_discrete_actions_are_a_one_line_error(script):
    proc = run_script(script, "--env-id", "CartPole-v1", check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "continuous" in proc.stderr and "CartPole-v1" in proc.stderr


def test_cudagraphs_without_cuda_is_a_one_line_error():
    proc = run_script("sac", "--cudagraphs", "--device", "cpu", check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--cudagraphs" in proc.stderr


def test_resume_continues_with_every_counter(run_in):
    _, run_dir, first = run_in("sac", "--total-timesteps", "1200", "--learning-starts", "1000",
                               "--checkpoint-replay", "--eval-episodes", "2")
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["global_step"] == 1200 and saved["n_updates"] == 201 and "replay" in saved
    # Extend the finished run's budget and resume it: training picks up from the checkpoint.
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "total_timesteps": 1400}))
    resumed = run_script("sac", "--resume", str(run_dir), timeout=600)
    assert "resumed from step 1200" in resumed.stdout
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["global_step"] == 1400 and checkpoint["n_updates"] == 401
    assert not torch.equal(checkpoint["actor"]["net.0.weight"], saved["actor"]["net.0.weight"])
    assert checkpoint["actor_optimizer"]["state"][0]["step"] == saved["actor_optimizer"]["state"][0]["step"] + 200
    assert read_summary(run_dir)["global_step"] == 1400 and first["global_step"] == 1200
