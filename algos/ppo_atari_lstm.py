"""Recurrent PPO: clipped PPO with GAE and an LSTM fed torso features, the previous action and reward.

Schulman et al. 2017 (https://arxiv.org/abs/1707.06347) with a recurrent policy as in Mnih et al. 2016's
A3C-LSTM. The torso is the Nature-DQN CNN for Atari frame stacks ([4, 84, 84] uint8, scaled by 1/255) and a
small MLP for vector observations (and the encoded, concatenated leaves of Dict ones), so memory tasks run on
a CPU. Discrete actions take a categorical head (the previous action enters the LSTM one-hot); Box actions a
diagonal Gaussian with a state-independent log-std, as in ppo.py (the previous action enters as sampled).

Training re-runs whole environment sequences: a minibatch is a subset of the environments (all T steps of
each), started from the rnn state stored at the start of the batch, with the state zeroed at every step
where an episode ended inside the sequence, exactly as the sampler did while collecting.

Flags left at `None` ("auto") take the preset of the observation kind, resolved in config.json: images the
Atari one (lr 2.5e-4, clip 0.1, LSTM 128), vectors a small one with observation and reward normalisation.
The entropy bonus is 0.01 for discrete actions and 0 for continuous ones. Any flag overrides its preset.

    python algos/ppo_atari_lstm.py --env-id ALE/Pong-v5 --sampler parallel-cpu --n-workers 8 --n-envs 16
    python algos/ppo_atari_lstm.py --env-id tests.memory_envs:CartPoleNoVelocity-v0 --total-timesteps 300000
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Categorical, Independent, Normal

from common import distributed
from common.config import AtariArgs, CommonArgs, PPOArgs, UsageError, env_options, run, setup
from common.envs import make_env, observation_example
from common.kernels import explained_variance, gae_advantages
from common.logger import Evaluation, RunLogger, restore_checkpoint
from common.namedarraytuple import buffer_map, buffer_to, namedarraytuple
from common.networks import NatureCNN, layer_init, observation_encoder
from common.normalization import ObservationNormalizer, RewardScaler, RunningMeanStd
from common.samplers import make_sampler


@dataclass
class Args(CommonArgs, AtariArgs, PPOArgs):
    # A flag without a docstring sets this script's default for a flag of common/config.py.
    env_id: str = "ALE/Breakout-v5"
    """Atari id (ALE/<Game>-v5, <Game>NoFrameskip-v4) or a vector-observation env (discrete or Box actions)"""
    total_timesteps: int = 10_000_000
    """environment steps (Atari: agent steps, 4 frames each) to train for, summed over all environments"""
    n_envs: int = 8
    """training environments per data-parallel rank (a multiple of --num-minibatches)"""
    num_steps: int = 128
    """environment steps per environment per rollout (the length of the training sequences)"""
    learning_rate: float | None = None
    """Adam learning rate (auto: 2.5e-4 images, 1e-3 vectors)"""
    num_minibatches: int = 4
    """minibatches per epoch, each a subset of the environments"""
    clip_coef: float | None = None
    """policy ratio clipping (auto: 0.1 images, 0.2 vectors)"""
    ent_coef: float | None = None
    """entropy bonus coefficient (auto: 0.01 discrete actions, 0 continuous)"""
    lstm_size: int | None = None
    """LSTM hidden units (auto: 128 images, 64 vectors)"""
    norm_obs: bool | None = None
    """normalise observations by running statistics kept in the model (auto: on for vectors)"""
    norm_reward: bool | None = None
    """scale rewards by the std of a running discounted return (auto: on for vectors; Atari clips them)"""
    hidden_size: int = 64
    """width of the MLP torso (vector observations)"""
    eval_epsilon: float | None = None
    """probability of a random action in evaluation episodes (auto: 0.001 images, so that a greedy policy that
    never presses FIRE after a lost life cannot idle until the time limit; 0 vectors; discrete actions only)"""


# The values of the "auto" (None) fields, by observation kind.
PRESETS = {
    "image": dict(learning_rate=2.5e-4, clip_coef=0.1, lstm_size=128, norm_obs=False, norm_reward=False,
                  eval_epsilon=0.001),
    "vector": dict(learning_rate=1e-3, clip_coef=0.2, lstm_size=64, norm_obs=True, norm_reward=True,
                   eval_epsilon=0.0),
}


def resolve_presets(args: Args, kind: str, continuous: bool = False) -> None:
    """Fill the "auto" (None) fields from the preset of the observation kind ("image" or "vector") and actions."""
    for name, value in {**PRESETS[kind], "ent_coef": 0.0 if continuous else 0.01}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if continuous and args.eval_epsilon:
        raise UsageError(f"--eval-epsilon {args.eval_epsilon}: random evaluation actions are for discrete "
                         "actions; leave it at 0 for a continuous action space")
    if kind == "image" and args.norm_obs:
        raise UsageError("--norm-obs standardises vector observations; Atari frames are uint8 pixels that the "
                         "network scales itself: drop --norm-obs")


def observation_kind(example) -> str:
    """The preset of observations shaped like `example`: "image" for frame stacks, "vector" for vectors and Dicts."""
    return "vector" if isinstance(example, tuple) or example.ndim == 1 else "image"


RnnState = namedarraytuple("RnnState", ["h", "c"])
AgentInfo = namedarraytuple("AgentInfo", ["log_prob", "value", "rnn_state"])  # rnn_state: before the step


class RecurrentActorCritic(nn.Module):
    def __init__(self, example, action_space: gym.Space, hidden_size: int, lstm_size: int, norm_obs: bool = False):
        super().__init__()
        self.image, self.continuous = observation_kind(example) == "image", isinstance(action_space, gym.spaces.Box)
        self.n_actions = n_actions = int(np.prod(action_space.shape)) if self.continuous else int(action_space.n)
        if not norm_obs:
            self.obs_norm = nn.Identity()
        elif isinstance(example, tuple):  # a Dict observation: statistics per float leaf
            self.obs_norm = ObservationNormalizer(example)
        else:
            self.obs_norm = RunningMeanStd(example.shape)
        n_features = 512 if self.image else hidden_size
        if self.image:
            self.torso = NatureCNN(example.shape[0])
        else:  # a Dict observation: its leaves, encoded and concatenated
            self.encoder, obs_dim = observation_encoder(example)
            self.torso = nn.Sequential(layer_init(nn.Linear(obs_dim, hidden_size)), nn.Tanh())
        self.lstm = nn.LSTM(n_features + n_actions + 1, lstm_size)
        for name, param in self.lstm.named_parameters():
            nn.init.constant_(param, 0.0) if "bias" in name else nn.init.orthogonal_(param, 1.0)
        self.actor = layer_init(nn.Linear(lstm_size, n_actions), std=0.01)
        self.critic = layer_init(nn.Linear(lstm_size, 1), std=1.0)
        if self.continuous:
            self.log_std = nn.Parameter(torch.zeros(n_actions))

    def initial_state(self, batch_size: int, device: torch.device) -> RnnState:
        zeros = torch.zeros(batch_size, self.lstm.hidden_size, device=device)
        return RnnState(zeros, zeros.clone())

    def forward(self, obs, prev_action, prev_reward, state: RnnState, reset: torch.Tensor | None = None,
                reset_steps: list[int] = ()):
        """Unroll obs [T, B, ...], prev_action, prev_reward [T, B] from state [B, H]; returns (the actor's output
        [T, B, A]: logits or Gaussian means, value [T, B], the state after the last step). `reset[t]` ([T, B] bool)
        zeroes the state before step t; `reset_steps` lists, on the host, the steps where some env may reset.
        Between two of them the LSTM runs the whole segment in one call (10x faster than a loop over steps).
        """
        T, B = prev_action.shape[:2]
        obs = self.obs_norm(buffer_map(lambda leaf: leaf.flatten(0, 1), obs))
        features = self.torso(obs if self.image else self.encoder(obs)).view(T, B, -1)
        # Atari trains on sign-clipped rewards and evaluates on raw scores: the network sees their sign.
        prev_reward = prev_reward.sign() if self.image else prev_reward
        prev_action = prev_action.float() if self.continuous else F.one_hot(prev_action.long(), self.n_actions).float()
        x = torch.cat([features, prev_action.view(T, B, -1), prev_reward.unsqueeze(-1).float()], -1)
        h, c = state.h[None], state.c[None]
        bounds = [0, *(t for t in reset_steps if 0 < t < T), T]
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if reset is not None:
                keep = (~reset[start]).float()[None, :, None]
                h, c = h * keep, c * keep
            out, (h, c) = self.lstm(x[start:end], (h, c))
            outputs.append(out)
        out = torch.cat(outputs)
        return self.actor(out), self.critic(out).squeeze(-1), RnnState(h[0], c[0])

    def distribution(self, out: torch.Tensor):
        if self.continuous:
            # One distribution over the action vector: log_prob and entropy sum over its dimensions.
            return Independent(Normal(out, self.log_std.exp().expand_as(out), validate_args=False), 1,
                               validate_args=False)
        return Categorical(logits=out, validate_args=False)


def policy_step(model: RecurrentActorCritic, obs, prev_action, prev_reward, rnn_state, deterministic: bool = False,
                epsilon: float = 0.0):
    """One step of a batch of envs (`epsilon`: uniform random discrete actions); agent_info keeps the state before."""
    if rnn_state is None:
        rnn_state = model.initial_state(prev_reward.shape[0], prev_reward.device)
    out, value, next_state = model(obs[None], prev_action[None], prev_reward[None], rnn_state)
    dist = model.distribution(out[0])
    action = (dist.mean if model.continuous else dist.probs.argmax(-1)) if deterministic else dist.sample()
    if epsilon > 0:
        explore = torch.rand(action.shape, device=action.device) < epsilon
        action = torch.where(explore, torch.randint_like(action, out.shape[-1]), action)
    return action, AgentInfo(dist.log_prob(action), value[0], rnn_state), next_state


def eval_policy_kwargs(args: Args) -> dict:
    """Keyword arguments of `policy_step` in evaluation (here and in common.evaluate): epsilon-greedy."""
    return {"epsilon": args.eval_epsilon}


def load_policy(args: Args, checkpoint: dict, device: torch.device):
    """The trained model (with its observation statistics) and the evaluation env_fn, for common.evaluate."""
    eval_env_fn = partial(make_env, args.env_id, training=False, clip_actions=True, **env_options(args))
    probe = eval_env_fn(args.seed)
    example = observation_example(probe.observation_space)
    resolve_presets(args, observation_kind(example), isinstance(probe.action_space, gym.spaces.Box))
    model = RecurrentActorCritic(example, probe.action_space, args.hidden_size, args.lstm_size, args.norm_obs)
    probe.close()
    model.load_state_dict(checkpoint["model"])
    return model.to(device), eval_env_fn


def next_values(model: RecurrentActorCritic, batch) -> torch.Tensor:
    """Value [T, B] of each step's true next observation, what GAE bootstraps from: inside an episode the next
    step's value; at the batch end and where an episode was truncated, the value of `next_observation` (the
    final observation, not the reset one) after the stored pre-step rnn state is advanced through the step,
    with the step's action and reward as the previous ones, as the episode would have continued."""
    value = batch.agent_info.value
    needs_bootstrap = batch.truncated.clone()
    needs_bootstrap[-1] = True
    where = needs_bootstrap.nonzero(as_tuple=True)
    step = batch[where]
    _, _, after = model(step.observation[None], step.prev_action[None], step.prev_reward[None],
                        step.agent_info.rnn_state)
    _, bootstrap, _ = model(step.next_observation[None], step.action[None], step.reward[None], after)
    next_value = torch.cat([value[1:], torch.zeros_like(value[:1])])
    next_value[where] = bootstrap[0]
    return next_value


def ppo_loss(log_prob, entropy, value, old_log_prob, advantage, returns, old_value, args: Args):
    """Clipped surrogate + (clipped) value loss - entropy bonus of re-run [T, b] sequences; returns (loss, stats).
    `--compile` compiles this, not the model, whose segments vary by batch."""
    entropy = entropy.mean()
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
    env_fn = partial(make_env, args.env_id, training=True, clip_actions=True, **env_options(args))
    eval_env_fn = partial(make_env, args.env_id, training=False, clip_actions=True, **env_options(args))
    probe = env_fn(args.seed)
    action_space, example = probe.action_space, observation_example(probe.observation_space)
    probe.close()
    continuous = isinstance(action_space, gym.spaces.Box)
    if not (isinstance(action_space, gym.spaces.Discrete) or (continuous and len(action_space.shape) == 1)):
        raise UsageError(f"algos/ppo_atari_lstm.py needs discrete actions or a 1-D Box of continuous ones, "
                         f"{args.env_id} has {action_space}")
    if not isinstance(example, tuple) and example.shape[1:] != (84, 84) and example.ndim != 1:
        raise UsageError(f"algos/ppo_atari_lstm.py needs vector observations or [C, 84, 84] Atari frames (or Dict / "
                         f"Tuple observations), {args.env_id} has shape {example.shape}")
    resolve_presets(args, observation_kind(example), continuous)
    if args.num_minibatches < 1 or args.n_envs % args.num_minibatches:
        raise UsageError(f"--num-minibatches {args.num_minibatches} must divide --n-envs {args.n_envs}: "
                         "a minibatch is a subset of whole environment sequences")
    model = RecurrentActorCritic(example, action_space, args.hidden_size, args.lstm_size, args.norm_obs).to(device)
    reward_scaler = RewardScaler(args.n_envs, args.gamma).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, eps=1e-5, foreach=True)
    loss_fn = torch.compile(ppo_loss) if args.compile else ppo_loss

    # What a checkpoint saves and --resume restores, with the counters and the RNG states.
    trained = dict(model=model, optimizer=optimizer, reward_scaler=reward_scaler)
    count, _ = restore_checkpoint(args.resume, trained, device, init_from=args.init_from)
    sampler = make_sampler(args, env_fn, policy_step, model, horizon=args.num_steps, start_step=count.global_step)
    logger = RunLogger(args, "ppo_atari_lstm", count)
    evaluation = Evaluation(args, eval_env_fn, policy_step, model, device, start_step=count.global_step,
                            **eval_policy_kwargs(args))
    try:
        while count.global_step < args.total_timesteps:
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - count.global_step / args.total_timesteps)
            batch, episodes = sampler.collect()
            count.global_step += args.n_envs * args.num_steps
            logger.log_episodes(count.global_step, episodes)

            batch = buffer_to(batch, device)
            value = batch.agent_info.value
            done = batch.terminated | batch.truncated
            reset = torch.cat([torch.zeros_like(done[:1]), done[:-1]])  # the state is zeroed after an episode end
            reward = reward_scaler(batch.reward, done) if args.norm_reward else batch.reward
            with torch.no_grad():
                advantage, returns = gae_advantages(reward, value, next_values(model, batch), batch.terminated,
                                                    batch.truncated, args.gamma, args.gae_lambda)

            # Every epoch's minibatches (env subsets), drawn up front: where each resets reaches the host in one sync.
            permutations = [torch.randperm(args.n_envs, device=device) for _ in range(args.update_epochs)]
            minibatch_envs = torch.stack(permutations).view(args.update_epochs, args.num_minibatches, -1)
            minibatch_resets = reset[:, minibatch_envs].any(-1).permute(1, 2, 0).cpu()  # [epochs, minibatches, T]
            for epoch in range(args.update_epochs):
                for k, envs in enumerate(minibatch_envs[epoch]):
                    sequences = batch[:, envs]
                    # Whole sequences, from the state stored at their start, zeroed after episode ends.
                    out, new_value, _ = model(sequences.observation, sequences.prev_action, sequences.prev_reward,
                                              sequences.agent_info.rnn_state[0], reset[:, envs],
                                              minibatch_resets[epoch, k].nonzero().flatten().tolist())
                    dist = model.distribution(out)
                    loss, stats = loss_fn(dist.log_prob(sequences.action), dist.entropy(), new_value,
                                          sequences.agent_info.log_prob, advantage[:, envs], returns[:, envs],
                                          value[:, envs], args)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    distributed.all_reduce_gradients(model.parameters())  # data-parallel: the mean over ranks
                    nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                if args.target_kl is not None and distributed.all_reduce_mean(stats[3]) > args.target_kl:
                    break  # on the KL averaged over data-parallel ranks: they stop at the same epoch
            if args.norm_obs:  # after the update: the batch was collected and optimised with the same statistics
                model.obs_norm.update(batch.observation)
            sampler.sync(model)

            policy_loss, value_loss, entropy, approx_kl, clipfrac = stats
            logger.log(count.global_step, {
                "charts/learning_rate": optimizer.param_groups[0]["lr"], "losses/policy_loss": policy_loss,
                "losses/value_loss": value_loss, "losses/entropy": entropy, "losses/approx_kl": approx_kl,
                "losses/clipfrac": clipfrac, "losses/explained_variance": explained_variance(value, returns)})
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
