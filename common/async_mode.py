"""Feeding a replay buffer, synchronously or from a separate sampling process (`--async-sampling`).

Replay-based scripts write one training loop for both modes: `count.global_step, episodes = feeder.collect()`, then the
updates that `count.updates_due(args.replay_ratio, feeder.learning_starts)` counts (sampling `feeder.replay`), then
`feeder.sync(model)` so that the new parameters reach the sampler.

Synchronous: `collect` samples one batch (any `--sampler` kind) into the replay buffer. Asynchronous: a sampling process
runs its own sampler and appends every batch to a shared-memory replay buffer through a copier thread (two batch
buffers, so sampling never waits for the copy); `collect` only waits for new steps, so `--replay-ratio` is an upper
bound. Sampling pauses while it is `max_lag_steps` (`--async-max-lag`, default 4 collects; batches being copied count)
ahead of the step of the previous `collect`. `sync` publishes the parameters in shared memory under a lock; the sampling
process picks up a new version before each batch. `exploration(step) -> dict` gives the policy keyword arguments (an
epsilon, say) for the sampler's current step. Under data-parallel training each rank has its own sampling process and
replay buffer, and `collect` returns the smallest step count over the ranks, so every rank owes the same number of
updates. A sampling process that dies ends the run within seconds with its traceback (or, for bad input that only the
envs reveal, its one-line UsageError); it exits when the main process dies.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from common import distributed
from common.envs import UsageError
from common.namedarraytuple import buffer_from_example
from common.replay import ReplaySizeError
from common.samplers import (
    REPLICA_STREAM,
    SAMPLING_PROCESS_STREAM,
    EnvGroup,
    Episode,
    SamplerError,
    make_sampler,
    pid_exists,
    samples_example,
    seed_worker,
    training_seed,
)

POLL_S = 0.001
STEP, VERSION, STOP, CONSUMED = 0, 1, 2, 3


def _build_replay(args: Any, replay_factory: Callable[..., Any], example: Any, share_memory: bool) -> Any:
    """`replay_factory(example, share_memory=...)`; a size too small for one item is a --buffer-size UsageError."""
    try:
        return replay_factory(example, share_memory=share_memory)
    except ReplaySizeError as error:
        raise UsageError(f"--buffer-size {args.buffer_size}: {error}") from None


def copy_parameters(destination: torch.nn.Module, source: torch.nn.Module) -> None:
    """Copy every parameter and buffer of `source` into `destination` (same architecture)."""
    with torch.no_grad():
        for dst, src in zip(destination.state_dict().values(), source.state_dict().values()):
            dst.copy_(src, non_blocking=False)


class ReplayFeeder:
    """Runs the sampler and fills the replay buffer, in this process or in a sampling process."""

    def __init__(self, args: Any, env_fn: Callable[[int], Any], policy_step: Callable, model: torch.nn.Module,
                 replay_factory: Callable[..., Any], horizon: int, exploration: Callable[[int], dict],
                 checkpoint: dict | None = None, trained: dict | None = None, seed: int | None = None,
                 max_lag_steps: int | None = None, append: Callable[[Any, Any], None] | None = None):
        """`checkpoint` (from restore_checkpoint on --resume) sets the first step and, where it saved one, the replay
        buffer, loaded before any sampling starts. With --checkpoint-replay the buffer joins `trained`, the objects
        every checkpoint saves. `append(replay, batch)` stores a batch (default `replay.append(batch)`).
        `learning_starts` is the step of the first update: --learning-starts steps after the start (and after a resume
        without the replay, which must be refilled first); never before every rank's buffer can give its first item."""
        self.asynchronous = bool(getattr(args, "async_sampling", False))
        self.exploration = exploration
        self.append = append or append_batch
        self.step = start_step = checkpoint.get("global_step", 0) if checkpoint else 0
        replay_state = checkpoint.get("replay") if checkpoint else None
        self.learning_starts = 0 if replay_state is not None else start_step
        self.steps_per_batch = horizon * args.n_envs
        max_lag_steps = max_lag_steps or getattr(args, "async_max_lag", None) or 4 * self.steps_per_batch
        seed = training_seed(args.seed, start_step) if seed is None else seed
        if not self.asynchronous:
            self.sampler = make_sampler(args, env_fn, policy_step, model, horizon=horizon, seed=seed)
            self.example = self.sampler.example
            try:
                self.replay = _build_replay(args, replay_factory, self.example, share_memory=False)
                if replay_state is not None:
                    restore_replay(self.replay, replay_state)
            except BaseException:
                self.sampler.close()
                raise
            self._declare(args, trained)
            return
        seed = distributed.replica_seed(seed)  # here: the sampling process has no rank for make_sampler to add
        if distributed.rank() > 0:  # as make_sampler does: the replay minibatches of each rank are its own
            seed_worker(seed, REPLICA_STREAM)
        device = next(model.parameters()).device
        self.inference_device = inference_device(args.sampler, device)
        probe = EnvGroup(env_fn, [seed])
        try:
            self.example = samples_example(probe, policy_step, model, device)
        finally:
            probe.close()
        self.replay = _build_replay(args, replay_factory, self.example, share_memory=True)
        if replay_state is not None:
            restore_replay(self.replay, replay_state)
        self.shared_model = copy.deepcopy(model).cpu().share_memory()
        self.counters = torch.zeros(4, dtype=torch.int64).share_memory_()
        self.counters[STEP] = self.counters[CONSUMED] = start_step
        ctx = mp.get_context(args.start_method)
        if args.start_method == "forkserver":
            ctx.set_forkserver_preload(["__main__", "common.async_mode"])
        self.lock = ctx.Lock()
        self.episodes: Any = ctx.Queue()
        self.errors: Any = ctx.Queue()
        process_args = (args, env_fn, policy_step, self.shared_model, self.replay, self.append, horizon, exploration,
                        seed, self.counters, self.lock, self.episodes, self.errors, os.getpid(), max_lag_steps,
                        self.inference_device)
        self.process = ctx.Process(target=sampling_main, args=process_args, daemon=False, name="rlsolo-async-sampler")
        self.process.start()
        self._declare(args, trained)

    def _declare(self, args: Any, trained: dict | None) -> None:
        # A rank's buffer holds at least the (rank-agreed) step count / n_envs steps per env.
        self.learning_starts += max(getattr(args, "learning_starts", 0), self.replay.steps_to_first_item * args.n_envs)
        if trained is not None and getattr(args, "checkpoint_replay", False):
            trained["replay"] = self.replay

    def collect(self, timeout_s: float = 600.0) -> tuple[int, list[Episode]]:
        """Sync: sample one batch into replay. Async: wait for new sampled steps. Returns (step, episodes)."""
        if not self.asynchronous:
            batch, episodes = self.sampler.collect(**self.exploration(self.step))
            self.append(self.replay, batch)
            self.step += self.steps_per_batch
            return self.step, episodes
        self.counters[CONSUMED] = self.step  # the optimizer is done with the steps of the previous call
        deadline = time.time() + timeout_s
        while int(self.counters[STEP]) <= self.step:
            self.check()
            if time.time() > deadline:
                raise SamplerError(f"the sampling process produced no data in {timeout_s:.0f} s")
            time.sleep(POLL_S)
        self.step = int(self.counters[STEP])
        if distributed.world_size() > 1:  # every rank owes the same number of updates
            self.step = int(distributed.all_reduce_min(torch.tensor(self.step)))
        episodes = []
        while True:
            try:
                episodes += self.episodes.get_nowait()
            except queue.Empty:
                break
        return self.step, episodes

    def sync(self, model: torch.nn.Module) -> None:
        """New parameters reach the sampler (sync: its workers; async: the sampling process)."""
        if not self.asynchronous:
            self.sampler.sync(model)
            return
        with self.lock:
            copy_parameters(self.shared_model, model)
            self.counters[VERSION] += 1

    def check(self) -> None:
        """Raise with the sampling process's error if it died."""
        if self.asynchronous and not self.process.is_alive():
            try:
                message = self.errors.get(timeout=1.0)
            except queue.Empty:
                message = f"exit code {self.process.exitcode}"
            if isinstance(message, UsageError):  # bad input that only the envs reveal: its one-line message
                raise message
            raise SamplerError(f"the sampling process died: {message}")

    def close(self) -> None:
        if not self.asynchronous:
            self.sampler.close()
        elif getattr(self, "process", None) is not None:
            self.counters[STOP] = 1
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
            self.process = None


def inference_device(sampler: str, model_device: torch.device) -> torch.device:
    """The sampling process's policy device: the model's for parallel-gpu / alternating-gpu, else the CPU."""
    return model_device if sampler in ("parallel-gpu", "alternating-gpu") else torch.device("cpu")


def restore_replay(replay: Any, state: dict) -> None:
    """Load a checkpoint's replay buffer, ending there the episodes the checkpoint cut (the sampler starts new ones)."""
    try:
        replay.load_state_dict(state)
    except ValueError as error:
        raise UsageError(f"--resume: the checkpoint's replay buffer does not fit this run's ({error})") from None
    replay.truncate_open_episodes()


def append_batch(replay: Any, batch: Any) -> None:
    replay.append(batch)


def sampling_main(args: Any, env_fn: Callable, policy_step: Callable, shared_model: torch.nn.Module, replay: Any,
                  append: Callable[[Any, Any], None], horizon: int, exploration: Callable[[int], dict], seed: int,
                  counters: torch.Tensor, lock: Any, episodes_out: Any, errors: Any, main_pid: int,
                  max_lag_steps: int, device: torch.device) -> None:
    """The sampling process: collects batches with any sampler kind into the shared replay. Its generators are seeded by
    `seed` (the run's seed and rank); it acts on `device` with a copy of each new version of `shared_model`."""
    torch.set_num_threads(1)
    seed_worker(seed, SAMPLING_PROCESS_STREAM)
    parent_pid = os.getppid()  # the main process (spawn, fork) or the forkserver that ends with it

    def main_gone() -> bool:
        return os.getppid() != parent_pid or not pid_exists(main_pid)

    sampler = None
    try:
        model = copy.deepcopy(shared_model).to(device)
        version = -1
        sampler = make_sampler(args, env_fn, policy_step, model, horizon=horizon, seed=seed, device=device)
        batches = [buffer_from_example(sampler.example, (horizon, args.n_envs)) for _ in range(2)]
        ready = [threading.Semaphore(0), threading.Semaphore(0)]
        free = [threading.Semaphore(1), threading.Semaphore(1)]
        copier_error: list[BaseException] = []
        steps_per_batch = horizon * args.n_envs

        def copier() -> None:
            k = 0
            try:
                while True:
                    ready[k].acquire()
                    if counters[STOP]:
                        return
                    append(replay, batches[k])
                    counters[STEP] += steps_per_batch
                    free[k].release()
                    k ^= 1
            except BaseException as error:  # noqa: BLE001 - reported to the main process below
                copier_error.append(error)

        threading.Thread(target=copier, daemon=True).start()
        step, k = int(counters[STEP]), 0
        while not counters[STOP]:
            if main_gone():
                return
            # `step` counts the batches in the copier's hands too, so no sampled step is further ahead than this.
            if step - int(counters[CONSUMED]) >= max_lag_steps:
                time.sleep(POLL_S)  # the optimizer is behind: let it catch up
                continue
            if int(counters[VERSION]) != version:
                with lock:
                    version = int(counters[VERSION])
                    copy_parameters(model, shared_model)
                sampler.sync(model)
            batch, episodes = sampler.collect(**exploration(step))
            while not free[k].acquire(timeout=0.1):
                if copier_error:
                    raise copier_error[0]
                if counters[STOP] or main_gone():
                    return
            batches[k][:] = batch
            ready[k].release()
            if episodes:
                episodes_out.put(list(episodes))
            step += steps_per_batch
            k ^= 1
    except BaseException as error:  # noqa: BLE001 - the main process re-raises it (UsageError: its one-line message)
        errors.put(error if isinstance(error, UsageError) else traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        counters[STOP] = 1
        for semaphore in (ready if "ready" in locals() else []):
            semaphore.release()
        if sampler is not None:
            sampler.close()
