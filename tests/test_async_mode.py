"""ReplayFeeder: the same training loop fed synchronously or by a sampling process."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, read_progress

from common import distributed
from common.async_mode import STEP, ReplayFeeder
from common.envs import make_env
from common.replay import UniformReplayBuffer
from common.samplers import SamplerError


class Switch(torch.nn.Module):
    """Action 1 when `bias` > 0, else 0 (a parameter the optimizer side changes)."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(-1.0))


def switch_policy(model, obs, prev_action, prev_reward, rnn_state, deterministic=False, force_one=0.0):
    on = (model.bias > 0) | (torch.as_tensor(force_one) > 0)
    return on.long().expand(obs.shape[0]).clone(), None, None


def no_exploration(step):
    return {}


def force_one(step):
    return {"force_one": 1.0}


def make_args(asynchronous, **kw):
    return SimpleNamespace(async_sampling=asynchronous, seed=0, n_envs=2, sampler="serial", n_workers=1,
                           n_gpus=0, start_method="spawn", cpu_affinity=False, **kw)


def replay_factory(example, share_memory):
    return UniformReplayBuffer(example, size=4000, n_envs=2, share_memory=share_memory)


def recent_actions(replay, n=400):
    return replay.sample(n).action


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_parameters_reach_the_sampler_and_steps_advance(asynchronous):
    model = Switch()
    feeder = ReplayFeeder(make_args(asynchronous), partial(make_env, "CartPole-v1"), switch_policy, model,
                          replay_factory, horizon=4, exploration=no_exploration)
    try:
        step, episodes = 0, []
        while step < 400:
            step, new = feeder.collect()
            episodes += new
        assert step >= 400 and step % 8 == 0 and len(feeder.replay) > 0
        assert episodes and all(e.length > 0 for e in episodes)
        assert (recent_actions(feeder.replay) == 0).all()
        with torch.no_grad():
            model.bias.fill_(1.0)
        feeder.sync(model)
        deadline = time.time() + 300
        while time.time() < deadline:  # the buffer turns over to the new policy's actions
            step, _ = feeder.collect()
            if step > 5000 and (recent_actions(feeder.replay, 64) == 1).all():
                break
        assert (recent_actions(feeder.replay, 64) == 1).all()
    finally:
        feeder.close()


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_resumed_feeder_ends_the_episodes_its_checkpoint_cut(asynchronous):
    # Resumed with its replay buffer, a run's sampler starts new episodes: the last restored step of every
    # env still in an episode becomes a truncation that bootstraps from that episode's true next observation
    # (what the run would have seen had it gone on), not from the new sampler's first observation.
    args = make_args(False)
    first = ReplayFeeder(args, partial(make_env, "CartPole-v1"), switch_policy, Switch(), replay_factory,
                         horizon=4, exploration=no_exploration)
    try:
        was_open = np.zeros(args.n_envs, dtype=bool)
        while first.step < 96 or not was_open.all():  # checkpoint with both envs in mid-episode
            first.collect()
            cut = int(first.replay.counters[0])  # time steps stored per env
            row = (cut - 1) % first.replay.n_rows
            was_open = ~(first.replay.terminated[row] | first.replay.truncated[row])
        checkpoint = {"global_step": first.step, "replay": first.replay.state_dict()}
        first.collect()
        true_next = first.replay.observation[cut % first.replay.n_rows].copy()
    finally:
        first.close()
    resumed = ReplayFeeder(make_args(asynchronous), partial(make_env, "CartPole-v1"), switch_policy, Switch(),
                           replay_factory, horizon=4, exploration=no_exploration, checkpoint=checkpoint)
    try:
        while resumed.collect()[0] < checkpoint["global_step"] + 32:
            pass
        replay = resumed.replay
        assert replay.truncated[row].all()
        torch.manual_seed(0)
        samples = replay.sample(4000)
        for env in range(args.n_envs):
            at_cut = samples.index == (cut - 1) * args.n_envs + env
            assert at_cut.any()
            bootstrap = samples.bootstrap_observation[at_cut][0].numpy()
            assert np.array_equal(bootstrap, true_next[env]) and samples.discount[at_cut][0] > 0
            assert not np.array_equal(bootstrap, replay.observation[cut % replay.n_rows, env])
    finally:
        resumed.close()


def test_exploration_kwargs_reach_the_sampling_process():
    feeder = ReplayFeeder(make_args(True), partial(make_env, "CartPole-v1"), switch_policy, Switch(),
                          replay_factory, horizon=4, exploration=force_one)
    try:
        while feeder.collect()[0] < 200:
            pass
        assert (recent_actions(feeder.replay) == 1).all()
    finally:
        feeder.close()


@pytest.mark.parametrize("max_lag", [None, 64])
def test_a_slow_optimizer_holds_the_sampler_within_the_lag_bound(max_lag):
    # The optimizer takes 20 ms per collect, far longer than the sampler needs for a batch, so the sampler
    # runs ahead until the bound stops it: then it has sampled (batches in the copier's hands included) exactly
    # max_lag steps more than the optimizer has consumed (the steps of the previous collect), never more.
    args = make_args(True, async_max_lag=max_lag)
    feeder = ReplayFeeder(args, partial(make_env, "CartPole-v1"), switch_policy, Switch(), replay_factory,
                          horizon=4, exploration=no_exploration)
    bound = max_lag or 4 * 4 * args.n_envs
    try:
        consumed, ahead = 0, []
        for _ in range(30):
            step = feeder.collect()[0]
            time.sleep(0.02)
            ahead.append(int(feeder.counters[STEP]) - consumed)
            consumed = step
    finally:
        feeder.close()
    assert max(ahead) == bound, ahead
    assert sum(a == bound for a in ahead) >= 20, ahead


def test_a_killed_sampling_process_ends_the_run_quickly():
    feeder = ReplayFeeder(make_args(True), partial(make_env, "CartPole-v1"), switch_policy, Switch(),
                          replay_factory, horizon=4, exploration=no_exploration)
    try:
        feeder.collect()
        os.kill(feeder.process.pid, signal.SIGKILL)
        start = time.time()
        with pytest.raises(SamplerError, match="sampling process"):
            for _ in range(100_000):
                feeder.collect(timeout_s=30)
        assert time.time() - start < 10
    finally:
        feeder.close()


@pytest.mark.learning
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dqn_async_sampling_learns_cartpole(run_in, seed):
    # An asynchronous run is not deterministic: which policy version sampled which step depends on the load.
    # So each of three seeds must reach 475 in an evaluation every 10k steps, as synchronous seeds 1-10 all do
    # (each evaluates 500 from 60k on). Where an asynchronous run ends is not asked: DQN on CartPole can fall back
    # late in a run, and a shared machine decides when. Seed 3 ended at 116.6 and 165.2 in two CI runs of the
    # suite; under two busy processes, seed 2 evaluated 500, 500, 447 at 30k-50k, then 147, 152, 203, 461, and
    # ended at 500. That the sampler's policy stays within the lag bound, the reason a lagging run could lose
    # what it learned (with 1000 steps allowed, seed 1 reached 500 and ended at 263.5), is tested exactly by
    # test_a_slow_optimizer_holds_the_sampler_within_the_lag_bound.
    _, run_dir, summary = run_in("dqn", "--async-sampling", "--env-id", "CartPole-v1", "--total-timesteps",
                                 "100000", "--seed", str(seed), "--eval-every", "10000")
    rows = [row for row in read_progress(run_dir) if row.get("eval/episodic_return")]
    evaluations = [float(row["eval/episodic_return"]) for row in rows]
    assert summary["global_step"] >= 100_000
    # One evaluation every 10k steps, the last of them the final one (not evaluated and logged twice).
    assert [int(row["global_step"]) // 10_000 for row in rows] == list(range(1, 11))
    assert int(rows[-1]["global_step"]) == summary["global_step"] and evaluations[-1] == summary["final_eval_return"]
    assert max(evaluations) >= 475, evaluations


@pytest.mark.learning
def test_sac_async_sampling_learns_pendulum(run_in):
    _, _, summary = run_in("sac", "--async-sampling", "--env-id", "Pendulum-v1", "--total-timesteps", "20000")
    assert summary["global_step"] >= 20_000 and summary["final_eval_return"] >= -250, summary


def _async_rank_main(rank, port, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init("cpu")
    # Rank 1 samples ten times more slowly: collect must still hand both ranks the same step counts.
    env_fn = partial(make_env, "CartPole-v1") if rank == 0 else partial(slow_cartpole, 0.002)
    feeder = ReplayFeeder(make_args(True), env_fn, switch_policy, Switch(), replay_factory, horizon=4,
                          exploration=no_exploration)
    try:
        steps = [feeder.collect()[0] for _ in range(30)]
        observations = feeder.replay.sample(64).observation
        queue.put((rank, steps, observations.numpy().copy()))
    finally:
        feeder.close()
        distributed.shutdown()


def slow_cartpole(delay_s, seed=None):
    env = make_env("CartPole-v1", seed=seed)
    step = env.step

    def slow_step(action):
        time.sleep(delay_s)
        return step(action)

    env.step = slow_step
    return env


def test_two_ranks_agree_on_steps_and_sample_different_data():
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = distributed.free_port()
    processes = [ctx.Process(target=_async_rank_main, args=(rank, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    try:
        results = dict((rank, (steps, obs)) for rank, steps, obs in (queue.get(timeout=120) for _ in range(2)))
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    steps0, obs0 = results[0]
    steps1, obs1 = results[1]
    assert steps0 == steps1 and steps0 == sorted(steps0) and steps0[-1] >= 30 * 8, (steps0, steps1)
    assert not np.allclose(obs0, obs1)  # env seeds differ by rank in the sampling processes too


@pytest.mark.learning
def test_torchrun_two_ranks_dqn_async_sampling_learns_cartpole(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
         str(distributed.free_port()), "algos/dqn.py", "--device", "cpu", "--async-sampling", "--env-id",
         "CartPole-v1", "--total-timesteps", "100000", "--output-dir", str(tmp_path), "--run-name", "ddp-async"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp-async" / "summary.json").read_text())
    rows = read_progress(tmp_path / "ddp-async")
    returns = [float(r["charts/episodic_return"]) for r in rows if r["charts/episodic_return"]]
    # Training returns (both ranks' episodes) reach the level of a solved task; the final evaluation of an
    # asynchronous run is left out, since DQN on CartPole can dip late in a run whatever the sampling mode.
    # (On 50k steps one run reached 400 at 23k and another never passed 350: the budget is 100k.)
    assert summary["global_step"] >= 100_000 and max(returns) >= 400, (summary, returns[-20:])


def test_r2d1_async_sampling_trains_on_sequences(run_in):
    proc, run_dir, summary = run_in("r2d1", "--async-sampling", "--env-id", "tests.memory_envs:CartPoleNoVelocity-v0",
                                    "--total-timesteps", "12000", "--learning-starts", "2000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["global_step"] >= 12_000
    rows = read_progress(run_dir)
    losses = [float(r["losses/td_loss"]) for r in rows if r["losses/td_loss"]]
    returns = [float(r["charts/episodic_return"]) for r in rows if r["charts/episodic_return"]]
    assert len(losses) >= 5 and all(math.isfinite(x) for x in losses) and returns, (losses, returns)


def test_async_sampling_process_is_seeded(run_in):
    # No update ever reaches the sampler (learning starts after the run): two runs with one seed draw the
    # same actions, and another seed draws others.
    flags = ["--async-sampling", "--env-id", "Pendulum-v1", "--total-timesteps", "600", "--learning-starts", "5000",
             "--buffer-size", "4000", "--checkpoint-replay", "--eval-episodes", "0"]
    actions = []
    for name, seed in (("first", "1"), ("second", "1"), ("other", "2")):
        _, run_dir, _ = run_in("sac", *flags, "--seed", seed, run_name=name)
        replay = torch.load(run_dir / "checkpoint.pt", weights_only=True)["replay"]
        actions.append(replay["action"][:600])
    assert actions[0].abs().sum() > 0 and torch.equal(actions[0], actions[1])
    assert not torch.equal(actions[0], actions[2])


def test_parallel_gpu_kinds_run_the_sampling_process_inference_on_the_model_device():
    from common.async_mode import inference_device

    cuda = torch.device("cuda", 1)  # a device object needs no GPU
    assert inference_device("parallel-gpu", cuda) == cuda and inference_device("alternating-gpu", cuda) == cuda
    assert inference_device("parallel-cpu", cuda) == torch.device("cpu")
    assert inference_device("serial", cuda) == torch.device("cpu")


def test_the_sampling_process_moves_its_policy_to_the_device_it_is_given_and_samples_there(monkeypatch):
    import queue
    import threading

    from common import async_mode

    seen = {}

    def recording_make_sampler(args, env_fn, policy_step, model, horizon, seed, device):
        seen.update(device=device, model=next(model.parameters()).device)
        raise RuntimeError("recorded")

    monkeypatch.setattr(async_mode, "make_sampler", recording_make_sampler)
    errors, threads = queue.Queue(), torch.get_num_threads()
    meta = torch.device("meta")  # not the CPU: shows the device is the one passed in
    try:
        with pytest.raises(SystemExit):
            async_mode.sampling_main(make_args(True), partial(make_env, "CartPole-v1"), switch_policy, Switch(), None,
                                     async_mode.append_batch, 4, no_exploration, 0, torch.zeros(4, dtype=torch.int64),
                                     threading.Lock(), queue.Queue(), errors, os.getppid(), 1000, meta)
    finally:
        torch.set_num_threads(threads)
    assert seen == {"device": meta, "model": meta}
    assert "recorded" in errors.get_nowait()
