"""--info-keys: env info values aggregated over each training episode and logged as charts/info/<key>.

The env (tests/memory_envs.py InfoReport-v0) runs 5-step episodes whose info reports bonus 1.0 every step,
is_success 1.0 on the last step only and a string label: bonus:sum is the episode length, is_success 1.
"""

from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import read_progress
from sampler_helpers import ProbeModel, memory_policy

from common.envs import UsageError, make_env
from common.samplers import PARALLEL_KINDS, EnvGroup, Samples, make_sampler, parse_info_keys

ENV = ["--env-id", "tests.memory_envs:InfoReport-v0"]
LENGTH = 5
PPO = [*ENV, "--total-timesteps", "256", "--num-steps", "32", "--eval-episodes", "1"]
DQN_ASYNC = [*ENV, "--async-sampling", "--total-timesteps", "600", "--learning-starts", "200", "--buffer-size", "1000",
             "--batch-size", "32", "--eval-episodes", "1"]
SERIAL = ["--sampler", "serial", "--n-envs", "2"]
PARALLEL_CPU = ["--sampler", "parallel-cpu", "--n-workers", "2", "--n-envs", "2"]
ALTERNATING = ["--sampler", "alternating-gpu", "--device", "cpu", "--n-workers", "2", "--n-envs", "4"]


def group_episodes(info_keys: list[str], n_steps: int, n_envs: int = 2) -> list:
    """The episodes of an EnvGroup of InfoReport envs stepped `n_steps` times."""
    group = EnvGroup(partial(make_env, "tests.memory_envs:InfoReport-v0"), list(range(n_envs)),
                     parse_info_keys(info_keys))
    step = Samples(observation=None, next_observation=np.zeros((n_envs, 1), np.float32), action=None,
                   reward=np.zeros(n_envs, np.float32), terminated=np.zeros(n_envs, bool),
                   truncated=np.zeros(n_envs, bool), prev_action=None, prev_reward=None, agent_info=None)
    episodes = []
    try:
        for _ in range(n_steps):
            episodes += group.step(np.zeros(n_envs, np.int64), step)[0]
    finally:
        group.close()
    return episodes


def test_info_values_are_summed_or_taken_last_per_episode():
    episodes = group_episodes(["bonus:sum", "is_success"], 2 * LENGTH)
    assert len(episodes) == 4
    assert all(episode.info == {"bonus": LENGTH, "is_success": 1.0} for episode in episodes)
    assert [episode.info for episode in group_episodes(["bonus:last"], LENGTH)] == [{"bonus": 1.0}] * 2
    assert all(episode.info == {} for episode in group_episodes([], LENGTH))


def test_bad_info_keys_raise_usage_errors():
    with pytest.raises(UsageError, match=r"no 'nope' in its first episode; it reported 'bonus', 'is_success', 'label'"):
        group_episodes(["bonus:sum", "nope"], LENGTH)
    with pytest.raises(UsageError, match=r"info\['label'\] is a str, not a number"):
        group_episodes(["label"], 1)
    for spec in ["bonus:mean", ":sum"]:
        with pytest.raises(UsageError, match="KEY:sum or KEY:last"):
            parse_info_keys([spec])
    with pytest.raises(UsageError, match="given twice"):
        parse_info_keys(["bonus:sum", "bonus:last"])


def sampler_episodes(kind: str) -> list:
    """The episodes of three collects of 4 InfoReport envs under sampler `kind` (2 workers, forkserver)."""
    args = SimpleNamespace(sampler=kind, n_envs=4, n_workers=2, seed=3, start_method="forkserver",
                           info_keys=["bonus:sum", "is_success"])
    sampler = make_sampler(args, partial(make_env, "tests.memory_envs:InfoReport-v0"), memory_policy, ProbeModel(2),
                           horizon=7, device=torch.device("cpu"))
    try:
        return [episode for _ in range(3) for episode in sampler.collect()[1]]
    finally:
        sampler.close()


@pytest.mark.parametrize("kind", PARALLEL_KINDS)
def test_parallel_samplers_return_the_serial_episodes_with_their_info(kind):
    expected = sampler_episodes("serial")
    assert len(expected) == 4 * 21 // LENGTH and all(e.info == {"bonus": LENGTH, "is_success": 1.0} for e in expected)
    assert sampler_episodes(kind) == expected


def assert_info_logged(run_dir) -> None:
    rows = [row for row in read_progress(run_dir) if row.get("charts/episodic_length")]
    assert rows
    for row in rows:
        assert float(row["charts/info/bonus"]) == float(row["charts/episodic_length"]) == LENGTH
        assert float(row["charts/info/is_success"]) == 1.0


@pytest.mark.parametrize("sampler", [SERIAL, PARALLEL_CPU], ids=["serial", "parallel-cpu"])
def test_ppo_logs_info_values_of_training_episodes(run_in, sampler):
    _, run_dir, _ = run_in("ppo", *PPO, *sampler, "--info-keys", "bonus:sum", "is_success:last", timeout=300)
    assert_info_logged(run_dir)


def test_dqn_async_sampling_logs_info_values_of_training_episodes(run_in):
    _, run_dir, _ = run_in("dqn", *DQN_ASYNC, "--info-keys", "bonus:sum", "is_success", timeout=300)
    assert_info_logged(run_dir)


@pytest.mark.parametrize("script, flags, message", [
    ("ppo", [*PPO, "--info-keys", "bonus:mean"], "--info-keys bonus:mean: write KEY, KEY:sum or KEY:last"),
    ("ppo", [*PPO, "--info-keys", "label"], "info['label'] is a str, not a number"),
    ("ppo", [*PPO, *PARALLEL_CPU, "--info-keys", "nope"], "it reported 'bonus', 'is_success', 'label'"),
    ("ppo", [*PPO, *ALTERNATING, "--info-keys", "nope"], "it reported 'bonus', 'is_success', 'label'"),
    ("dqn", [*DQN_ASYNC, "--info-keys", "nope"], "it reported 'bonus', 'is_success', 'label'"),
], ids=["bad-aggregation", "not-a-number", "parallel-cpu", "alternating-gpu", "dqn-async"])
def test_bad_info_keys_are_one_line_errors(run_in, script, flags, message):
    proc, _, _ = run_in(script, *flags, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr[-3000:]
    assert message in proc.stderr
