"""TD3: twin delayed deep deterministic policy gradient.

Fujimoto et al. 2018, https://arxiv.org/abs/1802.09477: twin critics (the smaller target), target policy
smoothing (clipped noise on the target action) and a delayed actor (and target) update. Continuous (Box)
actions and vector (or Dict) observations: classic control and MuJoCo. The two critics are one module with stacked
weights, evaluated in one batched matmul per layer (torch.baddbmm).

    python algos/td3.py --env-id Pendulum-v1 --total-timesteps 15000
    python algos/td3.py --env-id Hopper-v5 --total-timesteps 1000000 --learning-starts 25000
    python algos/td3.py --env-id Hopper-v5 --n-envs 4 --sampler parallel-cpu --n-workers 2 --compile
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
    exploration_noise: float = 0.1
    """std of the Gaussian exploration noise, as a fraction of the action range's half-width"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise (same units)"""
    noise_clip: float = 0.5
    """the target policy smoothing noise is clipped to +-noise_clip"""
    policy_frequency: int = 2
    """critic updates per actor (and target-network) update"""


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

def td3_critic_loss(critics: Critics, target_critics: Critics, target_actor: Actor, s, policy_noise: float,
                    noise_clip: float):
    """Both critics' squared TD errors against the smaller target Q of a smoothed target action."""
    with torch.no_grad():
        next_action = target_actor(s.bootstrap_observation)
        noise = (policy_noise * torch.randn_like(next_action)).clamp(-noise_clip, noise_clip)
        next_action = (next_action + noise).clamp(-1.0, 1.0)
        next_q = target_critics(s.bootstrap_observation, next_action).min(0).values
        # discount is 0 at terminations only: a time-limit end bootstraps from its true final observation.
        target = s.n_step_return + s.discount * next_q
    q = critics(s.observation, target_actor.from_env(s.action))
    loss = (q - target).pow(2).mean(1).sum()
    return loss, q.mean().detach()


def td3_actor_loss(actor: Actor, critics: Critics, obs):
    """Deterministic policy gradient through the first critic: -Q1(s, pi(s))."""
    return -critics(obs, actor(obs), detach=True, first=1).mean()


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
    (act_dim,) = require_continuous_actions(probe, "algos/td3.py")
    example = observation_example(probe.observation_space)
    if not isinstance(example, tuple) and example.ndim != 1:
        raise UsageError(f"algos/td3.py needs vector or Dict / Tuple observations, {args.env_id} has shape "
                         f"{example.shape}")
    low, high = probe.action_space.low, probe.action_space.high
    qpg_defaults(args, probe)  # --hidden-size and --learning-starts by the env's kind
    probe.close()

    actor = Actor(example, act_dim, args.hidden_size, low, high).to(device)
    critics = Critics(example, act_dim, args.hidden_size).to(device)
    target_actor = copy.deepcopy(actor).requires_grad_(False)
    target_critics = copy.deepcopy(critics).requires_grad_(False)
    actor_optimizer = adam(actor.parameters(), args.policy_lr, device)
    critic_optimizer = adam(critics.parameters(), args.q_lr, device)
    critic_loss_fn = compile_fn(td3_critic_loss, args.compile, args.cudagraphs)
    actor_loss_fn = compile_fn(td3_actor_loss, args.compile, args.cudagraphs)

    # What a checkpoint saves and --resume restores, with the counters and the RNG states.
    trained = dict(actor=actor, critics=critics, target_actor=target_actor, target_critics=target_critics,
                   actor_optimizer=actor_optimizer, critic_optimizer=critic_optimizer)
    count, checkpoint = restore_checkpoint(args.resume, trained, device, init_from=args.init_from)
    feeder = ReplayFeeder(args, env_fn, policy_step, actor, partial(make_replay, args), horizon=args.num_steps,
                          exploration=partial(exploration, args), checkpoint=checkpoint, trained=trained)
    replay, learning_starts = feeder.replay, feeder.learning_starts
    logger = RunLogger(args, "td3", count)
    evaluation = Evaluation(args, eval_env_fn, policy_step, actor, device, start_step=count.global_step)
    actor_loss = torch.zeros((), device=device)
    try:
        while count.global_step < args.total_timesteps:
            count.global_step, episodes = feeder.collect()  # async: the steps the sampling process made meanwhile
            logger.log_episodes(count.global_step, episodes)
            for _ in count.updates_due(args.replay_ratio, learning_starts):  # none in the warm-up
                if args.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()  # a new update: earlier graph outputs may be reused
                sample = buffer_to(replay.sample(args.batch_size), device)
                q_loss, q_mean = critic_loss_fn(critics, target_critics, target_actor, sample, args.policy_noise,
                                                args.noise_clip)
                critic_optimizer.zero_grad(set_to_none=True)
                q_loss.backward()
                distributed.all_reduce_gradients(critics.parameters())  # data-parallel: the mean over ranks
                critic_optimizer.step()
                count.n_updates += 1
                if count.n_updates % args.policy_frequency == 0:
                    actor_loss = actor_loss_fn(actor, critics, sample.observation)
                    actor_optimizer.zero_grad(set_to_none=True)
                    actor_loss.backward()
                    distributed.all_reduce_gradients(actor.parameters())
                    actor_optimizer.step()
                    polyak_update(target_actor.parameters(), actor.parameters(), args.tau)
                    polyak_update(target_critics.parameters(), critics.parameters(), args.tau)
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
