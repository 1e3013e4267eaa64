"""C51 for Atari (pixels): categorical distributional DQN, with n-step returns and prioritized replay.

Bellemare et al. 2017, "A Distributional Perspective on Reinforcement Learning" (https://arxiv.org/abs/1707.06887).
Per action, a distribution over 51 fixed returns in [-10, 10]; the target distribution r + gamma^n z is
projected onto the atoms, and the loss is the cross-entropy to it (with `--prioritized`, also the priority).
DeepMind preprocessing (common/envs.py); the replay buffer stores each frame once.

    python algos/c51_atari.py --env-id ALE/Pong-v5
    python algos/c51_atari.py --env-id ALE/Breakout-v5 --n-step 3 --prioritized
    python algos/c51_atari.py --env-id ALE/Pong-v5 --n-envs 8 --sampler alternating-gpu --n-workers 4
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from common import distributed
from common.async_mode import ReplayFeeder
from common.config import AtariArgs, CommonArgs, QLearningArgs, UsageError, env_options, run, setup
from common.envs import make_env, require_discrete_actions
from common.kernels import categorical_projection, epsilon_greedy, linear_schedule, polyak_update
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
    n_atoms: int = 51
    """atoms of the return distribution"""
    v_min: float = -10.0
    """smallest return the distribution can represent (rewards are clipped to [-1, 1])"""
    v_max: float = 10.0
    """largest return the distribution can represent"""
    n_step: int = 1
    prioritized: bool = False
    """prioritized experience replay (priority: the cross-entropy loss of the transition)"""
    learning_rate: float = 2.5e-4
    adam_eps: float = 3.125e-4
    buffer_size: int = 1_000_000
    """replay capacity in transitions (frames are stored once: about 7 KB each)"""
    batch_size: int = 32
    replay_ratio: float = 0.25
    learning_starts: int = 80_000
    eval_epsilon: float = 0.001
    """probability of a random action in evaluation episodes (a greedy policy that never presses FIRE after a
    lost life would otherwise idle until the time limit)"""


class CategoricalAtariNetwork(nn.Module):
    """The Nature CNN giving, per action, the logits of a distribution over the fixed `atoms`."""

    def __init__(self, in_channels: int, n_actions: int, atoms: torch.Tensor):
        super().__init__()
        self.n_actions, self.n_atoms = n_actions, atoms.numel()
        self.register_buffer("atoms", atoms)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
            nn.Linear(512, n_actions * self.n_atoms),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, n_actions, n_atoms] for uint8 frame stacks [B, 4, 84, 84]."""
        logits = self.net(obs.float() / 255.0).view(-1, self.n_actions, self.n_atoms)
        return logits.log_softmax(-1)

    def q_values(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Expected returns [B, n_actions] of the distributions `log_probs`."""
        return (log_probs.exp() * self.atoms).sum(-1)


def policy_step(model: CategoricalAtariNetwork, obs, prev_action, prev_reward, rnn_state,
                deterministic: bool = False, epsilon: float = 0.0):
    """Epsilon-greedy on the expected returns (evaluation, deterministic, passes its small --eval-epsilon)."""
    def greedy():
        return model.q_values(model(obs)).argmax(-1)
    return epsilon_greedy(greedy, obs, model.n_actions, epsilon), None, None


def eval_policy_kwargs(args: Args) -> dict:
    """Keyword arguments of `policy_step` in evaluation (here and in common.evaluate): epsilon-greedy."""
    return {"epsilon": args.eval_epsilon}


def load_policy(args: Args, checkpoint: dict, device: torch.device):
    """The trained network and the evaluation env_fn (for common.evaluate)."""
    eval_env_fn = partial(make_env, args.env_id, training=False, **env_options(args))
    probe = eval_env_fn(args.seed)
    atoms = torch.linspace(args.v_min, args.v_max, args.n_atoms)
    model = CategoricalAtariNetwork(probe.observation_space.shape[0], int(probe.action_space.n), atoms)
    probe.close()
    model.load_state_dict(checkpoint["q_net"])
    return model.to(device), eval_env_fn


def categorical_loss(q_net: CategoricalAtariNetwork, target_net: CategoricalAtariNetwork, s):
    """Cross-entropy to the projected n-step target distribution; returns (loss, per-sample loss, mean Q)."""
    log_probs = q_net(s.observation)
    rows = torch.arange(log_probs.shape[0], device=log_probs.device)
    chosen = log_probs[rows, s.action.long()]
    with torch.no_grad():
        next_log_probs = target_net(s.bootstrap_observation)
        next_action = target_net.q_values(next_log_probs).argmax(-1)
        next_probs = next_log_probs[rows, next_action].exp()
        target = categorical_projection(next_probs, s.n_step_return, s.discount, target_net.atoms)
    cross_entropy = -(target * chosen).sum(-1)
    loss = (s.weight * cross_entropy).mean()
    q_mean = (chosen.detach().exp() * q_net.atoms).sum(-1).mean()
    return loss, cross_entropy.detach(), q_mean


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
    n_actions = require_discrete_actions(probe, "algos/c51_atari.py")
    obs_shape = probe.observation_space.shape
    probe.close()
    if len(obs_shape) != 3:
        raise UsageError(f"algos/c51_atari.py needs image observations [stack, H, W], {args.env_id} has shape "
                         f"{obs_shape}: use c51.py for vector observations")
    if args.n_atoms < 2 or args.v_min >= args.v_max:
        raise UsageError(f"need --n-atoms >= 2 and --v-min < --v-max, got {args.n_atoms}, {args.v_min}, {args.v_max}")

    atoms = torch.linspace(args.v_min, args.v_max, args.n_atoms)
    q_net = CategoricalAtariNetwork(obs_shape[0], n_actions, atoms).to(device)
    target_net = CategoricalAtariNetwork(obs_shape[0], n_actions, atoms).to(device)
    target_net.load_state_dict(q_net.state_dict())
    optimizer = torch.optim.Adam(q_net.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    loss_fn = torch.compile(categorical_loss) if args.compile else categorical_loss

    # What a checkpoint saves and --resume restores, with the counters and the RNG states.
    trained = dict(q_net=q_net, target_net=target_net, optimizer=optimizer)
    count, checkpoint = restore_checkpoint(args.resume, trained, device, init_from=args.init_from)
    feeder = ReplayFeeder(args, env_fn, policy_step, q_net, partial(make_replay, args), horizon=args.num_steps,
                          exploration=partial(exploration, args), checkpoint=checkpoint, trained=trained)
    replay, learning_starts = feeder.replay, feeder.learning_starts
    logger = RunLogger(args, "c51_atari", count)
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
                loss, per_sample_loss, q_mean = loss_fn(q_net, target_net, sample)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.all_reduce_gradients(q_net.parameters())  # data-parallel: the mean over ranks
                nn.utils.clip_grad_norm_(q_net.parameters(), args.max_grad_norm)
                optimizer.step()
                if args.prioritized:
                    replay.update_priorities(sample.index, per_sample_loss)
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
