"""Loop overhead: each script's whole process against a plain single-file loop of the same run.

For each case, `algos/<script>.py` runs as a subprocess (`--eval-episodes 0`, one torch thread,
`OMP_NUM_THREADS=1`), and so does a straightforward loop written below with the same hyper-parameters,
networks, number of environment steps, number of gradient updates and batch size: gymnasium's
`SyncVectorEnv` (same-step autoreset, so a truncated episode's final observation is at hand as it is in
the scripts), a numpy ring replay buffer, `torch.as_tensor` per step, plain `torch.optim.Adam`. The two
alternate (rlsolo, plain, rlsolo, plain ... for `--repeats`), so that load from other processes hits
them alike. Per run: the CPU time (user + sys) of the child, from `getrusage(RUSAGE_CHILDREN)` deltas,
and its wall time; per case, the median over repeats and the ratio rlsolo / plain, printed as a markdown
table with the targets (at most: dqn 0.67, ppo 0.5, sac 0.75, td3 0.75).

Each repeat also runs both sides with a budget of one sampler batch (`n_envs x num_steps` steps): the
CPU time of starting the process (imports, environments, networks, the first optimizer) plus one batch.
The table gives these start-up times and the ratio of what is left, the loop's CPU time
(whole run - start-up), because at these budgets a start-up that both sides pay is a third or more of the
plain loop's whole process.

Both sides report how much work they did: the script's final checkpoint holds its update count and
summary.json its environment steps; a plain loop prints both. The benchmark stops with an error if they
differ, or if a script's config.json disagrees with the hyper-parameters the plain loop uses.

    python benchmark/loop_overhead.py                          # 70 minutes on a busy 2-core machine
    python benchmark/loop_overhead.py --cases dqn ppo --repeats 5
    python benchmark/loop_overhead.py --quick                  # tiny budgets, seconds: a smoke run
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions import Categorical, Normal

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    cases: tuple[str, ...] = ("dqn", "ppo", "sac", "td3")
    """which cases to run (dqn, ppo, sac, td3)"""
    repeats: int | None = None
    """interleaved runs of each side per case; the table reports the medians (default: 3, 1 with --quick)"""
    quick: bool = False
    """tiny step budgets (a smoke run of a few seconds per process)"""
    seed: int = 1
    """--seed of every run"""
    plain: str | None = None
    """run the plain loop of this case in this process and print its step and update counts (what the
    benchmark's plain children run)"""
    total_timesteps: int | None = None
    """with --plain: the step budget (default: the case's)"""


# --------------------------------------------------------------------------------------------------
# Plain single-file loops
# --------------------------------------------------------------------------------------------------


def make_envs(env_id: str, n_envs: int, seed: int) -> tuple[gym.vector.VectorEnv, np.ndarray]:
    """A same-step-autoreset SyncVectorEnv with episode statistics, reset with seeds seed .. seed + n - 1."""
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id)] * n_envs,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    obs, _ = envs.reset(seed=[seed + i for i in range(n_envs)])
    envs.single_action_space.seed(seed)
    return envs, obs


def true_next_obs(next_obs: np.ndarray, infos: dict) -> np.ndarray:
    """The next observations with the final one (not the reset one) where an episode ended."""
    real = next_obs.copy()
    if "_final_obs" in infos:
        for i in np.flatnonzero(infos["_final_obs"]):
            real[i] = infos["final_obs"][i]
    return real


def episode_returns(infos: dict) -> list[float]:
    return [float(r) for r in infos["episode"]["r"][infos["_episode"]]] if "_episode" in infos else []


class ReplayRing:
    """Transitions (obs, next obs, action, reward, terminated) in preallocated numpy arrays, sampled uniformly."""

    def __init__(self, capacity: int, obs_dim: int, action_shape: tuple[int, ...], action_dtype: type):
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.action = np.zeros((capacity, *action_shape), action_dtype)
        self.reward = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.float32)
        self.capacity, self.pos, self.full = capacity, 0, False

    def add(self, obs, next_obs, action, reward, terminated) -> None:
        for i in range(len(obs)):
            self.obs[self.pos], self.next_obs[self.pos], self.action[self.pos] = obs[i], next_obs[i], action[i]
            self.reward[self.pos], self.terminated[self.pos] = reward[i], terminated[i]
            self.pos = (self.pos + 1) % self.capacity
            self.full = self.full or self.pos == 0

    def sample(self, batch_size: int):
        index = np.random.randint(0, self.capacity if self.full else self.pos, batch_size)
        return SimpleNamespace(obs=torch.as_tensor(self.obs[index]), next_obs=torch.as_tensor(self.next_obs[index]),
                               action=torch.as_tensor(self.action[index]), reward=torch.as_tensor(self.reward[index]),
                               terminated=torch.as_tensor(self.terminated[index]))


def mlp(n_in: int, n_out: int, hidden: int, activation: type = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), activation(), nn.Linear(hidden, hidden), activation(),
                         nn.Linear(hidden, n_out))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def plain_dqn(h: SimpleNamespace, env_id: str, total_timesteps: int, seed: int) -> tuple[int, int]:
    """DQN, one-step target from the target network, epsilon-greedy; returns (env steps, updates)."""
    seed_everything(seed)
    envs, obs = make_envs(env_id, h.n_envs, seed)
    obs_dim, n_actions = envs.single_observation_space.shape[0], int(envs.single_action_space.n)
    q_net = mlp(obs_dim, n_actions, h.hidden_size)
    target_net = copy.deepcopy(q_net)
    optimizer = torch.optim.Adam(q_net.parameters(), lr=h.learning_rate)
    replay = ReplayRing(h.buffer_size, obs_dim, (), np.int64)
    global_step, n_updates, updates_owed, returns, losses = 0, 0, 0.0, [], []
    while global_step < total_timesteps:
        optimizer.param_groups[0]["lr"] = h.learning_rate * max(1.0 - global_step / total_timesteps, 0)
        duration = max(h.exploration_fraction * total_timesteps, 1)
        epsilon = h.end_epsilon if global_step >= duration else \
            h.start_epsilon + (h.end_epsilon - h.start_epsilon) * global_step / duration
        if random.random() < epsilon:
            actions = np.array([envs.single_action_space.sample() for _ in range(h.n_envs)])
        else:
            with torch.no_grad():
                actions = q_net(torch.as_tensor(obs, dtype=torch.float32)).argmax(-1).numpy()
        next_obs, rewards, terminated, truncated, infos = envs.step(actions)
        replay.add(obs, true_next_obs(next_obs, infos), actions, rewards, terminated)
        returns += episode_returns(infos)
        obs = next_obs
        global_step += h.n_envs
        if global_step < h.learning_starts:
            continue
        updates_owed += h.replay_ratio * h.n_envs
        while updates_owed >= 1:
            updates_owed -= 1
            s = replay.sample(h.batch_size)
            with torch.no_grad():
                target = s.reward + h.gamma * (1 - s.terminated) * target_net(s.next_obs).max(-1).values
            q = q_net(s.obs).gather(-1, s.action.unsqueeze(-1)).squeeze(-1)
            loss = F.smooth_l1_loss(q, target)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(q_net.parameters(), h.max_grad_norm)
            optimizer.step()
            n_updates += 1
            if n_updates % h.target_network_period == 0:
                target_net.load_state_dict(q_net.state_dict())
            if n_updates % 100 == 0:
                losses.append((loss.item(), q.mean().item()))
    envs.close()
    return global_step, n_updates


def plain_ppo(h: SimpleNamespace, env_id: str, total_timesteps: int, seed: int) -> tuple[int, int]:
    """PPO for discrete actions, GAE bootstrapping truncated episodes from their final observation."""
    seed_everything(seed)
    envs, next_obs = make_envs(env_id, h.n_envs, seed)
    obs_dim, n_actions = envs.single_observation_space.shape[0], int(envs.single_action_space.n)

    def layer_init(layer: nn.Linear, std: float = math.sqrt(2)) -> nn.Linear:
        nn.init.orthogonal_(layer.weight, std)
        nn.init.constant_(layer.bias, 0.0)
        return layer

    def tanh_mlp(n_out: int, std: float) -> nn.Sequential:
        return nn.Sequential(layer_init(nn.Linear(obs_dim, h.hidden_size)), nn.Tanh(),
                             layer_init(nn.Linear(h.hidden_size, h.hidden_size)), nn.Tanh(),
                             layer_init(nn.Linear(h.hidden_size, n_out), std))

    critic, actor = tanh_mlp(1, 1.0), tanh_mlp(n_actions, 0.01)
    params = list(critic.parameters()) + list(actor.parameters())
    optimizer = torch.optim.Adam(params, lr=h.learning_rate, eps=1e-5)
    T, B = h.num_steps, h.n_envs
    batch_size, minibatch_size = T * B, T * B // h.num_minibatches
    obs = torch.zeros((T, B, obs_dim))
    actions, log_probs = torch.zeros((T, B), dtype=torch.long), torch.zeros((T, B))
    rewards, values, final_values = torch.zeros((T, B)), torch.zeros((T, B)), torch.zeros((T, B))
    terminated, truncated = torch.zeros((T, B)), torch.zeros((T, B))
    next_obs = torch.as_tensor(next_obs, dtype=torch.float32)
    global_step, n_updates, returns, stats = 0, 0, [], []
    while global_step < total_timesteps:
        optimizer.param_groups[0]["lr"] = h.learning_rate * (1.0 - global_step / total_timesteps)
        for t in range(T):
            obs[t] = next_obs
            with torch.no_grad():
                dist = Categorical(logits=actor(next_obs), validate_args=False)
                action = dist.sample()
                actions[t], log_probs[t], values[t] = action, dist.log_prob(action), critic(next_obs).squeeze(-1)
            next_obs_np, reward, term, trunc, infos = envs.step(action.numpy())
            rewards[t], terminated[t] = torch.as_tensor(reward), torch.as_tensor(term)
            truncated[t] = torch.as_tensor(trunc)
            if trunc.any():
                with torch.no_grad():
                    final = torch.as_tensor(true_next_obs(next_obs_np, infos)[trunc], dtype=torch.float32)
                    final_values[t, torch.as_tensor(trunc)] = critic(final).squeeze(-1)
            returns += episode_returns(infos)
            next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32)
        global_step += batch_size

        with torch.no_grad():
            next_value = critic(next_obs).squeeze(-1)
            advantages = torch.zeros((T, B))
            last_advantage = torch.zeros(B)
            for t in reversed(range(T)):
                following = next_value if t == T - 1 else values[t + 1]
                following = torch.where(truncated[t].bool(), final_values[t], following)
                delta = rewards[t] + h.gamma * (1 - terminated[t]) * following - values[t]
                done = torch.maximum(terminated[t], truncated[t])
                last_advantage = delta + h.gamma * h.gae_lambda * (1 - done) * last_advantage
                advantages[t] = last_advantage
            returns_ = advantages + values

        b_obs, b_actions, b_log_probs = obs.reshape(batch_size, obs_dim), actions.reshape(-1), log_probs.reshape(-1)
        b_advantages, b_returns, b_values = advantages.reshape(-1), returns_.reshape(-1), values.reshape(-1)
        for _epoch in range(h.update_epochs):
            permutation = torch.randperm(batch_size)
            for start in range(0, batch_size, minibatch_size):
                mb = permutation[start:start + minibatch_size]
                dist = Categorical(logits=actor(b_obs[mb]), validate_args=False)
                log_ratio = dist.log_prob(b_actions[mb]) - b_log_probs[mb]
                ratio = log_ratio.exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean()
                advantage = b_advantages[mb]
                advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
                policy_loss = torch.max(-advantage * ratio,
                                        -advantage * ratio.clamp(1 - h.clip_coef, 1 + h.clip_coef)).mean()
                value = critic(b_obs[mb]).squeeze(-1)
                value_clipped = b_values[mb] + (value - b_values[mb]).clamp(-h.clip_coef, h.clip_coef)
                value_loss = 0.5 * torch.max((value - b_returns[mb]) ** 2, (value_clipped - b_returns[mb]) ** 2).mean()
                entropy = dist.entropy().mean()
                loss = policy_loss - h.ent_coef * entropy + h.vf_coef * value_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, h.max_grad_norm)
                optimizer.step()
                n_updates += 1
        y_pred, y_true = b_values.numpy(), b_returns.numpy()
        explained_var = 1 - np.var(y_true - y_pred) / np.var(y_true)
        stats.append((policy_loss.item(), value_loss.item(), entropy.item(), approx_kl.item(), explained_var))
    envs.close()
    return global_step, n_updates


def plain_sac(h: SimpleNamespace, env_id: str, total_timesteps: int, seed: int) -> tuple[int, int]:
    """SAC with twin critics, a tanh-squashed Gaussian actor and a tuned temperature."""
    seed_everything(seed)
    envs, obs = make_envs(env_id, h.n_envs, seed)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    low, high = envs.single_action_space.low, envs.single_action_space.high
    action_scale, action_bias = (high - low) / 2.0, (high + low) / 2.0
    actor = mlp(obs_dim, 2 * act_dim, h.hidden_size)
    qf1, qf2 = mlp(obs_dim + act_dim, 1, h.hidden_size), mlp(obs_dim + act_dim, 1, h.hidden_size)
    qf1_target, qf2_target = copy.deepcopy(qf1), copy.deepcopy(qf2)
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=h.q_lr)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=h.policy_lr)
    log_alpha = torch.tensor(math.log(h.alpha), requires_grad=True)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=h.q_lr)
    target_entropy = -float(act_dim)

    def policy(o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = actor(o).chunk(2, -1)
        log_std = -5.0 + 0.5 * (2.0 - -5.0) * (torch.tanh(log_std) + 1)
        normal = Normal(mean, log_std.exp(), validate_args=False)
        pre_tanh = normal.rsample()
        action = torch.tanh(pre_tanh)
        log_prob = normal.log_prob(pre_tanh) - torch.log(1 - action.pow(2) + 1e-6)
        return action, log_prob.sum(-1)

    replay = ReplayRing(h.buffer_size, obs_dim, (act_dim,), np.float32)
    global_step, n_updates, updates_owed, returns, losses = 0, 0, 0.0, [], []
    while global_step < total_timesteps:
        if global_step < h.learning_starts:
            actions = np.random.uniform(-1, 1, (h.n_envs, act_dim)).astype(np.float32)
        else:
            with torch.no_grad():
                actions = policy(torch.as_tensor(obs, dtype=torch.float32))[0].numpy()
        next_obs, rewards, terminated, truncated, infos = envs.step(actions * action_scale + action_bias)
        replay.add(obs, true_next_obs(next_obs, infos), actions, rewards, terminated)
        returns += episode_returns(infos)
        obs = next_obs
        global_step += h.n_envs
        if global_step < h.learning_starts:
            continue
        updates_owed += h.replay_ratio * h.n_envs
        while updates_owed >= 1:
            updates_owed -= 1
            s = replay.sample(h.batch_size)
            alpha = log_alpha.exp().detach()
            with torch.no_grad():
                next_action, next_log_prob = policy(s.next_obs)
                x = torch.cat([s.next_obs, next_action], -1)
                next_q = torch.min(qf1_target(x), qf2_target(x)).squeeze(-1) - alpha * next_log_prob
                target = s.reward + h.gamma * (1 - s.terminated) * next_q
            x = torch.cat([s.obs, s.action], -1)
            q1, q2 = qf1(x).squeeze(-1), qf2(x).squeeze(-1)
            q_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
            q_optimizer.zero_grad()
            q_loss.backward()
            q_optimizer.step()

            action, log_prob = policy(s.obs)
            x = torch.cat([s.obs, action], -1)
            actor_loss = (alpha * log_prob - torch.min(qf1(x), qf2(x)).squeeze(-1)).mean()
            actor_optimizer.zero_grad()
            actor_loss.backward()
            actor_optimizer.step()
            alpha_loss = -(log_alpha * (log_prob.detach() + target_entropy)).mean()
            alpha_optimizer.zero_grad()
            alpha_loss.backward()
            alpha_optimizer.step()
            with torch.no_grad():
                for net, target_net in [(qf1, qf1_target), (qf2, qf2_target)]:
                    for param, target_param in zip(net.parameters(), target_net.parameters()):
                        target_param.lerp_(param, h.tau)
            n_updates += 1
            if n_updates % h.log_every_updates == 0:
                losses.append((q_loss.item(), actor_loss.item(), alpha_loss.item(), alpha.item()))
    envs.close()
    return global_step, n_updates


def plain_td3(h: SimpleNamespace, env_id: str, total_timesteps: int, seed: int) -> tuple[int, int]:
    """TD3: twin critics, target policy smoothing, delayed actor and target updates."""
    seed_everything(seed)
    envs, obs = make_envs(env_id, h.n_envs, seed)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    low, high = envs.single_action_space.low, envs.single_action_space.high
    action_scale, action_bias = (high - low) / 2.0, (high + low) / 2.0
    actor = nn.Sequential(mlp(obs_dim, act_dim, h.hidden_size), nn.Tanh())
    qf1, qf2 = mlp(obs_dim + act_dim, 1, h.hidden_size), mlp(obs_dim + act_dim, 1, h.hidden_size)
    actor_target, qf1_target, qf2_target = copy.deepcopy(actor), copy.deepcopy(qf1), copy.deepcopy(qf2)
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=h.q_lr)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=h.policy_lr)
    replay = ReplayRing(h.buffer_size, obs_dim, (act_dim,), np.float32)
    global_step, n_updates, updates_owed, returns, losses = 0, 0, 0.0, [], []
    actor_loss = torch.zeros(())
    while global_step < total_timesteps:
        if global_step < h.learning_starts:
            actions = np.random.uniform(-1, 1, (h.n_envs, act_dim)).astype(np.float32)
        else:
            with torch.no_grad():
                action = actor(torch.as_tensor(obs, dtype=torch.float32))
                actions = (action + h.exploration_noise * torch.randn_like(action)).clamp(-1, 1).numpy()
        next_obs, rewards, terminated, truncated, infos = envs.step(actions * action_scale + action_bias)
        replay.add(obs, true_next_obs(next_obs, infos), actions, rewards, terminated)
        returns += episode_returns(infos)
        obs = next_obs
        global_step += h.n_envs
        if global_step < h.learning_starts:
            continue
        updates_owed += h.replay_ratio * h.n_envs
        while updates_owed >= 1:
            updates_owed -= 1
            s = replay.sample(h.batch_size)
            with torch.no_grad():
                noise = (torch.randn_like(s.action) * h.policy_noise).clamp(-h.noise_clip, h.noise_clip)
                next_action = (actor_target(s.next_obs) + noise).clamp(-1, 1)
                x = torch.cat([s.next_obs, next_action], -1)
                target = s.reward + h.gamma * (1 - s.terminated) * torch.min(qf1_target(x), qf2_target(x)).squeeze(-1)
            x = torch.cat([s.obs, s.action], -1)
            q_loss = F.mse_loss(qf1(x).squeeze(-1), target) + F.mse_loss(qf2(x).squeeze(-1), target)
            q_optimizer.zero_grad()
            q_loss.backward()
            q_optimizer.step()
            n_updates += 1
            if n_updates % h.policy_frequency == 0:
                actor_loss = -qf1(torch.cat([s.obs, actor(s.obs)], -1)).mean()
                actor_optimizer.zero_grad()
                actor_loss.backward()
                actor_optimizer.step()
                with torch.no_grad():
                    for net, target_net in [(actor, actor_target), (qf1, qf1_target), (qf2, qf2_target)]:
                        for param, target_param in zip(net.parameters(), target_net.parameters()):
                            target_param.lerp_(param, h.tau)
            if n_updates % h.log_every_updates == 0:
                losses.append((q_loss.item(), actor_loss.item()))
    envs.close()
    return global_step, n_updates


# --------------------------------------------------------------------------------------------------
# Cases: the script's flags and the hyper-parameters both sides use
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    script: str
    env_id: str
    total_timesteps: int
    quick_total_timesteps: int
    plain: Callable[[SimpleNamespace, str, int, int], tuple[int, int]]
    hyper: dict = field(default_factory=dict)
    """hyper-parameters named as the script's Args fields: given to the script as flags where `flags` lists
    them, otherwise its defaults; checked against the run's config.json"""
    flags: tuple[str, ...] = ()
    """the fields of `hyper` passed on the script's command line"""
    quick: dict = field(default_factory=dict)
    """overrides of `hyper` under --quick"""
    target: float = 1.0
    """the ratio rlsolo / plain CPU time to reach (at most)"""
    counts_updates: bool = True
    """whether the script's checkpoint counts its gradient updates (ppo.py's does not: its count follows
    from the steps, with --target-kl off)"""

    def settings(self, quick: bool) -> tuple[SimpleNamespace, int]:
        h = {**self.hyper, **(self.quick if quick else {})}
        return SimpleNamespace(**h), self.quick_total_timesteps if quick else self.total_timesteps

    @property
    def startup_timesteps(self) -> int:
        """The budget of a start-up run: one sampler batch."""
        return self.hyper["n_envs"] * self.hyper["num_steps"]


CASES = {
    "dqn": Case(
        "dqn", "CartPole-v1", 50_000, 2_000, plain_dqn, target=0.67,
        hyper=dict(n_envs=1, learning_starts=10_000, replay_ratio=0.1, batch_size=128, double=False, n_step=1,
                   dueling=False, prioritized=False, num_steps=1, learning_rate=1e-3, anneal_lr=True,
                   buffer_size=100_000, gamma=0.99, target_network_period=100, tau=1.0, start_epsilon=1.0,
                   end_epsilon=0.05, exploration_fraction=0.1, max_grad_norm=10.0, hidden_size=128),
        flags=("n_envs", "learning_starts", "replay_ratio", "batch_size", "double", "n_step"),
        quick=dict(learning_starts=500),
    ),
    "ppo": Case(
        "ppo", "CartPole-v1", 100_000, 1_024, plain_ppo, target=0.5, counts_updates=False,
        hyper=dict(n_envs=4, num_steps=128, learning_rate=1e-3, anneal_lr=True, gamma=0.99, gae_lambda=0.95,
                   num_minibatches=4, update_epochs=4, norm_adv=True, clip_coef=0.2, clip_vloss=True, ent_coef=0.01,
                   vf_coef=0.5, max_grad_norm=0.5, target_kl=None, norm_obs=False, norm_reward=False, hidden_size=64),
        flags=("n_envs", "num_steps"),
    ),
    "sac": Case(
        "sac", "Hopper-v5", 6_000, 300, plain_sac, target=0.75,
        hyper=dict(n_envs=1, learning_starts=1_000, num_steps=1, buffer_size=1_000_000, gamma=0.99, tau=0.005,
                   batch_size=256, replay_ratio=1.0, policy_lr=3e-4, q_lr=1e-3, alpha=0.2, autotune=True,
                   hidden_size=256, log_every_updates=100),
        # The temperature tuned and the actor at 3e-4 (CleanRL's sac_continuous_action), as measured in
        # benchmark/README.md; sac.py's own MuJoCo defaults are Tianshou's (1e-3, fixed).
        flags=("learning_starts", "policy_lr", "autotune"),
        quick=dict(learning_starts=200),
    ),
    "td3": Case(
        "td3", "Hopper-v5", 6_000, 300, plain_td3, target=0.75,
        hyper=dict(n_envs=1, learning_starts=1_000, num_steps=1, buffer_size=1_000_000, gamma=0.99, tau=0.005,
                   batch_size=256, replay_ratio=1.0, policy_lr=1e-3, q_lr=1e-3, exploration_noise=0.1, policy_noise=0.2,
                   noise_clip=0.5, policy_frequency=2, hidden_size=256, log_every_updates=100),
        flags=("learning_starts",),
        quick=dict(learning_starts=200),
    ),
}


# --------------------------------------------------------------------------------------------------
# Running and timing the two sides
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    cpu_s: float
    wall_s: float
    steps: int
    updates: int | None


def as_flag(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + name.replace("_", "-")]
    return [flag, str(value)]


def timed(command: list[str]) -> tuple[float, float, str]:
    """Run `command` to completion; its CPU seconds (user + sys), wall seconds and stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall, proc.stdout


def run_rlsolo(case: Case, args: Args, output_dir: Path, name: str, total: int | None = None) -> Run:
    h, case_total = case.settings(args.quick)
    total = total or case_total
    command = [sys.executable, str(ROOT / "algos" / f"{case.script}.py"), "--env-id", case.env_id,
               "--total-timesteps", str(total), "--seed", str(args.seed), "--eval-episodes", "0",
               "--torch-threads", "1", "--checkpoint-every-s", "1e9", "--output-dir", str(output_dir),
               "--run-name", name]
    for flag in case.flags:
        command += as_flag(flag, getattr(h, flag))
    cpu, wall, _ = timed(command)
    run_dir = output_dir / name
    config = json.loads((run_dir / "config.json").read_text())
    differ = {k: (config.get(k), v) for k, v in vars(h).items() if config.get(k, object()) != v}
    if differ:
        raise RuntimeError(f"{case.script}.py ran with other hyper-parameters than the plain loop "
                           f"(script, plain): {differ}; update CASES")
    steps = json.loads((run_dir / "summary.json").read_text())["global_step"]
    updates = None
    if case.counts_updates:
        updates = int(torch.load(run_dir / "checkpoint.pt", weights_only=True)["n_updates"])
    return Run(cpu, wall, steps, updates)


def run_plain(case_name: str, args: Args, total: int | None = None) -> Run:
    command = [sys.executable, str(Path(__file__).resolve()), "--plain", case_name, "--seed", str(args.seed)]
    if total is not None:
        command += ["--total-timesteps", str(total)]
    cpu, wall, stdout = timed(command + (["--quick"] if args.quick else []))
    report = json.loads(stdout.strip().splitlines()[-1])
    return Run(cpu, wall, report["steps"], report["updates"])


def plain_main(args: Args) -> None:
    """The child side: run one plain loop and print its counts as a JSON line."""
    case = CASES[args.plain]
    torch.set_num_threads(1)
    h, total = case.settings(args.quick)
    steps, updates = case.plain(h, case.env_id, args.total_timesteps or total, args.seed)
    print(json.dumps({"steps": steps, "updates": updates}))


def main(args: Args) -> int:
    unknown = [c for c in args.cases if c not in CASES]
    args.repeats = args.repeats or (1 if args.quick else 3)
    if unknown or args.repeats < 1:
        print(f"error: unknown case(s) {unknown}: choose from {sorted(CASES)}; --repeats must be >= 1", file=sys.stderr)
        return 2
    print(f"# loop_overhead  {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
          f"gymnasium {gym.__version__}, load average {os.getloadavg()[0]:.1f}" + ("  (--quick)" if args.quick else ""),
          flush=True)
    results: dict[str, dict[str, list[Run]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            case = CASES[name]
            runs = results[name] = {"rlsolo": [], "plain": [], "rlsolo start-up": [], "plain start-up": []}
            for repeat in range(args.repeats):
                runs["rlsolo"].append(run_rlsolo(case, args, Path(tmp), f"{name}-{repeat}"))
                runs["plain"].append(run_plain(name, args))
                runs["rlsolo start-up"].append(run_rlsolo(case, args, Path(tmp), f"{name}-{repeat}-startup",
                                                          total=case.startup_timesteps))
                runs["plain start-up"].append(run_plain(name, args, total=case.startup_timesteps))
                r, p = runs["rlsolo"][-1], runs["plain"][-1]
                rs, ps = runs["rlsolo start-up"][-1], runs["plain start-up"][-1]
                print(f"# {name} repeat {repeat + 1}: rlsolo {r.cpu_s:.2f} s CPU / {r.wall_s:.2f} s wall, "
                      f"plain {p.cpu_s:.2f} / {p.wall_s:.2f}; start-up CPU rlsolo {rs.cpu_s:.2f}, plain {ps.cpu_s:.2f}",
                      flush=True)

    print("\n| case | settings | rlsolo CPU s | plain CPU s | CPU ratio | target | rlsolo wall s | plain wall s "
          "| wall ratio | start-up CPU s (rlsolo / plain) | loop CPU ratio | env steps | updates (rlsolo / plain) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    mismatches = []
    for name, runs in results.items():
        case = CASES[name]
        h, total = case.settings(args.quick)
        r_cpu, p_cpu = (statistics.median(run.cpu_s for run in runs[side]) for side in ("rlsolo", "plain"))
        r_wall, p_wall = (statistics.median(run.wall_s for run in runs[side]) for side in ("rlsolo", "plain"))
        r_start, p_start = (statistics.median(run.cpu_s for run in runs[side])
                            for side in ("rlsolo start-up", "plain start-up"))
        loop_ratio = f"{(r_cpu - r_start) / (p_cpu - p_start):.2f}" if p_cpu > p_start and r_cpu > r_start else "-"
        r, p = runs["rlsolo"][-1], runs["plain"][-1]
        settings = f"{case.env_id}, {total} steps, " + " ".join(
            " ".join(as_flag(flag, getattr(h, flag))) for flag in case.flags)
        ratio = r_cpu / p_cpu
        verdict = "met" if ratio <= case.target else "not met"
        rlsolo_updates = "-" if r.updates is None else str(r.updates)
        print(f"| {name} | {settings} | {r_cpu:.2f} | {p_cpu:.2f} | {ratio:.2f} | <= {case.target} ({verdict}) "
              f"| {r_wall:.2f} | {p_wall:.2f} | {r_wall / p_wall:.2f} | {r_start:.2f} / {p_start:.2f} | {loop_ratio} "
              f"| {r.steps} / {p.steps} "
              f"| {rlsolo_updates} / {p.updates} |")
        start_steps = {run.steps for side in ("rlsolo start-up", "plain start-up") for run in runs[side]}
        if start_steps != {case.startup_timesteps}:
            mismatches.append(f"{name}: env steps of the start-up runs: {sorted(start_steps)}, "
                              f"not {case.startup_timesteps}")
        work = {(run.steps, run.updates) for run in runs["plain"]}
        work |= {(run.steps, p.updates if run.updates is None else run.updates) for run in runs["rlsolo"]}
        if len(work) > 1:
            mismatches.append(f"{name}: (env steps, updates) of the runs: {sorted(work)}")
    if mismatches:
        print("error: the two sides did different amounts of work: " + "; ".join(mismatches), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli = tyro.cli(Args)
    if cli.plain is not None:
        plain_main(cli)
        sys.exit(0)
    sys.exit(main(cli))
