"""Sampler throughput on Atari: agent steps per second of rlsolo's samplers against gymnasium and ale-py.

Every configuration steps `--n-envs` copies of `--env-id` (through `common.envs.make_env`: DeepMind
preprocessing, 4x84x84 uint8 observations, 4 frames per agent step) and stores a [T, B] batch of
observations, actions and rewards, either with a Nature-CNN actor-critic on `--device` (sampled actions,
log-prob and value, as in PPO) or with random actions (no network):

- rlsolo: `serial`, `parallel-cpu`, `parallel-gpu`, `alternating-gpu` (each with the most workers, up to
  `--n-workers`, that its envs split evenly over);
- gymnasium: `SyncVectorEnv` and `AsyncVectorEnv` (shared-memory observations) of the same envs, driven by
  a CleanRL-style loop with the same policy;
- ale-py: the C++ `AtariVectorEnv` (`--n-workers` threads, the same preprocessing), same loop.

Where the main process runs the policy, it is measured with 1 and with `nproc` torch threads, and the
better is kept (that choice is the user's); with `--device cuda` the main process runs it on the GPU, with
one thread (parallel-cpu's workers run their copies on the CPU whatever the device). The configurations
are measured in interleaved rounds, so that load from other processes hits them alike, and each reports its
best round (and the median), with the CPU time its processes spent per agent step in that round (all
threads, workers included: a measure of efficiency that load from other processes barely changes). The last
lines print the ratios the targets are stated in.

    python benchmark/sampler_throughput.py                     # about 4 minutes on 2 cores
    python benchmark/sampler_throughput.py --n-envs 16 --rounds 5 --policies cnn
    python benchmark/sampler_throughput.py --device cuda --n-envs 32 --policies cnn   # 16 cores and a GPU
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.distributions import Categorical

from common.envs import make_env
from common.namedarraytuple import namedarraytuple
from common.samplers import PARALLEL_KINDS, ParallelSampler, SerialSampler

AgentInfo = namedarraytuple("AgentInfo", ["log_prob", "value"])
OURS = ("serial",) + PARALLEL_KINDS
Config = Literal["serial", "parallel-cpu", "parallel-gpu", "alternating-gpu", "gym-sync", "gym-async", "ale-vector"]


@dataclass
class Args:
    env_id: str = "ALE/Pong-v5"
    """Atari game, as make_env takes it"""
    n_envs: int = 8
    """environments in every configuration"""
    n_workers: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    """at most this many worker processes in our parallel samplers (each takes the most that its envs split
    evenly over), and the threads of ale-py's vector env (default: the usable cores)"""
    horizon: int = 64
    """steps per environment in one collect (one rollout of the gymnasium loops)"""
    seconds: float = 2.0
    """measured time per configuration and round (after one warm-up rollout)"""
    rounds: int = 3
    """rounds over all configurations; each configuration reports its best round"""
    policies: tuple[str, ...] = ("cnn", "random")
    """cnn: Nature-CNN actor-critic on --device; random: uniform random actions, no network"""
    device: str = "cpu"
    """where the main process runs the network (cpu or cuda; parallel-cpu's workers run it on the CPU)"""
    configs: tuple[Config, ...] = OURS + ("gym-sync", "gym-async", "ale-vector")
    """configurations to measure"""
    start_method: str = "forkserver"
    """start method of our samplers' workers (throughput does not depend on it; forkserver starts fast)"""
    seed: int = 1
    """seed of the envs and the network"""


class NatureCNN(nn.Module):
    """Mnih et al. 2015 torso with PPO's actor and critic heads."""

    def __init__(self, n_actions: int):
        super().__init__()
        self.n_actions = n_actions
        self.torso = nn.Sequential(
            nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
        )
        self.actor = nn.Linear(512, n_actions)
        self.critic = nn.Linear(512, 1)


class RandomActions(nn.Module):
    def __init__(self, n_actions: int):
        super().__init__()
        self.n_actions = n_actions


def cnn_policy(model: NatureCNN, observation, prev_action, prev_reward, rnn_state, deterministic=False):
    hidden = model.torso(observation.float() / 255.0)
    distribution = Categorical(logits=model.actor(hidden))
    action = distribution.sample()
    return action, AgentInfo(distribution.log_prob(action), model.critic(hidden).squeeze(-1)), None


def random_policy(model: RandomActions, observation, prev_action, prev_reward, rnn_state, deterministic=False):
    return torch.randint(model.n_actions, (observation.shape[0],)), None, None


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads) so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure(rollout: Callable[[], None], steps_per_rollout: int, seconds: float,
            pids: list[int]) -> tuple[float, float]:
    """Agent steps per second of repeated rollouts (after one warm-up rollout), and CPU ms per agent step."""
    rollout()
    pids = [os.getpid(), *pids]
    n, start, cpu_start = 0, time.perf_counter(), cpu_seconds(pids)
    while time.perf_counter() - start < seconds:
        rollout()
        n += 1
    steps = n * steps_per_rollout
    return steps / (time.perf_counter() - start), 1e3 * (cpu_seconds(pids) - cpu_start) / steps


def ours(kind: str, env_fn, policy, model, args: Args) -> tuple[float, float]:
    device = torch.device(args.device)
    if kind == "serial":
        sampler = SerialSampler(env_fn, policy, model, args.n_envs, args.horizon, args.seed, device)
    else:
        sampler = ParallelSampler(kind, env_fn, policy, model, args.n_envs, args.horizon, args.seed, device,
                                  workers_of(kind, args), start_method=args.start_method)
    try:
        return measure(sampler.collect, args.n_envs * args.horizon, args.seconds, getattr(sampler, "worker_pids", []))
    finally:
        sampler.close()


def workers_of(kind: str, args: Args) -> int:
    """The most workers, up to --n-workers, that --n-envs splits evenly over for sampler `kind`."""
    halves = 2 if kind == "alternating-gpu" else 1
    fits = [w for w in range(1, args.n_workers + 1) if args.n_envs % (halves * w) == 0]
    if not fits:
        raise SystemExit(f"error: --n-envs {args.n_envs} cannot run {kind}: give an even number of envs")
    return fits[-1]


def vector_loop(envs, policy, model, args: Args) -> tuple[float, float]:
    """A CleanRL-style rollout loop: store obs, run the policy, step, store action / reward / done."""
    obs, _ = envs.reset(seed=args.seed)
    T, B = args.horizon, args.n_envs
    observations = np.zeros((T, B) + obs.shape[1:], obs.dtype)
    actions, rewards, dones = np.zeros((T, B), np.int64), np.zeros((T, B), np.float32), np.zeros((T, B), bool)
    log_probs, values = np.zeros((T, B), np.float32), np.zeros((T, B), np.float32)
    device = torch.device(args.device)
    prev_action, prev_reward = torch.zeros(B, dtype=torch.int64, device=device), torch.zeros(B, device=device)
    state = {"obs": obs}

    def rollout():
        for t in range(T):
            observations[t] = state["obs"]
            with torch.no_grad():
                observation = torch.from_numpy(state["obs"]).to(device)
                action, info, _ = policy(model, observation, prev_action, prev_reward, None)
            actions[t] = action.cpu().numpy()
            if info is not None:
                log_probs[t], values[t] = info.log_prob.cpu().numpy(), info.value.cpu().numpy()
            state["obs"], rewards[t], terminated, truncated, _ = envs.step(actions[t])
            dones[t] = terminated | truncated

    try:
        workers = [process.pid for process in getattr(envs, "processes", [])]  # AsyncVectorEnv's
        return measure(rollout, T * B, args.seconds, workers)
    finally:
        envs.close()


def make_vector_env(config: str, args: Args):
    if config == "ale-vector":
        from ale_py.vector_env import AtariVectorEnv

        name = args.env_id.split("/")[-1].split("-")[0].replace("NoFrameskip", "")
        game = "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))
        sticky = 0.25 if args.env_id.startswith("ALE/") else 0.0
        # make_env's training preprocessing: sticky actions of v5, noop reset, max-and-skip 4, episodic
        # life, fire reset, 84x84 grey, reward clipping, stack 4.
        return AtariVectorEnv(game, args.n_envs, num_threads=args.n_workers, repeat_action_probability=sticky,
                              episodic_life=True, reward_clipping=True, use_fire_reset=True, noop_max=30,
                              frameskip=4, maxpool=True, stack_num=4, img_height=84, img_width=84)
    env_fns = [partial(make_env, args.env_id, args.seed + i) for i in range(args.n_envs)]
    if config == "gym-sync":
        return gym.vector.SyncVectorEnv(env_fns)
    assert config == "gym-async", config
    return gym.vector.AsyncVectorEnv(env_fns, shared_memory=True)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"


def main(args: Args) -> None:
    probe = make_env(args.env_id, args.seed)
    n_actions = int(probe.action_space.n)
    probe.close()
    env_fn = partial(make_env, args.env_id)
    n_cpus = len(os.sched_getaffinity(0))
    workers = ", ".join(f"{kind} {workers_of(kind, args)}" for kind in args.configs if kind in PARALLEL_KINDS)
    print(f"{args.env_id}, {args.n_envs} envs, workers: {workers or '-'}, horizon {args.horizon}, "
          f"{args.rounds} rounds of {args.seconds:g} s per configuration; {n_cpus} CPUs ({cpu_model()}); "
          f"torch {torch.__version__}, gymnasium {gym.__version__}; network on {device_name(args.device)}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    models = {"cnn": (NatureCNN, cnn_policy), "random": (RandomActions, random_policy)}
    runs = [
        (policy_name, config, threads)
        for policy_name in args.policies
        for config in args.configs
        # parallel-cpu's workers run the policy with one thread each; elsewhere the main process runs it (on
        # the CPU with 1 or all threads, or on the GPU).
        for threads in ([1] if policy_name == "random" or config == "parallel-cpu" or args.device != "cpu"
                        else sorted({1, n_cpus}))
    ]
    # Rounds interleave the configurations, so that load from other processes hits them alike; the best
    # round of each is reported.
    measured: dict[tuple[str, str, int], list[tuple[float, float]]] = {run: [] for run in runs}
    for _ in range(args.rounds):
        for policy_name, config, threads in runs:
            torch.manual_seed(args.seed)
            model_cls, policy = models[policy_name]
            model = model_cls(n_actions).to(args.device)
            torch.set_num_threads(threads)
            if config in OURS:
                result = ours(config, env_fn, policy, model, args)
            else:
                result = vector_loop(make_vector_env(config, args), policy, model, args)
            measured[policy_name, config, threads].append(result)
    torch.set_num_threads(n_cpus)

    print(f"{'policy':<8} {'sampler':<16} {'main threads':>12} {'steps/s':>9} {'median':>9} {'CPU ms/step':>12}")
    best: dict[tuple[str, str], float] = {}
    for policy_name in args.policies:
        for config in args.configs:
            options = []
            for (p, c, threads), results in measured.items():
                if (p, c) == (policy_name, config):
                    sps, cpu_ms = max(results)
                    options.append((sps, threads, float(np.median([r[0] for r in results])), cpu_ms))
            sps, threads, median, cpu_ms = max(options)
            best[policy_name, config] = sps
            print(f"{policy_name:<8} {config:<16} {threads:>12} {sps:>9.0f} {median:>9.0f} {cpu_ms:>12.3f}")

    def best_of(policy_name: str, configs) -> tuple[float, str]:
        candidates = [(best[policy_name, c], c) for c in configs if (policy_name, c) in best]
        return max(candidates) if candidates else (float("nan"), "-")

    for policy_name in args.policies:
        our_sps, our_config = best_of(policy_name, OURS)
        ale_sps, _ = best_of(policy_name, ["ale-vector"])
        print(f"{policy_name}: best rlsolo ({our_config}) / ale-py AtariVectorEnv = {our_sps / ale_sps:.2f}")
    for policy_name in args.policies:
        our_sps, our_config = best_of(policy_name, OURS)
        gym_sps, gym_config = best_of(policy_name, ["gym-sync", "gym-async"])
        print(f"{policy_name}: best rlsolo ({our_config}) / best gymnasium ({gym_config}) = {our_sps / gym_sps:.2f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
