"""Bad flags end before any work with one UsageError naming the flag; custom env modules import from the cwd."""

import ast
import os
import re
import shlex
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, load_script, read_summary

from common import config
from common.async_mode import ReplayFeeder
from common.envs import UsageError, make_env
from common.replay import UniformReplayBuffer

SCRIPTS = ["a2c", "c51", "c51_atari", "ddpg", "dqn", "dqn_atari", "ppo", "ppo_atari", "ppo_atari_lstm", "r2d1",
           "rainbow_atari", "sac", "td3"]


def parse(script, *flags, tmp_path):
    return config.parse_args(load_script(script).Args, ["--output-dir", str(tmp_path), *flags])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_defaults_pass_validation(script, tmp_path):
    assert parse(script, tmp_path=tmp_path).total_timesteps >= 1


@pytest.mark.parametrize("script, flags, message", [
    ("dqn", ["--target-network-period", "0"], "--target-network-period must be at least 1, got 0"),
    ("rainbow_atari", ["--target-network-period", "0"], "--target-network-period must be at least 1, got 0"),
    ("dqn", ["--num-steps", "0"], "--num-steps must be at least 1, got 0"),
    ("r2d1", ["--num-steps", "0"], "--num-steps must be at least 1, got 0"),
    ("dqn", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("dqn", ["--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
    ("r2d1", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("dqn", ["--replay-ratio", "-1"], "--replay-ratio must be positive, got -1.0"),
    ("ppo_atari", ["--num-steps", "-4"], "--num-steps must be at least 1, got -4"),
    ("ppo_atari_lstm", ["--env-id", "CartPole-v1", "--num-steps", "0"], "--num-steps must be at least 1, got 0"),
    ("ppo", ["--update-epochs", "0"], "--update-epochs must be at least 1, got 0"),
    ("ppo_atari_lstm", ["--update-epochs", "0"], "--update-epochs must be at least 1, got 0"),
    ("ppo", ["--hidden-size", "-1"], "--hidden-size must be at least 1, got -1"),
    ("td3", ["--log-every-updates", "0"], "--log-every-updates must be at least 1, got 0"),
    ("sac", ["--log-every-updates", "0"], "--log-every-updates must be at least 1, got 0"),
    ("ddpg", ["--log-every-updates", "0"], "--log-every-updates must be at least 1, got 0"),
    ("ppo", ["--eval-every", "-5"], "--eval-every must be at least 0, got -5"),
    ("ppo", ["--torch-threads", "0"], "--torch-threads must be at least 1, got 0"),
    ("r2d1", ["--eval-epsilon", "1.5"], "--eval-epsilon must be in [0, 1], got 1.5"),
    ("dqn_atari", ["--eval-epsilon", "-0.1"], "--eval-epsilon must be in [0, 1], got -0.1"),
    ("ppo_atari_lstm", ["--eval-epsilon", "2"], "--eval-epsilon must be in [0, 1], got 2.0"),
    ("dqn", ["--learning-rate", "-1e-3"], "--learning-rate must be at least 0, got -0.001"),
    ("dqn", ["--tau", "0"], "--tau must be positive, got 0.0"),
    ("dqn", ["--tau", "1.5"], "--tau must be in [0, 1], got 1.5"),
    ("dqn", ["--async-sampling", "--async-max-lag", "-1"], "--async-max-lag must be at least 1, got -1"),
    ("dqn", ["--async-sampling", "--async-max-lag", "0"], "--async-max-lag must be at least 1, got 0"),
])
def test_an_out_of_range_flag_is_a_usage_error_naming_it(script, flags, message, tmp_path):
    with pytest.raises(UsageError) as error:
        parse(script, *flags, tmp_path=tmp_path)
    assert str(error.value) == message


def test_zero_stays_valid_where_it_means_none_or_off(tmp_path):
    args = parse("dqn", "--learning-starts", "0", "--eval-every", "0", "--eval-episodes", "0", "--priority-alpha",
                 "0", "--exploration-fraction", "0", "--async-max-lag", "1", tmp_path=tmp_path)
    assert (args.learning_starts, args.eval_every, args.priority_alpha, args.async_max_lag) == (0, 0, 0.0, 1)
    assert parse("ppo", "--learning-rate", "0", tmp_path=tmp_path).learning_rate == 0.0  # an untrained run
    assert parse("sac", "--alpha", "0", tmp_path=tmp_path).alpha == 0.0


def test_help_says_n_envs_and_total_timesteps_are_per_data_parallel_rank(capsys):
    with pytest.raises(SystemExit):
        config.parse_args(config.CommonArgs, ["--help"])
    help_text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "--n-envs INT training environments per data-parallel rank" in help_text
    assert "--total-timesteps INT environment steps to train for per data-parallel rank" in help_text


def test_n_gpus_with_device_cpu_points_to_n_procs(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError, match=r"--device cpu.*--n-procs 2 --device cpu"):
        parse("dqn", "--device", "cpu", "--n-gpus", "2", tmp_path=tmp_path)
    assert config.resolve_device(parse("dqn", "--n-gpus", "2", tmp_path=tmp_path)) == torch.device("cuda", 0)


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


# What a documented command may need that this machine lacks: a GPU, or a saved run to resume.
MACHINE_DEPENDENT = ("needs a CUDA GPU", "than are visible", "no config.json there")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, flags) of every `python algos/<script>.py ...` in the READMEs and the scripts' docstrings."""
    commands = []
    for path in [ROOT / "README.md", ROOT / "benchmark" / "README.md", *sorted((ROOT / "algos").glob("*.py"))]:
        text = path.read_text()
        if path.suffix == ".py":
            text = ast.get_docstring(ast.parse(text)) or ""
        text = text.replace("\\\n", " ")  # a command continued on the next line
        for match in re.finditer(r"python algos/(\w+)\.py([^`|\n]*)", text):
            flags = shlex.split(match.group(2), comments=True)
            commands.append((path.name, match.group(1), flags))
    return commands


def test_every_documented_command_parses_and_validates(tmp_path):
    commands = documented_commands()
    assert len(commands) > 40 and {script for _, script, _ in commands} == set(SCRIPTS)
    for where, script, flags in commands:
        try:
            parse(script, *flags, tmp_path=tmp_path)
        except UsageError as error:
            assert any(reason in str(error) for reason in MACHINE_DEPENDENT), (where, script, flags, error)
        except SystemExit as error:  # tyro: an unknown flag or a value of the wrong type
            raise AssertionError(f"{where}: python algos/{script}.py {shlex.join(flags)} does not parse") from error
