"""SAC: soft actor-critic with twin Q-functions, a tanh-squashed Gaussian policy and an entropy temperature tuned
automatically (by default; on MuJoCo envs it is fixed at 0.2, as in Tianshou's benchmarked SAC).

Haarnoja et al. 2018, https://arxiv.org/abs/1801.01290; automatic temperature: https://arxiv.org/abs/1812.05905.
Continuous (Box) actions and vector (or Dict) observations: classic control and MuJoCo. The two critics are one
module with stacked weights, evaluated in one batched matmul per layer (torch.baddbmm).

    python algos/sac.py --env-id Pendulum-v1 --total-timesteps 15000
    python algos/sac.py --env-id Hopper-v5 --total-timesteps 1000000 --learning-starts 5000
    python algos/sac.py --env-id Hopper-v5 --n-envs 4 --sampler parallel-cpu --n-workers 2 --compile
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import distributed
from common.async_mode import ReplayFeeder
from common.config import CommonArgs, EnvDefaultFlag, QPGArgs, UsageError, run, setup
from common.envs import make_env, observation_example, require_continuous_actions
from common.kernels import polyak_update
from common.logger import Evaluation, RunLogger, restore_checkpoint
from common.namedarraytuple import buffer_to
from common.networks import Critics, ScaledActions, adam, compile_fn, observation_encoder, qpg_defaults
from common.replay import UniformReplayBuffer


@dataclass
class Args(CommonArgs, QPGArgs):
    # A flag without a docstring sets this script's default for a flag of common/config.py.
    env_id: str = "Pendulum-v1"
    """environment id (continuous actions, vector observations): Pendulum-v1, Hopper-v5, HalfCheetah-v5 ..."""
    policy_lr: float | None = None
    """Adam learning rate of the actor (default: 1e-3 for MuJoCo envs, as Tianshou's SAC; 3e-4 for the others, as
    CleanRL's)"""
    q_lr: float = 1e-3
    """Adam learning rate of the critics and the temperature"""
    alpha: float = 0.2
    """entropy temperature (its initial value with --autotune; 0, no entropy bonus, with --no-autotune)"""
    autotune: EnvDefaultFlag = None
    """tune the temperature so that the policy entropy stays near --target-entropy (default: on, except for MuJoCo
    envs, where it stays at --alpha as in Tianshou's SAC)"""
    target_entropy: float | None = None
    """the entropy the temperature is tuned towards (None: -(action dimensions))"""
    clip_log_std: bool = False
    """clip the actor's log-std to [-20, 2] (SAC authors, Tianshou, SB3), not a rescaled tanh into [-5, 2] (CleanRL)"""


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the tanh-rescaled range; with --clip-log-std: clipped to [-20, 2]


class Actor(ScaledActions):
    """Tanh-squashed diagonal Gaussian policy; actions are in [-1, 1] until `to_env` scales them to the bounds."""

    def __init__(self, example, act_dim: int, hidden: int, low: np.ndarray, high: np.ndarray,
                 clip_log_std: bool = False):
        super().__init__(low, high)
        self.clip_log_std = clip_log_std
        self.encoder, obs_dim = observation_encoder(example)  # a Dict observation: its leaves, concatenated
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2 * act_dim),
        )

    def forward(self, obs) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std [B, act_dim] of the Gaussian before the tanh; log-std clipped or squashed into its range."""
        mean, log_std = self.net(self.encoder(obs)).chunk(2, -1)
        if self.clip_log_std:
            return mean, log_std.clamp(-20.0, LOG_STD_MAX)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1.0)
        return mean, log_std

    def sample(self, obs) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterized action in [-1, 1] [B, act_dim] and its log-probability [B]."""
        mean, log_std = self(obs)
        noise = torch.randn_like(mean)
        pre_tanh = mean + log_std.exp() * noise
        # log N(pre_tanh) - log |d tanh / du|, with log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)).
        log_prob = (-0.5 * noise.pow(2) - log_std - 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh)))
        return torch.tanh(pre_tanh), log_prob.sum(-1) - 0.5 * math.log(2 * math.pi) * mean.shape[-1]


def policy_step(model: Actor, obs, prev_action, prev_reward, rnn_state, deterministic: bool = False,
                uniform: bool = False):
    """A squashed-Gaussian sample (the squashed mean when deterministic, uniform when `uniform`), in env bounds."""
    if deterministic:
        action = torch.tanh(model(obs)[0])
    elif uniform:
        action = model.uniform_action(obs)
    else:
        action = model.sample(obs)[0]
    return model.to_env(action), None, None


def load_policy(args: Args, checkpoint: dict, device: torch.device):
    """The trained actor and the evaluation env_fn (for common.evaluate)."""
    eval_env_fn = partial(make_env, args.env_id, training=False)
    probe = eval_env_fn(args.seed)
    qpg_defaults(args, probe)  # --hidden-size and --learning-starts by the env's kind
    space = probe.action_space
    actor = Actor(observation_example(probe.observation_space), space.shape[0], args.hidden_size, space.low,
                  space.high, args.clip_log_std)
    probe.close()
    actor.load_state_dict(checkpoint["actor"])
    return actor.to(device), eval_env_fn

def soft_q_loss(critics: Critics, target_critics: Critics, actor: Actor, log_alpha: torch.Tensor, s):
    """Both critics' squared soft TD errors on an n-step replay sample; returns (loss, mean Q)."""
    with torch.no_grad():
        next_action, next_log_prob = actor.sample(s.bootstrap_observation)
        next_q = target_critics(s.bootstrap_observation, next_action).min(0).values
        # discount is 0 at terminations only: a time-limit end bootstraps from its true final observation.
        target = s.n_step_return + s.discount * (next_q - log_alpha.exp() * next_log_prob)
    q = critics(s.observation, actor.from_env(s.action))
    loss = (q - target).pow(2).mean(1).sum()
    return loss, q.mean().detach()


def actor_and_alpha_loss(actor: Actor, critics: Critics, log_alpha: torch.Tensor, obs, target_entropy: float):
    """Policy loss E[alpha log pi - min Q] plus the temperature loss; returns (sum, stats)."""
    action, log_prob = actor.sample(obs)
    q = critics(obs, action, detach=True).min(0).values
    alpha = log_alpha.exp()
    actor_loss = (alpha.detach() * log_prob - q).mean()
    if log_alpha.requires_grad:
        alpha_loss = -(log_alpha * (log_prob.detach() + target_entropy)).mean()
    else:  # a fixed temperature (--no-autotune) has no loss; at 0 its log is -inf, which would make this nan
        alpha_loss = torch.zeros((), device=log_prob.device)
    return actor_loss + alpha_loss, (actor_loss, alpha_loss, alpha.detach(), -log_prob.mean().detach())


def exploration(args: Args, step: int) -> dict:
    """Policy keyword arguments at environment step `step`: uniformly random actions before learning starts."""
    return {"uniform": step < args.learning_starts}


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
    (act_dim,) = require_continuous_actions(probe, "algos/sac.py")
    example = observation_example(probe.observation_space)
    if not isinstance(example, tuple) and example.ndim != 1:
        raise UsageError(f"algos/sac.py needs vector or Dict / Tuple observations, {args.env_id} has shape "
                         f"{example.shape}")
    low, high = probe.action_space.low, probe.action_space.high
    mujoco = qpg_defaults(args, probe)  # --hidden-size and --learning-starts by the env's kind
    probe.close()
    # MuJoCo: Tianshou's SAC, the anchor of benchmark/README.md (a tuned temperature falls to 0.05 on Hopper and
    # its deterministic policy comes and goes); other envs: CleanRL's.
    if args.policy_lr is None:
        args.policy_lr = 1e-3 if mujoco else 3e-4
    if args.autotune is None:
        args.autotune = not mujoco
    if args.alpha < 0 or (args.alpha == 0 and args.autotune):
        raise UsageError(f"--alpha {args.alpha}: the entropy temperature must be > 0, or 0 (no entropy bonus) with "
                         "--no-autotune")

    actor = Actor(example, act_dim, args.hidden_size, low, high, args.clip_log_std).to(device)
    critics = Critics(example, act_dim, args.hidden_size).to(device)
    target_critics = Critics(example, act_dim, args.hidden_size).to(device).requires_grad_(False)
    target_critics.load_state_dict(critics.state_dict())
    # The temperature, in log space (what --autotune learns); a fixed temperature of 0 is log 0 = -inf.
    log_alpha = torch.tensor(math.log(args.alpha) if args.alpha > 0 else -math.inf, device=device,
                             requires_grad=args.autotune)
    if args.target_entropy is None:  # resolved here, so that config.json records the value the run used
        args.target_entropy = -float(act_dim)
    critic_optimizer = adam(critics.parameters(), args.q_lr, device)
    actor_optimizer = adam([{"params": actor.parameters()}, {"params": [log_alpha], "lr": args.q_lr}]
                           if args.autotune else actor.parameters(), args.policy_lr, device)
    q_loss_fn = compile_fn(soft_q_loss, args.compile, args.cudagraphs)
    actor_loss_fn = compile_fn(actor_and_alpha_loss, args.compile, args.cudagraphs)

    # What a checkpoint saves and --resume restores, with the counters and the RNG states.
    trained = dict(actor=actor, critics=critics, target_critics=target_critics, log_alpha=log_alpha,
                   critic_optimizer=critic_optimizer, actor_optimizer=actor_optimizer)
    count, checkpoint = restore_checkpoint(args.resume, trained, device, init_from=args.init_from)
    feeder = ReplayFeeder(args, env_fn, policy_step, actor, partial(make_replay, args), horizon=args.num_steps,
                          exploration=partial(exploration, args), checkpoint=checkpoint, trained=trained)
    replay, learning_starts = feeder.replay, feeder.learning_starts
    logger = RunLogger(args, "sac", count)
    evaluation = Evaluation(args, eval_env_fn, policy_step, actor, device, start_step=count.global_step)
    try:
        while count.global_step < args.total_timesteps:
            count.global_step, episodes = feeder.collect()  # async: the steps the sampling process made meanwhile
            logger.log_episodes(count.global_step, episodes)
            for _ in count.updates_due(args.replay_ratio, learning_starts):  # none in the warm-up
                if args.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()  # a new update: earlier graph outputs may be reused
                sample = buffer_to(replay.sample(args.batch_size), device)
                q_loss, q_mean = q_loss_fn(critics, target_critics, actor, log_alpha, sample)
                critic_optimizer.zero_grad(set_to_none=True)
                q_loss.backward()
                distributed.all_reduce_gradients(critics.parameters())  # data-parallel: the mean over ranks
                critic_optimizer.step()
                loss, (actor_loss, alpha_loss, alpha, entropy) = actor_loss_fn(
                    actor, critics, log_alpha, sample.observation, args.target_entropy)
                actor_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.all_reduce_gradients([*actor.parameters(), log_alpha])
                actor_optimizer.step()
                polyak_update(target_critics.parameters(), critics.parameters(), args.tau)
                count.n_updates += 1
                if count.n_updates % args.log_every_updates == 0:
                    logger.log_updates(count, {
                        "losses/qf_loss": q_loss, "losses/qf_values": q_mean, "losses/actor_loss": actor_loss,
                        "losses/alpha_loss": alpha_loss, "losses/alpha": alpha, "losses/entropy": entropy})
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
