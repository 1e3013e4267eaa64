"""C51: categorical distributional DQN for vector or Dict observations, with n-step returns, prioritized replay,
double Q-learning and dueling streams.

Bellemare et al. 2017, "A Distributional Perspective on Reinforcement Learning" (https://arxiv.org/abs/1707.06887).
The network outputs, per action, a distribution over `--n-atoms` fixed returns in [v_min, v_max]; the target
distribution r + gamma^n z is projected back onto the atoms and the loss is the cross-entropy to it
(which, with `--prioritized`, is also each transition's priority).

    python algos/c51.py --env-id CartPole-v1
    python algos/c51.py --env-id CartPole-v1 --n-step 3 --prioritized
    python algos/c51.py --env-id CartPole-v1 --double --dueling
    python algos/c51.py --n-envs 4 --sampler parallel-cpu --n-workers 2
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from common import distributed
from common.async_mode import ReplayFeeder
from common.config import CommonArgs, QLearningArgs, UsageError, run, setup
from common.envs import make_env, observation_example, require_discrete_actions
from common.kernels import categorical_projection, epsilon_greedy, linear_schedule, polyak_update
from common.logger import Evaluation, RunLogger, restore_checkpoint
from common.namedarraytuple import buffer_to
from common.networks import observation_encoder
from common.replay import PrioritizedReplayBuffer, UniformReplayBuffer


@dataclass
class Args(CommonArgs, QLearningArgs):
    # A flag without a docstring sets this script's default for a flag of common/config.py.
    n_envs: int = 4
    """training environments per data-parallel rank"""
    n_atoms: int = 51
    """atoms of the return distribution"""
    v_min: float = -100.0
    """smallest return the distribution can represent"""
    v_max: float = 200.0
    """largest return the distribution can represent (keep it clear of the best value: no mass piles up there)"""
    n_step: int = 1
    double: bool = False
    """double Q-learning: the online network picks the bootstrap action, the target network gives its distribution"""
    dueling: bool = False
    """dueling streams: logits = value [atoms] + advantage [actions, atoms] - its mean over actions"""
    prioritized: bool = False
    """prioritized experience replay (priority: the cross-entropy loss of the transition)"""
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


class CategoricalQNetwork(nn.Module):
    """MLP giving, per action, the logits of a distribution over the fixed `atoms` (dueling: from two streams)."""

    def __init__(self, example, n_actions: int, hidden: int, atoms: torch.Tensor, dueling: bool = False):
        super().__init__()
        self.n_actions, self.n_atoms, self.dueling = n_actions, atoms.numel(), dueling
        self.register_buffer("atoms", atoms)
        self.encoder, obs_dim = observation_encoder(example)  # a Dict observation: its leaves, concatenated
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, (n_actions + dueling) * self.n_atoms),
        )

    def logits(self, obs) -> torch.Tensor:
        """Logits [B, n_actions, n_atoms]; dueling: value + advantage - mean advantage, atom by atom."""
        out = self.net(self.encoder(obs)).view(-1, self.n_actions + self.dueling, self.n_atoms)
        if not self.dueling:
            return out
        value, advantage = out[:, :1], out[:, 1:]  # [B, 1, atoms], [B, n_actions, atoms]
        return value + advantage - advantage.mean(1, keepdim=True)

    def forward(self, obs) -> torch.Tensor:
        """Log-probabilities [B, n_actions, n_atoms] of observations [B, ...] (arrays or namedarraytuples)."""
        return self.logits(obs).log_softmax(-1)

    def q_values(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Expected returns [B, n_actions] of the distributions `log_probs`."""
        return (log_probs.exp() * self.atoms).sum(-1)


def policy_step(model: CategoricalQNetwork, obs, prev_action, prev_reward, rnn_state, deterministic: bool = False,
                epsilon: float = 0.0):
    """Epsilon-greedy on the expected returns (greedy when deterministic)."""
    def greedy():
        return model.q_values(model(obs)).argmax(-1)
    return epsilon_greedy(greedy, obs, model.n_actions, 0.0 if deterministic else epsilon), None, None


def load_policy(args: Args, checkpoint: dict, device: torch.device):
    """The trained network and the evaluation env_fn (for common.evaluate)."""
    eval_env_fn = partial(make_env, args.env_id, training=False)
    probe = eval_env_fn(args.seed)
    atoms = torch.linspace(args.v_min, args.v_max, args.n_atoms)
    model = CategoricalQNetwork(observation_example(probe.observation_space), int(probe.action_space.n),
                                args.hidden_size, atoms, args.dueling)
    probe.close()
    model.load_state_dict(checkpoint["q_net"])
    return model.to(device), eval_env_fn


def categorical_loss(q_net: CategoricalQNetwork, target_net: CategoricalQNetwork, s, double: bool):
    """Cross-entropy to the projected n-step target distribution; returns (loss, per-sample loss, mean Q)."""
    log_probs = q_net(s.observation)
    rows = torch.arange(log_probs.shape[0], device=log_probs.device)
    chosen = log_probs[rows, s.action.long()]
    with torch.no_grad():
        next_log_probs = target_net(s.bootstrap_observation)
        picker = q_net(s.bootstrap_observation) if double else next_log_probs  # double: the online network picks
        next_action = target_net.q_values(picker).argmax(-1)
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
    n_actions = require_discrete_actions(probe, "algos/c51.py")
    example = observation_example(probe.observation_space)
    if not isinstance(example, tuple) and example.ndim != 1:
        raise UsageError(f"algos/c51.py needs vector or Dict / Tuple observations, {args.env_id} has shape "
                         f"{example.shape}: use c51_atari.py for images")
    probe.close()
    if args.n_atoms < 2 or args.v_min >= args.v_max:
        raise UsageError(f"need --n-atoms >= 2 and --v-min < --v-max, got {args.n_atoms}, {args.v_min}, {args.v_max}")

    atoms = torch.linspace(args.v_min, args.v_max, args.n_atoms)
    q_net = CategoricalQNetwork(example, n_actions, args.hidden_size, atoms, args.dueling).to(device)
    target_net = CategoricalQNetwork(example, n_actions, args.hidden_size, atoms, args.dueling).to(device)
    target_net.load_state_dict(q_net.state_dict())
    optimizer = torch.optim.Adam(q_net.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    loss_fn = torch.compile(categorical_loss) if args.compile else categorical_loss

    # What a checkpoint saves and --resume restores, with the counters and the RNG states.
    trained = dict(q_net=q_net, target_net=target_net, optimizer=optimizer)
    count, checkpoint = restore_checkpoint(args.resume, trained, device, init_from=args.init_from)
    feeder = ReplayFeeder(args, env_fn, policy_step, q_net, partial(make_replay, args), horizon=args.num_steps,
                          exploration=partial(exploration, args), checkpoint=checkpoint, trained=trained)
    replay, learning_starts = feeder.replay, feeder.learning_starts
    logger = RunLogger(args, "c51", count)
    evaluation = Evaluation(args, eval_env_fn, policy_step, q_net, device, start_step=count.global_step)
    try:
        while count.global_step < args.total_timesteps:
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - count.global_step / args.total_timesteps)
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
                loss, per_sample_loss, q_mean = loss_fn(q_net, target_net, sample, args.double)
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
