"""PPO for Atari: clipped proximal policy optimization with GAE and the Nature-DQN convolutional torso.

Schulman et al. 2017, https://arxiv.org/abs/1707.06347, with the Atari settings of its appendix (8 envs,
128 steps, lr 2.5e-4 annealed, clip 0.1, 4 epochs of 4 minibatches, entropy 0.01). Observations are the
uint8 [4, 84, 84] frame stacks of `common.envs.make_env` (DeepMind preprocessing), scaled by 1/255 in the
network. Logged returns are raw game scores.

    python algos/ppo_atari.py --env-id ALE/Breakout-v5
    python algos/ppo_atari.py --env-id PongNoFrameskip-v4 --sampler parallel-cpu --n-workers 8 --n-envs 16
    python algos/ppo_atari.py --env-id ALE/Pong-v5 --sampler alternating-gpu --n-workers 4 --track
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.distributions import Categorical

from common import distributed
from common.config import AtariArgs, CommonArgs, PPOArgs, UsageError, env_options, run, setup
from common.envs import make_env, observation_shape, require_discrete_actions
from common.kernels import explained_variance, gae_advantages
from common.logger import Evaluation, RunLogger, restore_checkpoint
from common.namedarraytuple import buffer_to, namedarraytuple
from common.networks import NatureCNN, layer_init
from common.samplers import make_sampler


@dataclass
class Args(CommonArgs, AtariArgs, PPOArgs):
    # A flag without a docstring sets this script's default for a flag of common/config.py.
    env_id: str = "ALE/Breakout-v5"
    """Atari id (ALE/<Game>-v5 or <Game>NoFrameskip-v4)"""
    total_timesteps: int = 10_000_000
    """environment steps (agent steps, 4 frames each) to train for, summed over all environments"""
    n_envs: int = 8
    """training environments per data-parallel rank"""
    eval_epsilon: float = 0.001
    """probability of a random action in evaluation episodes (a greedy policy that never presses FIRE after a
    lost life would otherwise idle until the time limit)"""


AgentInfo = namedarraytuple("AgentInfo", ["log_prob", "value"])



class ActorCritic(nn.Module):
    def __init__(self, in_channels: int, n_actions: int):
        super().__init__()
        self.torso = NatureCNN(in_channels)
        self.actor = layer_init(nn.Linear(512, n_actions), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1.0)

    def forward(self, obs: torch.Tensor) -> tuple[Categorical, torch.Tensor]:
        """The policy and the value [B] of a batch of frame stacks [B, C, 84, 84]."""
        features = self.torso(obs)
        return Categorical(logits=self.actor(features), validate_args=False), self.critic(features).squeeze(-1)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.torso(obs)).squeeze(-1)


def policy_step(model: ActorCritic, obs, prev_action, prev_reward, rnn_state, deterministic: bool = False,
                epsilon: float = 0.0):
    """Sample (or, deterministically, take the most likely) action, uniform with probability `epsilon`;
    record log-prob and value."""
    dist, value = model(obs)
    action = dist.probs.argmax(-1) if deterministic else dist.sample()
    if epsilon > 0:
        explore = torch.rand(action.shape, device=action.device) < epsilon
        action = torch.where(explore, torch.randint_like(action, dist.probs.shape[-1]), action)
    return action, AgentInfo(dist.log_prob(action), value), None


def eval_policy_kwargs(args: Args) -> dict:
    """Keyword arguments of `policy_step` in evaluation (here and in common.evaluate): epsilon-greedy."""
    return {"epsilon": args.eval_epsilon}


def load_policy(args: Args, checkpoint: dict, device: torch.device):
    """The trained model and the evaluation env_fn, for common.evaluate."""
    eval_env_fn = partial(make_env, args.env_id, training=False, **env_options(args))
    probe = eval_env_fn(args.seed)
    model = ActorCritic(observation_shape(probe)[0], int(probe.action_space.n))
    probe.close()
    model.load_state_dict(checkpoint["model"])
    return model.to(device), eval_env_fn


def next_values(model: ActorCritic, batch) -> torch.Tensor:
    """Value [T, B] of each step's true next observation, what GAE bootstraps from.

    Inside an episode it is the next step's value; at the batch end and where an episode was truncated it
    is evaluated afresh on `next_observation` (the episode's final observation, not the reset one).
    """
    value = batch.agent_info.value
    next_value = torch.cat([value[1:], model.value(batch.next_observation[-1])[None]])
    truncated = batch.truncated
    if truncated.any():
        next_value[truncated] = model.value(batch.next_observation[truncated])
    return next_value


def ppo_loss(model: ActorCritic, obs, action, old_log_prob, advantage, returns, old_value, args: Args):
    """Clipped surrogate + (clipped) value loss - entropy bonus; returns (loss, stats)."""
    dist, value = model(obs)
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
    if args.clip_vloss:
        value_clipped = old_value + (value - old_value).clamp(-args.clip_coef, args.clip_coef)
        value_loss = 0.5 * torch.max((value - returns) ** 2, (value_clipped - returns) ** 2).mean()
    else:
        value_loss = 0.5 * ((value - returns) ** 2).mean()
    loss = policy_loss - args.ent_coef * entropy + args.vf_coef * value_loss
    return loss, (policy_loss, value_loss, entropy, approx_kl, clipfrac)


def main(args: Args) -> dict:
    device = setup(args)
    env_fn = partial(make_env, args.env_id, training=True, **env_options(args))
    eval_env_fn = partial(make_env, args.env_id, training=False, **env_options(args))
    probe = env_fn(args.seed)
    n_actions = require_discrete_actions(probe, "algos/ppo_atari.py")
    shape = observation_shape(probe)
    probe.close()
    if len(shape) != 3:
        raise UsageError(f"algos/ppo_atari.py needs image observations [C, H, W], {args.env_id} has shape {shape}: "
                         "use ppo.py for vector observations")
    if shape[1:] != (84, 84):
        raise UsageError(f"algos/ppo_atari.py needs 84x84 frames, {args.env_id} has shape {shape}: use an Atari id")
    if args.num_minibatches < 1 or args.n_envs * args.num_steps % args.num_minibatches:
        raise UsageError(f"--num-minibatches {args.num_minibatches} must divide the batch of --n-envs x --num-steps "
                         f"= {args.n_envs * args.num_steps} steps")
    model = ActorCritic(shape[0], n_actions).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, eps=1e-5, foreach=True)
    loss_fn = torch.compile(ppo_loss) if args.compile else ppo_loss

    # What a checkpoint saves and --resume restores, with the counters and the RNG states.
    trained = dict(model=model, optimizer=optimizer)
    count, _ = restore_checkpoint(args.resume, trained, device, init_from=args.init_from)
    sampler = make_sampler(args, env_fn, policy_step, model, horizon=args.num_steps, start_step=count.global_step)
    logger = RunLogger(args, "ppo_atari", count)
    evaluation = Evaluation(args, eval_env_fn, policy_step, model, device, start_step=count.global_step,
                            **eval_policy_kwargs(args))
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
            with torch.no_grad():
                advantage, returns = gae_advantages(batch.reward, value, next_values(model, batch), batch.terminated,
                                                    batch.truncated, args.gamma, args.gae_lambda)

            flat = lambda x: x.reshape((batch_size,) + x.shape[2:])  # noqa: E731
            obs, action = flat(batch.observation), flat(batch.action)
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
                if args.target_kl is not None and distributed.all_reduce_mean(stats[3]) > args.target_kl:
                    break  # on the KL averaged over data-parallel ranks: they stop at the same epoch
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
