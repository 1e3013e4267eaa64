"""PPO: clipped proximal policy optimization with GAE, for vector or Dict observations.

Schulman et al. 2017, https://arxiv.org/abs/1707.06347. Discrete actions get a categorical policy,
continuous (Box) actions a diagonal Gaussian with a state-independent log-std.

Hyper-parameters left at `None` ("auto") take the preset of the action space, printed resolved in
config.json: discrete actions the classic-control preset, continuous actions the MuJoCo preset (with
observation and reward normalisation). Any flag overrides its preset value.

    python algos/ppo.py --env-id CartPole-v1
    python algos/ppo.py --env-id InvertedPendulum-v5 --total-timesteps 100000
    python algos/ppo.py --env-id Hopper-v5 --total-timesteps 1000000 --norm-reward False
    python algos/ppo.py --sampler parallel-cpu --n-workers 2 --n-envs 8 --track
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
from common.config import CommonArgs, PPOArgs, UsageError, run, setup
from common.envs import make_env, observation_example
from common.kernels import explained_variance, gae_advantages
from common.logger import Evaluation, RunLogger, restore_checkpoint
from common.namedarraytuple import buffer_map, buffer_to, namedarraytuple
from common.networks import layer_init, observation_encoder
from common.normalization import ObservationNormalizer, RewardScaler, RunningMeanStd
from common.samplers import make_sampler


@dataclass
class Args(CommonArgs, PPOArgs):
    # A flag without a docstring sets this script's default for a flag of common/config.py.
    n_envs: int = 8
    """training environments per data-parallel rank"""
    num_steps: int | None = None
    """environment steps per environment per rollout (auto: 64 discrete, 256 continuous)"""
    learning_rate: float | None = None
    """Adam learning rate (auto: 1e-3 discrete, 3e-4 continuous)"""
    num_minibatches: int | None = None
    """minibatches per epoch (auto: 4 discrete, 32 continuous)"""
    update_epochs: int | None = None
    """optimization epochs per rollout (auto: 4 discrete, 10 continuous)"""
    clip_coef: float = 0.2
    ent_coef: float | None = None
    """entropy bonus coefficient (auto: 0.01 discrete, 0 continuous)"""
    norm_obs: bool | None = None
    """normalise observations by running statistics kept in the model (auto: on for continuous actions)"""
    norm_reward: bool | None = None
    """scale rewards by the std of a running discounted return (auto: on for continuous actions)"""
    hidden_size: int = 64
    """width of the actor and critic MLPs"""


# The values of the "auto" (None) fields, by action space.
PRESETS = {
    "discrete": dict(num_steps=64, learning_rate=1e-3, num_minibatches=4, update_epochs=4, ent_coef=0.01,
                     norm_obs=False, norm_reward=False),
    "continuous": dict(num_steps=256, learning_rate=3e-4, num_minibatches=32, update_epochs=10, ent_coef=0.0,
                       norm_obs=True, norm_reward=True),
}

AgentInfo = namedarraytuple("AgentInfo", ["log_prob", "value"])



class ActorCritic(nn.Module):
    def __init__(self, example, action_space: gym.Space, hidden: int, norm_obs: bool):
        super().__init__()
        self.continuous = isinstance(action_space, gym.spaces.Box)
        n_out = int(np.prod(action_space.shape)) if self.continuous else int(action_space.n)
        if not norm_obs:
            self.obs_norm = nn.Identity()
        elif isinstance(example, tuple):  # a Dict observation: statistics per float leaf
            self.obs_norm = ObservationNormalizer(example)
        else:
            self.obs_norm = RunningMeanStd(example.shape)
        self.encoder, obs_dim = observation_encoder(example)  # a Dict observation: its leaves, concatenated

        def mlp(out: int, std: float) -> nn.Sequential:
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
        """Observations (arrays or namedarraytuples, any leading dims) -> the MLPs' inputs [..., obs_dim]."""
        return self.encoder(self.obs_norm(obs))

    def value(self, obs) -> torch.Tensor:
        return self.critic(self.features(obs)).squeeze(-1)

    def distribution(self, obs):
        out = self.actor(self.features(obs))
        if self.continuous:
            # One distribution over the action vector: log_prob and entropy sum over its dimensions.
            return Independent(Normal(out, self.log_std.exp().expand_as(out), validate_args=False), 1,
                               validate_args=False)
        return Categorical(logits=out, validate_args=False)


def policy_step(model: ActorCritic, obs, prev_action, prev_reward, rnn_state, deterministic: bool = False):
    """Sample (or, deterministically, take the mode of) the policy; record log-prob and value."""
    dist = model.distribution(obs)
    if deterministic:
        action = dist.mean if model.continuous else dist.probs.argmax(-1)
    else:
        action = dist.sample()
    return action, AgentInfo(dist.log_prob(action), model.value(obs)), None


def resolve_presets(args: Args, action_space: gym.Space) -> None:
    """Fill the "auto" (None) fields from the preset of the action space."""
    preset = PRESETS["continuous" if isinstance(action_space, gym.spaces.Box) else "discrete"]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def load_policy(args: Args, checkpoint: dict, device: torch.device):
    """The trained model (with its observation statistics) and the evaluation env_fn, for common.evaluate."""
    eval_env_fn = partial(make_env, args.env_id, training=False, clip_actions=True)
    probe = eval_env_fn(args.seed)
    resolve_presets(args, probe.action_space)
    model = ActorCritic(observation_example(probe.observation_space), probe.action_space, args.hidden_size,
                        args.norm_obs)
    probe.close()
    model.load_state_dict(checkpoint["model"])
    return model.to(device), eval_env_fn


def next_values(model: ActorCritic, batch) -> torch.Tensor:
    """Value [T, B] of each step's true next observation, what GAE bootstraps from.

    Inside an episode it is the next step's value; at the batch end and where an episode was truncated it
    is evaluated afresh on `next_observation` (the episode's final observation, not the reset one).
    """
    value = batch.agent_info.value
    next_value = torch.cat([value[1:], model.value(batch.next_observation[-1:])])
    truncated = batch.truncated
    if truncated.any():
        next_value[truncated] = model.value(batch.next_observation[truncated])
    return next_value


def ppo_loss(model: ActorCritic, obs, action, old_log_prob, advantage, returns, old_value, args: Args):
    """Clipped surrogate + (clipped) value loss - entropy bonus; returns (loss, stats)."""
    dist = model.distribution(obs)
    log_prob = dist.log_prob(action)
    entropy = dist.entropy().mean()
    log_ratio = log_prob - old_log_prob
    ratio = log_ratio.exp()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
    if args.norm_adv:
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
    policy_loss = torch.max(-advantage * ratio, -advantage * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    value = model.value(obs)
    if args.clip_vloss:
        value_clipped = old_value + (value - old_value).clamp(-args.clip_coef, args.clip_coef)
        value_loss = 0.5 * torch.max((value - returns) ** 2, (value_clipped - returns) ** 2).mean()
    else:
        value_loss = 0.5 * ((value - returns) ** 2).mean()
    loss = policy_loss - args.ent_coef * entropy + args.vf_coef * value_loss
    return loss, (policy_loss, value_loss, entropy, approx_kl, clipfrac)


def main(args: Args) -> dict:
    device = setup(args)
    env_fn = partial(make_env, args.env_id, training=True, clip_actions=True)
    eval_env_fn = partial(make_env, args.env_id, training=False, clip_actions=True)
    probe = env_fn(args.seed)
    if not isinstance(probe.action_space, gym.spaces.Discrete | gym.spaces.Box):
        raise UsageError(f"algos/ppo.py needs a Discrete or Box action space, {args.env_id} has {probe.action_space}")
    example = observation_example(probe.observation_space)
    if not isinstance(example, tuple) and example.ndim != 1:
        raise UsageError(f"algos/ppo.py needs vector or Dict / Tuple observations, {args.env_id} has shape "
                         f"{example.shape}: use ppo_atari.py for images")
    resolve_presets(args, probe.action_space)
    if args.num_steps < 1 or args.num_minibatches < 1 or args.n_envs * args.num_steps % args.num_minibatches:
        raise UsageError(f"--num-minibatches {args.num_minibatches} must divide the batch of --n-envs x --num-steps "
                         f"= {args.n_envs * args.num_steps} steps")
    model = ActorCritic(example, probe.action_space, args.hidden_size, args.norm_obs).to(device)
    probe.close()
    reward_scaler = RewardScaler(args.n_envs, args.gamma).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, eps=1e-5, foreach=True)
    loss_fn = torch.compile(ppo_loss) if args.compile else ppo_loss

    # What a checkpoint saves and --resume restores, with the counters and the RNG states.
    trained = dict(model=model, optimizer=optimizer, reward_scaler=reward_scaler)
    count, _ = restore_checkpoint(args.resume, trained, device, init_from=args.init_from)
    sampler = make_sampler(args, env_fn, policy_step, model, horizon=args.num_steps, start_step=count.global_step)
    logger = RunLogger(args, "ppo", count)
    evaluation = Evaluation(args, eval_env_fn, policy_step, model, device, start_step=count.global_step)
    batch_size = args.n_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    try:
        while count.global_step < args.total_timesteps:
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - count.global_step / args.total_timesteps)
            batch, episodes = sampler.collect()
            count.global_step += batch_size
            logger.log_episodes(count.global_step, episodes)

            batch = buffer_to(batch, device)
            value = batch.agent_info.value
            reward = batch.reward
            if args.norm_reward:
                reward = reward_scaler(reward, batch.terminated | batch.truncated)
            with torch.no_grad():
                advantage, returns = gae_advantages(reward, value, next_values(model, batch), batch.terminated,
                                                    batch.truncated, args.gamma, args.gae_lambda)

            flat = lambda x: x.reshape((batch_size,) + x.shape[2:])  # noqa: E731
            obs, action = buffer_map(flat, batch.observation), flat(batch.action)
            old_log_prob, old_value = flat(batch.agent_info.log_prob), flat(value)
            advantage, returns = flat(advantage), flat(returns)
            for _epoch in range(args.update_epochs):
                permutation = torch.randperm(batch_size, device=device)
                for start in range(0, batch_size, minibatch_size):
                    mb = permutation[start:start + minibatch_size]
                    loss, stats = loss_fn(model, obs[mb], action[mb], old_log_prob[mb], advantage[mb],
                                          returns[mb], old_value[mb], args)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    distributed.all_reduce_gradients(model.parameters())  # data-parallel: the mean over ranks
                    nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                # Data-parallel ranks stop together: on the mean KL over ranks.
                if args.target_kl is not None and distributed.all_reduce_mean(stats[3]) > args.target_kl:
                    break
            if args.norm_obs:
                # After the update, so that the batch was collected and optimised with the same statistics.
                model.obs_norm.update(obs)
            sampler.sync(model)

            policy_loss, value_loss, entropy, approx_kl, clipfrac = stats
            logger.log(count.global_step, {
                "charts/learning_rate": optimizer.param_groups[0]["lr"],
                "losses/policy_loss": policy_loss, "losses/value_loss": value_loss, "losses/entropy": entropy,
                "losses/approx_kl": approx_kl, "losses/clipfrac": clipfrac,
                "losses/explained_variance": explained_variance(old_value, returns),
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
