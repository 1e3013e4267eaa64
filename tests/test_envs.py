"""Tests of common/envs.py: Atari preprocessing, episode statistics, time limits, ids, space checks."""

import json
from functools import partial
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from common.config import CommonArgs, parse_args
from common.envs import (
    UsageError,
    is_atari,
    make_env,
    observation_example,
    observation_shape,
    raw_observation,
    require_continuous_actions,
    require_discrete_actions,
    write_observation,
)
from common.namedarraytuple import buffer_from_example


def record_raw_rewards(env: gym.Env) -> list[float]:
    """Make the innermost env log each raw (per-frame, unclipped) reward; the list restarts on a game reset."""
    ale_env = env.unwrapped
    rewards: list[float] = []
    step, reset = ale_env.step, ale_env.reset

    def logged_step(action):
        out = step(action)
        rewards.append(float(out[1]))
        return out

    def logged_reset(**kwargs):
        rewards.clear()
        return reset(**kwargs)

    ale_env.step, ale_env.reset = logged_step, logged_reset
    return rewards


# ------------------------------------------------------------------------------------------------
# Atari
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", ["ALE/Pong-v5", "PongNoFrameskip-v4"])
def test_atari_observations_and_frame_stack(env_id):
    env = make_env(env_id, seed=0)
    assert is_atari(env_id)
    assert env.observation_space == gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    assert observation_shape(env) == (4, 84, 84)
    assert require_discrete_actions(env, "algos/dqn.py") == 6
    assert env.unwrapped._frameskip == 1  # our MaxAndSkip does the skipping

    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.uint8 and obs.shape == (4, 84, 84) and env.observation_space.contains(obs)
    assert all(np.array_equal(obs[k], obs[0]) for k in range(4))  # reset fills the stack with frame 0
    changed = False
    for _ in range(60):
        next_obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        assert not (terminated or truncated)
        assert next_obs.shape == (4, 84, 84) and next_obs.dtype == np.uint8
        np.testing.assert_array_equal(next_obs[:-1], obs[1:])
        changed |= not np.array_equal(next_obs[-1], obs[-1])
        obs = next_obs
    assert changed


def test_atari_sticky_actions_and_determinism():
    v5 = make_env("ALE/Pong-v5", seed=3)
    v4 = make_env("PongNoFrameskip-v4", seed=3)
    assert v5.unwrapped.ale.getFloat("repeat_action_probability") == pytest.approx(0.25)
    assert v4.unwrapped.ale.getFloat("repeat_action_probability") == 0.0

    twin = make_env("ALE/Pong-v5", seed=3)
    obs_a, _ = v5.reset(seed=7)
    obs_b, _ = twin.reset(seed=7)
    for _ in range(50):
        np.testing.assert_array_equal(obs_a, obs_b)
        action = v5.action_space.sample()
        assert action == twin.action_space.sample()  # action spaces seeded by make_env
        obs_a, reward_a, *_ = v5.step(action)
        obs_b, reward_b, *_ = twin.step(action)
        assert reward_a == reward_b


def test_no_frameskip_v4_falls_back_to_v5_without_sticky_actions(monkeypatch):
    monkeypatch.delitem(gym.registry, "PongNoFrameskip-v4")
    assert is_atari("PongNoFrameskip-v4")
    env = make_env("PongNoFrameskip-v4")
    assert env.unwrapped.spec.id == "ALE/Pong-v5"
    assert env.unwrapped.ale.getFloat("repeat_action_probability") == 0.0
    assert env.reset(seed=0)[0].shape == (4, 84, 84)


def test_atari_episode_statistic_is_raw_score_of_the_whole_game():
    # Space Invaders: 3 lives, rewards of 5..30 points per invader, so clipping would change the sum.
    env = make_env("ALE/SpaceInvaders-v5", seed=4, training=True)
    raw_rewards = record_raw_rewards(env)
    env.reset(seed=4)
    agent_steps, clipped_return, life_losses, score_before_first_life_loss = 0, 0.0, 0, None
    while True:
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        agent_steps += 1
        clipped_return += reward
        assert reward in (-1.0, 0.0, 1.0)
        if terminated or truncated:
            if "episode" in info:
                break
            life_losses += 1
            assert info["lives"] > 0
            if score_before_first_life_loss is None:
                score_before_first_life_loss = sum(raw_rewards)
            env.reset()
        assert agent_steps < 5000
    episode = info["episode"]
    assert set(episode) == {"r", "l"} and isinstance(episode["r"], float) and isinstance(episode["l"], int)
    assert life_losses == 2 and info["lives"] == 0
    assert episode["r"] == sum(raw_rewards)
    assert episode["r"] > clipped_return
    assert episode["r"] > score_before_first_life_loss  # the statistic does not stop at a life loss
    # Counts every agent step of every life (plus the few steps taken inside life-loss resets).
    assert agent_steps <= episode["l"] <= agent_steps + 3 * (life_losses + 1)


def test_episodic_life_in_training_only():
    train = make_env("ALE/Breakout-v5", seed=1, training=True)
    obs, info = train.reset(seed=1)
    assert info["lives"] == 5
    for _ in range(2000):
        obs, _, terminated, truncated, info = train.step(train.action_space.sample())
        if terminated:
            break
    assert terminated and not truncated
    assert info["lives"] == 4 and "episode" not in info  # life lost, game continues
    frame_before_reset = info["episode_frame_number"]
    obs, info = train.reset()
    assert info["lives"] == 4 and info["episode_frame_number"] > frame_before_reset  # same game, not restarted
    assert obs.shape == (4, 84, 84)
    life_loss_steps = [steps := 0]
    while True:  # play on to the game over: 4 more terminations, the statistic only on the last
        _, _, terminated, truncated, info = train.step(train.action_space.sample())
        steps += 1
        if terminated:
            life_loss_steps.append(steps)
            if "episode" in info:
                break
            train.reset()
        assert not truncated and steps < 5000
    assert len(life_loss_steps) == 5 and info["lives"] == 0
    assert info["episode"]["l"] > steps  # spans all five lives, not only the last

    evaluation = make_env("ALE/Breakout-v5", seed=1, training=False)
    evaluation.reset(seed=1)
    lives = 5
    life_losses = 0
    for _ in range(5000):
        _, reward, terminated, truncated, info = evaluation.step(evaluation.action_space.sample())
        if info["lives"] < lives:
            life_losses += 1
            lives = info["lives"]
            if lives > 0:
                assert not terminated and "episode" not in info
        if terminated or truncated:
            break
    assert terminated and life_losses == 5 and "episode" in info


def test_atari_max_episode_steps_truncates_in_agent_steps():
    env = make_env("PongNoFrameskip-v4", seed=0, max_episode_steps=50)
    env.reset(seed=0)
    agent_steps = 0
    while True:
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        agent_steps += 1
        if terminated or truncated:
            break
        assert "episode" not in info and agent_steps < 100
    assert truncated and not terminated
    # The limit counts the steps the episode statistic sees, including the two FIRE-reset steps.
    assert info["episode"]["l"] == 50 and agent_steps == 48


@pytest.mark.parametrize("frame_skip", [1, 2, 4])
def test_atari_videos_play_at_the_game_speed(tmp_path, frame_skip):
    import imageio.v2 as imageio

    env = make_env("ALE/Pong-v5", seed=0, training=False, max_episode_steps=5, frame_skip=frame_skip,
                   video_dir=tmp_path)
    env.reset(seed=0)
    while not any(env.step(0)[2:4]):
        pass
    env.close()
    with imageio.get_reader(tmp_path / "seed0-episode0.mp4") as reader:
        assert reader.get_meta_data()["fps"] == 60 / frame_skip  # the ALE's 60 frames per second


def test_a_video_of_an_env_without_rgb_array_frames_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    with pytest.raises(UsageError, match=r"ConstantReward-v0: it renders \[\], no 'rgb_array'.*drop --capture-video"):
        make_env("tests.memory_envs:ConstantReward-v0", video_dir=tmp_path / "videos")
    assert not (tmp_path / "videos").exists()
    with pytest.raises(UsageError, match="no 'rgb_array'"):  # at start-up, not after training
        parse_args(CommonArgs, ["--env-id", "tests.memory_envs:ConstantReward-v0", "--capture-video",
                                "--output-dir", str(tmp_path)])
    assert parse_args(CommonArgs, ["--env-id", "CartPole-v1", "--capture-video", "--output-dir", str(tmp_path)])


class InstanceRenderModesEnv(gym.Env):
    """Declares its render modes in __init__ (its class keeps gym.Env's empty list) and draws frames."""

    def __init__(self, render_mode=None):
        self.metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
        self.render_mode = render_mode
        self.observation_space, self.action_space = gym.spaces.Box(-1, 1, (1,)), gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action):
        return np.zeros(1, np.float32), 1.0, True, False, {}

    def render(self):
        return np.zeros((16, 16, 3), np.uint8)


def test_a_video_of_an_env_that_declares_its_render_modes_when_built_is_recorded(tmp_path):
    gym.register(id="InstanceRenderModes-v0", entry_point=InstanceRenderModesEnv, max_episode_steps=5)
    env = make_env("InstanceRenderModes-v0", 0, training=False, video_dir=tmp_path)
    env.reset(seed=0)
    env.step(0)
    env.close()
    assert (tmp_path / "seed0-episode0.mp4").stat().st_size > 0


@pytest.mark.parametrize("limit", range(24, 30))
def test_a_game_that_ends_inside_a_life_loss_reset_is_still_reported(limit):
    # Always NOOP in Breakout: the ball is lost after about 22 steps, and the reset that follows takes a NOOP
    # (EpisodicLife) and two FIRE-reset steps. Time limits of 24 to 29 steps end the first game before, on,
    # or inside that reset, or just after it. Every game, however it ends, is one episode of `limit` steps.
    from common.samplers import EnvGroup, Samples

    group = EnvGroup(partial(make_env, "ALE/Breakout-v5", sticky_actions=0.0, max_episode_steps=limit), [0])
    step = Samples(observation=np.empty_like(group.observation), next_observation=np.empty_like(group.observation),
                   action=None, reward=np.zeros(1, np.float32), terminated=np.zeros(1, bool),
                   truncated=np.zeros(1, bool), prev_action=np.empty_like(group.prev_action),
                   prev_reward=np.empty_like(group.prev_reward), agent_info=None)
    episodes = []
    for _ in range(3 * limit):
        episodes += group.step(np.array([0]), step)[0]
    group.close()
    assert len(episodes) >= 2 and all(episode.length == limit for episode in episodes), episodes


def test_atari_evaluation_rewards_are_unclipped():
    env = make_env("ALE/SpaceInvaders-v5", seed=0, training=False)
    env.reset(seed=0)
    rewards = set()
    for _ in range(300):
        _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        rewards.add(reward)
        assert not (terminated or truncated)
    assert max(rewards) > 1.0


# ------------------------------------------------------------------------------------------------
# Classic control, MuJoCo, custom ids
# ------------------------------------------------------------------------------------------------


def test_cartpole_episode_statistics():
    env = make_env("CartPole-v1", seed=0)
    assert not is_atari("CartPole-v1")
    assert require_discrete_actions(env, "algos/dqn.py") == 2
    assert observation_shape(env) == (4,)
    env.reset(seed=0)
    for _ in range(3):
        total, length = 0.0, 0
        while True:
            _, reward, terminated, truncated, info = env.step(env.action_space.sample())
            total += reward
            length += 1
            if terminated or truncated:
                break
            assert "episode" not in info
        assert info["episode"] == {"r": total, "l": length}
        env.reset()


def test_max_episode_steps_override_truncates_and_emits_statistic():
    env = make_env("Pendulum-v1", seed=0, max_episode_steps=25)
    env.reset(seed=0)
    total = 0.0
    for step in range(1, 26):
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        total += reward
        assert not terminated
        assert truncated == (step == 25)
        assert ("episode" in info) == (step == 25)
    assert info["episode"]["l"] == 25 and info["episode"]["r"] == pytest.approx(total)



def test_clip_actions_steps_as_the_action_at_its_bound():
    # CueRecall does not clip (its reward is minus the squared distance of the action to the cue): with
    # clip_actions an action of 5 earns what the bound 1 earns, without it less.
    rewards = {}
    for name, action in (("clipped", 5.0), ("plain", 5.0), ("bound", 1.0)):
        env = make_env("tests.memory_envs:CueRecall-v0", seed=0, clip_actions=(name == "clipped"))
        env.reset(seed=0)
        rewards[name] = env.step(np.array([action], np.float32))[1]
    assert rewards["clipped"] == rewards["bound"] > rewards["plain"]
    assert isinstance(make_env("CartPole-v1", clip_actions=True).action_space, gym.spaces.Discrete)


@pytest.mark.parametrize("env_id, action_shape", [("InvertedPendulum-v5", (1,)), ("Hopper-v5", (3,))])
def test_mujoco(env_id, action_shape):
    env = make_env(env_id, seed=0)
    assert require_continuous_actions(env, "algos/sac.py") == action_shape
    obs, _ = env.reset(seed=0)
    assert obs.shape == observation_shape(env)
    for _ in range(10):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        if terminated or truncated:
            assert "episode" in info
            obs, _ = env.reset()
    assert env.observation_space.contains(obs.astype(env.observation_space.dtype))


def test_custom_module_id_memory_env(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # repo root, as in `python -m pytest`
    env = make_env("tests.memory_envs:CartPoleNoVelocity-v0", seed=0)
    full = make_env("CartPole-v1", seed=0)
    assert observation_shape(env) == (2,) and env.spec.max_episode_steps == 500
    obs, _ = env.reset(seed=5)
    full_obs, _ = full.reset(seed=5)
    np.testing.assert_array_equal(obs, full_obs[[0, 2]])
    for _ in range(5):
        action = env.action_space.sample()
        obs, *_ = env.step(action)
        full_obs, *_ = full.step(action)
        np.testing.assert_array_equal(obs, full_obs[[0, 2]])


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env_id, hint",
    [
        ("NoSuchEnv-v0", "NoSuchEnv"),
        ("Cartpole-v1", "CartPole"),  # gymnasium's "did you mean" survives
        ("CartPole-v9", "v1"),
        ("ALE/Pongg-v5", "ALE/Pong-v5"),
        ("no_such_module_xyz:Foo-v0", "no_such_module_xyz"),
        ("tests.memory_envs:NotRegistered-v0", "NotRegistered"),
    ],
)
def test_unknown_ids_raise_usage_error(env_id, hint):
    with pytest.raises(UsageError) as raised:
        make_env(env_id)
    message = str(raised.value)
    assert repr(env_id) in message and hint in message and "\n" not in message


def test_action_space_checks():
    pendulum = make_env("Pendulum-v1")
    with pytest.raises(UsageError, match=r"algos/dqn\.py needs a discrete action space, but Pendulum-v1 has Box"):
        require_discrete_actions(pendulum, "algos/dqn.py")
    assert require_continuous_actions(pendulum, "algos/td3.py") == (1,)
    with pytest.raises(UsageError, match=r"continuous.*CartPole-v1 has Discrete\(2\)"):
        require_continuous_actions(make_env("CartPole-v1"), "algos/td3.py")

    class UnboundedActions(gym.Env):
        action_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)

    with pytest.raises(UsageError, match="finite action bounds, but UnboundedActions"):
        require_continuous_actions(UnboundedActions(), "algos/sac.py")


def test_bad_arguments():
    with pytest.raises(UsageError, match="frame_stack"):
        make_env("ALE/Pong-v5", frame_stack=0)
    with pytest.raises(UsageError, match="max_episode_steps"):
        make_env("CartPole-v1", max_episode_steps=0)
    assert make_env("ALE/Pong-v5", frame_stack=2).reset(seed=0)[0].shape == (2, 84, 84)


def wrapper_names(env) -> list[str]:
    names = []
    while isinstance(env, gym.Wrapper):
        names.append(type(env).__name__)
        env = env.env
    return names


def test_atari_options_change_the_preprocessing():
    default = make_env("ALE/Breakout-v5", seed=1, training=True)
    assert {"NoopReset", "MaxAndSkip", "EpisodicLife", "SignReward"} <= set(wrapper_names(default))
    assert default.action_space.n == 4
    plain = make_env("ALE/Breakout-v5", seed=1, training=True, frame_skip=1, noop_max=0, episodic_life=False,
                     clip_rewards=False, sticky_actions=0.0, full_action_space=True, frame_stack=2)
    assert not {"NoopReset", "MaxAndSkip", "EpisodicLife", "SignReward"} & set(wrapper_names(plain))
    assert plain.action_space.n == 18 and plain.unwrapped.ale.getFloat("repeat_action_probability") == 0.0
    obs, _ = plain.reset(seed=1)
    assert obs.shape == (2, 84, 84)
    frames = plain.unwrapped.ale.getEpisodeFrameNumber()
    plain.step(0)
    assert plain.unwrapped.ale.getEpisodeFrameNumber() - frames == 1  # one frame per agent step
    skip3 = make_env("ALE/Breakout-v5", seed=1, frame_skip=3, noop_max=0)
    skip3.reset(seed=1)
    frames = skip3.unwrapped.ale.getEpisodeFrameNumber()
    skip3.step(0)
    assert skip3.unwrapped.ale.getEpisodeFrameNumber() - frames == 3
    assert make_env("ALE/Pong-v5", sticky_actions=0.5).unwrapped.ale.getFloat("repeat_action_probability") == 0.5
    with pytest.raises(UsageError, match="frame_skip 0, sticky_actions 1.5"):
        make_env("ALE/Pong-v5", frame_skip=0, sticky_actions=1.5)


def test_atari_options_reach_a_run_and_its_evaluation(run_in):
    from common.evaluate import evaluate_run

    flags = ["--frame-stack", "2", "--frame-skip", "2", "--noop-max", "0", "--sticky-actions", "0",
             "--full-action-space", "--no-episodic-life", "--no-clip-rewards"]
    _, run_dir, summary = run_in("ppo_atari", "--env-id", "ALE/Pong-v5", "--n-envs", "2", "--num-steps", "16",
                                 "--total-timesteps", "32", "--max-episode-steps", "30", "--eval-episodes", "1",
                                 *flags)
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["frame_stack"], config["frame_skip"], config["noop_max"], config["sticky_actions"]) == (2, 2, 0, 0.0)
    assert config["full_action_space"] and not config["episodic_life"] and not config["clip_rewards"]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["model"]["actor.weight"].shape[0] == 18  # the full action set
    assert checkpoint["model"]["torso.net.0.weight"].shape[1] == 2  # two stacked frames
    episodes = evaluate_run(run_dir)
    assert [e.ret for e in episodes] == [summary["final_eval_return"]]


# ------------------------------------------------------------------------------------------------
# Dict / Tuple observations
# ------------------------------------------------------------------------------------------------

NESTED_SPACE = gym.spaces.Dict({
    "velocity": gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
    "image": gym.spaces.Box(0, 255, (1, 3, 3), np.uint8),
    "extra": gym.spaces.Tuple((gym.spaces.Discrete(4), gym.spaces.Dict({"flag": gym.spaces.MultiBinary(3)}))),
})


def test_observation_example_mirrors_dict_and_tuple_spaces():
    example = observation_example(NESTED_SPACE)
    assert example._fields == ("extra", "image", "velocity")  # gymnasium sorts a dict's keys
    assert example.extra._fields == ("f0", "f1") and example.extra.f1._fields == ("flag",)
    assert example.image.shape == (1, 3, 3) and example.image.dtype == np.uint8
    assert example.velocity.dtype == np.float32 and example.extra.f0.dtype == np.int64
    assert example.extra.f1.flag.shape == (3,) and example.extra.f1.flag.dtype == np.int8
    box = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    assert observation_example(box).shape == (3,)
    observed = observation_example(box, np.zeros(3, np.float64))  # what the env returns wins over its space
    assert observed.dtype == np.float64


def test_write_and_raw_observation_round_trip():
    NESTED_SPACE.seed(0)
    raw = [NESTED_SPACE.sample() for _ in range(3)]
    buffer = buffer_from_example(observation_example(NESTED_SPACE), 3)
    for b, observation in enumerate(raw):
        write_observation(buffer, b, observation)
    for b, observation in enumerate(raw):
        back = raw_observation(NESTED_SPACE, buffer[b])
        assert NESTED_SPACE.contains(back)
        assert isinstance(back, dict) and isinstance(back["extra"], tuple)
        np.testing.assert_array_equal(back["velocity"], observation["velocity"])
        np.testing.assert_array_equal(back["image"], observation["image"])
        assert back["extra"][0] == observation["extra"][0]
        np.testing.assert_array_equal(back["extra"][1]["flag"], observation["extra"][1]["flag"])
    plain = np.zeros((2, 3), np.float32)
    write_observation(plain, 1, np.ones(3, np.float32))
    row = plain[1]
    assert plain.sum() == 3 and raw_observation(gym.spaces.Box(0, 1, (3,)), row) is row


@pytest.mark.parametrize("space,message", [
    (gym.spaces.Dict({"bad-key": gym.spaces.Discrete(2)}), r"key 'bad-key'.*rename the key"),
    (gym.spaces.Dict({"_private": gym.spaces.Discrete(2)}), r"key '_private'"),
    (gym.spaces.Dict({"ok": gym.spaces.Dict({"class": gym.spaces.Discrete(2)})}), r"observation\['ok'\].*'class'"),
    (gym.spaces.Text(5), r"Text.*no fixed array shape.*wrap the env"),
    (gym.spaces.Tuple((gym.spaces.Discrete(2), gym.spaces.Sequence(gym.spaces.Discrete(2)))),
     r"observation\[1\].*Sequence"),
    (gym.spaces.Graph(gym.spaces.Box(0, 1, (2,)), None), r"Graph"),
])
def test_observation_spaces_nothing_can_store_are_usage_errors(space, message):
    with pytest.raises(UsageError, match=message) as raised:
        observation_example(space)
    assert "\n" not in str(raised.value)


def test_observation_shape_refuses_dict_spaces_for_array_scripts():
    env = make_env("tests.memory_envs:DictCartPole-v0")
    with pytest.raises(UsageError, match="needs array observations: flatten it"):
        observation_shape(env)
