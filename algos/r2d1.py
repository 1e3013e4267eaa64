"""R2D1: recurrent DQN with sequence replay, stored recurrent state, burn-in and value rescaling.

Kapturowski et al. 2019, "Recurrent Experience Replay in Distributed Reinforcement Learning" (R2D2,
https://openreview.net/forum?id=r1lyTjAqYX), in one process: an LSTM fed the observation's features, the
previous action (one-hot) and the previous reward; replay of fixed-length sequences that start from the
recurrent state the actor had (stored with them) and first unroll `--burn-in` steps without training on
them; double Q-learning on n-step targets under the value rescaling h(x) = sign(x)(sqrt(|x|+1)-1) + eps x;
sequences prioritized by eta max|td| + (1 - eta) mean|td|; optional dueling Q heads. Image observations
[stack, H, W] get the Nature CNN torso (and the frame-deduplicated buffer), vector observations an MLP (as do
Dict observations, their leaves encoded and concatenated).

    python algos/r2d1.py --env-id tests.memory_envs:CartPoleNoVelocity-v0 --total-timesteps 200000
    python algos/r2d1.py --env-id ALE/Pong-v5 --total-timesteps 10000000 --n-envs 16 --lstm-size 512 \\
        --burn-in 40 --train-length 40 --sequence-period 40 --n-step 5 --gamma 0.997 --learning-rate 1e-4 \\
        --adam-eps 1e-3 --batch-size 64 --replay-ratio 0.002 --buffer-size 1000000 --learning-starts 50000 \\
        --target-network-period 2500 --sampler alternating-gpu
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
from common.envs import is_atari, make_env, observation_example, require_discrete_actions
from common.kernels import (
    epsilon_greedy,
    inverse_value_rescale,
    linear_schedule,
    n_step_returns,
    polyak_update,
    value_rescale,
)
from common.logger import Evaluation, RunLogger, restore_checkpoint
from common.namedarraytuple import buffer_to, namedarraytuple
from common.networks import observation_encoder
from common.replay import PrioritizedFrameSequenceReplayBuffer, PrioritizedSequenceReplayBuffer


@dataclass
class Args(CommonArgs, AtariArgs, QLearningArgs):
    # A flag without a docstring sets this script's default for a flag of common/config.py.
    n_envs: int = 8
    """training environments per data-parallel rank"""
    num_steps: int = 20
    hidden_size: int = 64
    """width of the MLP torso and of the Q head (vector observations)"""
    lstm_size: int = 64
    """LSTM units (512 in R2D2 on Atari)"""
    dueling: bool = False
    """dueling Q head: Q = V + A - (mean of A over actions), from one layer's 1 + n_actions outputs"""
    burn_in: int = 10
    """steps unrolled from the stored state, without loss, before the trained part of each sequence"""
    train_length: int = 20
    """steps of each sequence that get a loss"""
    sequence_period: int = 10
    """steps between the starts of consecutive sequences (they overlap when < --train-length)"""
    n_step: int = 3
    value_rescale_eps: float = 1e-3
    """eps of the value rescaling h (in the targets); 0 for the plain square-root rescaling"""
    priority_alpha: float = 0.9
    """prioritization exponent"""
    priority_beta: float = 0.6
    """importance-sampling exponent"""
    priority_eta: float = 0.9
    """sequence priority: eta * max|td| + (1 - eta) * mean|td|"""
    adam_eps: float = 1e-3
    buffer_size: int = 100_000
    """replay capacity in environment steps"""
    batch_size: int = 32
    """sequences per gradient update"""
    replay_ratio: float = 0.0125
    target_network_period: int = 50
    end_epsilon: float = 0.02
    exploration_fraction: float = 0.2
    learning_starts: int = 5_000
    max_grad_norm: float = 40.0
    eval_epsilon: float | None = None
    """random-action probability in evaluation, so no episode idles to its time limit (auto: 0.001 Atari, else 0)"""


RnnState = namedarraytuple("RnnState", ["h", "c"])
AgentInfo = namedarraytuple("AgentInfo", ["rnn_state"])  # the state before the step, for sequence replay


class R2D1Network(nn.Module):
    """Torso (CNN for images, MLP for vectors) -> LSTM(features, one-hot previous action, previous reward) -> Q."""

    def __init__(self, example, n_actions: int, hidden: int, lstm_size: int, sign_reward=False, dueling=False):
        super().__init__()
        self.n_actions, self.lstm_size, self.sign_reward, self.dueling = n_actions, lstm_size, sign_reward, dueling
        self.image = is_frame_stack(example)
        if self.image:
            self.torso = nn.Sequential(  # the Nature CNN
                nn.Conv2d(example.shape[0], 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
            )
        else:  # a Dict observation: its leaves, encoded and concatenated
            self.encoder, obs_dim = observation_encoder(example)
            self.torso = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU())
        width = 512 if self.image else hidden  # of the torso's output and of the Q head's hidden layer
        self.lstm = nn.LSTMCell(width + n_actions + 1, lstm_size)
        self.head = nn.Sequential(nn.Linear(lstm_size, width), nn.ReLU(), nn.Linear(width, n_actions + dueling))

    def inputs(self, obs, prev_action: torch.Tensor, prev_reward: torch.Tensor) -> torch.Tensor:
        """LSTM inputs [..., F] for observations, previous actions / rewards [...] (signs only with `sign_reward`)."""
        lead = prev_reward.shape
        if self.image:
            obs = obs.reshape(-1, *obs.shape[len(lead):]).float() / 255.0
        else:
            obs = self.encoder(obs).reshape(-1, self.encoder.out_features)
        features = self.torso(obs)
        features = features.view(*lead, features.shape[-1])
        one_hot = F.one_hot(prev_action.long(), self.n_actions).to(features.dtype)
        prev_reward = prev_reward.sign() if self.sign_reward else prev_reward
        return torch.cat([features, one_hot, prev_reward.unsqueeze(-1).to(features.dtype)], -1)

    def initial_state(self, batch: int, device: torch.device) -> RnnState:
        return RnnState(*torch.zeros(2, batch, self.lstm_size, device=device))

    def forward(self, obs, prev_action, prev_reward, rnn_state: RnnState) -> tuple[torch.Tensor, RnnState]:
        """One step for a batch [B]: Q-values [B, n_actions] and the next state."""
        h, c = self.lstm(self.inputs(obs, prev_action, prev_reward), tuple(rnn_state))
        return self.q_values(h), RnnState(h, c)

    def q_values(self, h: torch.Tensor) -> torch.Tensor:
        """Q-values [..., n_actions] of LSTM outputs h [..., lstm_size]; dueling: V + A - mean over actions of A."""
        out = self.head(h)
        return out[..., :1] + out[..., 1:] - out[..., 1:].mean(-1, keepdim=True) if self.dueling else out


def is_frame_stack(example) -> bool:
    """Whether observations shaped like `example` are frame stacks [stack, H, W] (not vectors or Dicts)."""
    return not isinstance(example, tuple) and example.ndim == 3


def policy_step(model: R2D1Network, obs, prev_action, prev_reward, rnn_state, deterministic: bool = False,
                epsilon: float = 0.0):
    """Epsilon-greedy action (evaluation, deterministic, passes --eval-epsilon); agent_info keeps the state the
    step started from."""
    if rnn_state is None:
        rnn_state = model.initial_state(prev_reward.shape[0], prev_reward.device)
    q, next_state = model(obs, prev_action, prev_reward, rnn_state)
    action = epsilon_greedy(lambda: q.argmax(-1), obs, model.n_actions, epsilon)
    return action, AgentInfo(rnn_state), next_state


def eval_policy_kwargs(args: Args) -> dict:
    """Keyword arguments of `policy_step` in evaluation (here and in common.evaluate)."""
    auto = 0.001 if is_atari(args.env_id) else 0.0
    return {"epsilon": auto if args.eval_epsilon is None else args.eval_epsilon}


def load_policy(args: Args, checkpoint: dict, device: torch.device):
    """The trained network and the evaluation env_fn (for common.evaluate)."""
    eval_env_fn = partial(make_env, args.env_id, training=False, **env_options(args))
    probe = eval_env_fn(args.seed)
    model = R2D1Network(observation_example(probe.observation_space), int(probe.action_space.n), args.hidden_size,
                        args.lstm_size, is_atari(args.env_id), args.dueling)
    probe.close()
    model.load_state_dict(checkpoint["q_net"])
    return model.to(device), eval_env_fn


def unroll(model: R2D1Network, s, burn_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LSTM states [L, N, H] (h and c after each step) from the stored state; no gradient through burn-in.

    The state is zeroed after every step that ended an episode, as the actor's was.
    """
    ended = (s.terminated | s.truncated).unsqueeze(-1)
    h, c = s.rnn_state.h, s.rnn_state.c
    hs, cs = [], []
    with torch.no_grad():
        burn_in_inputs = model.inputs(s.observation[:burn_in], s.prev_action[:burn_in], s.prev_reward[:burn_in])
    inputs = model.inputs(s.observation[burn_in:], s.prev_action[burn_in:], s.prev_reward[burn_in:])
    for t in range(s.reward.shape[0]):
        if t > 0:
            h, c = h.masked_fill(ended[t - 1], 0.0), c.masked_fill(ended[t - 1], 0.0)
        if t < burn_in:
            with torch.no_grad():
                h, c = model.lstm(burn_in_inputs[t], (h, c))
        else:
            h, c = model.lstm(inputs[t - burn_in], (h, c))
        hs.append(h)
        cs.append(c)
    return torch.stack(hs), torch.stack(cs)


def next_q_values(model: R2D1Network, s, q: torch.Tensor, hs: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """Q-values [L, N, A] of the true next observation of every step, given the unroll's Q-values and states.

    Inside an episode, the next step's Q; after a truncation, the Q of the final observation fed with the state after
    the last step (the few such steps are gathered). Unused after a termination and at the last step (never trained).
    """
    next_q = torch.cat([q[1:], q[-1:]])
    t, n = s.truncated.nonzero(as_tuple=True)  # syncs on a GPU, as the priority update does anyway
    h, _ = model.lstm(model.inputs(s.next_observation[t, n], s.action[t, n], s.reward[t, n]), (hs[t, n], cs[t, n]))
    next_q[t, n] = model.q_values(h)
    return next_q


def r2d1_loss(q_net: R2D1Network, target_net: R2D1Network, s, burn_in: int, train_length: int, n_step: int,
              gamma: float, rescale_eps: float):
    """Double-Q n-step loss on value-rescaled targets over the trained steps; returns (loss, |td| [T', N], mean Q)."""
    trained = slice(burn_in, burn_in + train_length)
    hs, cs = unroll(q_net, s, burn_in)
    q_all = q_net.q_values(hs)
    q = q_all[trained].gather(-1, s.action[trained].long().unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        online_next = next_q_values(q_net, s, q_all.detach(), hs.detach(), cs.detach())
        target_hs, target_cs = unroll(target_net, s, s.reward.shape[0])
        target_next = next_q_values(target_net, s, target_net.q_values(target_hs), target_hs, target_cs)
        next_action = online_next.argmax(-1, keepdim=True)
        next_value = inverse_value_rescale(target_next.gather(-1, next_action).squeeze(-1), rescale_eps)
        returns, discount, last = n_step_returns(s.reward, s.terminated, s.truncated, n_step, gamma)
        target = value_rescale(returns + discount * next_value.gather(0, last), rescale_eps)[trained]
    td_error = target - q
    loss = (s.weight * 0.5 * td_error.pow(2).mean(0)).mean()
    return loss, td_error.abs().detach(), q.mean().detach()


def exploration(args: Args, step: int) -> dict:
    """Policy keyword arguments at environment step `step`: the linearly decaying epsilon."""
    return {"epsilon": linear_schedule(args.start_epsilon, args.end_epsilon,
                                       args.exploration_fraction * args.total_timesteps, step)}


def make_replay(args: Args, example, share_memory: bool = False):
    """Prioritized sequence replay (frame-deduplicated for images) storing the actor's LSTM states."""
    image = is_frame_stack(example.observation)
    replay_cls = PrioritizedFrameSequenceReplayBuffer if image else PrioritizedSequenceReplayBuffer
    try:
        return replay_cls(example, size=args.buffer_size, n_envs=args.n_envs, burn_in=args.burn_in,
                          train_length=args.train_length, n_step=args.n_step, gamma=args.gamma,
                          rnn_state_example=example.agent_info.rnn_state, rnn_state_interval=args.sequence_period,
                          alpha=args.priority_alpha, beta=args.priority_beta, eta=args.priority_eta,
                          share_memory=share_memory, **({"frame_padding": "repeat"} if image else {}))
    except ValueError as error:
        raise UsageError(f"--buffer-size {args.buffer_size}: {error}") from None


def append_sequences(replay, batch) -> None:
    """Store a batch with the LSTM states the actor had before each step."""
    replay.append(batch, batch.agent_info.rnn_state)


def main(args: Args) -> dict:
    device = setup(args)
    env_fn = partial(make_env, args.env_id, training=True, **env_options(args))
    eval_env_fn = partial(make_env, args.env_id, training=False, **env_options(args))
    probe = env_fn(args.seed)
    n_actions = require_discrete_actions(probe, "algos/r2d1.py")
    example = observation_example(probe.observation_space)
    probe.close()
    if not isinstance(example, tuple) and example.ndim not in (1, 3):
        raise UsageError(f"algos/r2d1.py needs vector, Dict / Tuple or [stack, H, W] observations; {args.env_id} has "
                         f"{example.shape}")

    network = partial(R2D1Network, example, n_actions, args.hidden_size, args.lstm_size, is_atari(args.env_id),
                      args.dueling)
    q_net, target_net = network().to(device), network().to(device)
    target_net.load_state_dict(q_net.state_dict())
    optimizer = torch.optim.Adam(q_net.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    loss_fn = torch.compile(r2d1_loss) if args.compile else r2d1_loss

    # What a checkpoint saves and --resume restores, with the counters and the RNG states.
    trained = dict(q_net=q_net, target_net=target_net, optimizer=optimizer)
    count, checkpoint = restore_checkpoint(args.resume, trained, device, init_from=args.init_from)
    feeder = ReplayFeeder(args, env_fn, policy_step, q_net, partial(make_replay, args), horizon=args.num_steps,
                          exploration=partial(exploration, args), checkpoint=checkpoint,
                          append=append_sequences, trained=trained)
    replay, learning_starts = feeder.replay, feeder.learning_starts
    logger = RunLogger(args, "r2d1", count)
    evaluation = Evaluation(args, eval_env_fn, policy_step, q_net, device, start_step=count.global_step,
                            **eval_policy_kwargs(args))
    try:
        while count.global_step < args.total_timesteps:
            epsilon = exploration(args, count.global_step)["epsilon"]  # logged: the epsilon the new steps start from
            count.global_step, episodes = feeder.collect()  # async: the steps the sampling process made meanwhile
            logger.log_episodes(count.global_step, episodes)
            for _ in count.updates_due(args.replay_ratio, learning_starts):  # none in the warm-up
                sample = buffer_to(replay.sample(args.batch_size), device)
                loss, td_abs, q_mean = loss_fn(q_net, target_net, sample, args.burn_in, args.train_length,
                                               args.n_step, args.gamma, args.value_rescale_eps)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.all_reduce_gradients(q_net.parameters())  # data-parallel: the mean over ranks
                nn.utils.clip_grad_norm_(q_net.parameters(), args.max_grad_norm)
                optimizer.step()
                replay.update_priorities(sample.index, td_abs)
                count.n_updates += 1
                if count.n_updates % args.target_network_period == 0:
                    polyak_update(target_net.parameters(), q_net.parameters(), args.tau)
                if count.n_updates % 10 == 0:
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
