"""Learning tests: each script's default hyper-parameters, seeded, must reach its return threshold.

The parallel sampler kinds must learn as well as serial: they produce the same data for a deterministic
policy (tests/test_samplers.py); here ppo trains end to end under each of them with two worker processes
(dqn does in tests/test_deep_q.py's variant runs).
"""

import pytest

pytestmark = pytest.mark.learning

KINDS = ["serial", "parallel-cpu", "parallel-gpu", "alternating-gpu"]


def sampler_flags(kind: str, n_envs: int) -> list[str]:
    flags = ["--sampler", kind, "--n-envs", str(n_envs)]
    return flags if kind == "serial" else flags + ["--n-workers", "1" if kind == "alternating-gpu" else "2"]


def test_ppo_cartpole_reaches_475(run_in):
    # Final evaluations of seeds 1, 2, 3 (the tests' pinned kernels): 500.0 each at 150k steps; at 100k,
    # 347.4, 500.0 and 397.9: the policy is still settling there.
    _, _, summary = run_in("ppo", "--env-id", "CartPole-v1", "--total-timesteps", "150000", "--seed", "1")
    assert summary["global_step"] >= 150_000
    assert summary["final_eval_return"] >= 475, summary


@pytest.mark.parametrize("kind", KINDS[1:])
def test_ppo_cartpole_reaches_475_with_every_sampler(run_in, kind):
    # ppo's default 8 envs, as test_ppo_cartpole_reaches_475 (every kind ends at 500). With 4 envs x 64 steps
    # the seed-1 alternating-gpu run reaches 500 at 56k steps and falls back to 131.6 by 100k.
    _, _, summary = run_in("ppo", "--env-id", "CartPole-v1", "--total-timesteps", "100000", "--seed", "1",
                           *sampler_flags(kind, 8))
    assert summary["final_eval_return"] >= 475, summary
