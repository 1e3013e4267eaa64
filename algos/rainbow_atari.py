"""Rainbow for Atari: double + dueling + categorical (C51) + n-step + prioritized replay + noisy networks.

Hessel et al. 2018, "Rainbow: Combining Improvements in Deep Reinforcement Learning"
(https://arxiv.org/abs/1710.02298); noisy nets: Fortunato et al. 2018 (factorised Gaussian noise).
Exploration comes from the noisy layers, whose noise is drawn afresh at every forward pass: at every
sampler step and for each network of every update; evaluation uses the mean weights. There is no
epsilon-greedy exploration unless `--noisy-std 0` turns the noise off.

    python algos/rainbow_atari.py --env-id ALE/Pong-v5
    python algos/rainbow_atari.py --env-id ALE/Breakout-v5 --n-envs 8 --sampler alternating-gpu --n-workers 4
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import distributed
from common.async_mode import ReplayFeeder
from common.config import AtariArgs, CommonArgs, QLearningArgs, UsageError, env_options, run, setup
from common.envs import make_env, require_discrete_actions
from common.kernels import categorical_projection, epsilon_greedy, linear_schedule, polyak_update
from common.logger import Evaluation, RunLogger, restore_checkpoint
from common.namedarraytuple import buffer_to
from common.replay import PrioritizedFrameReplayBuffer


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
    noisy_std: float = 0.5
    """initial noise scale sigma_0 of the noisy layers (0: no noise, epsilon-greedy exploration instead)"""
    n_step: int = 3
    learning_rate: float = 6.25e-5
    adam_eps: float = 1.5e-4
    buffer_size: int = 1_000_000
    """replay capacity in transitions (frames are stored once: about 7 KB each)"""
    batch_size: int = 32
    replay_ratio: float = 0.25
    start_epsilon: float = 1.0
    """initial exploration rate (only with --noisy-std 0)"""
    end_epsilon: float = 0.01
    """final exploration rate (only with --noisy-std 0)"""
    exploration_fraction: float = 0.1
    """fraction of --total-timesteps over which epsilon decays linearly (only with --noisy-std 0)"""
    learning_starts: int = 80_000
    eval_epsilon: float = 0.001
    """probability of a random action in evaluation episodes (a greedy policy that never presses FIRE after a
    lost life would otherwise idle until the time limit)"""


class NoisyLinear(nn.Module):
    """Linear layer with factorised Gaussian noise on its weights, drawn afresh at every noisy forward pass."""

    def __init__(self, in_features: int, out_features: int, std_init: float):
        super().__init__()
        self.in_features, self.out_features, self.std_init = in_features, out_features, std_init
        bound = 1.0 / math.sqrt(in_features)
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.weight_sigma = nn.Parameter(torch.full((out_features, in_features), std_init * bound))
        self.bias_mu = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        self.bias_sigma = nn.Parameter(torch.full((out_features,), std_init * bound))

    def forward(self, x: torch.Tensor, noise: bool = True) -> torch.Tensor:
        if not noise or self.std_init == 0:
            return F.linear(x, self.weight_mu, self.bias_mu)
        # f(e) = sign(e) sqrt(|e|) of independent normals per input and per output: noise of rank one.
        epsilon = torch.randn(self.in_features + self.out_features, device=x.device, dtype=x.dtype)
        epsilon = epsilon.sign() * epsilon.abs().sqrt()
        epsilon_in, epsilon_out = epsilon[: self.in_features], epsilon[self.in_features:]
        # x (mu + sigma * outer(e_out, e_in))^T = x mu^T + ((x * e_in) sigma^T) * e_out: no [out, in] noise matrix.
        noisy = F.linear(x * epsilon_in, self.weight_sigma) * epsilon_out
        return F.linear(x, self.weight_mu, self.bias_mu + self.bias_sigma * epsilon_out) + noisy


class RainbowNetwork(nn.Module):
    """Nature CNN torso, noisy dueling streams, per-action log-probabilities over the fixed `atoms`."""

    def __init__(self, in_channels: int, n_actions: int, atoms: torch.Tensor, noisy_std: float):
        super().__init__()
        self.n_actions, self.n_atoms = n_actions, atoms.numel()
        self.register_buffer("atoms", atoms)
        self.torso = nn.Sequential(
            nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )
        self.value_hidden = NoisyLinear(3136, 512, noisy_std)
        self.value_out = NoisyLinear(512, self.n_atoms, noisy_std)
        self.advantage_hidden = NoisyLinear(3136, 512, noisy_std)
        self.advantage_out = NoisyLinear(512, n_actions * self.n_atoms, noisy_std)

    def forward(self, obs: torch.Tensor, noise: bool = True) -> torch.Tensor:
        """Log-probabilities [B, n_actions, n_atoms] for uint8 frame stacks [B, 4, 84, 84]."""
        features = self.torso(obs.float() / 255.0)
        value = self.value_out(F.relu(self.value_hidden(features, noise)), noise).unsqueeze(1)
        advantage = self.advantage_out(F.relu(self.advantage_hidden(features, noise)), noise)
        advantage = advantage.view(-1, self.n_actions, self.n_atoms)
        logits = value + advantage - advantage.mean(1, keepdim=True)
        return logits.log_softmax(-1)

    def q_values(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Expected returns [B, n_actions] of the distributions `log_probs`."""
        return (log_probs.exp() * self.atoms).sum(-1)


def policy_step(model: RainbowNetwork, obs, prev_action, prev_reward, rnn_state, deterministic: bool = False,
                epsilon: float = 0.0):
    """Greedy action of a fresh noise sample (of the mean weights when deterministic); epsilon-greedy if asked."""
    q = model.q_values(model(obs, noise=not deterministic))  # the noise is drawn before the exploration coins
    return epsilon_greedy(lambda: q.argmax(-1), obs, model.n_actions, epsilon), None, None


def eval_policy_kwargs(args: Args) -> dict:
    """Keyword arguments of `policy_step` in evaluation (here and in common.evaluate): epsilon-greedy."""
    return {"epsilon": args.eval_epsilon}


def load_policy(args: Args, checkpoint: dict, device: torch.device):
    """The trained network and the evaluation env_fn (for common.evaluate)."""
    eval_env_fn = partial(make_env, args.env_id, training=False, **env_options(args))
    probe = eval_env_fn(args.seed)
    atoms = torch.linspace(args.v_min, args.v_max, args.n_atoms)
    model = RainbowNetwork(probe.observation_space.shape[0], int(probe.action_space.n), atoms, args.noisy_std)
    probe.close()
    model.load_state_dict(checkpoint["q_net"])
    return model.to(device), eval_env_fn


def rainbow_loss(q_net: RainbowNetwork, target_net: RainbowNetwork, s):
    """Double-Q categorical cross-entropy to the projected n-step target; returns (loss, per-sample loss, mean Q).

    Each network draws one noise sample: the online network picks the bootstrap action with the noise it trains.
    """
    n = s.observation.shape[0]
    both = q_net(torch.cat([s.observation, s.bootstrap_observation]))
    log_probs, next_log_probs = both[:n], both[n:].detach()
    rows = torch.arange(n, device=log_probs.device)
    chosen = log_probs[rows, s.action.long()]
    with torch.no_grad():
        next_action = q_net.q_values(next_log_probs).argmax(-1)  # double: online picks
        next_probs = target_net(s.bootstrap_observation)[rows, next_action].exp()  # target evaluates
        target = categorical_projection(next_probs, s.n_step_return, s.discount, target_net.atoms)
    cross_entropy = -(target * chosen).sum(-1)
    loss = (s.weight * cross_entropy).mean()
    q_mean = (chosen.detach().exp() * q_net.atoms).sum(-1).mean()
    return loss, cross_entropy.detach(), q_mean


def exploration(args: Args, step: int) -> dict:
    """Policy keyword arguments at step `step`: epsilon 0 (the noisy layers explore), decaying with --noisy-std 0."""
    if args.noisy_std != 0:
        return {"epsilon": 0.0}
    return {"epsilon": linear_schedule(args.start_epsilon, args.end_epsilon,
                                       args.exploration_fraction * args.total_timesteps, step)}


def make_replay(args: Args, example, share_memory: bool = False) -> PrioritizedFrameReplayBuffer:
    """The prioritized frame replay buffer (shared memory when a sampling process fills it)."""
    return PrioritizedFrameReplayBuffer(
        example, size=args.buffer_size, n_envs=args.n_envs, n_step=args.n_step, gamma=args.gamma,
        frame_padding="repeat", alpha=args.priority_alpha, beta=args.priority_beta, share_memory=share_memory,
    )


def main(args: Args) -> dict:
    device = setup(args)
    env_fn = partial(make_env, args.env_id, training=True, **env_options(args))
    eval_env_fn = partial(make_env, args.env_id, training=False, **env_options(args))
    probe = env_fn(args.seed)
    n_actions = require_discrete_actions(probe, "algos/rainbow_atari.py")
    obs_shape = probe.observation_space.shape
    probe.close()
    if len(obs_shape) != 3:
        raise UsageError(f"algos/rainbow_atari.py needs image observations [stack, H, W], {args.env_id} has "
                         f"shape {obs_shape}: use c51.py or dqn.py for vector observations")
    if args.n_atoms < 2 or args.v_min >= args.v_max:
        raise UsageError(f"need --n-atoms >= 2 and --v-min < --v-max, got {args.n_atoms}, {args.v_min}, {args.v_max}")
    if args.noisy_std < 0:
        raise UsageError(f"--noisy-std must be >= 0, got {args.noisy_std}")

    atoms = torch.linspace(args.v_min, args.v_max, args.n_atoms)
    q_net = RainbowNetwork(obs_shape[0], n_actions, atoms, args.noisy_std).to(device)
    target_net = RainbowNetwork(obs_shape[0], n_actions, atoms, args.noisy_std).to(device)
    target_net.load_state_dict(q_net.state_dict())
    optimizer = torch.optim.Adam(q_net.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    loss_fn = torch.compile(rainbow_loss) if args.compile else rainbow_loss

    # What a checkpoint saves and --resume restores, with the counters and the RNG states.
    trained = dict(q_net=q_net, target_net=target_net, optimizer=optimizer)
    count, checkpoint = restore_checkpoint(args.resume, trained, device, init_from=args.init_from)
    feeder = ReplayFeeder(args, env_fn, policy_step, q_net, partial(make_replay, args), horizon=args.num_steps,
                          exploration=partial(exploration, args), checkpoint=checkpoint, trained=trained)
    replay, learning_starts = feeder.replay, feeder.learning_starts
    logger = RunLogger(args, "rainbow_atari", count)
    evaluation = Evaluation(args, eval_env_fn, policy_step, q_net, device, start_step=count.global_step,
                            **eval_policy_kwargs(args))
    try:
        while count.global_step < args.total_timesteps:
            epsilon = exploration(args, count.global_step)["epsilon"]  # logged: the epsilon the new steps start from
            count.global_step, episodes = feeder.collect()  # async: the steps the sampling process made meanwhile
            logger.log_episodes(count.global_step, episodes)
            beta = args.priority_beta + (1 - args.priority_beta) * min(count.global_step / args.total_timesteps, 1)
            for _ in count.updates_due(args.replay_ratio, learning_starts):  # none in the warm-up
                sample = buffer_to(replay.sample(args.batch_size, beta=beta), device)
                loss, per_sample_loss, q_mean = loss_fn(q_net, target_net, sample)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.all_reduce_gradients(q_net.parameters())  # data-parallel: the mean over ranks
                nn.utils.clip_grad_norm_(q_net.parameters(), args.max_grad_norm)
                optimizer.step()
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
