"""A2C: synchronous advantage actor-critic, for vector or Dict observations and Atari frames.

Mnih et al. 2016 (A3C, https://arxiv.org/abs/1602.01783), in its synchronous form: every update uses one
short rollout of all environments, bootstrapped n-step returns (GAE with lambda = 1 by default) and a single
RMSprop step. Discrete actions get a categorical policy, continuous (Box) actions a diagonal Gaussian with
a state-independent log-std. Vector observations (or the leaves of a Dict observation, encoded and
concatenated) feed two MLPs (actor, critic); Atari frame stacks feed the
Nature CNN shared by an actor and a critic head, with an entropy bonus of 0.01 (the A3C paper's setting).

    python algos/a2c.py --env-id CartPole-v1 --total-timesteps 200000
    python algos/a2c.py --env-id InvertedPendulum-v5 --total-timesteps 500000
    python algos/a2c.py --env-id ALE/Pong-v5 --total-timesteps 10000000 --sampler parallel-gpu
    python algos/a2c.py --sampler parallel-cpu --n-workers 2 --n-envs 8
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical, Independent, Normal

from common import distributed
from common.config import AtariArgs, CommonArgs, UsageError, env_options, run, setup
from common.envs import make_env, observation_example
from common.kernels import explained_variance, gae_advantages
from common.logger import Evaluation, RunLogger, restore_checkpoint
from common.namedarraytuple import buffer_map, buffer_to, namedarraytuple
from common.networks import NatureCNN, layer_init, observation_encoder
from common.samplers import make_sampler


@dataclass
class Args(CommonArgs, AtariArgs):
    n_envs: int = 16
    """training environments per data-parallel rank"""
    num_steps: int = 5
    """environment steps per environment per update"""
    learning_rate: float = 7e-4
    """RMSprop learning rate"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to zero"""
    rmsprop_alpha: float = 0.99
    """RMSprop smoothing constant"""
    rmsprop_eps: float = 1e-5
    """RMSprop epsilon"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 1.0
    """GAE lambda (1: plain bootstrapped n-step returns)"""
    norm_adv: bool = False
    """normalize advantages over the batch"""
    ent_coef: float | None = None
    """entropy bonus coefficient (auto: 0.01 images, 0 vectors)"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """gradient clipping norm"""
    hidden_size: int = 64
    """width of the actor and critic MLPs"""
    log_every_updates: int = 50
    """updates between two logs of the losses"""


AgentInfo = namedarraytuple("AgentInfo", ["log_prob", "value"])



class ActorCritic(nn.Module):
    def __init__(self, example, action_space: gym.Space, hidden: int):
        super().__init__()
        self.continuous = isinstance(action_space, gym.spaces.Box)
        n_out = int(np.prod(action_space.shape)) if self.continuous else int(action_space.n)
        frame_stack = is_frame_stack(example)
        self.torso = NatureCNN(example.shape[0]) if frame_stack else None
        if not frame_stack:  # a Dict observation: its leaves, encoded and concatenated
            self.encoder, obs_dim = observation_encoder(example)

        def mlp(out: int, std: float) -> nn.Module:
            if self.torso is not None:  # frame stacks: linear heads on the shared CNN features
                return layer_init(nn.Linear(512, out), std=std)
            return nn.Sequential(
                layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(),
                layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
                layer_init(nn.Linear(hidden, out), std=std),
            )

        self.critic = mlp(1, 1.0)
        self.actor = mlp(n_out, 0.01)
        if self.continuous:
            self.log_std = nn.Parameter(torch.zeros(n_out))

    def features(self, obs) -> torch.Tensor:
        """Observations (arrays or namedarraytuples, any leading dims) -> the heads' inputs [..., features]."""
        if self.torso is None:
            return self.encoder(obs)
        return self.torso(obs.reshape(-1, *obs.shape[-3:])).reshape(*obs.shape[:-3], -1)

    def forward(self, obs: torch.Tensor):
        """The policy and the value [N] of observations [N, ...], sharing one pass of the torso."""
        features = self.features(obs)
        return self.head(self.actor(features)), self.critic(features).squeeze(-1)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.features(obs)).squeeze(-1)

    def distribution(self, obs: torch.Tensor):
        return self.head(self.actor(self.features(obs)))

    def head(self, out: torch.Tensor):
        if self.continuous:
            # One distribution over the action vector: log_prob and entropy sum over its dimensions.
            return Independent(Normal(out, self.log_std.exp().expand_as(out), validate_args=False), 1,
                               validate_args=False)
        return Categorical(logits=out, validate_args=False)


def is_frame_stack(example) -> bool:
    """Whether observations shaped like `example` are Atari frame stacks [C, H, W] (not vectors or Dicts)."""
    return not isinstance(example, tuple) and example.ndim == 3


def policy_step(model: ActorCritic, obs, prev_action, prev_reward, rnn_state, deterministic: bool = False):
    """Sample (or, deterministically, take the mode of) the policy; record log-prob and value."""
    dist, value = model(obs)
    if deterministic:
        action = dist.mean if model.continuous else dist.probs.argmax(-1)
    else:
        action = dist.sample()
    return action, AgentInfo(dist.log_prob(action), value), None


def make_a2c_env(env_id: str, seed: int, training: bool = True, **options) -> gym.Env:
    """make_env, with continuous actions clipped to the action bounds (the policy samples unbounded).

    `options` (Atari options, video_dir, video_episodes) go on to make_env.
    """
    env = make_env(env_id, seed, training=training, **options)
    return gym.wrappers.ClipAction(env) if isinstance(env.action_space, gym.spaces.Box) else env


def load_policy(args: Args, checkpoint: dict, device: torch.device):
    """The trained model and the evaluation env_fn, for common.evaluate."""
    eval_env_fn = partial(make_a2c_env, args.env_id, training=False, **env_options(args))
    probe = eval_env_fn(args.seed)
    model = ActorCritic(observation_example(probe.observation_space), probe.action_space, args.hidden_size)
    probe.close()
    model.load_state_dict(checkpoint["model"])
    return model.to(device), eval_env_fn


def next_values(model: ActorCritic, batch) -> torch.Tensor:
    """Value [T, B] of each step's true next observation, what the returns bootstrap from.

    Inside an episode it is the next step's value; at the batch end and where an episode was truncated it
    is evaluated on `next_observation` (the episode's final observation, not the reset one). The short
    batch is evaluated whole: selecting the truncated steps would cost a host sync every update.
    """
    value = batch.agent_info.value
    next_value = torch.cat([value[1:], model.value(batch.next_observation[-1:])])
    return torch.where(batch.truncated, model.value(batch.next_observation), next_value)


def a2c_loss(model: ActorCritic, obs, action, advantage, returns, args: Args):
    """Policy gradient with a learned baseline + value regression - entropy bonus; returns (loss, stats).

    obs, action, advantage, returns: [N, ...] (the flattened batch); the advantages are constants.
    """
    dist, value = model(obs)
    log_prob = dist.log_prob(action)
    entropy = dist.entropy().mean()
    if args.norm_adv:
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
    policy_loss = -(advantage * log_prob).mean()
    value_loss = 0.5 * ((value - returns) ** 2).mean()
    loss = policy_loss - args.ent_coef * entropy + args.vf_coef * value_loss
    return loss, (policy_loss, value_loss, entropy, log_prob.detach())


def main(args: Args) -> dict:
    device = setup(args)
    env_fn = partial(make_a2c_env, args.env_id, training=True, **env_options(args))
    eval_env_fn = partial(make_a2c_env, args.env_id, training=False, **env_options(args))
    probe = env_fn(args.seed)
    if not isinstance(probe.action_space, gym.spaces.Discrete | gym.spaces.Box):
        raise UsageError(f"algos/a2c.py needs a Discrete or Box action space, {args.env_id} has {probe.action_space}")
    example = observation_example(probe.observation_space)
    if not isinstance(example, tuple) and example.ndim not in (1, 3):
        raise UsageError(f"algos/a2c.py needs vector observations or Atari frame stacks (or Dict / Tuple "
                         f"observations), {args.env_id} has shape {example.shape}")
    if args.ent_coef is None:
        args.ent_coef = 0.01 if is_frame_stack(example) else 0.0
    model = ActorCritic(example, probe.action_space, args.hidden_size).to(device)
    probe.close()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=args.learning_rate, alpha=args.rmsprop_alpha,
                                    eps=args.rmsprop_eps, foreach=True)
    loss_fn = torch.compile(a2c_loss) if args.compile else a2c_loss

    # What a checkpoint saves and --resume restores, with the counters and the RNG states.
    trained = dict(model=model, optimizer=optimizer)
    count, _ = restore_checkpoint(args.resume, trained, device, init_from=args.init_from)
    sampler = make_sampler(args, env_fn, policy_step, model, horizon=args.num_steps, start_step=count.global_step)
    logger = RunLogger(args, "a2c", count)
    evaluation = Evaluation(args, eval_env_fn, policy_step, model, device, start_step=count.global_step)
    batch_size = args.n_envs * args.num_steps
    try:
        while count.global_step < args.total_timesteps:
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - count.global_step / args.total_timesteps)
            batch, episodes = sampler.collect()
            count.global_step += batch_size
            logger.log_episodes(count.global_step, episodes)

            batch = buffer_to(batch, device)
            value = batch.agent_info.value
            with torch.no_grad():
                advantage, returns = gae_advantages(batch.reward, value, next_values(model, batch), batch.terminated,
                                                    batch.truncated, args.gamma, args.gae_lambda)

            flat = lambda x: x.reshape((batch_size,) + x.shape[2:])  # noqa: E731
            obs = buffer_map(flat, batch.observation)
            loss, stats = loss_fn(model, obs, flat(batch.action), flat(advantage), flat(returns), args)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_gradients(model.parameters())  # data-parallel: the mean over ranks
            nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm, foreach=True)
            optimizer.step()
            count.n_updates += 1
            sampler.sync(model)

            if count.n_updates % args.log_every_updates == 0:
                policy_loss, value_loss, entropy, old_log_prob = stats
                with torch.no_grad():  # how far this update moved the policy on its own batch
                    new_log_prob = model.distribution(obs).log_prob(flat(batch.action))
                    log_ratio = new_log_prob - old_log_prob
                    approx_kl = ((log_ratio.exp() - 1) - log_ratio).mean()
                logger.log(count.global_step, {
                    "charts/learning_rate": optimizer.param_groups[0]["lr"],
                    "losses/policy_loss": policy_loss, "losses/value_loss": value_loss, "losses/entropy": entropy,
                    "losses/approx_kl": approx_kl,
                    "losses/explained_variance": explained_variance(flat(value), flat(returns)),
                })
            evaluation.maybe_log(logger, count.global_step)
            logger.maybe_checkpoint(trained, count)
            logger.progress(count.global_step)

        logger.checkpoint(trained, count)
        return evaluation.finish(logger, count.global_step)
    finally:
        sampler.close()
        logger.close()


if __name__ == "__main__":
    run(main, Args)
