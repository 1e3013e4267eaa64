"""ReplayFeeder: the same training loop fed synchronously or by a sampling process."""

import os
import signal
import time
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from common.async_mode import ReplayFeeder
from common.envs import make_env
from common.replay import UniformReplayBuffer
from common.samplers import SamplerError


class Switch(torch.nn.Module):
    """Action 1 when `bias` > 0, else 0 (a parameter the optimizer side changes)."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(-1.0))


def switch_policy(model, obs, prev_action, prev_reward, rnn_state, deterministic=False, force_one=0.0):
    on = (model.bias > 0) | (torch.as_tensor(force_one) > 0)
    return on.long().expand(obs.shape[0]).clone(), None, None


def no_exploration(step):
    return {}


def force_one(step):
    return {"force_one": 1.0}


def make_args(asynchronous, **kw):
    return SimpleNamespace(async_sampling=asynchronous, seed=0, n_envs=2, sampler="serial", n_workers=1,
                           n_gpus=0, start_method="spawn", cpu_affinity=False, **kw)


def replay_factory(example, share_memory):
    return UniformReplayBuffer(example, size=4000, n_envs=2, share_memory=share_memory)


def recent_actions(replay, n=400):
    return replay.sample(n).action


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_parameters_reach_the_sampler_and_steps_advance(asynchronous):
    model = Switch()
    feeder = ReplayFeeder(make_args(asynchronous), partial(make_env, "CartPole-v1"), switch_policy, model,
                          replay_factory, horizon=4, exploration=no_exploration)
    try:
        step, episodes = 0, []
        while step < 400:
            step, new = feeder.collect()
            episodes += new
        assert step >= 400 and step % 8 == 0 and len(feeder.replay) > 0
        assert episodes and all(e.length > 0 for e in episodes)
        assert (recent_actions(feeder.replay) == 0).all()
        with torch.no_grad():
            model.bias.fill_(1.0)
        feeder.sync(model)
        deadline = time.time() + 300
        while time.time() < deadline:  # the buffer turns over to the new policy's actions
            step, _ = feeder.collect()
            if step > 5000 and (recent_actions(feeder.replay, 64) == 1).all():
                break
        assert (recent_actions(feeder.replay, 64) == 1).all()
    finally:
        feeder.close()


def test_exploration_kwargs_reach_the_sampling_process():
    feeder = ReplayFeeder(make_args(True), partial(make_env, "CartPole-v1"), switch_policy, Switch(),
                          replay_factory, horizon=4, exploration=force_one)
    try:
        while feeder.collect()[0] < 200:
            pass
        assert (recent_actions(feeder.replay) == 1).all()
    finally:
        feeder.close()


def test_a_killed_sampling_process_ends_the_run_quickly():
    feeder = ReplayFeeder(make_args(True), partial(make_env, "CartPole-v1"), switch_policy, Switch(),
                          replay_factory, horizon=4, exploration=no_exploration)
    try:
        feeder.collect()
        os.kill(feeder.process.pid, signal.SIGKILL)
        start = time.time()
        with pytest.raises(SamplerError, match="sampling process"):
            for _ in range(100_000):
                feeder.collect(timeout_s=30)
        assert time.time() - start < 10
    finally:
        feeder.close()


def test_dqn_async_sampling_learns_cartpole(run_in):
    _, _, summary = run_in("dqn", "--async-sampling", "--env-id", "CartPole-v1", "--total-timesteps", "100000")
    assert summary["global_step"] >= 100_000 and summary["final_eval_return"] >= 400, summary


def test_sac_async_sampling_learns_pendulum(run_in):
    _, _, summary = run_in("sac", "--async-sampling", "--env-id", "Pendulum-v1", "--total-timesteps", "20000")
    assert summary["global_step"] >= 20_000 and summary["final_eval_return"] >= -250, summary
