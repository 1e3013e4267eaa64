"""--async-sampling in ddpg, td3, c51 and the Atari deep-Q scripts: short runs that update and log, one learning run.

dqn.py and sac.py are tested in test_async_mode.py.
"""

import math

import pytest
from conftest import read_progress

PENDULUM = ["--env-id", "Pendulum-v1", "--total-timesteps", "1500", "--learning-starts", "500",
            "--buffer-size", "2000", "--batch-size", "64", "--eval-episodes", "2"]
CARTPOLE = ["--env-id", "CartPole-v1", "--total-timesteps", "2000", "--learning-starts", "500",
            "--buffer-size", "2000", "--batch-size", "32", "--eval-episodes", "2"]
ATARI_SMOKE = ["--env-id", "ALE/Pong-v5", "--total-timesteps", "800", "--learning-starts", "200",
               "--buffer-size", "4000", "--batch-size", "4", "--max-episode-steps", "150", "--eval-episodes", "1",
               "--n-envs", "4", "--seed", "2"]
# script: (flags, total timesteps, loss column of progress.csv)
SHORT_RUNS = {
    "td3": (PENDULUM, 1500, "losses/qf_loss"),
    "ddpg": (PENDULUM, 1500, "losses/qf_loss"),
    "c51": ([*CARTPOLE, "--prioritized", "--n-step", "3"], 2000, "losses/td_loss"),
    "dqn_atari": ([*ATARI_SMOKE, "--prioritized", "--n-step", "3"], 800, "losses/td_loss"),
    "c51_atari": (ATARI_SMOKE, 800, "losses/td_loss"),
    "rainbow_atari": (ATARI_SMOKE, 800, "losses/td_loss"),
}


@pytest.mark.parametrize("script", list(SHORT_RUNS))
def test_async_sampling_updates_and_logs_training_episodes(run_in, script):
    flags, total, loss_column = SHORT_RUNS[script]
    proc, run_dir, summary = run_in(script, "--async-sampling", *flags, timeout=300)
    assert proc.returncode == 0 and summary["global_step"] >= total, summary
    assert math.isfinite(summary["final_eval_return"])
    rows = read_progress(run_dir)
    losses = [float(row[loss_column]) for row in rows if row.get(loss_column)]
    assert losses and all(math.isfinite(loss) for loss in losses), losses
    # Episodes finished in the sampling process reach the main process's log.
    assert any(row.get("charts/episodic_return") for row in rows)


@pytest.mark.learning
def test_td3_async_sampling_learns_pendulum(run_in):
    _, _, summary = run_in("td3", "--async-sampling", "--env-id", "Pendulum-v1", "--total-timesteps", "20000")
    assert summary["global_step"] >= 20_000 and summary["final_eval_return"] >= -250, summary
