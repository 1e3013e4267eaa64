"""Where a process's time goes, by kind of work: py-spy sampling profiles folded into a few categories.

    pip install py-spy
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=offline
    run="--seed 1 --eval-episodes 0 --torch-threads 1 --checkpoint-every-s 1e9 --output-dir runs/profile"
    py-spy record -r 500 -f raw -o dqn.raw -- python algos/dqn.py --env-id CartPole-v1 --total-timesteps 50000 \
        $run --n-envs 1 --learning-starts 10000 --replay-ratio 0.1 --batch-size 128 --no-double --n-step 1
    py-spy record -r 500 -f raw -o dqn-plain.raw -- python benchmark/loop_overhead.py --plain dqn --seed 1
    py-spy record -r 500 -f raw -o ppo.raw -- python algos/ppo.py --env-id CartPole-v1 --total-timesteps 100000 \
        $run --n-envs 4 --num-steps 128
    py-spy record -r 500 -f raw -o ppo-plain.raw -- python benchmark/loop_overhead.py --plain ppo --seed 1
    python benchmark/profile_split.py dqn.raw dqn-plain.raw --rate 500

These are the loop-overhead cases (benchmark/loop_overhead.py) with the flags it gives each side.
py-spy samples the running Python stacks at a fixed rate with little overhead (cProfile, by contrast, adds
a cost to every Python call and so inflates small calls). Each sample of a profile goes to the first
category, in the order of `CATEGORIES`, that some frame of its stack belongs to: everything under an
import is start-up, everything under a gymnasium env's `step` is the environment, and so on. What no
category claims is the Python lines of the loop itself (the script, common/, the benchmark's plain loop)
with the tensor and array operations they call directly; those samples are also listed by the innermost
such function. A time is samples / rate: the process's CPU time while it ran Python, as its one thread
was busy throughout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import tyro


@dataclass(frozen=True)
class Frame:
    function: str
    path: str
    """the file as py-spy names it: relative to site-packages or to the working directory"""


def parse_frame(text: str) -> Frame:
    """`function (path:line)` as py-spy's raw format writes a frame."""
    function, _, location = text.rpartition(" (")
    return Frame(function, location.rstrip(")").rpartition(":")[0])


def under(*prefixes: str) -> Callable[[Frame], bool]:
    return lambda frame: frame.path.startswith(prefixes)


VECTOR_PATHS = ("gymnasium/vector/", "gymnasium/wrappers/vector/")


def in_env(frame: Frame) -> bool:
    """A frame of one environment: the env, its wrappers (not a vector env's) or rlsolo's episode statistics."""
    return (frame.path.startswith(("gymnasium/envs/", "gymnasium/wrappers/", "mujoco/"))
            and not frame.path.startswith(VECTOR_PATHS)) or frame.function.startswith("EpisodeStatistics.")


CATEGORIES: list[tuple[str, Callable[[Frame], bool]]] = [
    ("start-up: optimizer construction (and the imports it triggers)",
     lambda f: f.path.startswith("torch/optim/") and f.function.endswith(".__init__")),
    ("start-up: imports", lambda f: f.function == "_find_and_load"),
    ("environments (env, wrappers, episode statistics)", in_env),
    ("backward", lambda f: f.function == "Tensor.backward" or f.path.startswith("torch/autograd/")),
    ("optimizer step and zero_grad", under("torch/optim/")),
    ("gradient clipping", under("torch/nn/utils/clip_grad")),
    ("network forward (nn.Module calls)", under("torch/nn/modules/", "torch/nn/functional")),
    ("distributions", under("torch/distributions/")),
    ("vector env (SyncVectorEnv and its wrappers' own lines)", under(*VECTOR_PATHS)),
]
OWN = "the loop's own Python lines and the tensor / array ops they call"
NO_FRAME = "no Python frame (interpreter start-up and exit)"
LIBRARY_PREFIXES = ("torch/", "numpy/", "gymnasium/", "<frozen", "tyro/", "wandb/", "importlib/")


def classify(stack: list[Frame]) -> str:
    if not stack:
        return NO_FRAME
    for name, belongs in CATEGORIES:
        if any(belongs(frame) for frame in stack):
            return name
    return OWN


def own_function(stack: list[Frame]) -> str:
    """The innermost frame of the loop's own code (not a library's or the standard library's)."""
    for frame in reversed(stack):
        if not frame.path.startswith(LIBRARY_PREFIXES) and "/python3" not in frame.path:
            return f"{frame.function} ({Path(frame.path).name})"
    return "(library only)"


def read_raw(lines: Iterable[str]) -> tuple[Counter, Counter, int]:
    """Samples by category and, for OWN, by function; and the total, from py-spy `-f raw` lines."""
    categories, own, total = Counter(), Counter(), 0
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack_text, _, count = line.rpartition(" ")
        stack, n = [parse_frame(frame) for frame in stack_text.split(";") if frame], int(count)
        total += n
        category = classify(stack)
        categories[category] += n
        if category == OWN:
            own[own_function(stack)] += n
    return categories, own, total


@dataclass
class Args:
    profiles: tyro.conf.Positional[tuple[str, ...]]
    """py-spy `record -f raw` outputs, one column each"""
    rate: float = 500.0
    """the sampling rate they were recorded at (py-spy's -r)"""
    top: int = 12
    """own-code functions listed"""


def main(args: Args) -> None:
    read = []
    for path in args.profiles:
        with open(path) as f:
            read.append(read_raw(f))
    header = "| category | " + " | ".join(f"{Path(p).name} s (%)" for p in args.profiles) + " |"
    print(header + "\n|---|" + "---|" * len(args.profiles))

    def row(name: str, samples: list[int], totals: list[int]) -> str:
        cells = [f"{n / args.rate:.2f} ({100 * n / max(t, 1):.1f}%)" for n, t in zip(samples, totals)]
        return f"| {name} | " + " | ".join(cells) + " |"

    totals = [total for _, _, total in read]
    for name in [NO_FRAME] + [name for name, _ in CATEGORIES] + [OWN]:
        print(row(name, [categories[name] for categories, _, _ in read], totals))
    print(row("all", totals, totals))
    for path, (_, own, total) in zip(args.profiles, read):
        print(f"\n{Path(path).name}, {OWN}, by innermost function:")
        for function, n in own.most_common(args.top):
            print(f"  {n / args.rate:6.2f} s {100 * n / max(total, 1):5.1f}%  {function}")


if __name__ == "__main__":
    main(tyro.cli(Args))
