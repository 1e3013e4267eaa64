"""Samplers: who steps the environments and who runs the policy, behind one interface.

    sampler = make_sampler(args, env_fn, policy_step, model, horizon=T)
    batch, episodes = sampler.collect()   # batch: Samples of [T, B] torch CPU tensors; episodes: [Episode]
    sampler.sync(model)                   # after optimizing: new parameters reach the workers / inference copy
    sampler.evaluate(n_episodes)          # deterministic evaluation episodes (or module-level `evaluate`)
    sampler.close()

`env_fn(seed)` builds one environment (see `common.envs.make_env`). The script's module-level
`policy_step(model, observation, prev_action, prev_reward, rnn_state, deterministic=False, **kw)` returns
`(action, agent_info, next_rnn_state)`, torch tensors with leading dim [B] as are its inputs: `observation` is a tensor
or, for Dict / Tuple spaces, a nested namedarraytuple of them (`common.envs.observation_example`); `agent_info` None or
a namedarraytuple of tensors (log-prob, value, rnn state ...); `rnn_state` None (feed-forward) or a structure of
tensors that the sampler zeroes, with the previous action and reward, for envs whose episode ended. The batch stores
observations (next_observation too) the same way and agent_info as [T, B, ...]; it is a view of a buffer that the next
`collect` overwrites, so copy what must outlive one iteration. `collect(**kw)` passes `kw` (an exploration epsilon, say)
to `policy_step` in every kind. `sampler.example`, one step of the batch (no leading dims), sizes replay buffers.

Kinds (`--sampler`):
- `serial`: one process steps every env and runs the policy, batched over all envs, on `device`.
- `parallel-cpu`: `--n-workers` processes each step a contiguous slice of the envs and run the policy on it, with
  one torch thread and a shared CPU copy of the model that `sync` updates.
- `parallel-gpu`: the workers only step envs; at every step the main process runs the policy for all envs on `device`.
- `alternating-gpu`: the envs form two halves, each split over all workers (B must split into 2 x workers); while
  the workers step one half, the main process runs the policy for the other.

Env i (column i of the batch) is built by `env_fn(seed + i)` and reset with seed `seed + i` whatever the kind and
worker split, so a policy that is a fixed function of its inputs yields the same batch from every kind, bit for bit.
Episodes are listed in the order they ended: by step, then by env index. Stochastic policies draw from the main
process's generators, except in parallel-cpu where each worker has its own, seeded from (seed, worker index). With
`--info-keys KEY[:sum|last] ...` the envs' numeric `info[KEY]` values are aggregated over each training episode
(summed, or the last value reported) into `Episode.info`; evaluation episodes carry none.

Parallel kinds: a worker that raises or dies makes the main process raise `SamplerError` (with its traceback or exit
status; a `UsageError`, one line, for bad input that only the envs reveal) within a fraction of a second. Workers exit
by themselves when the main process is gone, and ignore SIGINT: the main process's `finally: sampler.close()` stops
them. `close()` ends every worker, is idempotent and also runs at exit. Start methods: forkserver (the default), spawn
and fork; CUDA needs one of the first two, under which `policy_step`, model classes and `env_fn` are pickled by
reference (`__main__` is re-imported as `__mp_main__`): they must be module-level, and the script must guard `main()`
with `if __name__ == "__main__"`.
"""

from __future__ import annotations

import atexit
import copy
import numbers
import os
import random
import signal
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_handles
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.multiprocessing as torch_mp

from common import distributed
from common.envs import UsageError, observation_example, write_observation
from common.namedarraytuple import buffer_from_example, buffer_map, namedarraytuple, numpify_buffer, torchify_buffer

Samples = namedarraytuple("Samples", ["observation", "next_observation", "action", "reward", "terminated", "truncated",
                                      "prev_action", "prev_reward", "agent_info"])
# Where episodes ended inside a batch ([T, B] each): the parallel kinds report them through shared memory.
EpisodeStats = namedarraytuple("EpisodeStats", ["ended", "ret", "length", "info"])

EVAL_SEED_OFFSET = 1_000_003
EVAL_MAX_ENVS = 8  # evaluation episodes run batched over at most this many envs
PARALLEL_KINDS = ("parallel-cpu", "parallel-gpu", "alternating-gpu")
MAIN_POLL_S = 0.05  # a main-process wait checks that the workers live this often
WORKER_POLL_S = 0.5  # a worker wait checks that the main process lives this often
CLOSE_TIMEOUT_S = 2.0  # workers get this long to exit on request before they are terminated
# Streams of `seed_worker` besides the workers' own (their index): a data-parallel rank's main process
# (rank > 0) and an asynchronous sampling process.
REPLICA_STREAM, SAMPLING_PROCESS_STREAM = 1 << 30, (1 << 30) + 1
INFO_AGGREGATIONS = ("sum", "last")
InfoKey = tuple[str, str]  # (info key, aggregation)
PolicyStep = Callable[..., tuple[torch.Tensor, Any, Any]]
_LIVE_SAMPLERS: weakref.WeakSet = weakref.WeakSet()  # ParallelSamplers not closed yet, closed at exit


class Episode(NamedTuple):
    """One finished episode: raw (unclipped) return, length in env steps, aggregated `--info-keys` values by key."""

    ret: float
    length: int
    info: dict[str, float] = {}


def parse_info_keys(specs: Sequence[str]) -> list[InfoKey]:
    """`--info-keys` entries `KEY`, `KEY:sum` or `KEY:last` as (key, aggregation); `last` by default."""
    parsed: list[InfoKey] = []
    for spec in specs:
        key, _, how = spec.rpartition(":") if ":" in spec else (spec, "", "last")
        if not key or how not in INFO_AGGREGATIONS:
            raise UsageError(f"--info-keys {spec}: write KEY, KEY:sum or KEY:last")
        if key in dict(parsed):
            raise UsageError(f"--info-keys: {key!r} is given twice; give each key once")
        parsed.append((key, how))
    return parsed


def info_number(key: str, value: Any) -> float:
    """An info value as a float; UsageError if it is not a number."""
    if not isinstance(value, numbers.Real | np.bool_):
        raise UsageError(f"--info-keys {key}: the env's info[{key!r}] is a {type(value).__name__}, not a number; "
                         "pass only keys whose values are numbers")
    return float(value)


class SamplerError(RuntimeError):
    """A sampler worker raised or died; the message carries its traceback or exit status."""


class EnvGroup:
    """Environments stepped in lockstep, with each one's current observation, previous action and previous reward;
    a finished episode is reset in the same step. `write_inputs` and `step` fill a one-step Samples of [B, ...]
    arrays. `info_keys` (see `parse_info_keys`) are aggregated per env until the episode's end; a key that no env
    has reported by the end of the group's first episode raises UsageError."""

    def __init__(self, env_fn: Callable[[int], Any], seeds: list[int], info_keys: Sequence[InfoKey] = ()):
        self.envs = [env_fn(seed) for seed in seeds]
        self.info_keys = list(info_keys)
        self.info_values = np.zeros((len(self.envs), len(self.info_keys)))
        self.reported_keys: set[str] | None = set()  # until the first episode ends: every info key seen
        first = [env.reset(seed=seed)[0] for env, seed in zip(self.envs, seeds)]
        example = observation_example(self.envs[0].observation_space, first[0])
        self.observation = buffer_from_example(example, len(self.envs))
        for b, obs in enumerate(first):
            write_observation(self.observation, b, obs)
        example_action = np.asarray(self.envs[0].action_space.sample())
        self.prev_action = np.zeros((len(self.envs),) + example_action.shape, dtype=example_action.dtype)
        self.prev_reward = np.zeros(len(self.envs), dtype=np.float32)
        self.action_dtype = example_action.dtype
        self.finished_envs: list[int] = []

    def write_inputs(self, step: Samples) -> None:
        step.observation[:] = self.observation
        step.prev_action[:] = self.prev_action
        step.prev_reward[:] = self.prev_reward

    def step(self, action: np.ndarray, step: Samples) -> tuple[list[Episode], np.ndarray]:
        """Step every env with its action [B, ...], writing into step.next_observation (the true one, final for an
        ended episode), reward, terminated and truncated; returns finished episodes and the [B] bool done mask.
        Then `finished_envs[i]` is the index of the env that produced the i-th returned episode."""
        episodes, self.finished_envs = [], []
        terminated, truncated = step.terminated, step.truncated
        for b, env in enumerate(self.envs):
            obs, r, term, trunc, info = env.step(action[b])
            write_observation(step.next_observation, b, obs)
            step.reward[b], terminated[b], truncated[b] = r, term, trunc
            if self.info_keys:
                self._aggregate_info(b, info)
            if term or trunc:
                obs, reset_info = env.reset()
                # The game's statistics: on this step, or (Atari, after a life loss) on a step inside the reset.
                for ended in (info, reset_info):
                    if "episode" in ended:
                        episodes.append(Episode(float(ended["episode"]["r"]), int(ended["episode"]["l"]),
                                                self._episode_info(b)))
                        self.finished_envs.append(b)
            write_observation(self.observation, b, obs)
        done = np.logical_or(terminated, truncated)
        self.prev_action[:] = action
        self.prev_reward[:] = step.reward
        if done.any():  # a new episode starts with no previous action or reward
            self.prev_action[done] = 0
            self.prev_reward[done] = 0.0
        return episodes, done

    def _aggregate_info(self, b: int, info: dict) -> None:
        if self.reported_keys is not None:
            self.reported_keys.update(info)
        for k, (key, how) in enumerate(self.info_keys):
            if key in info:
                value = info_number(key, info[key])
                self.info_values[b, k] = self.info_values[b, k] + value if how == "sum" else value

    def _episode_info(self, b: int) -> dict[str, float]:
        """The info values of env b's finished episode; its aggregates start afresh."""
        if not self.info_keys:
            return {}
        if self.reported_keys is not None:
            missing = [key for key, _ in self.info_keys if key not in self.reported_keys]
            if missing:
                reported = sorted(self.reported_keys - {"episode"})
                raise UsageError(
                    f"--info-keys: the env reported no {', '.join(map(repr, missing))} in its first episode; "
                    f"it reported {', '.join(map(repr, reported)) if reported else 'no info keys'}"
                )
            self.reported_keys = None
        values = dict(zip([key for key, _ in self.info_keys], self.info_values[b].tolist()))
        self.info_values[b] = 0.0
        return values

    def close(self) -> None:
        for env in self.envs:
            env.close()


def zero_rnn_state(rnn_state: Any, done: torch.Tensor | np.ndarray) -> Any:
    """Zero the recurrent state of environments whose episode ended (done: [B] bool)."""
    if rnn_state is None or not bool(done.any()):
        return rnn_state
    keep = (~torch.as_tensor(done)).to(torch.float32)
    return buffer_map(lambda x: x * keep.to(x.device, x.dtype).view((-1,) + (1,) * (x.dim() - 1)), rnn_state)


def to_device(buffer: Any, device: torch.device) -> Any:
    """numpy leaves [B, ...] as tensors on `device` (an array, or a namedarraytuple observation)."""
    if device.type == "cpu":
        return buffer_map(torch.from_numpy, buffer)
    return buffer_map(lambda array: torch.from_numpy(array).to(device, non_blocking=True), buffer)


def call_policy(policy_step: PolicyStep, model: Any, observation: Any, prev_action: np.ndarray | torch.Tensor,
                prev_reward: np.ndarray | torch.Tensor, rnn_state: Any, device: torch.device, **kwargs: Any):
    """Run the policy without autograd on inputs [B, ...], numpy arrays or tensors already on `device`; returns
    (action numpy, agent_info numpy, rnn_state). Collect loops hold `torch.no_grad` over all their steps."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return call_policy(policy_step, model, observation, prev_action, prev_reward, rnn_state, device, **kwargs)
    if not isinstance(prev_reward, torch.Tensor):
        observation, prev_action, prev_reward = (to_device(x, device) for x in (observation, prev_action, prev_reward))
    action, agent_info, rnn_state = policy_step(model, observation, prev_action, prev_reward, rnn_state, **kwargs)
    if agent_info is not None:
        agent_info = numpify_buffer(buffer_map(lambda x: x.cpu(), agent_info))
    return action.cpu().numpy(), agent_info, rnn_state


def act(step: Samples, policy_step: PolicyStep, model: Any, rnn_state: Any, device: torch.device,
        inputs: Samples | None = None, **kwargs: Any) -> Any:
    """Run the policy on a step's inputs [B, ...], write its action and agent_info into the step; returns the rnn
    state. `inputs`: the same step as CPU tensors viewing its arrays, for a CPU policy to run on unconverted."""
    source = step if inputs is None else inputs
    action, agent_info, rnn_state = call_policy(policy_step, model, source.observation, source.prev_action,
                                                source.prev_reward, rnn_state, device, **kwargs)
    step.action[:] = action
    if agent_info is not None:
        step.agent_info[:] = agent_info
    return rnn_state


def samples_example(group: EnvGroup, policy_step: PolicyStep, model: Any, device: torch.device) -> Samples:
    """A one-step Samples (no leading dims) with the dtypes and shapes the batch buffer needs."""
    n = len(group.envs)
    obs = buffer_map(np.copy, group.observation)
    action, agent_info, _ = call_policy(policy_step, model, obs, group.prev_action.copy(), group.prev_reward.copy(),
                                        None, device)
    if action.shape[0] != n:
        raise ValueError(f"policy_step returned {action.shape[0]} actions for {n} observations")
    return Samples(
        observation=obs[0], next_observation=obs[0], action=action[0].astype(group.action_dtype, copy=False),
        reward=np.float32(0), terminated=np.bool_(False), truncated=np.bool_(False), prev_action=group.prev_action[0],
        prev_reward=np.float32(0), agent_info=None if agent_info is None else agent_info[0],
    )


def training_seed(seed: int, start_step: int) -> int:
    """The env seed of a run's sampler from environment step `start_step` on: the run's --seed at the start;
    after a resume, seeds of its own, apart from the first envs' and from the evaluation envs'."""
    return seed if start_step == 0 else seed + EVAL_SEED_OFFSET + EVAL_MAX_ENVS + start_step


def evaluation_plan(n_episodes: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeds of the evaluation envs and how many episodes each runs: episode k is one of env k % E."""
    n_envs = min(n_episodes, EVAL_MAX_ENVS)
    quotas = [n_episodes // n_envs + (i < n_episodes % n_envs) for i in range(n_envs)]
    return [seed + EVAL_SEED_OFFSET + i for i in range(n_envs)], quotas


def run_episodes(env_fn: Callable[[int], Any], policy_step: PolicyStep, model: Any, seeds: list[int],
                 quotas: list[int], device: torch.device, **policy_kwargs: Any) -> list[list[Episode]]:
    """Deterministic episodes, batched: env i (seed seeds[i]) runs its first quotas[i]; returns them per env."""
    group = EnvGroup(env_fn, seeds)
    n_envs = len(seeds)
    was_training = getattr(model, "training", False)
    try:
        step = Samples(observation=buffer_map(np.empty_like, group.observation),
                       next_observation=buffer_map(np.empty_like, group.observation),
                       action=None, reward=np.zeros(n_envs, np.float32), terminated=np.zeros(n_envs, bool),
                       truncated=np.zeros(n_envs, bool), prev_action=np.empty_like(group.prev_action),
                       prev_reward=np.empty_like(group.prev_reward), agent_info=None)
        per_env: list[list[Episode]] = [[] for _ in range(n_envs)]
        rnn_state = None
        if hasattr(model, "eval"):
            model.eval()
        while any(len(per_env[i]) < quotas[i] for i in range(n_envs)):
            group.write_inputs(step)
            action, _, rnn_state = call_policy(policy_step, model, step.observation, step.prev_action,
                                               step.prev_reward, rnn_state, device, deterministic=True, **policy_kwargs)
            episodes, done = group.step(action, step)
            for b, episode in zip(group.finished_envs, episodes):
                if len(per_env[b]) < quotas[b]:
                    per_env[b].append(episode)
            rnn_state = zero_rnn_state(rnn_state, done)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
        group.close()
    return per_env


def evaluate(env_fn: Callable[[int], Any], policy_step: PolicyStep, model: Any, n_episodes: int, seed: int,
             device: torch.device | None = None, **policy_kwargs: Any) -> list[Episode]:
    """Run `n_episodes` deterministic episodes on `device` (default: the model's), batched over up to EVAL_MAX_ENVS
    envs; returns their stats. Episode k is one of env k % E, so the set does not depend on episode lengths."""
    if n_episodes <= 0:
        return []
    device = device if device is not None else next(model.parameters()).device
    seeds, quotas = evaluation_plan(n_episodes, seed)
    per_env = run_episodes(env_fn, policy_step, model, seeds, quotas, device, **policy_kwargs)
    return [episode for episodes in per_env for episode in episodes]


class SerialSampler:
    """Everything in one process: the envs are stepped in a loop, the policy runs batched on `device`."""

    def __init__(self, env_fn: Callable[[int], Any], policy_step: PolicyStep, model: Any, n_envs: int,
                 horizon: int, seed: int, device: torch.device, eval_env_fn: Callable[[int], Any] | None = None,
                 info_keys: Sequence[InfoKey] = ()):
        self.policy_step, self.model, self.device, self.horizon = policy_step, model, device, horizon
        self.seed, self.eval_env_fn = seed, eval_env_fn or env_fn
        self.group = EnvGroup(env_fn, [seed + i for i in range(n_envs)], info_keys)
        self.example = samples_example(self.group, policy_step, model, device)
        self.samples_np = buffer_from_example(self.example, (horizon, n_envs))
        self.samples = torchify_buffer(self.samples_np)
        # Views of each step, made once: numpy for the envs and, for a CPU policy, torch for its inputs.
        self.steps = [self.samples_np[t] for t in range(horizon)]
        self.inputs = [self.samples[t] if device.type == "cpu" else None for t in range(horizon)]
        self.rnn_state = None

    @torch.no_grad()
    def collect(self, **policy_kwargs: Any) -> tuple[Samples, list[Episode]]:
        """Step every environment `horizon` times; returns the [T, B] batch and finished episodes."""
        episodes: list[Episode] = []
        for step, inputs in zip(self.steps, self.inputs):
            self.group.write_inputs(step)
            self.rnn_state = act(step, self.policy_step, self.model, self.rnn_state, self.device, inputs,
                                 **policy_kwargs)
            finished, done = self.group.step(step.action, step)
            episodes += finished
            self.rnn_state = zero_rnn_state(self.rnn_state, done)
        return self.samples, episodes

    def sync(self, model: Any) -> None:
        """The serial sampler runs the training model itself: nothing to copy."""
        self.model = model

    def evaluate(self, n_episodes: int, seed: int | None = None, **policy_kwargs: Any) -> list[Episode]:
        """The module-level `evaluate` with the eval envs, model and device of this sampler (seed: its own)."""
        seed = self.seed if seed is None else seed
        return evaluate(self.eval_env_fn, self.policy_step, self.model, n_episodes, seed, self.device, **policy_kwargs)

    def close(self) -> None:
        self.group.close()


@dataclass
class WorkerSpec:
    """What one worker needs; pickled once, at start (shared tensors and semaphores go by reference)."""

    index: int
    env_only: bool  # parallel-gpu / alternating-gpu: the main process runs the policy
    env_fn: Callable[[int], Any]
    eval_env_fn: Callable[[int], Any]
    policy_step: PolicyStep
    model: Any  # parallel-cpu: the shared CPU copy; else None
    columns: list[tuple[int, int]]  # [start, stop) of its envs in each half of the batch
    seed: int
    info_keys: list[InfoKey]
    horizon: int
    samples: Samples  # [T, B] shared
    episode_stats: EpisodeStats  # [T, B] shared
    stop_flag: torch.Tensor  # [1] shared; set by close()
    obs_ready: list  # per half: the worker has written the step's policy inputs (env-only kinds)
    act_ready: list  # per half: the main process has written the step's actions (env-only kinds)
    conn: Any
    main_pid: int
    cpu: int | None


class WorkerStopped(Exception):
    """The main process is gone or asked the worker to stop."""


class MainWatch:
    """Worker-side waits that give up when the main process dies or sets the stop flag."""

    def __init__(self, main_pid: int, stop_flag: np.ndarray):
        self.main_pid, self.parent_pid, self.stop_flag = main_pid, os.getppid(), stop_flag

    def check(self) -> None:
        if self.stop_flag[0] or os.getppid() != self.parent_pid or not pid_exists(self.main_pid):
            raise WorkerStopped

    def acquire(self, semaphore: Any) -> None:
        while not semaphore.acquire(timeout=WORKER_POLL_S):
            self.check()
        if self.stop_flag[0]:
            raise WorkerStopped

    def receive(self, conn: Any) -> tuple[str, Any]:
        while not conn.poll(WORKER_POLL_S):
            self.check()
        try:
            return conn.recv()
        except EOFError:
            raise WorkerStopped from None


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EnvSlice:
    """A worker's envs in one contiguous range of batch columns, with numpy views of those columns."""

    def __init__(self, spec: WorkerSpec, start: int, stop: int, samples: Samples, stats: EpisodeStats,
                 obs_ready: Any, act_ready: Any):
        self.group = EnvGroup(spec.env_fn, [spec.seed + i for i in range(start, stop)], spec.info_keys)
        self.samples, self.stats = samples[:, start:stop], stats[:, start:stop]
        self.obs_ready, self.act_ready = obs_ready, act_ready
        self.rnn_state = None

    def step(self, t: int) -> np.ndarray:
        """Step with the actions of step t; record results and finished episodes; returns the done mask."""
        step, stats = self.samples[t], self.stats[t]
        episodes, done = self.group.step(step.action, step)
        stats.ended[:] = False
        for b, episode in zip(self.group.finished_envs, episodes):
            stats.ended[b], stats.ret[b], stats.length[b] = True, episode.ret, episode.length
            stats.info[b] = list(episode.info.values())
        return done


@torch.no_grad()
def collect_with_policy(spec: WorkerSpec, slices: list[EnvSlice], watch: MainWatch, training: bool,
                        policy_kwargs: dict) -> None:
    """parallel-cpu: run the policy and step the envs for a whole batch, without the main process."""
    cpu = torch.device("cpu")
    if hasattr(spec.model, "train"):
        spec.model.train(training)
    for t in range(spec.horizon):
        if watch.stop_flag[0]:
            raise WorkerStopped
        for envs in slices:
            envs.group.write_inputs(envs.samples[t])
            envs.rnn_state = act(envs.samples[t], spec.policy_step, spec.model, envs.rnn_state, cpu, **policy_kwargs)
            envs.rnn_state = zero_rnn_state(envs.rnn_state, envs.step(t))


def step_envs_only(slices: list[EnvSlice], horizon: int, watch: MainWatch) -> None:
    """Env-only kinds: per step and half, publish the inputs, wait for the actions, step."""
    for envs in slices:
        envs.group.write_inputs(envs.samples[0])
        envs.obs_ready.release()
    for t in range(horizon):
        for envs in slices:
            watch.acquire(envs.act_ready)
            envs.step(t)
            if t + 1 < horizon:  # the last step's results are announced by the end-of-collect reply
                envs.group.write_inputs(envs.samples[t + 1])
                envs.obs_ready.release()


def seed_worker(seed: int, index: int) -> None:
    """Give a process its own random streams (policy sampling, exploration), derived from the seed and `index`."""
    low, high = np.random.SeedSequence([seed & (2**64 - 1), index]).generate_state(2)
    random.seed(int(low))
    np.random.seed(int(low))
    torch.manual_seed((int(high) << 32) | int(low))


def worker_main(spec: WorkerSpec) -> None:
    """A worker process: build its envs, then serve collect / evaluate / close commands from the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    torch.set_num_threads(1)
    conn, slices, exit_code = spec.conn, [], 0
    try:
        if spec.cpu is not None:
            os.sched_setaffinity(0, {spec.cpu})
        seed_worker(spec.seed, spec.index)
        watch = MainWatch(spec.main_pid, spec.stop_flag.numpy())
        samples, stats = numpify_buffer(spec.samples), numpify_buffer(spec.episode_stats)
        for half, (start, stop) in enumerate(spec.columns):
            ready = (spec.obs_ready[half], spec.act_ready[half]) if spec.env_only else (None, None)
            slices.append(EnvSlice(spec, start, stop, samples, stats, *ready))
        conn.send(("ready", None))
        while True:
            command, payload = watch.receive(conn)
            result = None
            if command == "close":
                break
            if command == "collect" and spec.env_only:
                step_envs_only(slices, spec.horizon, watch)
            elif command == "collect":
                collect_with_policy(spec, slices, watch, **payload)
            elif command == "evaluate":
                seeds, quotas, policy_kwargs = payload
                result = run_episodes(spec.eval_env_fn, spec.policy_step, spec.model, seeds, quotas,
                                      torch.device("cpu"), **policy_kwargs)
            else:
                raise ValueError(f"sampler worker got an unknown command {command!r}")
            conn.send(("done", result))
    except WorkerStopped:
        pass
    except BaseException as error:
        usage = isinstance(error, UsageError)  # bad input that only the envs reveal: one line, no traceback
        with suppress(OSError, ValueError):
            conn.send(("usage-error", str(error)) if usage else ("error", traceback.format_exc()))
        exit_code = 1
    for envs in slices:
        with suppress(Exception):
            envs.group.close()
    # Skip the interpreter's teardown (a second or more with torch loaded): nothing is left to clean up.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def check_split(kind: str, n_envs: int, n_workers: int) -> None:
    """UsageError unless --n-envs splits evenly over --n-workers (in two halves for alternating-gpu)."""
    n_halves = 2 if kind == "alternating-gpu" else 1
    if n_workers < 1 or n_envs % (n_halves * n_workers) != 0:
        raise UsageError(f"--sampler {kind}: --n-envs {n_envs} does not split evenly over --n-workers {n_workers}"
                         + (" in two alternating halves" if n_halves == 2 else "")
                         + f": use a multiple of {n_halves * max(n_workers, 1)}")


@atexit.register
def close_live_samplers() -> None:
    """At interpreter exit, stop the workers of samplers that were not closed."""
    for sampler in list(_LIVE_SAMPLERS):
        sampler.close()


class ParallelSampler:
    """Worker processes step the envs (and, in parallel-cpu, run the policy): see the module docstring."""

    def __init__(self, kind: str, env_fn: Callable[[int], Any], policy_step: PolicyStep, model: Any, n_envs: int,
                 horizon: int, seed: int, device: torch.device, n_workers: int, cpu_affinity: bool = False,
                 start_method: str = "forkserver", eval_env_fn: Callable[[int], Any] | None = None,
                 info_keys: Sequence[InfoKey] = ()):
        if kind not in PARALLEL_KINDS:
            raise UsageError(f"unknown parallel sampler {kind!r}: use one of {', '.join(PARALLEL_KINDS)}")
        check_split(kind, n_envs, n_workers)
        n_halves = 2 if kind == "alternating-gpu" else 1
        self.kind, self.policy_step, self.model, self.device = kind, policy_step, model, device
        self.n_envs, self.horizon, self.seed, self.n_workers = n_envs, horizon, seed, n_workers
        self.eval_env_fn, self.info_keys = eval_env_fn or env_fn, list(info_keys)
        self.training, self.shared_model = getattr(model, "training", False), None
        # Per worker: its process, pipe end and (env-only kinds) semaphores per half, obs_ready[w][h] and act_ready.
        self.processes, self.conns, self.obs_ready, self.act_ready = [], [], [], []
        self.stop_flag = torch.zeros(1, dtype=torch.int32).share_memory_()
        self.broken: str | None = None
        self.closed, self.owner_pid = False, os.getpid()
        half = n_envs // n_halves
        self.halves = [slice(h * half, (h + 1) * half) for h in range(n_halves)]
        self.rnn_state: list[Any] = [None] * n_halves  # env-only kinds: the main process runs the policy
        _LIVE_SAMPLERS.add(self)
        try:
            self._start(env_fn, cpu_affinity, start_method)
        except BaseException:
            self.close()
            raise

    @property
    def worker_pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def _start(self, env_fn: Callable[[int], Any], cpu_affinity: bool, start_method: str) -> None:
        probe = EnvGroup(env_fn, [self.seed])  # env 0's twin: the shapes and dtypes of one step
        try:
            self.example = samples_example(probe, self.policy_step, self.model, self.device)
        finally:
            probe.close()
        dims = (self.horizon, self.n_envs)
        self.samples = buffer_from_example(self.example, dims, share_memory=True)
        no_episode = EpisodeStats(np.bool_(False), np.float64(0), np.int64(0), np.zeros(len(self.info_keys)))
        self.episode_stats = buffer_from_example(no_episode, dims, share_memory=True)
        self.samples_np, self.stats_np = numpify_buffer(self.samples), numpify_buffer(self.episode_stats)
        env_only = self.kind != "parallel-cpu"
        if not env_only:
            self.shared_model = copy.deepcopy(self.model).cpu().share_memory()
        context = torch_mp.get_context(start_method)
        if start_method == "forkserver":
            context.set_forkserver_preload(["__main__", "common.samplers"])
        cpus = sorted(os.sched_getaffinity(0)) if cpu_affinity else None
        n_halves, per_worker = len(self.halves), self.n_envs // (len(self.halves) * self.n_workers)
        for w in range(self.n_workers):
            columns = [(half.start + w * per_worker, half.start + (w + 1) * per_worker) for half in self.halves]
            obs_ready = [context.Semaphore(0) for _ in range(n_halves)] if env_only else []
            act_ready = [context.Semaphore(0) for _ in range(n_halves)] if env_only else []
            main_conn, worker_conn = context.Pipe()
            spec = WorkerSpec(
                index=w, env_only=env_only, env_fn=env_fn, eval_env_fn=self.eval_env_fn,
                policy_step=self.policy_step, model=self.shared_model, columns=columns, seed=self.seed,
                info_keys=self.info_keys, horizon=self.horizon, samples=self.samples, episode_stats=self.episode_stats,
                stop_flag=self.stop_flag, obs_ready=obs_ready, act_ready=act_ready, conn=worker_conn,
                main_pid=os.getpid(), cpu=None if cpus is None else cpus[w % len(cpus)],
            )
            process = context.Process(target=worker_main, args=(spec,), name=f"sampler-worker-{w}", daemon=True)
            self.obs_ready.append(obs_ready)
            self.act_ready.append(act_ready)
            self.conns.append(main_conn)
            process.start()
            self.processes.append(process)
            worker_conn.close()
        self._wait_replies(range(self.n_workers))

    def collect(self, **policy_kwargs: Any) -> tuple[Samples, list[Episode]]:
        """Step every environment `horizon` times; returns the [T, B] batch and finished episodes."""
        self._check_usable()
        try:
            if self.kind == "parallel-cpu":
                self._send_all(("collect", {"training": self.training, "policy_kwargs": policy_kwargs}))
                self._wait_replies(range(self.n_workers))
            else:
                self._send_all(("collect", None))
                self._serve_policy(policy_kwargs)
        except BaseException as error:
            self.broken = self.broken or f"a collect was interrupted ({type(error).__name__})"
            raise
        return self.samples, self._finished_episodes()

    @torch.no_grad()
    def _serve_policy(self, policy_kwargs: dict) -> None:
        """Env-only kinds: per step, for each half, wait for its inputs, run the policy, hand out the actions."""
        for t in range(self.horizon):
            for h, columns in enumerate(self.halves):
                for ready in self.obs_ready:
                    self._acquire(ready[h])
                if t > 0:
                    self.rnn_state[h] = zero_rnn_state(self.rnn_state[h], self._done(t - 1, columns))
                self.rnn_state[h] = act(self.samples_np[t, columns], self.policy_step, self.model, self.rnn_state[h],
                                        self.device, **policy_kwargs)
                for ready in self.act_ready:
                    ready[h].release()
        self._wait_replies(range(self.n_workers))
        for h, columns in enumerate(self.halves):
            self.rnn_state[h] = zero_rnn_state(self.rnn_state[h], self._done(self.horizon - 1, columns))

    def _done(self, t: int, columns: slice) -> torch.Tensor:
        return torch.from_numpy(self.samples_np.terminated[t, columns] | self.samples_np.truncated[t, columns])

    def _finished_episodes(self) -> list[Episode]:
        times, envs = np.nonzero(self.stats_np.ended)  # row-major: by step, then env index
        ret, length, info = self.stats_np.ret, self.stats_np.length, self.stats_np.info
        keys = [key for key, _ in self.info_keys]
        return [Episode(float(ret[t, b]), int(length[t, b]), dict(zip(keys, info[t, b].tolist())))
                for t, b in zip(times, envs)]

    def sync(self, model: Any) -> None:
        """parallel-cpu: copy the model's parameters and buffers into the workers' shared copy."""
        self.model, self.training = model, getattr(model, "training", False)
        if self.shared_model is not None:
            self.shared_model.load_state_dict(model.state_dict())

    def evaluate(self, n_episodes: int, seed: int | None = None, **policy_kwargs: Any) -> list[Episode]:
        """The episodes of the module-level `evaluate`. parallel-cpu runs them in the workers (each a contiguous
        chunk of the evaluation envs, with the parameters of the last `sync`), the env-only kinds in this process."""
        seed = self.seed if seed is None else seed
        if self.shared_model is None:
            return evaluate(self.eval_env_fn, self.policy_step, self.model, n_episodes, seed, self.device,
                            **policy_kwargs)
        if n_episodes <= 0:
            return []
        self._check_usable()
        seeds, quotas = evaluation_plan(n_episodes, seed)
        chunks = [chunk for chunk in np.array_split(np.arange(len(seeds)), self.n_workers) if len(chunk)]
        try:
            for w, chunk in enumerate(chunks):
                self._send(w, ("evaluate", ([seeds[i] for i in chunk], [quotas[i] for i in chunk], policy_kwargs)))
            replies = self._wait_replies(range(len(chunks)))
        except BaseException as error:
            self.broken = self.broken or f"an evaluation was interrupted ({type(error).__name__})"
            raise
        return [episode for per_env in replies for episodes in per_env for episode in episodes]

    def _check_usable(self) -> None:
        if self.closed:
            raise SamplerError("the sampler is closed")
        if self.broken is not None:
            raise SamplerError(f"the sampler cannot continue: {self.broken}")

    def _send(self, w: int, message: tuple) -> None:
        try:
            self.conns[w].send(message)
        except (OSError, ValueError):
            raise self._failure(w) from None

    def _send_all(self, message: tuple) -> None:
        for w in range(self.n_workers):
            self._send(w, message)

    def _receive(self, w: int) -> Any:
        try:
            kind, payload = self.conns[w].recv()
        except (EOFError, OSError):
            raise self._failure(w) from None
        if kind in ("error", "usage-error"):
            raise self._worker_error(w, kind, payload)
        return payload

    def _wait_replies(self, workers: Any) -> list:
        """Each listed worker's next reply, in order; raises SamplerError as soon as one of them fails."""
        workers = list(workers)
        replies: dict[int, Any] = {}
        while len(replies) < len(workers):
            pending = [w for w in workers if w not in replies]
            handles = [self.conns[w] for w in pending] + [self.processes[w].sentinel for w in pending]
            wait_for_handles(handles, timeout=1.0)
            for w in pending:
                if self.conns[w].poll():
                    replies[w] = self._receive(w)
                elif self.processes[w].exitcode is not None:
                    raise self._failure(w)
        return [replies[w] for w in workers]

    def _acquire(self, semaphore: Any) -> None:
        while not semaphore.acquire(timeout=MAIN_POLL_S):
            self._check_workers()

    def _check_workers(self) -> None:
        for w, process in enumerate(self.processes):
            if self.conns[w].poll():
                self._receive(w)  # mid-collect, only an error can arrive: it raises
                raise self._fail(f"sampler worker {w} replied out of turn")
            if process.exitcode is not None:
                raise self._failure(w)

    def _worker_error(self, w: int, kind: str, payload: str) -> Exception:
        """A worker's reported error: its bad-input message as UsageError, else its traceback as SamplerError."""
        if kind == "usage-error":
            self.broken = self.broken or payload
            return UsageError(payload)
        return self._fail(f"sampler worker {w} (pid {self.processes[w].pid}) raised:\n{payload}")

    def _failure(self, w: int) -> Exception:
        """The error for a worker whose pipe broke or whose process ended: its own report if it sent one."""
        process = self.processes[w]
        with suppress(EOFError, OSError, ValueError):
            if self.conns[w].poll(0.5):
                kind, payload = self.conns[w].recv()
                if kind in ("error", "usage-error"):
                    return self._worker_error(w, kind, payload)
        process.join(0.5)
        code = process.exitcode
        status = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return self._fail(
            f"sampler worker {w} (pid {process.pid}) died ({status}) before it could report an error: it was "
            "killed, ran out of memory or crashed in native code, or it failed to start (see its stderr)"
        )

    def _fail(self, message: str) -> SamplerError:
        self.broken = self.broken or message
        return SamplerError(message)

    def close(self) -> None:
        """Stop the workers (asked first, then terminated) and free their resources; safe to call again."""
        if self.closed or os.getpid() != self.owner_pid:
            return
        self.closed = True
        _LIVE_SAMPLERS.discard(self)
        self.stop_flag[0] = 1
        for semaphores in self.act_ready:  # wake workers that wait for actions mid-collect
            for semaphore in semaphores:
                semaphore.release()
        for conn in self.conns:
            with suppress(OSError, ValueError):
                conn.send(("close", None))
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(1.0)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.conns:
            conn.close()
        # Dropping the semaphores unlinks their names (spawn / forkserver keep them in /dev/shm until then).
        self.processes, self.conns, self.obs_ready, self.act_ready = [], [], [], []


def make_sampler(args: Any, env_fn: Callable[[int], Any], policy_step: PolicyStep, model: Any, horizon: int,
                 device: torch.device | None = None, seed: int | None = None,
                 eval_env_fn: Callable[[int], Any] | None = None, start_step: int = 0):
    """Build the sampler selected by `--sampler` for `--n-envs` environments and `horizon` steps.

    `seed` (default: `training_seed(args.seed, start_step)`, where a run resumed at `start_step` picks up) seeds
    its envs; `device` (default: the model's) is where the main process runs the policy; `eval_env_fn` (default:
    `env_fn`) builds the envs of `sampler.evaluate`; `args.info_keys` (`--info-keys`, if the script has it) name
    the info values its episodes carry. Under data-parallel training every rank but rank 0 reseeds its generators
    here by (seed, rank), so that each explores on its own.
    """
    device = device if device is not None else next(model.parameters()).device
    seed = distributed.replica_seed(training_seed(args.seed, start_step) if seed is None else seed)
    if distributed.rank() > 0:
        seed_worker(seed, REPLICA_STREAM)
    info_keys = parse_info_keys(getattr(args, "info_keys", []))
    if args.sampler == "serial":
        return SerialSampler(env_fn, policy_step, model, args.n_envs, horizon, seed, device, eval_env_fn, info_keys)
    if args.sampler in PARALLEL_KINDS:
        return ParallelSampler(
            args.sampler, env_fn, policy_step, model, args.n_envs, horizon, seed, device, args.n_workers,
            cpu_affinity=getattr(args, "cpu_affinity", False), start_method=getattr(args, "start_method", "forkserver"),
            eval_env_fn=eval_env_fn, info_keys=info_keys,
        )
    raise UsageError(f"unknown --sampler {args.sampler!r}: use serial, {', '.join(PARALLEL_KINDS)}")
