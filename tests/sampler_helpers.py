"""Test-only policies and environments for tests/test_samplers.py, importable by sampler worker processes.

Registered with gymnasium on import, for `make_env("sampler_helpers:<Id>")` (tests/ is on sys.path under
pytest, and worker processes inherit it):

- `SlowCartPole-v0`: CartPole-v1 that sleeps 5 ms per step, so that a collect lasts long enough to be
  interrupted.
- `ExplodingCartPole-v0`: CartPole-v1 whose step raises `RuntimeError("ExplodingCartPole: boom ...")` on the
  5th step after a reset.
- `ExplodingResetCartPole-v0`: CartPole-v1 whose reset raises.

`counting_policy` computes its actions from integers only, so that it acts the same on every device (CUDA
included), bit for bit.
"""

import time

import gymnasium as gym
import torch
import torch.nn as nn
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

from common.namedarraytuple import buffer_leaves, namedarraytuple

ProbeInfo = namedarraytuple("ProbeInfo", ["memory", "epsilon", "parameter"])
CountInfo = namedarraytuple("CountInfo", ["count"])


class ProbeModel(nn.Module):
    """No learning: one parameter and one buffer whose values the policy reports, to check `sync`."""

    def __init__(self, n_actions: int):
        super().__init__()
        self.n_actions = n_actions
        self.weight = nn.Parameter(torch.ones(()))
        self.register_buffer("offset", torch.zeros(()))


def memory_policy(model: ProbeModel, observation, prev_action, prev_reward, rnn_state, deterministic=False,
                  epsilon=0.0):
    """Deterministic and recurrent: the rnn state is the running sum of the observations of the episode.

    The action is a fixed, erratic function of (memory, observation, previous action and reward), so any
    difference in rnn resets or in prev action / reward zeroing changes the trajectory. agent_info reports
    the memory, the `epsilon` keyword and the model's parameter + buffer. Observations may be namedarraytuples
    (Dict spaces): every leaf counts.
    """
    flat = torch.cat([leaf.reshape(leaf.shape[0], -1).double() for leaf in buffer_leaves(observation)], dim=1)
    memory = flat if rnn_state is None else rnn_state + flat
    score = memory.sum(-1) + 0.5 * flat.sum(-1) + prev_action.double() + prev_reward.double()
    action = (score.abs() * 1000).floor().long() % model.n_actions
    n = flat.shape[0]
    parameter = (model.weight + model.offset).detach().expand(n)
    return action, ProbeInfo(memory.sum(-1), torch.full((n,), float(epsilon)), parameter), memory


def counting_policy(model: ProbeModel, observation, prev_action, prev_reward, rnn_state, deterministic=False,
                    **kwargs):
    """Deterministic and recurrent, on integers only: the rnn state counts the steps of the episode.

    The action is a fixed, erratic function of (step count, previous action): the same action sequence on
    any device, whatever floating-point differences the device's arithmetic has. agent_info reports the count.
    """
    count = torch.zeros(observation.shape[0], dtype=torch.int64, device=observation.device) if rnn_state is None \
        else rnn_state + 1
    action = (7 * count + 3 * prev_action.long() + count // 5) % model.n_actions
    return action, CountInfo(count), count


class SlowCartPoleEnv(CartPoleEnv):
    def step(self, action):
        time.sleep(0.005)
        return super().step(action)


class ExplodingCartPoleEnv(CartPoleEnv):
    def reset(self, **kwargs):
        self.steps_since_reset = 0
        return super().reset(**kwargs)

    def step(self, action):
        self.steps_since_reset += 1
        if self.steps_since_reset == 5:
            raise RuntimeError("ExplodingCartPole: boom on the 5th step")
        return super().step(action)


class ExplodingResetCartPoleEnv(CartPoleEnv):
    def reset(self, **kwargs):
        raise RuntimeError("ExplodingResetCartPole: boom in reset")


for env_id, entry_point in [
    ("SlowCartPole-v0", SlowCartPoleEnv),
    ("ExplodingCartPole-v0", ExplodingCartPoleEnv),
    ("ExplodingResetCartPole-v0", ExplodingResetCartPoleEnv),
]:
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=entry_point, max_episode_steps=500)
