"""Samplers: who steps the environments and who runs the policy, behind one interface.

    sampler = make_sampler(args, env_fn, policy_step, model, horizon=T)
    batch, episodes = sampler.collect()   # batch: Samples of [T, B] torch CPU tensors; episodes: [Episode]
    ... optimize ...
    sampler.sync(model)                   # new parameters reach the workers / the inference copy
    sampler.close()

`env_fn(seed)` builds one environment (see `common.envs.make_env`); `policy_step` is a module-level
function of the script:

    def policy_step(model, observation, prev_action, prev_reward, rnn_state, deterministic=False, **kw):
        return action, agent_info, next_rnn_state      # torch tensors with leading dim [B]

`agent_info` is None or a namedarraytuple of [B, ...] tensors (log-prob, value, rnn state ...), stored in
the batch as [T, B, ...]; `rnn_state` is None for feed-forward policies, else a structure of [B, ...]
tensors that the sampler zeroes for environments whose episode ended (it also zeroes their previous
action and reward). Keyword arguments of `collect(**kw)` (an exploration epsilon, say) reach
`policy_step`.

The batch returned by `collect` is a view of the sampler's preallocated buffer: the next `collect`
overwrites it, so copy what must outlive one iteration (replay buffers do).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from common.envs import UsageError
from common.namedarraytuple import (
    buffer_from_example,
    buffer_map,
    namedarraytuple,
    numpify_buffer,
    torchify_buffer,
)

Samples = namedarraytuple(
    "Samples",
    ["observation", "next_observation", "action", "reward", "terminated", "truncated",
     "prev_action", "prev_reward", "agent_info"],
)

EVAL_SEED_OFFSET = 1_000_003


class Episode(NamedTuple):
    """Statistics of one finished episode: raw (unclipped) return and length in environment steps."""

    ret: float
    length: int


PolicyStep = Callable[..., tuple[torch.Tensor, Any, Any]]


class EnvGroup:
    """Environments stepped in lockstep; a finished episode is reset in the same step.

    Holds each environment's current observation, previous action and previous reward. `step` writes
    the true next observation (the final one for an ended episode) and the flags into caller-provided
    arrays, so the same code fills a local buffer or a slice of shared memory. After `step`,
    `finished_envs[i]` is the index of the env that produced the i-th returned episode.
    """

    def __init__(self, env_fn: Callable[[int], Any], seeds: list[int]):
        self.envs = [env_fn(seed) for seed in seeds]
        first = [env.reset(seed=seed)[0] for env, seed in zip(self.envs, seeds)]
        self.observation = np.stack(first)
        example_action = np.asarray(self.envs[0].action_space.sample())
        self.prev_action = np.zeros((len(self.envs),) + example_action.shape, dtype=example_action.dtype)
        self.prev_reward = np.zeros(len(self.envs), dtype=np.float32)
        self.action_dtype = example_action.dtype
        self.finished_envs: list[int] = []

    def write_inputs(self, observation: np.ndarray, prev_action: np.ndarray, prev_reward: np.ndarray) -> None:
        """Copy the policy inputs of the current step into the given [B, ...] arrays."""
        observation[:] = self.observation
        prev_action[:] = self.prev_action
        prev_reward[:] = self.prev_reward

    def step(self, action: np.ndarray, next_observation: np.ndarray, reward: np.ndarray,
             terminated: np.ndarray, truncated: np.ndarray) -> tuple[list[Episode], np.ndarray]:
        """Step every env with its action; returns finished episodes and the [B] bool mask of ended ones."""
        episodes = []
        self.finished_envs = []
        for b, env in enumerate(self.envs):
            obs, r, term, trunc, info = env.step(action[b])
            next_observation[b] = obs
            reward[b], terminated[b], truncated[b] = r, term, trunc
            if term or trunc:
                if "episode" in info:
                    episodes.append(Episode(float(info["episode"]["r"]), int(info["episode"]["l"])))
                    self.finished_envs.append(b)
                obs, _ = env.reset()
            self.observation[b] = obs
        done = np.logical_or(terminated, truncated)
        self.prev_action[:] = action
        self.prev_action[done] = 0
        self.prev_reward[:] = np.where(done, 0.0, reward)
        return episodes, done

    def close(self) -> None:
        for env in self.envs:
            env.close()


def zero_rnn_state(rnn_state: Any, done: torch.Tensor) -> Any:
    """Zero the recurrent state of environments whose episode ended (done: [B] bool)."""
    if rnn_state is None or not bool(done.any()):
        return rnn_state
    keep = (~done).to(torch.float32)
    return buffer_map(lambda x: x * keep.to(x.device, x.dtype).view((-1,) + (1,) * (x.dim() - 1)), rnn_state)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(array).to(device, non_blocking=True)


def call_policy(policy_step: PolicyStep, model: Any, observation: np.ndarray, prev_action: np.ndarray,
                prev_reward: np.ndarray, rnn_state: Any, device: torch.device, **kwargs: Any):
    """Run the policy on numpy inputs [B, ...]; returns (action numpy, agent_info numpy, rnn_state)."""
    with torch.no_grad():
        action, agent_info, rnn_state = policy_step(
            model, to_device(observation, device), to_device(prev_action, device),
            to_device(prev_reward, device), rnn_state, **kwargs,
        )
    return (
        action.cpu().numpy(),
        numpify_buffer(buffer_map(lambda x: x.cpu(), agent_info)),
        rnn_state,
    )


def samples_example(group: EnvGroup, policy_step: PolicyStep, model: Any, device: torch.device) -> Samples:
    """A one-step Samples (no leading dims) with the dtypes and shapes the batch buffer needs."""
    n = len(group.envs)
    obs = group.observation.copy()
    action, agent_info, _ = call_policy(
        policy_step, model, obs, group.prev_action.copy(), group.prev_reward.copy(), None, device
    )
    if action.shape[0] != n:
        raise ValueError(f"policy_step returned {action.shape[0]} actions for {n} observations")
    return Samples(
        observation=obs[0],
        next_observation=obs[0],
        action=action[0].astype(group.action_dtype, copy=False),
        reward=np.float32(0),
        terminated=np.bool_(False),
        truncated=np.bool_(False),
        prev_action=group.prev_action[0],
        prev_reward=np.float32(0),
        agent_info=None if agent_info is None else agent_info[0],
    )


class SerialSampler:
    """Everything in one process: the envs are stepped in a loop, the policy runs batched on `device`."""

    def __init__(self, env_fn: Callable[[int], Any], policy_step: PolicyStep, model: Any, n_envs: int,
                 horizon: int, seed: int, device: torch.device):
        self.policy_step, self.model, self.device, self.horizon = policy_step, model, device, horizon
        self.group = EnvGroup(env_fn, [seed + i for i in range(n_envs)])
        self.example = samples_example(self.group, policy_step, model, device)
        self.samples_np = buffer_from_example(self.example, (horizon, n_envs))
        self.samples = torchify_buffer(self.samples_np)
        self.rnn_state = None
        self.n_envs = n_envs

    def collect(self, **policy_kwargs: Any) -> tuple[Samples, list[Episode]]:
        """Step every environment `horizon` times; returns the [T, B] batch and finished episodes."""
        episodes: list[Episode] = []
        for t in range(self.horizon):
            step = self.samples_np[t]
            self.group.write_inputs(step.observation, step.prev_action, step.prev_reward)
            action, agent_info, self.rnn_state = call_policy(
                self.policy_step, self.model, step.observation, step.prev_action, step.prev_reward,
                self.rnn_state, self.device, **policy_kwargs,
            )
            step.action[:] = action
            if agent_info is not None:
                step.agent_info[:] = agent_info
            finished, done = self.group.step(
                step.action, step.next_observation, step.reward, step.terminated, step.truncated
            )
            episodes += finished
            self.rnn_state = zero_rnn_state(self.rnn_state, torch.from_numpy(done))
        return self.samples, episodes

    def sync(self, model: Any) -> None:
        """The serial sampler runs the training model itself: nothing to copy."""
        self.model = model

    def state(self) -> dict:
        return {}

    def close(self) -> None:
        self.group.close()


def make_sampler(args: Any, env_fn: Callable[[int], Any], policy_step: PolicyStep, model: Any, horizon: int,
                 device: torch.device | None = None, seed: int | None = None):
    """Build the sampler selected by `--sampler` for `--n-envs` environments and `horizon` steps."""
    device = device if device is not None else next(model.parameters()).device
    seed = args.seed if seed is None else seed
    if args.sampler == "serial":
        return SerialSampler(env_fn, policy_step, model, args.n_envs, horizon, seed, device)
    raise UsageError(f"--sampler {args.sampler} is not available in this version; use --sampler serial")


def evaluate(env_fn: Callable[[int], Any], policy_step: PolicyStep, model: Any, n_episodes: int, seed: int,
             device: torch.device | None = None, max_envs: int = 8, **policy_kwargs: Any) -> list[Episode]:
    """Run `n_episodes` deterministic episodes (batched over up to `max_envs` envs); returns their stats.

    Episode k is the k-th of env k % E, so the set of episodes does not depend on their lengths.
    """
    if n_episodes <= 0:
        return []
    device = device if device is not None else next(model.parameters()).device
    n_envs = min(n_episodes, max_envs)
    quota = [n_episodes // n_envs + (i < n_episodes % n_envs) for i in range(n_envs)]
    group = EnvGroup(env_fn, [seed + EVAL_SEED_OFFSET + i for i in range(n_envs)])
    try:
        obs = np.empty_like(group.observation)
        prev_action, prev_reward = np.empty_like(group.prev_action), np.empty_like(group.prev_reward)
        next_obs = np.empty_like(group.observation)
        reward = np.zeros(n_envs, np.float32)
        terminated, truncated = np.zeros(n_envs, bool), np.zeros(n_envs, bool)
        per_env: list[list[Episode]] = [[] for _ in range(n_envs)]
        rnn_state = None
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        while any(len(per_env[i]) < quota[i] for i in range(n_envs)):
            group.write_inputs(obs, prev_action, prev_reward)
            action, _, rnn_state = call_policy(
                policy_step, model, obs, prev_action, prev_reward, rnn_state, device,
                deterministic=True, **policy_kwargs,
            )
            episodes, done = group.step(action, next_obs, reward, terminated, truncated)
            for b, episode in zip(group.finished_envs, episodes):
                if len(per_env[b]) < quota[b]:
                    per_env[b].append(episode)
            rnn_state = zero_rnn_state(rnn_state, torch.from_numpy(done))
        if was_training and hasattr(model, "train"):
            model.train()
    finally:
        group.close()
    return [episode for episodes in per_env for episode in episodes]
