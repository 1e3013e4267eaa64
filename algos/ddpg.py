"""DDPG: deep deterministic policy gradient.

Lillicrap et al. 2016, https://arxiv.org/abs/1509.02971: a deterministic actor trained through one critic,
target networks with Polyak averaging, Gaussian exploration noise (instead of the paper's
Ornstein-Uhlenbeck process, as in TD3's re-implementation). Continuous (Box) actions and vector (or Dict)
observations: classic control and MuJoCo. The critic is common.networks.Critics (td3.py's and sac.py's
stacked-weights ensemble) with one member.

    python algos/ddpg.py --env-id Pendulum-v1 --total-timesteps 15000
    python algos/ddpg.py --env-id Hopper-v5 --total-timesteps 1000000 --learning-starts 25000
    python algos/ddpg.py --env-id Hopper-v5 --n-envs 4 --sampler parallel-cpu --n-workers 2 --compile
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn

from common import distributed
from common.async_mode import ReplayFeeder
from common.config import CommonArgs, QPGArgs, UsageError, run, setup
from common.envs import make_env, observation_example, require_continuous_actions
from common.kernels import polyak_update
from common.logger import Evaluation, RunLogger, restore_checkpoint
from common.namedarraytuple import buffer_to
from common.networks import Critics, ScaledActions, adam, compile_fn, observation_encoder, qpg_defaults
from common.replay import UniformReplayBuffer


@dataclass
class Args(CommonArgs, QPGArgs):
    env_id: str = "Pendulum-v1"
    """environment id (continuous actions, vector observations): Pendulum-v1, Hopper-v5, HalfCheetah-v5 ..."""
    q_lr: float = 1e-3
    """Adam learning rate of the critic"""
    exploration_noise: float = 0.1
    """std of the Gaussian exploration noise, as a fraction of the action range's half-width"""


class Actor(ScaledActions):
    """Deterministic policy; actions are in [-1, 1] until `to_env` scales them to the env's bounds."""

    def __init__(self, example, act_dim: int, hidden: int, low: np.ndarray, high: np.ndarray):
        super().__init__(low, high)
        self.encoder, obs_dim = observation_encoder(example)  # a Dict observation: its leaves, concatenated
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, act_dim),
        )

    def forward(self, obs) -> torch.Tensor:
        return torch.tanh(self.net(self.encoder(obs)))


def policy_step(model: Actor, obs, prev_action, prev_reward, rnn_state, deterministic: bool = False,
                uniform: bool = False, exploration_noise: float = 0.0):
    """The actor's action plus clipped Gaussian noise (none when deterministic; uniform when `uniform`)."""
    if uniform and not deterministic:
        action = model.uniform_action(obs)
    else:
        action = model(obs)
        if not deterministic and exploration_noise > 0:
            action = (action + exploration_noise * torch.randn_like(action)).clamp(-1.0, 1.0)
    return model.to_env(action), None, None


def load_policy(args: Args, checkpoint: dict, device: torch.device):
    """The trained actor and the evaluation env_fn (for common.evaluate)."""
    eval_env_fn = partial(make_env, args.env_id, training=False)
    probe = eval_env_fn(args.seed)
    qpg_defaults(args, probe)  # --hidden-size and --learning-starts by the env's kind
    space = probe.action_space
    actor = Actor(observation_example(probe.observation_space), space.shape[0], args.hidden_size, space.low,
                  space.high)
    probe.close()
    actor.load_state_dict(checkpoint["actor"])
    return actor.to(device), eval_env_fn

def ddpg_critic_loss(critic: Critics, target_critic: Critics, target_actor: Actor, s):
    """Squared TD error against the target critic's value of the target actor's action."""
    with torch.no_grad():
        next_q = target_critic(s.bootstrap_observation, target_actor(s.bootstrap_observation))[0]
        # discount is 0 at terminations only: a time-limit end bootstraps from its true final observation.
        target = s.n_step_return + s.discount * next_q
    q = critic(s.observation, target_actor.from_env(s.action))[0]
    loss = (q - target).pow(2).mean()
    return loss, q.mean().detach()


def ddpg_actor_loss(actor: Actor, critic: Critics, obs):
    """Deterministic policy gradient: -Q(s, pi(s)), with no gradient into the critic."""
    return -critic(obs, actor(obs), detach=True).mean()


def exploration(args: Args, step: int) -> dict:
    """Policy keyword arguments at environment step `step`: uniform actions before learning starts, then noise."""
    return {"uniform": step < args.learning_starts, "exploration_noise": args.exploration_noise}


def make_replay(args: Args, example, share_memory: bool = False) -> UniformReplayBuffer:
    """The replay buffer (shared memory when a sampling process fills it)."""
    return UniformReplayBuffer(example, size=args.buffer_size, n_envs=args.n_envs, n_step=args.n_step,
                               gamma=args.gamma, share_memory=share_memory)


def main(args: Args) -> dict:
    device = setup(args)
    if args.cudagraphs and device.type != "cuda":
        raise UsageError("--cudagraphs needs --device cuda (CUDA graphs do not exist on CPU): drop the flag")
    env_fn = partial(make_env, args.env_id, training=True)
    eval_env_fn = partial(make_env, args.env_id, training=False)
    probe = env_fn(args.seed)
    (act_dim,) = require_continuous_actions(probe, "algos/ddpg.py")
    example = observation_example(probe.observation_space)
    if not isinstance(example, tuple) and example.ndim != 1:
        raise UsageError(f"algos/ddpg.py needs vector or Dict / Tuple observations, {args.env_id} has shape "
                         f"{example.shape}")
    low, high = probe.action_space.low, probe.action_space.high
    qpg_defaults(args, probe)  # --hidden-size and --learning-starts by the env's kind
    probe.close()

    actor = Actor(example, act_dim, args.hidden_size, low, high).to(device)
    critic = Critics(example, act_dim, args.hidden_size, n=1).to(device)
    target_actor = copy.deepcopy(actor).requires_grad_(False)
    target_critic = copy.deepcopy(critic).requires_grad_(False)
    actor_optimizer = adam(actor.parameters(), args.policy_lr, device)
    critic_optimizer = adam(critic.parameters(), args.q_lr, device)
    critic_loss_fn = compile_fn(ddpg_critic_loss, args.compile, args.cudagraphs)
    actor_loss_fn = compile_fn(ddpg_actor_loss, args.compile, args.cudagraphs)

    # What a checkpoint saves and --resume restores, with the counters and the RNG states.
    trained = dict(actor=actor, critic=critic, target_actor=target_actor, target_critic=target_critic,
                   actor_optimizer=actor_optimizer, critic_optimizer=critic_optimizer)
    count, checkpoint = restore_checkpoint(args.resume, trained, device, init_from=args.init_from)
    feeder = ReplayFeeder(args, env_fn, policy_step, actor, partial(make_replay, args), horizon=args.num_steps,
                          exploration=partial(exploration, args), checkpoint=checkpoint, trained=trained)
    replay, learning_starts = feeder.replay, feeder.learning_starts
    logger = RunLogger(args, "ddpg", count)
    evaluation = Evaluation(args, eval_env_fn, policy_step, actor, device, start_step=count.global_step)
    try:
        while count.global_step < args.total_timesteps:
            count.global_step, episodes = feeder.collect()  # async: the steps the sampling process made meanwhile
            logger.log_episodes(count.global_step, episodes)
            for _ in count.updates_due(args.replay_ratio, learning_starts):  # none in the warm-up
                if args.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()  # a new update: earlier graph outputs may be reused
                sample = buffer_to(replay.sample(args.batch_size), device)
                q_loss, q_mean = critic_loss_fn(critic, target_critic, target_actor, sample)
                critic_optimizer.zero_grad(set_to_none=True)
                q_loss.backward()
                distributed.all_reduce_gradients(critic.parameters())  # data-parallel: the mean over ranks
                critic_optimizer.step()
                actor_loss = actor_loss_fn(actor, critic, sample.observation)
                actor_optimizer.zero_grad(set_to_none=True)
                actor_loss.backward()
                distributed.all_reduce_gradients(actor.parameters())
                actor_optimizer.step()
                polyak_update(target_actor.parameters(), actor.parameters(), args.tau)
                polyak_update(target_critic.parameters(), critic.parameters(), args.tau)
                count.n_updates += 1
                if count.n_updates % args.log_every_updates == 0:
                    logger.log_updates(count, {
                        "losses/qf_loss": q_loss, "losses/qf_values": q_mean, "losses/actor_loss": actor_loss})
            feeder.sync(actor)
            evaluation.maybe_log(logger, count.global_step)
            logger.maybe_checkpoint(trained, count)
            logger.progress(count.global_step)

        logger.checkpoint(trained, count)
        return evaluation.finish(logger, count.global_step)
    finally:
        feeder.close()
        logger.close()


if __name__ == "__main__":
    run(main, Args)
