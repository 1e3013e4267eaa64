"""Tests of common/samplers.py: every kind yields the serial batch; crashes, kills and Ctrl-C end cleanly.

Most tests start workers with `forkserver`, the default (`fork` and `spawn` are covered by one
equivalence test each); the script runs (`algos/ppo.py`) also check that a script's module-level policy
and model pickle by reference to `__mp_main__`.
"""

import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import default_sigint
from sampler_helpers import ProbeModel, memory_policy

from common.config import SamplerArgs
from common.envs import UsageError, make_env
from common.samplers import (
    Episode,
    ParallelSampler,
    SamplerError,
    SerialSampler,
    evaluate,
    evaluation_plan,
    make_sampler,
    training_seed,
)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def sampler_args(kind: str, n_envs: int = 4, n_workers: int = 2, start_method: str = "forkserver", seed: int = 7):
    return SimpleNamespace(sampler=kind, n_envs=n_envs, n_workers=n_workers, seed=seed, cpu_affinity=False,
                           start_method=start_method)


def leaves(batch) -> list[torch.Tensor]:
    """The batch's leaves as tensors in field order (agent_info flattened), copied out of the shared buffer."""
    out = []
    for field in batch:
        if field is None:
            continue
        out += leaves(field) if isinstance(field, tuple) else [torch.as_tensor(np.asarray(field)).clone()]
    return out


def run_collects(sampler, n_collects: int, **policy_kwargs) -> list[tuple[list[torch.Tensor], list[Episode]]]:
    return [(leaves(batch), episodes) for batch, episodes in
            (sampler.collect(**policy_kwargs) for _ in range(n_collects))]


def assert_same_collects(expected, actual) -> None:
    for i, ((expected_batch, expected_episodes), (batch, episodes)) in enumerate(zip(expected, actual)):
        for j, (x, y) in enumerate(zip(expected_batch, batch)):
            assert x.dtype == y.dtype and x.shape == y.shape, (i, j)
            assert torch.equal(x, y), f"collect {i}, leaf {j} differs"
        assert episodes == expected_episodes, f"collect {i}: episodes differ"


def process_gone(pid: int, timeout_s: float = 5.0) -> bool:
    """Whether `pid` has exited (a zombie counts as exited) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return out


def shm_entries_of(pids: list[int], semaphore_names: list[str]) -> list[str]:
    """/dev/shm entries that belong to these processes (torch's `torch_<pid>_...`) or these semaphores."""
    names = set(os.listdir("/dev/shm"))
    ours = [n for n in names if any(n.startswith(f"torch_{pid}_") for pid in pids)]
    return ours + [n for n in semaphore_names if n in names]


def semaphore_files(sampler: ParallelSampler) -> list[str]:
    return ["sem." + s._semlock.name.lstrip("/") for pair in sampler.obs_ready + sampler.act_ready for s in pair
            if s._semlock.name is not None]


# --------------------------------------------------------------------------------------------------
# Same batch as serial
# --------------------------------------------------------------------------------------------------


DICT_CARTPOLE = "tests.memory_envs:DictCartPole-v0"  # nested Dict observation with a uint8 leaf, 25-step limit


@pytest.mark.parametrize("env_id", ["CartPole-v1", DICT_CARTPOLE])
@pytest.mark.parametrize("kind,start_method", [
    ("parallel-cpu", "spawn"), ("parallel-gpu", "forkserver"), ("alternating-gpu", "fork"),
])
def test_every_kind_matches_serial_on_cartpole(kind, start_method, env_id):
    """Recurrent deterministic policy: same batches, episodes, rnn resets, kwargs and evaluation as serial."""
    env_fn = partial(make_env, env_id)
    model = ProbeModel(n_actions=2)
    serial = make_sampler(sampler_args("serial"), env_fn, memory_policy, model, horizon=40)
    expected = run_collects(serial, 1)
    if env_id == DICT_CARTPOLE:  # a truncated episode's next observation is its last one, not the reset's
        batch = serial.samples
        assert batch.truncated.any() and torch.all(batch.next_observation.steps.f0[batch.truncated] == 25)
    expected += run_collects(serial, 2) + run_collects(serial, 1, epsilon=0.25)
    expected_eval = evaluate(env_fn, memory_policy, model, 5, seed=7, device=CPU)
    serial.close()
    assert sum(len(episodes) for _, episodes in expected) >= 10  # the batches cross many episode ends

    sampler = make_sampler(sampler_args(kind, start_method=start_method), env_fn, memory_policy, model, horizon=40)
    try:
        assert [tuple(x.shape) for x in leaves(sampler.example)] == [tuple(x.shape) for x in leaves(serial.example)]
        actual = run_collects(sampler, 3) + run_collects(sampler, 1, epsilon=0.25)
        assert sampler.evaluate(5) == expected_eval
    finally:
        sampler.close()
    assert_same_collects(expected, actual)
    assert torch.all(actual[-1][0][-2] == 0.25)  # agent_info.epsilon: the collect kwarg reached the policy
    assert all(process_gone(pid) for pid in sampler.worker_pids)
    sampler.close()  # idempotent


@pytest.mark.parametrize("kind,n_workers", [("parallel-cpu", 2), ("parallel-gpu", 2), ("alternating-gpu", 1)])
def test_every_kind_matches_serial_on_pong(kind, n_workers):
    env_fn = partial(make_env, "ALE/Pong-v5")
    model = ProbeModel(n_actions=6)
    serial = SerialSampler(env_fn, memory_policy, model, n_envs=2, horizon=10, seed=3, device=CPU)
    expected = run_collects(serial, 2)
    serial.close()
    sampler = ParallelSampler(kind, env_fn, memory_policy, model, n_envs=2, horizon=10, seed=3, device=CPU,
                              n_workers=n_workers, start_method="fork")
    try:
        actual = run_collects(sampler, 2)
    finally:
        sampler.close()
    assert expected[0][0][0].shape == (10, 2, 4, 84, 84)
    assert_same_collects(expected, actual)


def test_default_workers_fork_from_one_server_not_from_this_process():
    """The default start method (forkserver): workers are forked from one server process that imported the
    script's modules once, instead of each importing torch as a fresh interpreter (spawn)."""
    args = SamplerArgs()
    assert args.start_method == "forkserver"
    args = SimpleNamespace(sampler="parallel-cpu", n_envs=4, n_workers=2, seed=7, cpu_affinity=False)
    sampler = make_sampler(args, partial(make_env, "CartPole-v1"), memory_policy, ProbeModel(n_actions=2), horizon=4)
    try:
        parents = {int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                   for pid in sampler.worker_pids}
        assert len(parents) == 1 and os.getpid() not in parents
        sampler.collect()
    finally:
        sampler.close()


def test_sync_copies_parameters_and_buffers_to_workers():
    model = ProbeModel(n_actions=2)
    args = sampler_args("parallel-cpu", start_method="fork")
    args.cpu_affinity = True
    sampler = make_sampler(args, partial(make_env, "CartPole-v1"), memory_policy, model, horizon=5)
    try:
        cpus = sorted(os.sched_getaffinity(0))
        assert [os.sched_getaffinity(pid) for pid in sampler.worker_pids] == [{cpus[0]}, {cpus[1 % len(cpus)]}]
        assert torch.all(sampler.collect()[0].agent_info.parameter == 1.0)
        with torch.no_grad():
            model.weight.fill_(2.0)
            model.offset.fill_(0.5)
        assert torch.all(sampler.collect()[0].agent_info.parameter == 1.0)  # not yet synced
        sampler.sync(model)
        assert torch.all(sampler.collect()[0].agent_info.parameter == 2.5)
    finally:
        sampler.close()


def test_bad_splits_are_usage_errors():
    env_fn = partial(make_env, "CartPole-v1")
    with pytest.raises(UsageError, match="multiple of 4"):
        make_sampler(sampler_args("alternating-gpu", n_envs=6), env_fn, memory_policy, ProbeModel(2), horizon=5)
    with pytest.raises(UsageError, match="--sampler"):
        make_sampler(sampler_args("threads"), env_fn, memory_policy, ProbeModel(2), horizon=5)


# --------------------------------------------------------------------------------------------------
# Failures end the run: killed workers, raising envs
# --------------------------------------------------------------------------------------------------


def collect_until_error(sampler) -> tuple[str, float]:
    """Collect until SamplerError; returns its message and when it came (time.monotonic)."""
    with pytest.raises(SamplerError) as info:
        for _ in range(20):
            sampler.collect()
    message = str(info.value)
    del info  # its traceback holds the sampler's frames (and semaphores) alive
    return message, time.monotonic()


@pytest.mark.parametrize("kind", ["parallel-cpu", "alternating-gpu"])
def test_killed_worker_raises_and_leaves_nothing(kind):
    env_fn = partial(make_env, "sampler_helpers:SlowCartPole-v0")
    sampler = make_sampler(sampler_args(kind), env_fn, memory_policy, ProbeModel(2), horizon=400)
    pids, semaphores = sampler.worker_pids, semaphore_files(sampler)
    killed_at = []

    def kill_worker():
        time.sleep(0.5)  # mid-collect: one collect takes about 400 x 2 x 5 ms
        killed_at.append(time.monotonic())
        os.kill(pids[1], signal.SIGKILL)

    threading.Thread(target=kill_worker).start()
    try:
        message, raised_at = collect_until_error(sampler)
    finally:
        sampler.close()
    assert "SIGKILL" in message and f"pid {pids[1]}" in message
    assert raised_at - killed_at[0] < 10.0
    assert all(process_gone(pid) for pid in pids)
    with pytest.raises(SamplerError, match="closed"):
        sampler.collect()
    del sampler
    assert shm_entries_of([os.getpid(), *pids], semaphores) == []


def test_env_raising_in_step_raises_its_traceback():
    env_fn = partial(make_env, "sampler_helpers:ExplodingCartPole-v0")
    sampler = make_sampler(sampler_args("parallel-gpu"), env_fn, memory_policy, ProbeModel(2), horizon=10)
    pids, semaphores = sampler.worker_pids, semaphore_files(sampler)
    start = time.monotonic()
    try:
        message, raised_at = collect_until_error(sampler)
    finally:
        sampler.close()
    assert "ExplodingCartPole: boom on the 5th step" in message and "Traceback" in message
    assert raised_at - start < 10.0
    assert all(process_gone(pid) for pid in pids)
    del sampler
    assert shm_entries_of([os.getpid(), *pids], semaphores) == []


def test_env_raising_in_reset_fails_construction():
    env_fn = partial(make_env, "sampler_helpers:ExplodingResetCartPole-v0")
    before = set(children_of(os.getpid()))
    with pytest.raises(RuntimeError, match="boom in reset"):
        ParallelSampler("parallel-cpu", env_fn, memory_policy, ProbeModel(2), n_envs=2, horizon=5, seed=0,
                        device=CPU, n_workers=2, start_method="fork")
    assert all(process_gone(pid) for pid in set(children_of(os.getpid())) - before)


def test_workers_exit_when_the_main_process_is_killed():
    script = (
        "import time, torch\n"
        "from functools import partial\n"
        "from sampler_helpers import ProbeModel, memory_policy\n"
        "from common.envs import make_env\n"
        "from common.samplers import ParallelSampler\n"
        "sampler = ParallelSampler('parallel-gpu', partial(make_env, 'CartPole-v1'), memory_policy, ProbeModel(2),\n"
        "                          n_envs=2, horizon=5, seed=0, device=torch.device('cpu'), n_workers=2,\n"
        "                          start_method='fork')\n"
        "sampler.collect()\n"
        "print(*sampler.worker_pids, flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pids = [int(pid) for pid in process.stdout.readline().split()]
    finally:
        process.kill()
        process.wait()
    assert len(pids) == 2, process.stderr.read()
    assert all(process_gone(pid, timeout_s=5.0) for pid in pids), "workers outlived the main process"


# --------------------------------------------------------------------------------------------------
# Real script runs (spawn): Ctrl-C, and an alternating-gpu run end to end
# --------------------------------------------------------------------------------------------------


def read_until(process: subprocess.Popen, text: str, timeout_s: float) -> str:
    """Read the process's stdout until a line contains `text`; fails on timeout or exit."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    seen = ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            line = process.stdout.readline()
            if not line:
                break
            seen += line
            if text in line:
                return seen
    process.kill()
    pytest.fail(f"no line with {text!r} within {timeout_s} s; output:\n{seen}\n{process.stderr.read()}")


def ppo_command(kind: str, tmp_path: Path, total_timesteps: int) -> list[str]:
    return [sys.executable, "algos/ppo.py", "--sampler", kind, "--n-workers", "2", "--n-envs", "4",
            "--num-steps", "32", "--total-timesteps", str(total_timesteps), "--eval-episodes", "2",
            "--log-every-s", "0", "--output-dir", str(tmp_path)]


def test_ctrl_c_ends_a_parallel_script_cleanly(tmp_path):
    process = subprocess.Popen(ppo_command("parallel-cpu", tmp_path, 10**7), cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    try:
        read_until(process, "SPS", timeout_s=60)  # a few collects went through the spawned workers
        children = children_of(process.pid)
        assert len(children) >= 2
        start = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)
        assert time.monotonic() - start < 10.0
    finally:
        process.kill()
        process.wait()
    assert process.returncode != 0
    assert all(process_gone(pid) for pid in children), "orphaned sampler processes"
    assert shm_entries_of([process.pid, *children], []) == []


def test_alternating_script_runs_end_to_end(tmp_path):
    result = subprocess.run(ppo_command("alternating-gpu", tmp_path, 256), cwd=REPO, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "final_eval_return" in result.stdout
    assert np.isfinite(float(result.stdout.split("final_eval_return=")[1].split(",")[0]))


def test_training_envs_never_take_the_seeds_of_the_evaluation_envs_or_of_another_rank(monkeypatch):
    # Env seeds are the sampler's seed + i. A run resumed at a step near the evaluation offset, and data-parallel
    # ranks, must still train on envs of their own: none seeded like an evaluation env or like another rank's.
    from common import distributed

    seeds = []

    def recording_env(seed):
        seeds.append(seed)
        return make_env("CartPole-v1", seed)

    make_sampler(sampler_args("serial", n_envs=8, seed=3), recording_env, memory_policy, ProbeModel(2),
                 horizon=1, start_step=1_000_000).close()
    evaluation = set(evaluation_plan(100, 3)[0])
    assert len(seeds) == 8 and not evaluation & set(seeds)
    n_envs, steps = 16, [0, 1, 1_000_000 - 8, 1_000_003, 10**7 + 7, 10**9]
    by_rank = {}
    for rank in (0, 1, 2):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        by_rank[rank] = {distributed.replica_seed(training_seed(3, step)) + i for step in steps for i in range(n_envs)}
        assert not by_rank[rank] & evaluation, rank
    assert not by_rank[0] & by_rank[1] and not by_rank[1] & by_rank[2] and not by_rank[0] & by_rank[2]
    assert training_seed(3, 0) == 3 and distributed.replica_seed(3) == 3 + (2 << 32)
