"""DQN for Atari (pixels), with double Q-learning, dueling heads, n-step returns and prioritized replay.

Mnih et al. 2015 (https://www.nature.com/articles/nature14236); double: van Hasselt et al. 2016;
dueling: Wang et al. 2016; prioritized replay: Schaul et al. 2016. DeepMind preprocessing (common/envs.py);
the replay buffer stores each 84x84 frame once and rebuilds the 4-frame stacks when sampling.

    python algos/dqn_atari.py --env-id ALE/Pong-v5
    python algos/dqn_atari.py --env-id ALE/Breakout-v5 --double --dueling --n-step 3 --prioritized
    python algos/dqn_atari.py --env-id ALE/Pong-v5 --n-envs 8 --sampler alternating-gpu --n-workers 4
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import distributed
from common.async_mode import ReplayFeeder
from common.config import AtariArgs, CommonArgs, QLearningArgs, UsageError, env_options, run, setup
from common.envs import make_env, require_discrete_actions
from common.kernels import epsilon_greedy, linear_schedule, polyak_update
from common.logger import Evaluation, RunLogger, restore_checkpoint
from common.namedarraytuple import buffer_to
from common.replay import FrameReplayBuffer, PrioritizedFrameReplayBuffer


@dataclass
class Args(CommonArgs, AtariArgs, QLearningArgs):
    # A flag without a docstring sets this script's default for a flag of common/config.py.
    env_id: str = "ALE/Pong-v5"
    """Atari environment id (ALE/<Game>-v5 or <Game>NoFrameskip-v4)"""
    total_timesteps: int = 10_000_000
    """environment steps (agent steps, 4 frames each) to train for"""
    double: bool = False
    """double Q-learning: the online network picks the bootstrap action"""
    dueling: bool = False
    """dueling value / advantage heads"""
    n_step: int = 1
    prioritized: bool = False
    """prioritized experience replay"""
    learning_rate: float = 1e-4
    adam_eps: float = 1.5e-4
    buffer_size: int = 1_000_000
    """replay capacity in transitions (frames are stored once: about 7 KB each)"""
    batch_size: int = 32
    replay_ratio: float = 0.25
    learning_starts: int = 80_000
    eval_epsilon: float = 0.001
    """probability of a random action in evaluation episodes (a greedy policy that never presses FIRE after a
    lost life would otherwise idle until the time limit)"""


class AtariQNetwork(nn.Module):
    """The Nature CNN with a plain or dueling Q head, on uint8 frame stacks [B, 4, 84, 84]."""

    def __init__(self, in_channels: int, n_actions: int, dueling: bool):
        super().__init__()
        self.n_actions, self.dueling = n_actions, dueling
        self.torso = nn.Sequential(
            nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )
        n_heads = 2 if dueling else 1
        self.hidden = nn.ModuleList(nn.Sequential(nn.Linear(3136, 512), nn.ReLU()) for _ in range(n_heads))
        self.advantage = nn.Linear(512, n_actions)
        self.value = nn.Linear(512, 1) if dueling else None

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        features = self.torso(obs.float() / 255.0)
        advantage = self.advantage(self.hidden[0](features))
        if not self.dueling:
            return advantage
        value = self.value(self.hidden[1](features))
        return value + advantage - advantage.mean(-1, keepdim=True)


def policy_step(model: AtariQNetwork, obs, prev_action, prev_reward, rnn_state, deterministic: bool = False,
                epsilon: float = 0.0):
    """Epsilon-greedy action (evaluation, deterministic, passes its small --eval-epsilon)."""
    def greedy():
        return model(obs).argmax(-1)
    return epsilon_greedy(greedy, obs, model.n_actions, epsilon), None, None


def eval_policy_kwargs(args: Args) -> dict:
    """Keyword arguments of `policy_step` in evaluation (here and in common.evaluate): epsilon-greedy."""
    return {"epsilon": args.eval_epsilon}


def load_policy(args: Args, checkpoint: dict, device: torch.device):
    """The trained Q-network and the evaluation env_fn (for common.evaluate)."""
    eval_env_fn = partial(make_env, args.env_id, training=False, **env_options(args))
    probe = eval_env_fn(args.seed)
    model = AtariQNetwork(probe.observation_space.shape[0], int(probe.action_space.n), args.dueling)
    probe.close()
    model.load_state_dict(checkpoint["q_net"])
    return model.to(device), eval_env_fn


def td_loss(q_net: AtariQNetwork, target_net: AtariQNetwork, s, double: bool):
    """Huber TD loss on an n-step replay sample; returns (loss, |td error| per sample, mean Q)."""
    q = q_net(s.observation).gather(-1, s.action.long().unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        target_q = target_net(s.bootstrap_observation)
        if double:
            next_action = q_net(s.bootstrap_observation).argmax(-1, keepdim=True)
        else:
            next_action = target_q.argmax(-1, keepdim=True)
        target = s.n_step_return + s.discount * target_q.gather(-1, next_action).squeeze(-1)
    loss = (s.weight * F.smooth_l1_loss(q, target, reduction="none")).mean()
    return loss, (target - q).abs().detach(), q.mean().detach()


def exploration(args: Args, step: int) -> dict:
    """Policy keyword arguments at environment step `step`: the linearly decaying epsilon."""
    return {"epsilon": linear_schedule(args.start_epsilon, args.end_epsilon,
                                       args.exploration_fraction * args.total_timesteps, step)}


def make_replay(args: Args, example, share_memory: bool = False):
    """The frame replay buffer the flags ask for (shared memory when a sampling process fills it)."""
    kwargs = dict(size=args.buffer_size, n_envs=args.n_envs, n_step=args.n_step, gamma=args.gamma,
                  frame_padding="repeat", share_memory=share_memory)
    if args.prioritized:
        return PrioritizedFrameReplayBuffer(example, alpha=args.priority_alpha, beta=args.priority_beta, **kwargs)
    return FrameReplayBuffer(example, **kwargs)


def main(args: Args) -> dict:
    device = setup(args)
    env_fn = partial(make_env, args.env_id, training=True, **env_options(args))
    eval_env_fn = partial(make_env, args.env_id, training=False, **env_options(args))
    probe = env_fn(args.seed)
    n_actions = require_discrete_actions(probe, "algos/dqn_atari.py")
    obs_shape = probe.observation_space.shape
    probe.close()
    if len(obs_shape) != 3:
        raise UsageError(f"algos/dqn_atari.py needs image observations [stack, H, W], {args.env_id} has shape "
                         f"{obs_shape}: use dqn.py for vector observations")

    q_net = AtariQNetwork(obs_shape[0], n_actions, args.dueling).to(device)
    target_net = AtariQNetwork(obs_shape[0], n_actions, args.dueling).to(device)
    target_net.load_state_dict(q_net.state_dict())
    optimizer = torch.optim.Adam(q_net.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    loss_fn = torch.compile(td_loss) if args.compile else td_loss

    # What a checkpoint saves and --resume restores, with the counters and the RNG states.
    trained = dict(q_net=q_net, target_net=target_net, optimizer=optimizer)
    count, checkpoint = restore_checkpoint(args.resume, trained, device, init_from=args.init_from)
    feeder = ReplayFeeder(args, env_fn, policy_step, q_net, partial(make_replay, args), horizon=args.num_steps,
                          exploration=partial(exploration, args), checkpoint=checkpoint, trained=trained)
    replay, learning_starts = feeder.replay, feeder.learning_starts
    logger = RunLogger(args, "dqn_atari", count)
    evaluation = Evaluation(args, eval_env_fn, policy_step, q_net, device, start_step=count.global_step,
                            **eval_policy_kwargs(args))
    try:
        while count.global_step < args.total_timesteps:
            epsilon = exploration(args, count.global_step)["epsilon"]  # logged: the epsilon the new steps start from
            count.global_step, episodes = feeder.collect()  # async: the steps the sampling process made meanwhile
            logger.log_episodes(count.global_step, episodes)
            beta = args.priority_beta + (1 - args.priority_beta) * min(count.global_step / args.total_timesteps, 1)
            for _ in count.updates_due(args.replay_ratio, learning_starts):  # none in the warm-up
                if args.prioritized:
                    sample = replay.sample(args.batch_size, beta=beta)
                else:
                    sample = replay.sample(args.batch_size)
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
