"""Bad flags end before any work with one UsageError naming the flag; custom env modules import from the cwd."""

import os
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, read_summary

from common.async_mode import ReplayFeeder
from common.envs import UsageError, make_env
from common.replay import UniformReplayBuffer


class Constant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))


def zero_policy(model, obs, prev_action, prev_reward, rnn_state, deterministic=False):
    return torch.zeros(obs.shape[0], dtype=torch.long), None, None


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_replay_too_small_for_one_item_is_a_buffer_size_error(asynchronous):
    args = SimpleNamespace(async_sampling=asynchronous, seed=0, n_envs=2, sampler="serial", n_workers=1, n_gpus=0,
                           start_method="spawn", cpu_affinity=False, buffer_size=3)

    def replay_factory(example, share_memory):
        return UniformReplayBuffer(example, size=args.buffer_size, n_envs=2, n_step=3, share_memory=share_memory)

    with pytest.raises(UsageError) as error:
        ReplayFeeder(args, partial(make_env, "CartPole-v1"), zero_policy, Constant(), replay_factory, horizon=4,
                     exploration=lambda step: {})
    assert str(error.value).startswith("--buffer-size 3: ") and str(error.value).endswith("at least 10")


def test_a_module_env_id_imports_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_only_envs.py").write_text(
        "import gymnasium as gym\n"
        "gym.register('CwdOnly-v0', entry_point='gymnasium.envs.classic_control.cartpole:CartPoleEnv', "
        "max_episode_steps=7)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    env = make_env("cwd_only_envs:CwdOnly-v0", seed=0)
    try:
        assert env.spec.max_episode_steps == 7 and env.observation_space.shape == (4,)
    finally:
        env.close()
        sys.modules.pop("cwd_only_envs", None)
    with pytest.raises(UsageError, match=f"cannot import module 'no_such_envs'.*current directory {tmp_path}"):
        make_env("no_such_envs:Nothing-v0", seed=0)


def test_a_script_run_from_the_repository_root_finds_a_test_env_in_every_worker(tmp_path):
    # `python algos/r2d1.py` puts algos/, not the cwd, on sys.path; common/ comes from a path of its own here,
    # as an installed package would.
    packages = tmp_path / "packages"
    packages.mkdir()
    (packages / "common").symlink_to(ROOT / "common")
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(packages), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "algos/r2d1.py", "--env-id", "tests.memory_envs:CartPoleNoVelocity-v0", "--total-timesteps",
         "400", "--sampler", "parallel-cpu", "--n-workers", "2", "--eval-episodes", "1", "--output-dir",
         str(tmp_path / "runs"), "--run-name", "r2d1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_summary(tmp_path / "runs" / "r2d1")["global_step"] >= 400
