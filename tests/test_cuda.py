"""The CUDA paths: every sampler kind with the policy on the GPU, data-parallel training over NCCL, asynchronous
sampling, torch.compile and CUDA graphs, checkpoints that cross devices, frame replay batches moved to the GPU.

Every test here is marked `cuda` and skipped where torch sees no CUDA device; `pytest -m cuda` runs them on a
GPU machine (`bash benchmark/gpu_check.sh --out DIR` does, in its second step).
"""

import copy
import math
import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script, read_progress, read_summary, run_script
from sampler_helpers import ProbeModel, counting_policy, memory_policy
from test_replay import GAMMA, check_transitions, chunks, make_stream, to_torch
from test_samplers import assert_same_collects, run_collects, sampler_args

from common.envs import make_env
from common.namedarraytuple import buffer_to
from common.replay import FrameReplayBuffer, ReplaySamples
from common.samplers import make_sampler

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
KINDS = ["serial", "parallel-cpu", "parallel-gpu", "alternating-gpu"]


def finite_column(run_dir, column: str) -> list[float]:
    """The logged values of a progress.csv column; fails unless there are some and all are finite."""
    values = [float(row[column]) for row in read_progress(run_dir) if row.get(column)]
    assert values and all(math.isfinite(v) for v in values), (column, values[-10:])
    return values


def saved_on_cuda(run_dir, name: str) -> bool:
    """Whether every tensor of the checkpoint's `name` entry (a state_dict) was saved from CUDA memory."""
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)[name]  # no map_location: where it was saved
    return all(tensor.is_cuda for tensor in state.values())


# --------------------------------------------------------------------------------------------------
# Samplers: the policy on CUDA, the environments on the CPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id, horizon, n_collects, n_eval, min_episodes", [
    pytest.param("CartPole-v1", 40, 3, 3, 5, id="CartPole"), pytest.param("ALE/Pong-v5", 10, 2, 0, 0, id="Pong"),
])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_with_a_cuda_model_steps_the_envs_as_serial_on_the_cpu(kind, env_id, horizon, n_collects, n_eval,
                                                                          min_episodes):
    """A fixed action sequence (an integer-only policy, exact on any device): the batches, episodes and
    evaluation episodes of each kind with the model on CUDA are those of the serial sampler on the CPU."""
    env_fn = partial(make_env, env_id)
    probe = env_fn(0)
    n_actions = int(probe.action_space.n)
    probe.close()
    serial = make_sampler(sampler_args("serial"), env_fn, counting_policy, ProbeModel(n_actions), horizon=horizon)
    try:
        expected = run_collects(serial, n_collects)
        expected_eval = serial.evaluate(n_eval)
    finally:
        serial.close()
    assert sum(len(episodes) for _, episodes in expected) >= min_episodes  # the batches cross episode ends

    model = ProbeModel(n_actions).to(CUDA)
    sampler = make_sampler(sampler_args(kind, start_method="spawn"), env_fn, counting_policy, model, horizon=horizon)
    try:
        actual = run_collects(sampler, n_collects)
        actual_eval = sampler.evaluate(n_eval)
    finally:
        sampler.close()
    assert_same_collects(expected, actual)
    assert actual_eval == expected_eval


def test_parallel_cpu_workers_act_with_the_parameters_synced_from_a_cuda_model():
    model = ProbeModel(n_actions=2).to(CUDA)
    sampler = make_sampler(sampler_args("parallel-cpu", start_method="spawn"), partial(make_env, "CartPole-v1"),
                           memory_policy, model, horizon=5)
    try:
        assert sampler.shared_model.weight.device == CPU  # the workers' copy lives in CPU shared memory
        assert torch.all(sampler.collect()[0].agent_info.parameter == 1.0)
        with torch.no_grad():
            model.weight.fill_(2.0)
            model.offset.fill_(0.5)
        assert torch.all(sampler.collect()[0].agent_info.parameter == 1.0)  # not yet synced
        sampler.sync(model)
        assert torch.all(sampler.collect()[0].agent_info.parameter == 2.5)
    finally:
        sampler.close()


# --------------------------------------------------------------------------------------------------
# Scripts on CUDA
# --------------------------------------------------------------------------------------------------

PONG_RUN = ["--env-id", "ALE/Pong-v5", "--n-envs", "4", "--n-workers", "2", "--num-steps", "32",
            "--total-timesteps", "256", "--max-episode-steps", "150", "--eval-episodes", "1"]
HOPPER_RUN = ["--env-id", "Hopper-v5", "--n-envs", "4", "--n-workers", "2", "--total-timesteps", "600",
              "--learning-starts", "200", "--buffer-size", "2000", "--batch-size", "64", "--log-every-updates", "50",
              "--eval-episodes", "1"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("script, flags, total, loss, saved", [
    pytest.param("ppo_atari", PONG_RUN, 256, "losses/value_loss", "model", id="ppo_atari-Pong"),
    pytest.param("sac", HOPPER_RUN, 600, "losses/qf_loss", "actor", id="sac-Hopper"),
])
def test_scripts_train_on_cuda_with_every_sampler_kind(run_in, script, flags, total, loss, saved, kind):
    _, run_dir, summary = run_in(script, "--device", "cuda", "--sampler", kind, *flags, timeout=300)
    assert summary["global_step"] == total and math.isfinite(summary["final_eval_return"]), summary
    finite_column(run_dir, loss)
    assert saved_on_cuda(run_dir, saved)


def test_dqn_atari_samples_frame_replay_onto_cuda(run_in):
    _, run_dir, summary = run_in(
        "dqn_atari", "--device", "cuda", "--sampler", "parallel-gpu", "--env-id", "ALE/Pong-v5", "--n-envs", "4",
        "--total-timesteps", "800", "--learning-starts", "200", "--replay-ratio", "1", "--buffer-size", "4000",
        "--batch-size", "32", "--max-episode-steps", "150", "--eval-episodes", "1", timeout=300)
    assert summary["global_step"] >= 800 and math.isfinite(summary["final_eval_return"]), summary
    assert len(finite_column(run_dir, "losses/td_loss")) >= 5  # one every 100 updates
    assert saved_on_cuda(run_dir, "q_net")


def test_dqn_async_sampling_runs_its_inference_on_cuda(run_in):
    _, run_dir, summary = run_in(
        "dqn", "--async-sampling", "--sampler", "parallel-gpu", "--device", "cuda", "--env-id", "CartPole-v1",
        "--n-envs", "4", "--total-timesteps", "3000", "--learning-starts", "500", "--buffer-size", "3000",
        "--batch-size", "32", "--eval-episodes", "2", timeout=300)
    assert summary["global_step"] >= 3000 and math.isfinite(summary["final_eval_return"]), summary
    finite_column(run_dir, "losses/td_loss")
    # Episodes finished in the sampling process reach the main process's log.
    finite_column(run_dir, "charts/episodic_return")


@pytest.mark.parametrize("flag", ["--compile", "--cudagraphs"])
@pytest.mark.parametrize("script", ["sac", "td3"])
def test_compiled_updates_train_on_cuda(run_in, script, flag):
    # Hopper-v5 with the default batch and network sizes: the shapes benchmark/algo_speed.py compiles (the
    # GPU check runs it next, and finds these compiled graphs in torch's cache). A log after every update
    # reads each update's losses (td3's actor loss is one update old on odd updates): CUDA graphs must not
    # have recycled their memory by then.
    _, run_dir, summary = run_in(
        script, flag, "--device", "cuda", "--env-id", "Hopper-v5", "--total-timesteps", "1500",
        "--learning-starts", "500", "--log-every-updates", "1", "--eval-episodes", "2", timeout=400)
    assert summary["global_step"] == 1500 and math.isfinite(summary["final_eval_return"]), summary
    assert len(finite_column(run_dir, "losses/qf_loss")) >= 900
    finite_column(run_dir, "losses/actor_loss")


def td3_updates(compile: bool, cudagraphs: bool, n_updates: int = 12) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """td3.py's update loop (policy every 2nd update, Polyak targets) without target-policy noise, on fixed
    batches: the losses of every 2nd update [n_updates / 2, 2] and the final actor parameters."""
    td3 = load_script("td3")
    torch._dynamo.reset()
    torch.manual_seed(0)
    obs_dim, act_dim, hidden, batch = 11, 3, 64, 128
    low, high = -np.ones(act_dim, np.float32), np.ones(act_dim, np.float32)
    actor = td3.Actor(np.zeros(obs_dim, np.float32), act_dim, hidden, low, high).to(CUDA)
    critics = td3.Critics(np.zeros(obs_dim, np.float32), act_dim, hidden).to(CUDA)
    target_actor = copy.deepcopy(actor).requires_grad_(False)
    target_critics = copy.deepcopy(critics).requires_grad_(False)
    actor_optimizer = td3.adam(actor.parameters(), 1e-3, CUDA)
    critic_optimizer = td3.adam(critics.parameters(), 1e-3, CUDA)
    critic_loss_fn = td3.compile_fn(td3.td3_critic_loss, compile, cudagraphs)
    actor_loss_fn = td3.compile_fn(td3.td3_actor_loss, compile, cudagraphs)
    generator = torch.Generator().manual_seed(1)
    batches = [buffer_to(ReplaySamples(
        observation=torch.randn(batch, obs_dim, generator=generator, dtype=torch.float64),
        action=torch.rand(batch, act_dim, generator=generator) * 2 - 1, prev_action=torch.zeros(batch, act_dim),
        prev_reward=torch.zeros(batch), n_step_return=torch.randn(batch, generator=generator), done=torch.zeros(batch),
        bootstrap_observation=torch.randn(batch, obs_dim, generator=generator, dtype=torch.float64),
        discount=torch.full((batch,), 0.99), weight=torch.ones(batch), index=torch.arange(batch),
    ), CUDA) for _ in range(3)]
    losses = []
    for n in range(1, n_updates + 1):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        sample = batches[n % len(batches)]
        q_loss, _ = critic_loss_fn(critics, target_critics, target_actor, sample, 0.0, 0.5)
        critic_optimizer.zero_grad(set_to_none=True)
        q_loss.backward()
        critic_optimizer.step()
        if n % 2 == 0:
            actor_loss = actor_loss_fn(actor, critics, sample.observation)
            actor_optimizer.zero_grad(set_to_none=True)
            actor_loss.backward()
            actor_optimizer.step()
            td3.polyak_update(target_actor.parameters(), actor.parameters(), 0.005)
            td3.polyak_update(target_critics.parameters(), critics.parameters(), 0.005)
            losses.append([q_loss.item(), actor_loss.item()])  # what the script logs, read when it is fresh
    return torch.tensor(losses), [p.detach().cpu() for p in actor.parameters()]


@pytest.mark.parametrize("cudagraphs", [False, True], ids=["compile", "cudagraphs"])
def test_compiled_td3_update_follows_the_eager_update(cudagraphs):
    eager_losses, eager_parameters = td3_updates(compile=False, cudagraphs=False)
    losses, parameters = td3_updates(compile=True, cudagraphs=cudagraphs)
    assert (eager_losses[:, 0].diff() != 0).all()  # the batches and parameters change from update to update
    torch.testing.assert_close(losses, eager_losses, rtol=1e-3, atol=1e-5)
    for parameter, eager in zip(parameters, eager_parameters):
        torch.testing.assert_close(parameter, eager, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Data-parallel training over NCCL
# --------------------------------------------------------------------------------------------------


def launch_local(n_ranks: int, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python <argv>` as `n_ranks` local ranks through the launcher `--n-gpus` uses (distributed.spawn_local)."""
    launcher = ("import sys; from common import distributed; "
                "sys.exit(distributed.spawn_local(int(sys.argv[1]), sys.argv[2:]))")
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", launcher, str(n_ranks), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_local_launcher_joins_one_nccl_rank_per_gpu():
    n_gpus = torch.cuda.device_count()
    probe = ("import torch, torch.distributed as dist\n"
             "from common import distributed\n"
             "distributed.init('cuda')\n"
             "total = torch.full((1,), distributed.rank() + 1.0, device='cuda')\n"
             "dist.all_reduce(total)\n"
             "print('rank', distributed.rank(), dist.get_backend(), torch.cuda.current_device(), int(total.item()))\n"
             "distributed.shutdown()\n")
    proc = launch_local(n_gpus, "-c", probe, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {f"rank {r} nccl {r} {n_gpus * (n_gpus + 1) // 2}" for r in range(n_gpus)}
    assert {line for line in proc.stdout.splitlines() if line.startswith("rank ")} == expected


def test_n_gpus_trains_ppo_through_the_local_launcher(tmp_path):
    n_gpus = torch.cuda.device_count()
    proc = launch_local(n_gpus, "algos/ppo.py", "--n-gpus", str(n_gpus), "--total-timesteps", "4096",
                        "--eval-episodes", "2", "--output-dir", str(tmp_path), "--run-name", "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(tmp_path / "ddp")
    assert summary["global_step"] == 4096 and math.isfinite(summary["final_eval_return"]), summary
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # only rank 0 wrote a run directory
    assert saved_on_cuda(tmp_path / "ddp", "model")


def test_more_gpus_than_visible_is_a_one_line_error():
    n_gpus = torch.cuda.device_count()
    proc = run_script("ppo", "--n-gpus", str(n_gpus + 1), check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"--n-gpus {n_gpus + 1}" in proc.stderr and f"({n_gpus})" in proc.stderr


# --------------------------------------------------------------------------------------------------
# Checkpoints and replay across devices
# --------------------------------------------------------------------------------------------------


def test_a_checkpoint_written_on_cuda_evaluates_on_the_cpu(run_in):
    _, run_dir, summary = run_in("ppo", "--device", "cuda", "--total-timesteps", "2048", "--eval-episodes", "3",
                                 "--seed", "4")
    assert saved_on_cuda(run_dir, "model")
    # No GPU visible to the evaluation: the checkpoint's CUDA tensors are mapped to the CPU on load.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "common.evaluate", str(run_dir), "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The same greedy CartPole episodes as the final evaluation on CUDA (argmax actions; rounding differences
    # between the devices' matmuls do not change them).
    assert proc.stdout.strip().splitlines()[-1] == (
        f"eval return: {summary['final_eval_return']:.2f} ± {summary['final_eval_return_std']:.2f} over 3 episodes")


def test_frame_replay_samples_move_to_cuda_intact():
    n_envs, n_steps, frame_stack = 3, 150, 4
    stream = make_stream(n_steps, n_envs, seed=21, frame_stack=frame_stack, p_end=0.2)
    buffer = FrameReplayBuffer(to_torch(stream)[0, 0], size=40 * n_envs, n_envs=n_envs, n_step=3, gamma=GAMMA,
                               final_capacity=12)
    torch.manual_seed(0)
    n_checked = 0
    for start, stop in chunks(n_steps, seed=21):
        buffer.append(to_torch(stream[start:stop]))
        if len(buffer) == 0:
            continue
        samples = buffer.sample(64)
        on_cuda = buffer_to(samples, CUDA, non_blocking=True)
        assert all(x.is_cuda and x.dtype == y.dtype and x.shape == y.shape for x, y in zip(on_cuda, samples))
        # Work on the GPU copy (what an update does), then check it against the stream, brute force.
        stack_sums = on_cuda.observation.flatten(1).long().sum(1)
        assert torch.equal(stack_sums.cpu(), samples.observation.flatten(1).long().sum(1))
        check_transitions(buffer, stream, buffer_to(on_cuda, CPU), stop, history=frame_stack - 1)
        n_checked += 1
    assert n_checked >= 10
