"""Envs (classic control, MuJoCo, Atari) behind one `make_env`, space checks, and storage of Dict / Tuple observations.

Every env from `make_env` is a single (non-vectorized) gymnasium env that puts `info["episode"] = {"r": raw
return, "l": length}` on the step where an episode really ends (terminated or truncated), and only then; for Atari
it sees the raw game score and the true game over. Atari stack, innermost first (DeepMind preprocessing):
    ALE (frameskip=1, grayscale) -> no-op reset -> max-and-skip 4 -> [time limit] -> episode statistics
    -> episodic life (training) -> fire reset -> 84x84 -> sign reward clip (training) -> frame stack
"""

from __future__ import annotations

import importlib
import inspect
import keyword
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ale_py
import gymnasium as gym
import numpy as np
from gymnasium import error as gym_error
from gymnasium.envs.registration import EnvSpec, load_env_creator
from gymnasium.wrappers import TimeLimit

from common.namedarraytuple import runtime_namedarraytuple

gym.register_envs(ale_py)

_NOOP, _FIRE, _FIRE_RESET_SECOND_ACTION = 0, 1, 2
_ALE_FRAMES_PER_S = 60  # the emulator's rate (its metadata says 30); a video shows every frame_skip-th frame
_NO_FRAMESKIP_V4 = re.compile(r"^(?P<game>[A-Za-z0-9]+)NoFrameskip-v4$")
ARRAY_SPACES = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)


class UsageError(Exception):
    """Bad user input (env id, flags); scripts print its one-line message and exit without a traceback."""


class EpisodeStatistics(gym.Wrapper):
    """Adds `info["episode"] = {"r": float return, "l": int steps}` on the step an episode ends."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.episode_return, self.episode_length = 0.0, 0

    def reset(self, **kwargs):
        self.episode_return, self.episode_length = 0.0, 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.episode_return += float(reward)
        self.episode_length += 1
        if terminated or truncated:
            info = {**info, "episode": {"r": self.episode_return, "l": self.episode_length}}
        return obs, reward, terminated, truncated, info


class NoopReset(gym.Wrapper):
    """On reset, take a random number (1..noop_max) of no-op actions so starts differ."""

    def __init__(self, env: gym.Env, noop_max: int = 30):
        super().__init__(env)
        self.noop_max = noop_max

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        for _ in range(int(self.np_random.integers(1, self.noop_max + 1))):
            obs, _, terminated, truncated, info = self.env.step(_NOOP)
            if terminated or truncated:
                obs, info = self.env.reset()
        return obs, info


class MaxAndSkip(gym.Wrapper):
    """Repeat the action `skip` frames; sum rewards; observe the pixel-wise max of the last two frames."""

    def __init__(self, env: gym.Env, skip: int = 4):
        super().__init__(env)
        self.skip = skip
        self.frames = np.zeros((2, *env.observation_space.shape), dtype=env.observation_space.dtype)

    def step(self, action):
        total_reward = 0.0
        for i in range(self.skip):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total_reward += float(reward)
            if i >= self.skip - 2:
                self.frames[i - (self.skip - 2)] = obs
            if terminated or truncated:  # ended early: the last frame counts (the buffer may hold a stale one)
                return obs, total_reward, terminated, truncated, info
        return self.frames.max(axis=0), total_reward, terminated, truncated, info


class EpisodicLife(gym.Wrapper):
    """Training only: a life loss ends the episode for the agent; reset() then continues the same game."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.ale = env.unwrapped.ale
        self.lives, self.game_over = 0, True

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        lives = self.ale.lives()
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs):
        if self.game_over:
            obs, info = self.env.reset(**kwargs)
        else:
            obs, _, terminated, truncated, info = self.env.step(_NOOP)
            if terminated or truncated:  # the game ended on this step: its statistics go out with the reset
                episode = info.get("episode")
                obs, info = self.env.reset(**kwargs)
                info = info if episode is None else {**info, "episode": episode}
        self.game_over, self.lives = False, self.ale.lives()
        return obs, info


class FireReset(gym.Wrapper):
    """Press FIRE after reset, for games that wait for it before play starts. A game that ends inside the reset
    (its time limit reached on these steps or on EpisodicLife's) reports its `info["episode"]` in reset's info."""

    def reset(self, **kwargs):
        _, info = self.env.reset(**kwargs)
        episode = info.get("episode")
        for action in (_FIRE, _FIRE_RESET_SECOND_ACTION):
            obs, _, terminated, truncated, info = self.env.step(action)
            if terminated or truncated:
                episode = info.get("episode", episode)
                obs, info = self.env.reset()
                episode = info.get("episode", episode)
        return obs, info if episode is None else {**info, "episode": episode}


class WarpFrame(gym.ObservationWrapper):
    """Resize a grayscale frame to `size`x`size` (uint8)."""

    def __init__(self, env: gym.Env, size: int = 84):
        import cv2  # here, not at the top: only Atari runs pay its import (0.1 s of CPU)
        super().__init__(env)
        self.size, self.resize, self.interpolation = size, cv2.resize, cv2.INTER_AREA
        self.observation_space = gym.spaces.Box(0, 255, (size, size), np.uint8)

    def observation(self, observation):
        return self.resize(observation, (self.size, self.size), interpolation=self.interpolation)


class SignReward(gym.RewardWrapper):
    """Clip rewards to {-1, 0, +1} by their sign."""

    def reward(self, reward):
        return float(np.sign(reward))


class FrameStack(gym.Wrapper):
    """Stack the last `k` observations along a new leading axis: [k, *obs_shape]; oldest first."""

    def __init__(self, env: gym.Env, k: int):
        super().__init__(env)
        space = env.observation_space
        self.frames = np.zeros((k, *space.shape), dtype=space.dtype)
        self.observation_space = gym.spaces.Box(np.repeat(space.low[None], k, axis=0),
                                                np.repeat(space.high[None], k, axis=0), dtype=space.dtype)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.frames[:] = obs
        return self.frames.copy(), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.frames[:-1] = self.frames[1:]
        self.frames[-1] = obs
        return self.frames.copy(), reward, terminated, truncated, info


class RecordEpisodes(gym.Wrapper):
    """Write each of the first `max_episodes` episodes to `<video_dir>/<name>-episode<k>.mp4` (H.264), rendering
    (render_mode="rgb_array") after reset and every step. An episode cut short by reset() or close() is not kept."""

    def __init__(self, env: gym.Env, video_dir: str | Path, name: str, max_episodes: int = 1, fps: float = 30):
        super().__init__(env)
        self.video_dir, self.name, self.max_episodes, self.fps = Path(video_dir), name, max_episodes, fps
        self.episode, self.writer, self.path = 0, None, None

    def reset(self, **kwargs):
        self._discard()
        obs, info = self.env.reset(**kwargs)
        if self.episode < self.max_episodes:
            import imageio.v2 as imageio
            self.video_dir.mkdir(parents=True, exist_ok=True)
            self.path = self.video_dir / f"{self.name}-episode{self.episode}.mp4"
            self.writer = imageio.get_writer(self.path, fps=self.fps, codec="libx264", macro_block_size=2)
            self.writer.append_data(self.env.render())
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.writer is not None:
            self.writer.append_data(self.env.render())
            if terminated or truncated:
                self.writer.close()
                self.writer = None
                self.episode += 1
        return obs, reward, terminated, truncated, info

    def close(self):
        self._discard()
        super().close()

    def _discard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.path.unlink(missing_ok=True)
            self.writer = None


class VideoEnvFn:
    """An env_fn whose j-th env (in each process) records its first episodes[j] episodes; see `record_video`."""

    def __init__(self, env_fn: Callable[..., gym.Env], video_dir: str | Path, episodes: Sequence[int]):
        try:
            inspect.signature(env_fn).bind(0, video_dir=video_dir, video_episodes=1)
        except TypeError:
            raise UsageError("cannot record a video: the env_fn takes no video_dir / video_episodes keywords; "
                             "build the env with common.envs.make_env and pass them on to it") from None
        self.env_fn, self.video_dir, self.episodes, self.built = env_fn, Path(video_dir), list(episodes), 0

    def __call__(self, seed: int) -> gym.Env:
        self.built += 1
        if self.built > len(self.episodes) or self.episodes[self.built - 1] < 1:
            return self.env_fn(seed)
        return self.env_fn(seed, video_dir=self.video_dir, video_episodes=self.episodes[self.built - 1])


def record_video(env_fn: Callable[[int], gym.Env], video_dir: str | Path | None,
                 episodes: int | Sequence[int] = 1) -> Callable[[int], gym.Env]:
    """`env_fn`, with its first env recording its first `episodes` episodes to mp4 files in `video_dir` (None:
    `env_fn` unchanged). A sequence gives a count to each env in build order (under `evaluate`, evaluation env 0,
    1, ...). `env_fn(seed, video_dir=..., video_episodes=...)` must pass both keywords on to `make_env`."""
    if video_dir is None:
        return env_fn
    return VideoEnvFn(env_fn, video_dir, [episodes] if isinstance(episodes, int) else episodes)


def _is_atari_spec(spec: EnvSpec) -> bool:
    return spec.entry_point is ale_py.env.AtariEnv or spec.entry_point == "ale_py.env:AtariEnv"


def _import_from_cwd(module: str) -> None:
    """Import `module`, also from the current directory (`python algos/x.py` puts only algos/ on sys.path)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        if os.getcwd() in sys.path:
            raise
        sys.path.append(os.getcwd())  # after the installed packages, so the cwd shadows none of them
        importlib.invalidate_caches()
        importlib.import_module(module)


def _resolve(env_id: str) -> tuple[EnvSpec, dict]:
    """The registered spec for `env_id` and the kwargs needed on top of it; UsageError if unknown."""
    name = env_id
    if ":" in env_id:
        module, name = env_id.split(":", 1)
        try:
            _import_from_cwd(module)
        except ModuleNotFoundError as e:
            raise UsageError(f"environment id {env_id!r}: cannot import module {module!r} ({e}) from the installed "
                             f"packages or the current directory {os.getcwd()}: run from the directory that contains "
                             f"it (or install it), and check that it registers {name!r}") from None
    match = _NO_FRAMESKIP_V4.match(name)
    if match and name not in gym.registry and f"ALE/{match['game']}-v5" in gym.registry:
        # What NoFrameskip-v4 meant, for ale-py versions that no longer register it.
        return gym.spec(f"ALE/{match['game']}-v5"), {"repeat_action_probability": 0.0, "full_action_space": False}
    try:
        return gym.spec(name), {}
    except gym_error.Error as e:
        reason = " ".join(str(e).split())
        raise UsageError(f"unknown environment id {env_id!r} ({reason}): check the spelling (gymnasium ids look "
                         "like 'CartPole-v1', Atari ids like 'ALE/Pong-v5'), or pass a custom env as "
                         "'module:EnvId-v0'") from None


def is_atari(env_id: str) -> bool:
    """Whether `env_id` names an ALE game (either id style). Raises UsageError for unknown ids."""
    return _is_atari_spec(_resolve(env_id)[0])


def require_rgb_array(env_id: str) -> None:
    """UsageError unless the env of `env_id` renders rgb_array frames, by its class's render modes (if it declares
    none, by an instance's)."""
    spec, kwargs = _resolve(env_id)
    creator = spec.entry_point if callable(spec.entry_point) else load_env_creator(spec.entry_point)
    metadata = getattr(creator, "metadata", None)  # what gym.make reads; a property (of a wrapper class) says nothing
    modes = metadata.get("render_modes") if isinstance(metadata, Mapping) else None
    if not modes:  # an env may set its metadata in __init__
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                env = gym.make(spec, render_mode="rgb_array", **kwargs)
            modes = env.unwrapped.metadata.get("render_modes") or []
            env.close()
        except AssertionError:  # gymnasium's check of an env without render modes
            modes = []
    if "rgb_array" not in modes:
        raise UsageError(f"cannot record a video of {env_id}: it renders {list(modes)}, no 'rgb_array' frames; "
                         "drop --capture-video, or give the env an 'rgb_array' render mode")


def make_env(env_id: str, seed: int = 0, *, training: bool = True, frame_stack: int = 4,
             max_episode_steps: int | None = None, render_mode: str | None = None, video_dir: str | Path | None = None,
             video_episodes: int = 1, frame_skip: int = 4, noop_max: int = 30, episodic_life: bool = True,
             clip_rewards: bool = True, sticky_actions: float | None = None, full_action_space: bool = False,
             clip_actions: bool = False) -> gym.Env:
    """Build one env by gymnasium id (`module:EnvId-v0` for custom envs), with episode statistics; it is not reset
    and `seed` seeds only its action space.

    Atari ids (`ALE/<Game>-v5`, `<Game>NoFrameskip-v4`) get DeepMind preprocessing (uint8 observations [frame_stack,
    84, 84]); the options named like the fields of `common.config.AtariArgs` mean what those say (`max_episode_steps`
    also overrides other envs' time limit), and `training` enables episodic life and reward clipping (each unless
    turned off). `video_dir` records the first `video_episodes` episodes to `<video_dir>/seed<seed>-episode<k>.mp4`;
    `clip_actions` clips Box actions to their bounds."""
    if video_dir is not None:
        require_rgb_array(env_id)
        render_mode = "rgb_array"
        if not os.environ.get("DISPLAY"):  # headless: MuJoCo renders through EGL, pygame through SDL's dummy driver
            os.environ.setdefault("MUJOCO_GL", "egl")
            os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    bad = [f"{name} {value}" for name, value, ok in (
        ("frame_stack", frame_stack, frame_stack >= 1), ("frame_skip", frame_skip, frame_skip >= 1),
        ("noop_max", noop_max, noop_max >= 0), ("sticky_actions", sticky_actions, 0 <= (sticky_actions or 0) <= 1),
    ) if not ok]
    if bad:
        raise UsageError(f"out of range: {', '.join(bad)} (frame_stack and frame_skip must be >= 1, noop_max >= 0, "
                         "sticky_actions in [0, 1])")
    if max_episode_steps is not None and max_episode_steps < 1:
        raise UsageError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
    spec, kwargs = _resolve(env_id)
    try:
        if _is_atari_spec(spec):
            if sticky_actions is not None:
                kwargs["repeat_action_probability"] = sticky_actions
            if full_action_space:
                kwargs["full_action_space"] = True
            env = gym.make(spec, frameskip=1, obs_type="grayscale", render_mode=render_mode, **kwargs)
            if noop_max > 0:
                env = NoopReset(env, noop_max=noop_max)
            if frame_skip > 1:
                env = MaxAndSkip(env, skip=frame_skip)
            if max_episode_steps is not None:
                env = TimeLimit(env, max_episode_steps)
            env = EpisodeStatistics(env)
            if training and episodic_life:
                env = EpisodicLife(env)
            meanings = env.unwrapped.get_action_meanings()
            if len(meanings) >= 3 and meanings[_FIRE] == "FIRE":
                env = FireReset(env)
            env = WarpFrame(env, size=84)
            if training and clip_rewards:
                env = SignReward(env)
            env = FrameStack(env, frame_stack)
        else:
            env = gym.make(spec, max_episode_steps=max_episode_steps, render_mode=render_mode, **kwargs)
            env = EpisodeStatistics(env)
    except gym_error.DependencyNotInstalled as e:
        reason = " ".join(str(e).split())
        raise UsageError(f"environment {env_id!r} needs a package that is not installed: {reason}") from None
    if video_dir is not None:
        fps = _ALE_FRAMES_PER_S / frame_skip if _is_atari_spec(spec) else env.metadata.get("render_fps") or 30
        env = RecordEpisodes(env, video_dir, f"seed{seed}", video_episodes, fps)
    env.action_space.seed(seed)
    if clip_actions and isinstance(env.action_space, gym.spaces.Box):
        env = gym.wrappers.ClipAction(env)
    return env


def _env_name(env: gym.Env) -> str:
    spec = env.unwrapped.spec
    return spec.id if spec is not None else type(env.unwrapped).__name__


def require_discrete_actions(env: gym.Env, script: str) -> int:
    """The number of actions of a Discrete action space; UsageError naming the fix otherwise."""
    space = env.action_space
    if not isinstance(space, gym.spaces.Discrete):
        raise UsageError(f"{script} needs a discrete action space, but {_env_name(env)} has {space}: "
                         "use a continuous-action script (ppo.py, sac.py, td3.py, ddpg.py)")
    return int(space.n)


def require_continuous_actions(env: gym.Env, script: str) -> tuple[int, ...]:
    """The action shape of a bounded, finite Box action space; UsageError naming the fix otherwise."""
    space = env.action_space
    if not isinstance(space, gym.spaces.Box):
        raise UsageError(f"{script} needs a continuous (Box) action space, but {_env_name(env)} has {space}: "
                         "use a discrete-action script (ppo.py, a2c.py, dqn.py, c51.py)")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise UsageError(f"{script} needs finite action bounds, but {_env_name(env)} has {space}: "
                         "wrap the env to give its action space finite low and high bounds")
    return tuple(space.shape)


def observation_shape(env: gym.Env) -> tuple[int, ...]:
    """The shape of one array observation (Atari: (frame_stack, 84, 84)); UsageError for Dict / Tuple spaces."""
    space = env.observation_space
    observation_example(space)  # UsageError for spaces that nothing can store
    if space.shape is None:
        raise UsageError(f"{_env_name(env)} has observation space {space}, but this script needs array observations: "
                         "flatten it with gymnasium.wrappers.FlattenObservation in a custom env")
    return tuple(space.shape)


def observation_example(space: gym.Space, observation: Any = None, where: str = "observation") -> Any:
    """One zero-filled observation as samplers and replay buffers store it (no leading dims): an array for
    ARRAY_SPACES, a namedarraytuple for a Dict space (fields: its keys, in order) or a Tuple space (fields f0, f1,
    ...), nested like the space; leaves take shape and dtype from a raw `observation` of the env if given, else from
    the space. UsageError (naming the space `where`) for spaces without a fixed array shape and for Dict keys that
    cannot be field names."""
    if isinstance(space, gym.spaces.Dict | gym.spaces.Tuple):
        if isinstance(space, gym.spaces.Dict):
            keys = names = list(space.spaces)
            for name in names:
                _check_field_name(name, where)
        else:
            keys, names = range(len(space.spaces)), [f"f{i}" for i in range(len(space.spaces))]
        fields = [observation_example(space[key], None if observation is None else observation[key],
                                      f"{where}[{key!r}]") for key in keys]
        return runtime_namedarraytuple("Observation", names)(*fields)
    if not isinstance(space, ARRAY_SPACES):
        raise UsageError(f"{where} has space {space}, which has no fixed array shape: rlsolo stores Box, Discrete, "
                         "MultiDiscrete and MultiBinary observations and Dict / Tuple spaces of them; wrap the env to "
                         "observe one of those")
    if observation is not None:
        return np.zeros_like(np.asarray(observation))
    return np.zeros(space.shape, space.dtype)


def _check_field_name(name: Any, where: str) -> None:
    if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("_")):
        raise UsageError(f"the Dict space at {where} has key {name!r}, which cannot name a namedarraytuple field "
                         "(a Python identifier, not a keyword, not starting with '_'): rename the key in the env or "
                         "a wrapper")


def write_observation(destination: Any, index: Any, observation: Any) -> None:
    """`destination[index] = observation` for a raw env observation (a dict / tuple for Dict / Tuple spaces), which
    goes leaf by leaf into the namedarraytuple `destination` (see `observation_example`), building none per step."""
    if not isinstance(destination, tuple):
        destination[index] = observation
        return
    if isinstance(observation, Mapping):
        observation = [observation[name] for name in destination._fields]
    for leaf, value in zip(destination, observation, strict=True):
        write_observation(leaf, index, value)


def raw_observation(space: gym.Space, observation: Any) -> Any:
    """A stored observation in the env's own form: dicts for Dict spaces and tuples for Tuple spaces (nested)."""
    if isinstance(space, gym.spaces.Dict):
        return {name: raw_observation(subspace, getattr(observation, name)) for name, subspace in space.spaces.items()}
    if isinstance(space, gym.spaces.Tuple):
        return tuple(raw_observation(subspace, field) for subspace, field in zip(space.spaces, observation))
    return observation
