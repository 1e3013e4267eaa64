"""Learning tests: each script's default hyper-parameters, seeded, must reach its return threshold."""

import pytest


@pytest.mark.parametrize("flags", [[]], ids=["serial"])
def test_ppo_cartpole_reaches_475(run_in, flags):
    _, _, summary = run_in("ppo", "--env-id", "CartPole-v1", "--total-timesteps", "100000", "--seed", "1", *flags)
    assert summary["global_step"] >= 100_000
    assert summary["final_eval_return"] >= 475, summary


@pytest.mark.parametrize("flags", [[]], ids=["plain"])
def test_dqn_cartpole_reaches_400(run_in, flags):
    _, _, summary = run_in("dqn", "--env-id", "CartPole-v1", "--total-timesteps", "100000", "--seed", "1", *flags)
    assert summary["global_step"] >= 100_000
    assert summary["final_eval_return"] >= 400, summary
