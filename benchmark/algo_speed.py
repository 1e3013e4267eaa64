"""Q-function policy gradient speed: sac.py and td3.py against a straightforward implementation of their update.

Three measurements, all with the networks and batch size of the scripts' defaults (or --hidden-size):

1. Update throughput in isolation (gradient updates per second, on fixed replay batches of Hopper-v5's
   shapes): the scripts' own update (imported from algos/sac.py and algos/td3.py: stacked twin critics in
   one torch.baddbmm per layer, fused Adam, no gradient into the critics' weights from the actor loss,
   foreach Polyak averaging), eager, with torch.compile and (on CUDA) as with --cudagraphs, against a
   reference written here the way a straightforward script does it: two critic networks called separately,
   one plain `torch.optim.Adam` per network, torch.distributions for the squashed Gaussian, a Python loop for
   the Polyak average.
2. Twin-critic evaluation alone (critic loss, forward and backward): two separate networks, torch.func
   (`functional_call` + `vmap` over stacked parameters) and the stacked-weights baddbmm layer of the scripts.
3. The matmul floor: every matrix product one eager update of each script makes, forward and backward
   (`mm`, `addmm`, `bmm`, `baddbmm`, recorded with a dispatch mode over two updates, td3's actor update
   coming every second one), replayed alone on tensors of the same shapes and strides. Its share of the
   eager update is the part of the update that any implementation of the same networks pays.
4. End to end: environment steps per second of `python algos/{sac,td3}.py --env-id Hopper-v5` after learning
   starts (replay ratio 1: one update per step), eager and --compile.

Configurations of 1, 2 and 3 are timed in interleaved rounds, so that load from other processes hits them
alike; each reports its median round, by wall clock and by process CPU time (the steadier of the two on a
shared machine). The last lines print the ratios against the reference (taken on CPU time, on wall clock
with --device cuda).

    python benchmark/algo_speed.py                       # about 6 minutes on 2 cores
    python benchmark/algo_speed.py --device cuda         # the same on a GPU
    python benchmark/algo_speed.py --no-end-to-end --hidden-size 64
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions import Normal
from torch.func import functional_call, stack_module_state, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from common.envs import make_env
from common.kernels import polyak_update
from common.namedarraytuple import buffer_to
from common.networks import qpg_defaults
from common.replay import ReplaySamples

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    device: str = "cpu"
    """cpu or cuda"""
    hidden_size: int | None = None
    """width of the MLPs (default: the scripts' default on Hopper-v5, 256)"""
    batch_size: int = 256
    """transitions per update"""
    obs_dim: int = 11
    """observation size (Hopper-v5: 11)"""
    act_dim: int = 3
    """action size (Hopper-v5: 3)"""
    seconds: float = 2.0
    """timed seconds per configuration and round"""
    rounds: int = 5
    """interleaved rounds; each configuration reports its median"""
    compile: bool = True
    """also time the torch.compile'd update (and run the scripts with --compile)"""
    cudagraphs: bool = True
    """on CUDA, also time the update as the scripts run it with --cudagraphs (compiled losses in CUDA graphs)"""
    end_to_end: bool = True
    """also run sac.py and td3.py on Hopper-v5"""
    e2e_steps: int = 4000
    """--total-timesteps of the end-to-end runs"""
    e2e_learning_starts: int = 1000
    """--learning-starts of the end-to-end runs (steps per second is measured after it, plus a warm-up)"""
    torch_threads: int = 1
    """torch intra-op threads (the scripts' default is 1)"""


def load_script(name: str):
    """Import algos/<name>.py as a module (its `main` is not run)."""
    spec = importlib.util.spec_from_file_location(f"rlsolo_{name}", ROOT / "algos" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def mlp(n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


def fake_batches(args: Args, device: torch.device, n: int = 8) -> list:
    """Replay samples with Hopper's dtypes (float64 observations, float32 actions in [-1, 1])."""
    b, o, a = args.batch_size, args.obs_dim, args.act_dim
    return [buffer_to(ReplaySamples(
        observation=torch.randn(b, o, dtype=torch.float64), action=torch.rand(b, a) * 2 - 1,
        n_step_return=torch.randn(b), bootstrap_observation=torch.randn(b, o, dtype=torch.float64),
        discount=torch.full((b,), 0.99), weight=torch.ones(b), index=torch.arange(b),
    ), device) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# Straightforward references
# --------------------------------------------------------------------------------------------------


class ReferenceSAC:
    """SAC as a straightforward script writes it: separate critics, one plain Adam per network."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, device: torch.device):
        self.qf1, self.qf2 = mlp(obs_dim + act_dim, 1, hidden).to(device), mlp(obs_dim + act_dim, 1, hidden).to(device)
        self.qf1_target, self.qf2_target = copy.deepcopy(self.qf1), copy.deepcopy(self.qf2)
        self.actor = mlp(obs_dim, 2 * act_dim, hidden).to(device)
        self.log_alpha = torch.zeros(1, device=device, requires_grad=True)
        self.q1_optimizer = torch.optim.Adam(self.qf1.parameters(), lr=1e-3)
        self.q2_optimizer = torch.optim.Adam(self.qf2.parameters(), lr=1e-3)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=3e-4)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=1e-3)
        self.target_entropy = -float(act_dim)

    def policy(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.actor(obs.float()).chunk(2, -1)
        log_std = -5.0 + 3.5 * (torch.tanh(log_std) + 1)
        normal = Normal(mean, log_std.exp())
        pre_tanh = normal.rsample()
        action = torch.tanh(pre_tanh)
        log_prob = normal.log_prob(pre_tanh) - torch.log(1 - action.pow(2) + 1e-6)
        return action, log_prob.sum(-1)

    def update(self, s) -> None:
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_action, next_log_prob = self.policy(s.bootstrap_observation)
            x = torch.cat([s.bootstrap_observation.float(), next_action], -1)
            next_q = torch.min(self.qf1_target(x), self.qf2_target(x)).squeeze(-1)
            target = s.n_step_return + s.discount * (next_q - alpha * next_log_prob)
        x = torch.cat([s.observation.float(), s.action], -1)
        q_loss = F.mse_loss(self.qf1(x).squeeze(-1), target) + F.mse_loss(self.qf2(x).squeeze(-1), target)
        self.q1_optimizer.zero_grad()
        self.q2_optimizer.zero_grad()
        q_loss.backward()
        self.q1_optimizer.step()
        self.q2_optimizer.step()

        action, log_prob = self.policy(s.observation)
        x = torch.cat([s.observation.float(), action], -1)
        actor_loss = (alpha * log_prob - torch.min(self.qf1(x), self.qf2(x)).squeeze(-1)).mean()
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.actor_optimizer.step()
        alpha_loss = (-self.log_alpha.exp() * (log_prob.detach() + self.target_entropy)).mean()
        self.alpha_optimizer.zero_grad()
        alpha_loss.backward()
        self.alpha_optimizer.step()
        for net, target_net in [(self.qf1, self.qf1_target), (self.qf2, self.qf2_target)]:
            for param, target_param in zip(net.parameters(), target_net.parameters()):
                target_param.data.copy_(0.005 * param.data + 0.995 * target_param.data)


class ReferenceTD3:
    """TD3 as a straightforward script writes it: separate critics, one plain Adam per network."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, device: torch.device):
        self.qf1, self.qf2 = mlp(obs_dim + act_dim, 1, hidden).to(device), mlp(obs_dim + act_dim, 1, hidden).to(device)
        self.actor = mlp(obs_dim, act_dim, hidden).to(device)
        self.qf1_target, self.qf2_target = copy.deepcopy(self.qf1), copy.deepcopy(self.qf2)
        self.actor_target = copy.deepcopy(self.actor)
        self.q1_optimizer = torch.optim.Adam(self.qf1.parameters(), lr=1e-3)
        self.q2_optimizer = torch.optim.Adam(self.qf2.parameters(), lr=1e-3)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=1e-3)
        self.n_updates = 0

    def update(self, s) -> None:
        with torch.no_grad():
            next_action = torch.tanh(self.actor_target(s.bootstrap_observation.float()))
            noise = (torch.randn_like(next_action) * 0.2).clamp(-0.5, 0.5)
            next_action = (next_action + noise).clamp(-1, 1)
            x = torch.cat([s.bootstrap_observation.float(), next_action], -1)
            next_q = torch.min(self.qf1_target(x), self.qf2_target(x)).squeeze(-1)
            target = s.n_step_return + s.discount * next_q
        x = torch.cat([s.observation.float(), s.action], -1)
        q_loss = F.mse_loss(self.qf1(x).squeeze(-1), target) + F.mse_loss(self.qf2(x).squeeze(-1), target)
        self.q1_optimizer.zero_grad()
        self.q2_optimizer.zero_grad()
        q_loss.backward()
        self.q1_optimizer.step()
        self.q2_optimizer.step()
        self.n_updates += 1
        if self.n_updates % 2 == 0:
            obs = s.observation.float()
            actor_loss = -self.qf1(torch.cat([obs, torch.tanh(self.actor(obs))], -1)).mean()
            self.actor_optimizer.zero_grad()
            actor_loss.backward()
            self.actor_optimizer.step()
            for net, target_net in [(self.qf1, self.qf1_target), (self.qf2, self.qf2_target),
                                    (self.actor, self.actor_target)]:
                for param, target_param in zip(net.parameters(), target_net.parameters()):
                    target_param.data.copy_(0.005 * param.data + 0.995 * target_param.data)


# --------------------------------------------------------------------------------------------------
# The scripts' updates (their functions, in the order of their training loops)
# --------------------------------------------------------------------------------------------------


def sac_update(sac, hidden: int, args: Args, device: torch.device, compile: bool, cudagraphs: bool) -> Callable:
    low, high = -np.ones(args.act_dim, np.float32), np.ones(args.act_dim, np.float32)
    actor = sac.Actor(np.zeros(args.obs_dim, np.float32), args.act_dim, hidden, low, high).to(device)
    critics = sac.Critics(np.zeros(args.obs_dim, np.float32), args.act_dim, hidden).to(device)
    target_critics = copy.deepcopy(critics).requires_grad_(False)
    log_alpha = torch.zeros((), device=device, requires_grad=True)
    critic_optimizer = sac.adam(critics.parameters(), 1e-3, device)
    actor_optimizer = sac.adam([{"params": actor.parameters()}, {"params": [log_alpha], "lr": 1e-3}], 3e-4, device)
    q_loss_fn = sac.compile_fn(sac.soft_q_loss, compile, cudagraphs)
    actor_loss_fn = sac.compile_fn(sac.actor_and_alpha_loss, compile, cudagraphs)

    def update(s) -> None:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        q_loss, _ = q_loss_fn(critics, target_critics, actor, log_alpha, s)
        critic_optimizer.zero_grad(set_to_none=True)
        q_loss.backward()
        critic_optimizer.step()
        loss, _ = actor_loss_fn(actor, critics, log_alpha, s.observation, -float(args.act_dim))
        actor_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        actor_optimizer.step()
        polyak_update(target_critics.parameters(), critics.parameters(), 0.005)

    return update


def td3_update(td3, hidden: int, args: Args, device: torch.device, compile: bool, cudagraphs: bool) -> Callable:
    low, high = -np.ones(args.act_dim, np.float32), np.ones(args.act_dim, np.float32)
    actor = td3.Actor(np.zeros(args.obs_dim, np.float32), args.act_dim, hidden, low, high).to(device)
    critics = td3.Critics(np.zeros(args.obs_dim, np.float32), args.act_dim, hidden).to(device)
    target_actor, target_critics = copy.deepcopy(actor), copy.deepcopy(critics)
    target_actor.requires_grad_(False)
    target_critics.requires_grad_(False)
    actor_optimizer = td3.adam(actor.parameters(), 1e-3, device)
    critic_optimizer = td3.adam(critics.parameters(), 1e-3, device)
    critic_loss_fn = td3.compile_fn(td3.td3_critic_loss, compile, cudagraphs)
    actor_loss_fn = td3.compile_fn(td3.td3_actor_loss, compile, cudagraphs)
    n_updates = [0]

    def update(s) -> None:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        q_loss, _ = critic_loss_fn(critics, target_critics, target_actor, s, 0.2, 0.5)
        critic_optimizer.zero_grad(set_to_none=True)
        q_loss.backward()
        critic_optimizer.step()
        n_updates[0] += 1
        if n_updates[0] % 2 == 0:
            actor_loss = actor_loss_fn(actor, critics, s.observation)
            actor_optimizer.zero_grad(set_to_none=True)
            actor_loss.backward()
            actor_optimizer.step()
            polyak_update(target_actor.parameters(), actor.parameters(), 0.005)
            polyak_update(target_critics.parameters(), critics.parameters(), 0.005)

    return update


# --------------------------------------------------------------------------------------------------
# Twin-critic evaluation: three ways
# --------------------------------------------------------------------------------------------------


def critic_steps(sac, hidden: int, args: Args, device: torch.device) -> dict[str, Callable]:
    """Critic loss forward + backward of two critics, by separate calls, torch.func vmap and stacked baddbmm."""
    n_in = args.obs_dim + args.act_dim
    qf1, qf2 = mlp(n_in, 1, hidden).to(device), mlp(n_in, 1, hidden).to(device)
    stacked_params, stacked_buffers = stack_module_state([qf1, qf2])
    stacked_params = {k: v.detach().requires_grad_() for k, v in stacked_params.items()}
    skeleton = copy.deepcopy(qf1).to("meta")
    critics = sac.Critics(np.zeros(args.obs_dim, np.float32), args.act_dim, hidden).to(device)

    def separate(s) -> None:
        x = torch.cat([s.observation.float(), s.action], -1)
        target = s.n_step_return
        (F.mse_loss(qf1(x).squeeze(-1), target) + F.mse_loss(qf2(x).squeeze(-1), target)).backward()

    def func_vmap(s) -> None:
        x = torch.cat([s.observation.float(), s.action], -1)
        q = vmap(lambda p, b: functional_call(skeleton, (p, b), (x,)))(stacked_params, stacked_buffers)
        (q.squeeze(-1) - s.n_step_return).pow(2).mean(1).sum().backward()

    def baddbmm(s) -> None:
        (critics(s.observation, s.action) - s.n_step_return).pow(2).mean(1).sum().backward()

    return {"separate calls": separate, "torch.func vmap": func_vmap, "stacked baddbmm": baddbmm}


# --------------------------------------------------------------------------------------------------
# The matmul floor
# --------------------------------------------------------------------------------------------------

MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default)


class RecordMatmuls(TorchDispatchMode):
    """Records every matrix product dispatched while active (autograd's backward included): op, arguments."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS:
            layout = lambda a: (tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
            self.calls.append((func, [layout(a) for a in args], dict(kwargs)))
        return func(*args, **kwargs)


def record_matmuls(update: Callable, batches: list, n_updates: int = 2) -> list[list[tuple]]:
    """The matrix products of each of `n_updates` successive calls of `update`, one list per call."""
    per_update = []
    for i in range(n_updates):
        with RecordMatmuls() as recorder:
            update(batches[i % len(batches)])
        per_update.append(recorder.calls)
    return per_update


def matmul_floor(per_update: list[list[tuple]]) -> Callable:
    """A step that runs one recorded update's matrix products (in turn) on random tensors of their layout."""
    def tensor(shape, stride, dtype, device) -> torch.Tensor:
        size = 1 + sum((n - 1) * step for n, step in zip(shape, stride))  # expanded (stride-0) layouts too
        return torch.empty(size, dtype=dtype, device=device).normal_().as_strided(shape, stride)
    replays = [[(func, [tensor(*a) if isinstance(a, tuple) and len(a) == 4 and isinstance(a[0], tuple) else a
                        for a in args], kwargs) for func, args, kwargs in calls] for calls in per_update]
    n = [0]

    def step(_s) -> None:
        for func, args, kwargs in replays[n[0] % len(replays)]:
            func(*args, **kwargs)
        n[0] += 1

    return step


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_rounds(configs: dict[str, Callable], batches: list, args: Args, device: torch.device) -> dict[str, tuple]:
    """Calls per second of each config, timed in interleaved rounds; {name: (median wall, median CPU)}."""
    for step in configs.values():  # warm-up (and compilation)
        for i in range(20):
            step(batches[i % len(batches)])
    sync(device)
    wall: dict[str, list] = {name: [] for name in configs}
    cpu: dict[str, list] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, step in configs.items():
            n, wall_start, cpu_start = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - wall_start < args.seconds:
                for _ in range(10):
                    step(batches[n % len(batches)])
                    n += 1
                sync(device)
            wall[name].append(n / (time.perf_counter() - wall_start))
            cpu[name].append(n / max(time.process_time() - cpu_start, 1e-9))
    return {name: (float(np.median(wall[name])), float(np.median(cpu[name]))) for name in configs}


def end_to_end(script: str, compile: bool, args: Args, hidden: int) -> float:
    """Environment steps per second of `algos/<script>.py` on Hopper-v5 after learning starts (and a warm-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--env-id", "Hopper-v5", "--total-timesteps", str(args.e2e_steps),
                 "--learning-starts", str(args.e2e_learning_starts), "--hidden-size", str(hidden),
                 "--batch-size", str(args.batch_size), "--device", args.device,
                 "--torch-threads", str(args.torch_threads), "--eval-episodes", "0", "--no-save-model",
                 "--log-every-s", "0.5", "--output-dir", tmp, "--run-name", "run"] + (["--compile"] if compile else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(args.torch_threads), "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, str(ROOT / "algos" / f"{script}.py"), *flags], cwd=ROOT, env=env,
                       check=True, capture_output=True, text=True)
        with open(Path(tmp) / "run" / "progress.csv", newline="") as f:
            rows = [(int(r["global_step"]), float(r["wall_time_s"])) for r in csv.DictReader(f)]
    warm = args.e2e_learning_starts + (args.e2e_steps - args.e2e_learning_starts) // 4
    timed = [(step, t) for step, t in rows if step >= warm]
    (first_step, first_t), (last_step, last_t) = timed[0], timed[-1]
    return (last_step - first_step) / max(last_t - first_t, 1e-9)


def main(args: Args) -> None:
    device = torch.device(args.device)
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    sac, td3 = load_script("sac"), load_script("td3")
    probe = make_env("Hopper-v5")
    flags = SimpleNamespace(hidden_size=args.hidden_size, learning_starts=None)
    qpg_defaults(flags, probe)  # the scripts' width on Hopper-v5 unless --hidden-size says otherwise
    hidden = flags.hidden_size
    probe.close()
    batches = fake_batches(args, device)
    print(f"# {platform.node()} | {platform.processor() or platform.machine()} | {os.cpu_count()} CPUs | "
          f"torch {torch.__version__} | device {device} | {args.torch_threads} torch thread(s) | "
          f"{time.strftime('%Y-%m-%d %H:%M')} | load average {os.getloadavg()[0]:.1f}")
    print(f"# networks {hidden}x{hidden}, batch {args.batch_size}, obs {args.obs_dim}, actions {args.act_dim}\n")

    # On a GPU the host's CPU time says little about the device's work: the ratios are taken on wall clock.
    by, by_name = (0, "wall clock") if device.type == "cuda" else (1, "CPU time")
    print(f"| update (updates/s) | wall clock | CPU time | ratio ({by_name}) |")
    print("|---|---|---|---|", flush=True)
    results: dict[str, dict[str, tuple]] = {}
    for algo, ours, reference in [("sac", partial_update(sac_update, sac), ReferenceSAC),
                                  ("td3", partial_update(td3_update, td3), ReferenceTD3)]:
        configs = {"reference": reference(args.obs_dim, args.act_dim, hidden, device).update,
                   "rlsolo eager": ours(hidden, args, device, False, False)}
        if args.compile:
            configs["rlsolo compile"] = ours(hidden, args, device, True, False)
        if args.cudagraphs and device.type == "cuda":
            configs["rlsolo cudagraphs"] = ours(hidden, args, device, True, True)
        results[algo] = rows = time_rounds(configs, batches, args, device)
        # Each algorithm's rows as soon as they are timed: a run stopped at a time limit keeps them.
        for name, times in rows.items():
            ratio = times[by] / rows["reference"][by]
            print(f"| {algo} {name} | {times[0]:.0f} | {times[1]:.0f} | {ratio:.2f}x |", flush=True)

    floors = {}
    for algo, ours in [("sac", partial_update(sac_update, sac)), ("td3", partial_update(td3_update, td3))]:
        per_update = record_matmuls(ours(hidden, args, device, False, False), batches)
        floors[algo] = (sum(map(len, per_update)) / len(per_update),
                        time_rounds({"matmuls alone": matmul_floor(per_update),
                                     "rlsolo eager": ours(hidden, args, device, False, False)}, batches, args, device))
    print(f"\n| matmul floor, per update | matrix products | matmuls alone (updates/s, {by_name}) | "
          f"rlsolo eager (updates/s, {by_name}) | share of the eager update |")
    print("|---|---|---|---|---|")
    for algo, (n_matmuls, rows) in floors.items():
        alone, eager = rows["matmuls alone"][by], rows["rlsolo eager"][by]
        print(f"| {algo} | {n_matmuls:g} | {alone:.0f} | {eager:.0f} | {100 * eager / alone:.0f}% |")

    critic = time_rounds(critic_steps(sac, hidden, args, device), batches, args, device)
    print("\n| twin critics, loss forward + backward (calls/s) | wall clock | CPU time |")
    print("|---|---|---|")
    for name, (wall, cpu) in critic.items():
        print(f"| {name} | {wall:.0f} | {cpu:.0f} |")

    if args.end_to_end:
        print(f"\n| Hopper-v5 end to end, steps/s after {args.e2e_learning_starts} learning-starts steps | eager |"
              + (" --compile |" if args.compile else ""))
        print("|---|---|" + ("---|" if args.compile else ""))
        for script in ("sac", "td3"):
            row = f"| {script}.py | {end_to_end(script, False, args, hidden):.0f} |"
            if args.compile:
                row += f" {end_to_end(script, True, args, hidden):.0f} |"
            print(row, flush=True)

    print()
    for algo, rows in results.items():
        best = max((name for name in rows if name != "reference"), key=lambda name: rows[name][by])
        print(f"{algo}: {best} / reference updates per second = {rows[best][1] / rows['reference'][1]:.2f}x "
              f"(CPU time), {rows[best][0] / rows['reference'][0]:.2f}x (wall clock)")


def partial_update(builder: Callable, module) -> Callable:
    return lambda hidden, args, device, compile, cudagraphs: builder(module, hidden, args, device, compile, cudagraphs)


if __name__ == "__main__":
    main(tyro.cli(Args))
