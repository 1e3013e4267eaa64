"""DQN for vector or Dict observations, with double Q-learning, dueling heads, n-step returns and prioritized replay.

Mnih et al. 2015 (https://www.nature.com/articles/nature14236); double: van Hasselt et al. 2016;
dueling: Wang et al. 2016; prioritized replay: Schaul et al. 2016.

    python algos/dqn.py --env-id CartPole-v1
    python algos/dqn.py --env-id CartPole-v1 --dueling --prioritized
    python algos/dqn.py --env-id CartPole-v1 --no-double --n-step 1      # the 2015 Nature DQN target
    python algos/dqn.py --n-envs 2 --sampler parallel-cpu --n-workers 2

The defaults use double Q-learning with 3-step returns: on CartPole-v1 at 100k steps they end with a greedy
return of at least 488 on each of 12 seeds; the one-step target without double Q-learning ends below 400 on
4 of 9 seeds (each of them learns, then falls back before the end).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import distributed
from common.async_mode import ReplayFeeder
from common.config import CommonArgs, QLearningArgs, UsageError, run, setup
from common.envs import make_env, observation_example, require_discrete_actions
from common.kernels import epsilon_greedy, linear_schedule, polyak_update
from common.logger import Evaluation, RunLogger, restore_checkpoint
from common.namedarraytuple import buffer_to
from common.networks import observation_encoder
from common.replay import PrioritizedReplayBuffer, UniformReplayBuffer


@dataclass
class Args(CommonArgs, QLearningArgs):
    # A flag without a docstring sets this script's default for a flag of common/config.py.
    n_envs: int = 4
    """training environments per data-parallel rank"""
    double: bool = True
    """double Q-learning: the online network picks the bootstrap action (--no-double: the target network does)"""
    dueling: bool = False
    """dueling value / advantage heads"""
    n_step: int = 3
    """n-step returns (1: the one-step target)"""
    prioritized: bool = False
    """prioritized experience replay"""
    priority_alpha: float = 0.6
    anneal_lr: bool = True
    """anneal the learning rate linearly to zero over training"""
    buffer_size: int = 100_000
    batch_size: int = 128
    replay_ratio: float = 0.25
    target_network_period: int = 100
    end_epsilon: float = 0.05
    hidden_size: int = 128
    """width of the MLP"""


class QNetwork(nn.Module):
    def __init__(self, example, n_actions: int, hidden: int, dueling: bool):
        super().__init__()
        self.n_actions, self.dueling = n_actions, dueling
        self.encoder, obs_dim = observation_encoder(example)  # a Dict observation: its leaves, concatenated
        self.torso = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, n_actions + (1 if dueling else 0))

    def forward(self, obs) -> torch.Tensor:
        """Q-values [..., n_actions] of observations (arrays or namedarraytuples) with any leading dims."""
        out = self.head(self.torso(self.encoder(obs)))
        if not self.dueling:
            return out
        value, advantage = out[..., :1], out[..., 1:]
        return value + advantage - advantage.mean(-1, keepdim=True)


def policy_step(model: QNetwork, obs, prev_action, prev_reward, rnn_state, deterministic: bool = False,
                epsilon: float = 0.0):
    """Epsilon-greedy action (greedy when deterministic)."""
    def greedy():
        return model(obs).argmax(-1)
    return epsilon_greedy(greedy, obs, model.n_actions, 0.0 if deterministic else epsilon), None, None


def load_policy(args: Args, checkpoint: dict, device: torch.device):
    """The trained Q-network and the evaluation env_fn (for common.evaluate)."""
    eval_env_fn = partial(make_env, args.env_id, training=False)
    probe = eval_env_fn(args.seed)
    model = QNetwork(observation_example(probe.observation_space), int(probe.action_space.n), args.hidden_size,
                     args.dueling)
    probe.close()
    model.load_state_dict(checkpoint["q_net"])
    return model.to(device), eval_env_fn


def td_loss(q_net: QNetwork, target_net: QNetwork, s, double: bool):
    """Huber TD loss on an n-step replay sample; returns (loss, |td error| per sample, mean Q)."""
    q = q_net(s.observation).gather(-1, s.action.long().unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        target_q = target_net(s.bootstrap_observation)
        if double:
            next_action = q_net(s.bootstrap_observation).argmax(-1, keepdim=True)
        else:
            next_action = target_q.argmax(-1, keepdim=True)
        target = s.n_step_return + s.discount * target_q.gather(-1, next_action).squeeze(-1)
    td_error = target - q
    loss = (s.weight * F.smooth_l1_loss(q, target, reduction="none")).mean()
    return loss, td_error.abs().detach(), q.mean().detach()


def exploration(args: Args, step: int) -> dict:
    """Policy keyword arguments at environment step `step`: the linearly decaying epsilon."""
    return {"epsilon": linear_schedule(args.start_epsilon, args.end_epsilon,
                                       args.exploration_fraction * args.total_timesteps, step)}


def make_replay(args: Args, example, share_memory: bool = False):
    """The replay buffer the flags ask for (shared memory when a sampling process fills it)."""
    kwargs = dict(size=args.buffer_size, n_envs=args.n_envs, n_step=args.n_step, gamma=args.gamma,
                  share_memory=share_memory)
    if args.prioritized:
        return PrioritizedReplayBuffer(example, alpha=args.priority_alpha, beta=args.priority_beta, **kwargs)
    return UniformReplayBuffer(example, **kwargs)


def main(args: Args) -> dict:
    device = setup(args)
    env_fn = partial(make_env, args.env_id, training=True)
    eval_env_fn = partial(make_env, args.env_id, training=False)
    probe = env_fn(args.seed)
    n_actions = require_discrete_actions(probe, "algos/dqn.py")
    example = observation_example(probe.observation_space)
    if not isinstance(example, tuple) and example.ndim != 1:
        raise UsageError(f"algos/dqn.py needs vector or Dict / Tuple observations, {args.env_id} has shape "
                         f"{example.shape}: use dqn_atari.py for images")
    probe.close()

    q_net = QNetwork(example, n_actions, args.hidden_size, args.dueling).to(device)
    target_net = QNetwork(example, n_actions, args.hidden_size, args.dueling).to(device)
    target_net.load_state_dict(q_net.state_dict())
    optimizer = torch.optim.Adam(q_net.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    loss_fn = torch.compile(td_loss) if args.compile else td_loss

    # What a checkpoint saves and --resume restores, with the counters and the RNG states.
    trained = dict(q_net=q_net, target_net=target_net, optimizer=optimizer)
    count, checkpoint = restore_checkpoint(args.resume, trained, device, init_from=args.init_from)
    feeder = ReplayFeeder(args, env_fn, policy_step, q_net, partial(make_replay, args), horizon=args.num_steps,
                          exploration=partial(exploration, args), checkpoint=checkpoint, trained=trained)
    replay, learning_starts = feeder.replay, feeder.learning_starts
    logger = RunLogger(args, "dqn", count)
    evaluation = Evaluation(args, eval_env_fn, policy_step, q_net, device, start_step=count.global_step)
    try:
        while count.global_step < args.total_timesteps:
            if args.anneal_lr:
                remaining = max(1.0 - count.global_step / args.total_timesteps, 0)
                optimizer.param_groups[0]["lr"] = args.learning_rate * remaining
            epsilon = exploration(args, count.global_step)["epsilon"]  # logged: the epsilon the new steps start from
            count.global_step, episodes = feeder.collect()  # async: the steps the sampling process made meanwhile
            logger.log_episodes(count.global_step, episodes)
            beta = args.priority_beta + (1 - args.priority_beta) * min(count.global_step / args.total_timesteps, 1)
            for _ in count.updates_due(args.replay_ratio, learning_starts):  # none in the warm-up
                sample = replay.sample(args.batch_size, beta=beta) if args.prioritized \
                    else replay.sample(args.batch_size)
                sample = buffer_to(sample, device)
                loss, td_abs, q_mean = loss_fn(q_net, target_net, sample, args.double)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.all_reduce_gradients(q_net.parameters())  # data-parallel: the mean over ranks
                nn.utils.clip_grad_norm_(q_net.parameters(), args.max_grad_norm)
                optimizer.step()
                if args.prioritized:
                    replay.update_priorities(sample.index, td_abs)
                count.n_updates += 1
                if count.n_updates % args.target_network_period == 0:
                    polyak_update(target_net.parameters(), q_net.parameters(), args.tau)
                if count.n_updates % 100 == 0:
                    logger.log_updates(count, {"losses/td_loss": loss, "losses/q_values": q_mean,
                                               "charts/epsilon": epsilon})
            feeder.sync(q_net)
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
