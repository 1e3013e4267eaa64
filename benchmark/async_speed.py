"""Asynchronous sampling speed: sac.py and dqn.py, synchronous against `--async-sampling`, in one run.

Each script runs twice with its default hyper-parameters, once per mode, one run at a time, on the same
budget. Rates are measured over the training window, from the first progress row at or after
`--learning-starts` to the last one (start-up and final evaluation left out):

- samples/s: environment steps per second in that window;
- updates/s: gradient updates (the final checkpoint's `n_updates`) per second of that window.

Synchronously the two alternate, so each slows the other; asynchronously the sampling process and the
optimizer overlap, and the sum of the two rates should rise (the last lines print async / sync of the
sum; > 1 is the target). `--replay-ratio` is an upper bound in async mode, so updates/s alone may drop
when the sampler outruns the optimizer.

    python benchmark/async_speed.py                                   # about 4 minutes on 2 cores
    python benchmark/async_speed.py --scripts sac --sac-steps 20000 -- --device cuda
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from common.logger import load_checkpoint

from launch import split_argv

ROOT = Path(__file__).resolve().parents[1]
ENV_IDS = {"dqn": "CartPole-v1", "sac": "Pendulum-v1"}


@dataclass
class Args:
    scripts: tuple[str, ...] = ("sac", "dqn")
    """which scripts to measure (sac, dqn)"""
    dqn_steps: int = 60_000
    """--total-timesteps of each dqn.py run"""
    sac_steps: int = 12_000
    """--total-timesteps of each sac.py run"""
    seed: int = 1
    """--seed of every run"""
    output_dir: str | None = None
    """where the runs go (default: a temporary directory, removed at the end)"""


@dataclass
class Rates:
    samples_per_s: float
    updates_per_s: float
    wall_s: float

    @property
    def total(self) -> float:
        return self.samples_per_s + self.updates_per_s


def window_rates(run_dir: Path) -> Rates:
    """Samples/s and updates/s over the training window of a finished run directory (from its config.json's
    --learning-starts, which flags after `--` may have changed)."""
    learning_starts = json.loads((run_dir / "config.json").read_text())["learning_starts"]
    rows = [(int(r["global_step"]), float(r["wall_time_s"])) for r in csv.DictReader((run_dir / "progress.csv").open())]
    window = [(step, t) for step, t in rows if step >= learning_starts]
    if len(window) < 2 or window[-1][1] <= window[0][1]:
        raise RuntimeError(f"{run_dir}: too few progress rows after learning starts; raise the step budget")
    (step0, t0), (step1, t1) = window[0], window[-1]
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        raise RuntimeError(f"{run_dir}: no checkpoint.pt (the run needs --save-model)")
    return Rates((step1 - step0) / (t1 - t0), checkpoint["n_updates"] / (t1 - t0), t1 - t0)


def measure(script: str, steps: int, asynchronous: bool, args: Args, output_dir: Path, extra: list[str]) -> Rates:
    name = f"{script}-{'async' if asynchronous else 'sync'}"
    learning_starts = 1000
    command = [sys.executable, str(ROOT / "algos" / f"{script}.py"), "--env-id", ENV_IDS[script],
               "--total-timesteps", str(steps), "--seed", str(args.seed), "--learning-starts", str(learning_starts),
               "--output-dir", str(output_dir), "--run-name", name, "--eval-episodes", "1", "--checkpoint-every-s",
               "1000000", *(["--async-sampling"] if asynchronous else []), *extra]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return window_rates(output_dir / name)


def main(args: Args, extra: list[str]) -> int:
    """Measure, print the table and the ratios; returns the exit code. `extra` goes to every run."""
    unknown = [s for s in args.scripts if s not in ENV_IDS]
    if unknown:
        print(f"error: unknown script(s) {unknown}: choose from {sorted(ENV_IDS)}", file=sys.stderr)
        return 2
    print(f"# async_speed  {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        output_dir = Path(args.output_dir or tmp)
        print(f"{'script':8} {'mode':6} {'samples/s':>10} {'updates/s':>10} {'sum':>10} {'window s':>9}")
        ratios = {}
        for script in args.scripts:
            steps = args.dqn_steps if script == "dqn" else args.sac_steps
            rates = {}
            for asynchronous in (False, True):
                r = rates[asynchronous] = measure(script, steps, asynchronous, args, output_dir, extra)
                print(f"{script:8} {'async' if asynchronous else 'sync':6} {r.samples_per_s:10.1f} "
                      f"{r.updates_per_s:10.1f} {r.total:10.1f} {r.wall_s:9.1f}", flush=True)
            ratios[script] = (rates[True].total / rates[False].total,
                              rates[True].samples_per_s / rates[False].samples_per_s,
                              rates[True].updates_per_s / rates[False].updates_per_s)
    for script, (total, samples, updates) in ratios.items():
        print(f"{script}: async / sync  samples/s + updates/s {total:.2f}x  (samples/s {samples:.2f}x, "
              f"updates/s {updates:.2f}x; target: sum > 1x)")
    return 0


if __name__ == "__main__":
    argv, extra = split_argv(sys.argv[1:])
    sys.exit(main(tyro.cli(Args, args=argv), extra))
