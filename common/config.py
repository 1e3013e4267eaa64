"""The shared command-line flags every script composes into its own `Args`, and the script entry point.

A script declares a dataclass `Args(CommonArgs, ...)` whose fields each carry a docstring (their --help text) and
calls `run(main, Args)`: it parses the flags (tyro), reloads a saved config for `--resume <run dir>`, validates the
combination and turns every `UsageError` into a one-line message and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import torch
import tyro

from common import distributed
from common.envs import UsageError, require_rgb_array
from common.samplers import check_split, parse_info_keys

__all__ = ["UsageError", "CommonArgs", "ExperimentArgs", "SamplerArgs", "LoggingArgs", "AsyncArgs", "ReplayArgs",
           "QLearningArgs", "QPGArgs", "PPOArgs", "AtariArgs", "run", "resolve_device", "setup"]

# A --flag / --no-flag pair whose default, None, the script replaces by the env's kind (e.g. sac.py's --autotune).
EnvDefaultFlag = Annotated[bool | None, tyro.conf.DisallowNone]


@dataclass
class ExperimentArgs:
    env_id: str = "CartPole-v1"
    """environment id: gymnasium (CartPole-v1, Hopper-v5), Atari (ALE/Pong-v5, PongNoFrameskip-v4), 'module:Id-v0'"""
    seed: int = 1
    """seed of the run (environments, networks, exploration)"""
    total_timesteps: int = 100_000
    """environment steps to train for per data-parallel rank, summed over its --n-envs environments"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where the networks live: 'auto' picks CUDA when present"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic` and seed every generator"""
    compile: bool = False
    """torch.compile the update step (off by default on CPU)"""
    torch_threads: int = 1
    """torch intra-op threads of the main process (small networks on CPU run fastest on one)"""


@dataclass
class SamplerArgs:
    sampler: Literal["serial", "parallel-cpu", "parallel-gpu", "alternating-gpu"] = "serial"
    """how environments are stepped: serial | parallel-cpu | parallel-gpu | alternating-gpu"""
    n_envs: int = 1
    """training environments per data-parallel rank (split over --n-workers by the parallel samplers)"""
    n_workers: int = 2
    """worker processes of the parallel samplers (ignored by serial)"""
    n_gpus: int = 0
    """data-parallel training on this many GPUs, one process each (NCCL); 0: one process on --device"""
    n_procs: int = 0
    """data-parallel training in this many local processes on --device (gloo on CPU); --n-gpus: same, a GPU each"""
    cpu_affinity: bool = False
    """pin each sampler worker to one CPU core"""
    start_method: Literal["forkserver", "spawn", "fork"] = "forkserver"
    """start method of the sampler workers and sampling process: forkserver and spawn are safe with CUDA, fork is not"""


@dataclass
class LoggingArgs:
    output_dir: str = "runs"
    """where run directories are created"""
    run_name: str | None = None
    """name of the run directory (default: <script>__<env>__<seed>__<time>-<pid>)"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "rlsolo"
    """W&B project"""
    wandb_entity: str | None = None
    """W&B entity (team or user)"""
    wandb_group: str | None = None
    """W&B group of the run (default: <script>__<env>; the launcher groups its runs by launch)"""
    capture_video: bool = False
    """record evaluation episodes to <run dir>/videos/"""
    save_model: bool = True
    """write checkpoints (periodically and at the end) into the run directory"""
    checkpoint_every_s: float = 30.0
    """seconds between periodic checkpoints"""
    resume: str | None = None
    """continue the run saved in this directory (its saved config is used)"""
    init_from: str | None = None
    """start a new run from the networks and normalisation statistics saved in this run directory"""
    eval_every: int = 0
    """environment steps between evaluations during training (0: only at the end)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes (after training and at every --eval-every)"""
    log_every_s: float = 2.0
    """seconds between console progress lines"""
    info_keys: list[str] = field(default_factory=list)
    """numeric env info entries to log per training episode as charts/info/KEY: KEY:sum (episode total) or KEY[:last]"""


@dataclass
class CommonArgs(ExperimentArgs, SamplerArgs, LoggingArgs):
    """The flags shared by every script."""


@dataclass
class AsyncArgs:
    async_sampling: bool = False
    """sample in a separate process into a shared-memory replay buffer while the main process optimizes"""
    async_max_lag: int | None = None
    """environment steps the sampling process may run ahead of the optimizer (default: 4 collects)"""


@dataclass
class ReplayArgs(AsyncArgs):
    """The replay flags of the deep-Q and Q-function policy gradient scripts (each script sets its defaults)."""

    buffer_size: int = 1_000_000
    """replay capacity in transitions"""
    batch_size: int = 256
    """transitions per gradient update"""
    gamma: float = 0.99
    """discount factor"""
    n_step: int = 1
    """n-step returns: the target sums n discounted rewards, then bootstraps (cut at an episode's end)"""
    replay_ratio: float = 1.0
    """gradient updates per sampled environment step (whatever the number of environments)"""
    learning_starts: int = 1_000
    """environment steps before the first update"""
    tau: float = 1.0
    """target update rate: 1 copies the online network, < 1 is a Polyak average"""
    num_steps: int = 1
    """environment steps per environment per collect"""
    checkpoint_replay: bool = False
    """also save the replay buffer in checkpoints, so --resume continues with it"""


@dataclass
class QLearningArgs(ReplayArgs):
    """The deep-Q flags: Adam, a periodically updated target network, epsilon-greedy exploration, priorities."""

    learning_rate: float = 1e-3
    """Adam learning rate"""
    adam_eps: float = 1e-8
    """Adam epsilon"""
    max_grad_norm: float = 10.0
    """gradient clipping norm"""
    target_network_period: int = 2_000
    """gradient updates between target-network updates"""
    start_epsilon: float = 1.0
    """initial exploration rate"""
    end_epsilon: float = 0.01
    """final exploration rate"""
    exploration_fraction: float = 0.1
    """fraction of --total-timesteps over which epsilon decays linearly"""
    priority_alpha: float = 0.5
    """prioritization exponent (with prioritized replay)"""
    priority_beta: float = 0.4
    """initial importance-sampling exponent, annealed to 1 over training (with prioritized replay)"""


@dataclass
class QPGArgs(ReplayArgs):
    """The Q-function policy gradient flags (ddpg, td3, sac): an actor, critics and Polyak-averaged targets."""

    tau: float = 0.005
    """target-network Polyak rate"""
    learning_starts: int | None = None
    """uniformly random environment steps before the first update (default: 10000 for MuJoCo envs, 1000 for others)"""
    policy_lr: float = 1e-3
    """Adam learning rate of the actor"""
    q_lr: float = 1e-3
    """Adam learning rate of the critics"""
    hidden_size: int | None = None
    """width of the actor and critic MLPs (default: 256 for MuJoCo envs, 64 for the others)"""
    log_every_updates: int = 100
    """gradient updates between loss logs (each log is one host sync)"""
    cudagraphs: bool = False
    """CUDA only: capture the compiled losses in CUDA graphs (torch.compile mode 'reduce-overhead')"""


@dataclass
class PPOArgs:
    """The PPO flags (ppo, ppo_atari, ppo_atari_lstm): a clipped surrogate on GAE advantages, epochs of minibatches."""

    num_steps: int = 128
    """environment steps per environment per rollout"""
    learning_rate: float = 2.5e-4
    """Adam learning rate"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to zero"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 4
    """optimization epochs per rollout"""
    norm_adv: bool = True
    """normalize advantages per minibatch"""
    clip_coef: float = 0.1
    """policy ratio clipping"""
    clip_vloss: bool = True
    """clip the value loss around the old values"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """gradient clipping norm"""
    target_kl: float | None = None
    """stop the epochs of an update early when the approximate KL exceeds this"""


@dataclass
class AtariArgs:
    """Environment options of the scripts that take Atari games (those marked Atari are ignored for other envs)."""

    max_episode_steps: int | None = None
    """time limit of an episode in agent steps (default: the env's own)"""
    frame_skip: int = 4
    """Atari: emulator frames per agent step (the observation is the max over the last two)"""
    noop_max: int = 30
    """Atari: at most this many no-op actions after a reset (0: none)"""
    episodic_life: bool = True
    """Atari: a lost life ends a training episode (evaluation plays whole games)"""
    clip_rewards: bool = True
    """Atari: train on the sign of the reward (evaluation reports the game score)"""
    sticky_actions: float | None = None
    """Atari: probability of repeating the previous action (default: the id's own, 0.25 for v5, 0 for NoFrameskip-v4)"""
    full_action_space: bool = False
    """Atari: all 18 actions instead of the game's minimal set"""
    frame_stack: int = 4
    """Atari: frames per observation"""


def env_options(args: Any) -> dict:
    """make_env's keyword arguments from a script's AtariArgs flags (for env_fn partials)."""
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(AtariArgs)}


ArgsT = TypeVar("ArgsT", bound=CommonArgs)


def resolve_device(args: CommonArgs) -> torch.device:
    """The torch device for `--device` / `--n-gpus` (0 when absent), with one-line errors for impossible requests."""
    n_gpus = getattr(args, "n_gpus", 0)
    if args.device == "cpu" and n_gpus > 0:
        raise UsageError(f"--n-gpus {n_gpus} trains on GPUs, but --device cpu asks for the CPU: drop --device cpu, "
                         f"or train in processes on the CPU with --n-procs {n_gpus} --device cpu")
    n_visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus > n_visible:
        hint = ", or train in N local processes on the CPU with --n-procs N --device cpu" if n_visible == 0 else ""
        raise UsageError(f"--n-gpus {n_gpus} asks for more GPUs than are visible ({n_visible}): lower --n-gpus{hint}")
    if args.device == "cuda" and n_visible == 0:
        raise UsageError("--device cuda needs a CUDA GPU, and none is visible: use --device cpu")
    if n_gpus > 0 or (args.device in ("auto", "cuda") and n_visible > 0):
        return torch.device("cuda", distributed.local_rank() % n_visible)
    return torch.device("cpu")


# The range of every numeric flag with one, by field name: whichever of them a script's Args has is checked
# (a None value is the script's own default, filled in later). A field may sit in two rows (tau: (0, 1]).
RANGES: list[tuple[str, Callable[[float], bool], tuple[str, ...]]] = [
    ("at least 1", lambda v: v >= 1, (
        "total_timesteps", "n_envs", "torch_threads", "num_steps", "batch_size", "n_step", "target_network_period",
        "update_epochs", "num_minibatches", "hidden_size", "lstm_size", "log_every_updates", "train_length",
        "sequence_period", "policy_frequency", "frame_skip", "frame_stack", "max_episode_steps", "async_max_lag")),
    ("positive", lambda v: v > 0, (
        "replay_ratio", "adam_eps", "rmsprop_eps", "max_grad_norm", "clip_coef", "target_kl", "tau")),
    ("at least 0", lambda v: v >= 0, (
        "eval_every", "eval_episodes", "learning_starts", "noop_max", "burn_in", "checkpoint_every_s",
        "log_every_s", "learning_rate", "policy_lr", "q_lr", "priority_alpha", "value_rescale_eps", "ent_coef",
        "vf_coef", "exploration_noise", "policy_noise", "noise_clip")),
    ("in [0, 1]", lambda v: 0 <= v <= 1, (
        "gamma", "gae_lambda", "tau", "start_epsilon", "end_epsilon", "eval_epsilon", "exploration_fraction",
        "priority_beta", "priority_eta", "sticky_actions", "rmsprop_alpha")),
]


def validate(args: CommonArgs, n_envs_given: bool = True) -> None:
    """Check the shared flags against each other; raise UsageError naming the problem and the fix. A parallel
    sampler whose --n-envs was not given rounds the script's default up to a multiple of its workers (x 2 groups
    for alternating-gpu), and says so."""
    if args.n_gpus < 0 or args.n_procs < 0 or (args.n_gpus and args.n_procs):
        raise UsageError("give either --n-gpus N (one GPU per process) or --n-procs N (processes on --device), "
                         "not both, and neither negative")
    resolve_device(args)  # a missing GPU is the first thing to report
    for requirement, valid, names in RANGES:  # the first flag out of its range
        for name in names:
            value = getattr(args, name, None)
            if value is not None and not valid(value):
                raise UsageError(f"--{name.replace('_', '-')} must be {requirement}, got {value}")
    if args.sampler != "serial":
        if args.n_workers < 1:
            raise UsageError(f"--n-workers must be at least 1, got {args.n_workers}")
        groups = 2 if args.sampler == "alternating-gpu" else 1
        multiple = args.n_workers * groups
        if args.n_envs % multiple != 0 and not n_envs_given:
            default, args.n_envs = args.n_envs, -(-args.n_envs // multiple) * multiple
            print(f"--n-envs {args.n_envs}: the default {default} rounded up to a multiple of --n-workers "
                  f"{args.n_workers}" + (" x 2 alternating groups" if groups == 2 else ""), flush=True)
        check_split(args.sampler, args.n_envs, args.n_workers)
    parse_info_keys(args.info_keys)
    if args.capture_video:
        require_rgb_array(args.env_id)  # now, not in the final evaluation after the whole training


def parse_args(args_cls: type[ArgsT], argv: list[str] | None = None) -> ArgsT:
    """Parse the command line; with --resume, reload the run's saved config (only --resume is taken from argv)."""
    args = tyro.cli(args_cls, args=argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.resume is not None:
        run_dir = Path(args.resume)
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise UsageError(f"--resume {args.resume}: no config.json there; pass the directory of a saved run")
        others = [flag.split("=")[0] for flag in argv if flag.startswith("--") and flag.split("=")[0] != "--resume"]
        if others:
            raise UsageError(f"--resume continues a run with the flags in its config.json: drop {' '.join(others)} "
                             "(edit total_timesteps there to extend the run)")
        saved = json.loads(config_path.read_text())
        known = {f.name for f in dataclasses.fields(args_cls)}
        args = args_cls(**{k: v for k, v in saved.items() if k in known})
        args.resume = str(run_dir)
        # The run keeps its name (a "group/run" one too, and so its W&B id) unless its directory was moved since.
        name = Path(args.run_name or "")
        if name.parts and run_dir.parts[-len(name.parts):] == name.parts:
            args.output_dir = str(run_dir.parents[len(name.parts) - 1])
        else:
            args.output_dir, args.run_name = str(run_dir.parent), run_dir.name
    if args.run_name is None:
        env = args.env_id.replace("/", "-").replace(":", "-")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.run_name = f"{Path(sys.argv[0]).stem or 'script'}__{env}__{args.seed}__{stamp}-{os.getpid()}"
    run_dir = Path(args.output_dir) / args.run_name
    if args.resume is None and ((run_dir / "checkpoint.pt").exists() or (run_dir / "summary.json").exists()):
        raise UsageError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or give this one "
                         "another --run-name")
    validate(args, n_envs_given=args.resume is not None or any(a.split("=")[0] in ("--n-envs", "--n_envs")
                                                                 for a in argv))
    return args


def run(main: Callable[[ArgsT], object], args_cls: type[ArgsT], argv: list[str] | None = None) -> None:
    """Parse flags and call `main(args)`; bad input ends with `error: ...` on stderr and exit code 2."""
    try:
        args = parse_args(args_cls, argv)
        summary = Path(args.resume or "") / "summary.json"
        if args.resume is not None and summary.is_file() and \
                json.loads(summary.read_text()).get("global_step", 0) >= args.total_timesteps:
            print(f"{args.resume} has trained its --total-timesteps {args.total_timesteps}: nothing to resume "
                  "(raise total_timesteps in its config.json to train on)", flush=True)
            return
        n_ranks = max(args.n_gpus, args.n_procs)
        if n_ranks > 1 and not distributed.launched():
            sys.exit(distributed.spawn_local(n_ranks))
        main(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        sys.stdout.flush()
        distributed.shutdown()


def setup(args: CommonArgs) -> torch.device:
    """Join the process group (torchrun / --n-gpus), seed everything, set torch threads; return the device."""
    device = resolve_device(args)
    distributed.init(device.type)
    # The same seed on every rank: data-parallel replicas build identical networks (make_sampler seeds envs apart).
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cudnn.benchmark = not args.torch_deterministic
    return device
