"""common.evaluate: a saved ppo run re-evaluates to its final_eval_return; videos (CartPole, MuJoCo); W&B offline."""

import json
import os
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from conftest import ROOT, read_summary, run_script

from common.envs import UsageError, make_env, observation_example, record_video
from common.evaluate import evaluate_run, import_script, main
from common.samplers import evaluation_plan


def evaluate_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "common.evaluate", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def video_frames(path) -> int:
    with imageio.get_reader(path) as reader:
        return sum(1 for _ in reader)


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    """A tiny tracked (offline) ppo run on CartPole with a 3-episode final evaluation."""
    out = tmp_path_factory.mktemp("evaluate")
    run_script("ppo", "--total-timesteps", "2048", "--eval-episodes", "3", "--seed", "4", "--output-dir", str(out),
               "--run-name", "cartpole", "--track", "--wandb-group", "test-group")
    return out / "cartpole"


def test_tracked_run_has_an_offline_wandb_run_with_config_tags_and_group(cartpole_run):
    config = json.loads((cartpole_run / "config.json").read_text())
    assert config["script"] == "ppo" and config["wandb_group"] == "test-group"
    runs = sorted((cartpole_run / "wandb").glob("offline-run-*"))  # the training run's is the first
    assert runs
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # the offline run's protobuf records
    for text in [b"test-group", b"total_timesteps", b"2048", b"learning_rate", b"CartPole-v1", b"serial", b"ppo"]:
        assert text in record, text


def test_evaluate_reproduces_the_final_eval_return(cartpole_run):
    summary = read_summary(cartpole_run)
    returns = [e.ret for e in evaluate_run(cartpole_run, device="cpu")]
    assert len(returns) == 3
    assert float(np.mean(returns)) == summary["final_eval_return"]
    assert float(np.std(returns)) == summary["final_eval_return_std"]
    last = evaluate_cli(str(cartpole_run / "checkpoint.pt"), "--device", "cpu").stdout.strip().splitlines()[-1]
    assert last == f"eval return: {np.mean(returns):.2f} ± {np.std(returns):.2f} over 3 episodes"
    assert len(evaluate_run(cartpole_run, episodes=5, seed=11)) == 5


def test_capture_video_on_cartpole_records_evaluation_env_0_and_uploads_it(cartpole_run):
    episodes = evaluate_run(cartpole_run, device="cpu")
    proc = evaluate_cli(str(cartpole_run), "--capture-video", "--track", "--device", "cpu")
    summary = read_summary(cartpole_run)
    assert proc.stdout.strip().splitlines()[-1].startswith(f"eval return: {summary['final_eval_return']:.2f} ± ")
    videos = sorted((cartpole_run / "videos").glob("*.mp4"))
    assert len(videos) == 1
    assert video_frames(videos[0]) == episodes[0].length + 1  # the reset frame, then one per step
    uploaded = list((cartpole_run / "wandb").glob("offline-run-*/files/media/videos/**/*.mp4"))
    assert uploaded, "the video was not logged to the W&B run"


def test_video_episodes_records_that_many_episodes_of_the_evaluation_and_leaves_its_returns(cartpole_run, tmp_path):
    plain = evaluate_run(cartpole_run, device="cpu")
    recorded = evaluate_run(cartpole_run, device="cpu", video_dir=tmp_path / "3", video_episodes=3)
    assert [(e.ret, e.length) for e in recorded] == [(e.ret, e.length) for e in plain]
    seeds = evaluation_plan(3, 4)[0]  # one episode on each of the 3 evaluation envs, in episode order
    assert [video_frames(tmp_path / "3" / f"seed{s}-episode0.mp4") for s in seeds] == [e.length + 1 for e in plain]
    evaluate_run(cartpole_run, device="cpu", video_dir=tmp_path / "5", video_episodes=5)  # more than there are
    assert len(list((tmp_path / "5").glob("*.mp4"))) == 3
    evaluate_run(cartpole_run, episodes=10, device="cpu", video_dir=tmp_path / "9", video_episodes=9)
    seeds = evaluation_plan(10, 4)[0]  # 8 envs: episode 8 is env 0's second
    assert sorted(p.name for p in (tmp_path / "9").glob("*.mp4")) == sorted(
        [f"seed{s}-episode0.mp4" for s in seeds] + [f"seed{seeds[0]}-episode1.mp4"])
    with pytest.raises(UsageError, match="--video-episodes must be at least 1"):
        evaluate_run(cartpole_run, device="cpu", video_dir=tmp_path / "0", video_episodes=0)


def test_track_without_video_adds_the_return_to_the_training_wandb_run(cartpole_run, monkeypatch):
    runs = []

    def init(**kwargs):
        runs.append(SimpleNamespace(kwargs=kwargs, summary={}, finish=lambda: None))
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init))
    assert main([str(cartpole_run), "--track", "--device", "cpu"]) == 0
    assert [run.kwargs["id"] for run in runs] == ["cartpole"]
    assert runs[0].summary == {"evaluate/episodic_return": read_summary(cartpole_run)["final_eval_return"]}


def test_capture_video_on_mujoco(tmp_path):
    run_script("ppo", "--env-id", "InvertedPendulum-v5", "--total-timesteps", "2048", "--eval-episodes", "2",
               "--output-dir", str(tmp_path), "--run-name", "mujoco")
    run_dir = tmp_path / "mujoco"
    proc = evaluate_cli(str(run_dir), "--capture-video", "--device", "cpu")
    summary = read_summary(run_dir)
    assert proc.stdout.strip().splitlines()[-1] == (
        f"eval return: {summary['final_eval_return']:.2f} ± {summary['final_eval_return_std']:.2f} over 2 episodes")
    videos = list((run_dir / "videos").glob("*.mp4"))
    assert len(videos) == 1 and video_frames(videos[0]) >= 2


def test_record_video_keeps_only_finished_episodes_of_the_first_env(tmp_path):
    env_fn = record_video(partial(make_env, "CartPole-v1", training=False), tmp_path, episodes=2)
    first, second = env_fn(3), env_fn(4)
    for env in (first, second):
        env.reset(seed=0)
        lengths = []
        for _ in range(3):
            done, n = False, 0
            while not done:
                _, _, terminated, truncated, _ = env.step(env.action_space.sample())
                done, n = terminated or truncated, n + 1
            lengths.append(n)
            env.reset()
        env.step(env.action_space.sample())  # an unfinished episode: not kept
        env.close()
        if env is first:
            first_lengths = lengths
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["seed3-episode0.mp4", "seed3-episode1.mp4"]
    assert [video_frames(tmp_path / f"seed3-episode{k}.mp4") for k in range(2)] == [n + 1 for n in first_lengths[:2]]
    assert record_video(env_fn, None) is env_fn


def test_record_video_needs_make_env(tmp_path):
    with pytest.raises(UsageError, match="make_env"):
        record_video(lambda seed: gym.make("CartPole-v1"), tmp_path)(0)


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"script": "mine", "env_id": "CartPole-v1"}))
    torch.save({"model": {}}, run_dir / "checkpoint.pt")
    script = tmp_path / "mine.py"
    script.write_text("from dataclasses import dataclass\n\n@dataclass\nclass Args:\n    env_id: str = 'x'\n")
    assert main([str(run_dir), "--script", str(script)]) == 2
    err = capsys.readouterr().err
    assert "policy_step, load_policy" in err and err.count("\n") == 1


DICT_POLICY_SCRIPT = """
from dataclasses import dataclass

import torch

from common.envs import make_env, observation_example
from common.networks import observation_encoder

ENV_ID = "tests.memory_envs:DictCartPole-v0"


@dataclass
class Args:
    env_id: str = ENV_ID
    seed: int = 1
    eval_episodes: int = 1


class Policy(torch.nn.Module):
    def __init__(self, example):
        super().__init__()
        self.encoder, size = observation_encoder(example)
        self.logits = torch.nn.Linear(size, 2)


def policy_step(model, observation, prev_action, prev_reward, rnn_state, deterministic=False):
    if type(observation).__name__ != "Observation" or observation.state.position.shape != (1, 2):
        raise ValueError(f"not a batch of one Dict observation: {observation}")
    return model.logits(model.encoder(observation)).argmax(-1), None, None


def env_fn(seed, **kwargs):
    return make_env(ENV_ID, seed, training=False, **kwargs)


def load_policy(args, checkpoint, device):
    model = Policy(observation_example(env_fn(0).observation_space))
    model.load_state_dict(checkpoint["model"])
    return model.to(device), env_fn
"""


def test_a_dict_observation_run_evaluates_and_records_video(tmp_path, capsys):
    """The policy gets each Dict observation as a namedarraytuple batch of one; the episode is recorded."""
    script = tmp_path / "dict_policy.py"
    script.write_text(DICT_POLICY_SCRIPT)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"script": "dict_policy", "seed": 3, "eval_episodes": 1}))
    module = import_script(script)
    torch.manual_seed(0)
    model = module.Policy(observation_example(module.env_fn(0).observation_space))
    torch.save({"model": model.state_dict()}, run_dir / "checkpoint.pt")
    assert main([str(run_dir), "--script", str(script), "--capture-video", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("over 1 episodes")
    episode, = evaluate_run(run_dir, device="cpu", script=script)
    videos = sorted((run_dir / "videos").glob("*.mp4"))
    assert len(videos) == 1 and video_frames(videos[0]) == episode.length + 1


class AlwaysNoop(torch.nn.Module):
    """A policy whose most likely action is always 0 (an Atari agent that never learned to press FIRE)."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor([5.0, 0.0, 0.0, 0.0]))

    def forward(self, obs):
        return torch.distributions.Categorical(logits=self.logits.expand(obs.shape[0], 4)), torch.zeros(obs.shape[0])


def test_atari_evaluation_is_epsilon_greedy_so_a_stalled_greedy_policy_still_ends_its_episodes():
    from conftest import load_script

    from common.logger import Evaluation

    ppo_atari = load_script("ppo_atari")
    args = ppo_atari.Args(eval_episodes=4, eval_every=0, seed=3)
    assert args.eval_epsilon == 0.001 and ppo_atari.eval_policy_kwargs(args) == {"epsilon": 0.001}
    env_fn = partial(make_env, "tests.memory_envs:GreedyNeverEnds-v0", training=False)
    model = AlwaysNoop()
    greedy = Evaluation(args, env_fn, ppo_atari.policy_step, model, torch.device("cpu")).returns()
    assert greedy == [1000.0] * 4  # without epsilon the greedy policy idles to the time limit
    args.eval_epsilon = 0.05
    evaluation = Evaluation(args, env_fn, ppo_atari.policy_step, model, torch.device("cpu"),
                            **ppo_atari.eval_policy_kwargs(args))
    returns = evaluation.returns()
    assert len(returns) == 4 and max(returns) < 1000
    assert evaluation.returns() == returns  # seeded: the same episodes again


class RecurrentAlwaysNoop(torch.nn.Module):
    """ppo_atari_lstm's model interface, most likely action always 0."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor([5.0, 0.0, 0.0, 0.0]))

    def initial_state(self, batch_size, device):
        return torch.zeros(1, batch_size, 1, device=device), torch.zeros(1, batch_size, 1, device=device)

    continuous = False

    def forward(self, obs, prev_action, prev_reward, rnn_state):
        time, batch = obs.shape[:2]
        return self.logits.expand(time, batch, 4), torch.zeros(time, batch), rnn_state

    def distribution(self, out):
        return torch.distributions.Categorical(logits=out)


def test_recurrent_ppo_evaluates_epsilon_greedy_on_images_and_greedy_on_vectors():
    from conftest import load_script

    from common.logger import Evaluation

    lstm = load_script("ppo_atari_lstm")
    image_args, vector_args = lstm.Args(eval_episodes=4, eval_every=0, seed=3), lstm.Args(eval_episodes=4, seed=3)
    lstm.resolve_presets(image_args, "image")
    lstm.resolve_presets(vector_args, "vector")
    assert lstm.eval_policy_kwargs(image_args) == {"epsilon": 0.001}
    assert lstm.eval_policy_kwargs(vector_args) == {"epsilon": 0.0}
    env_fn = partial(make_env, "tests.memory_envs:GreedyNeverEnds-v0", training=False)
    model = RecurrentAlwaysNoop()
    greedy = Evaluation(vector_args, env_fn, lstm.policy_step, model, torch.device("cpu"),
                        **lstm.eval_policy_kwargs(vector_args)).returns()
    assert greedy == [1000.0] * 4
    image_args.eval_epsilon = 0.05
    returns = Evaluation(image_args, env_fn, lstm.policy_step, model, torch.device("cpu"),
                         **lstm.eval_policy_kwargs(image_args)).returns()
    assert len(returns) == 4 and max(returns) < 1000


@pytest.mark.parametrize("script", ["rainbow_atari", "dqn_atari", "c51_atari"])
def test_deep_q_atari_evaluation_is_epsilon_greedy(script):
    from conftest import load_script

    module = load_script(script)
    assert module.eval_policy_kwargs(module.Args()) == {"epsilon": 0.001}
    torch.manual_seed(0)
    atoms = torch.linspace(-10, 10, 51)
    model = {"rainbow_atari": lambda: module.RainbowNetwork(4, 6, atoms, 0.5),
             "dqn_atari": lambda: module.AtariQNetwork(4, 6, dueling=False),
             "c51_atari": lambda: module.CategoricalAtariNetwork(4, 6, atoms)}[script]()
    obs = torch.randint(0, 255, (64, 4, 84, 84), dtype=torch.uint8)
    greedy = module.policy_step(model, obs, None, None, None, deterministic=True)[0]
    assert torch.equal(greedy, module.policy_step(model, obs, None, None, None, deterministic=True)[0])
    explored = module.policy_step(model, obs, None, None, None, deterministic=True, epsilon=0.5)[0]
    assert (explored != greedy).any() and (explored == greedy).any()


def test_r2d1_evaluates_epsilon_greedy_on_atari_and_greedy_on_vectors():
    from conftest import load_script

    r2d1 = load_script("r2d1")
    assert r2d1.eval_policy_kwargs(r2d1.Args(env_id="ALE/Pong-v5")) == {"epsilon": 0.001}
    assert r2d1.eval_policy_kwargs(r2d1.Args(env_id="CartPole-v1")) == {"epsilon": 0.0}
    assert r2d1.eval_policy_kwargs(r2d1.Args(env_id="CartPole-v1", eval_epsilon=0.05)) == {"epsilon": 0.05}
    torch.manual_seed(0)
    model = r2d1.R2D1Network(np.zeros(4, np.float32), 6, hidden=16, lstm_size=8)
    obs, zeros = torch.randn(64, 4), torch.zeros(64)
    greedy = r2d1.policy_step(model, obs, zeros.long(), zeros, None, deterministic=True)[0]
    assert torch.equal(greedy, r2d1.policy_step(model, obs, zeros.long(), zeros, None, deterministic=True)[0])
    explored = r2d1.policy_step(model, obs, zeros.long(), zeros, None, deterministic=True, epsilon=0.5)[0]
    assert (explored != greedy).any() and (explored == greedy).any()
