"""Test-only environments, registered with gymnasium on import.

`CartPoleNoVelocity-v0`: CartPole-v1 (500-step limit) that observes only cart position and pole angle;
the velocities must be inferred from history, so a feed-forward policy on one observation cannot
balance the pole well while a recurrent one can. Use it as
`make_env("tests.memory_envs:CartPoleNoVelocity-v0")` from the repository root.

`ConstantReward-v0`: reward 1 every step, the same observation always, never terminated; the 10-step
time limit truncates every episode, so a correct value estimate bootstraps at the cut.

`CueRecall-v0`: continuous actions in [-1, 1]; the first observation shows a cue c drawn uniformly from
[-1, 1], the later ones do not, and each of the 9 steps pays -(action - c)^2. A policy that remembers c scores
near 0; the best one that cannot (c on the first step, then 0) loses about 1/3 a step, -8/3 an episode.

`DictCartPole-v0`: CartPole-v1 with a 25-step time limit (so episodes are also truncated) observing a
nested Dict: `pixels` (uint8 [1, 8, 8], the cart and pole drawn as one lit pixel per row),
`state` (Dict of `position` [x, theta] and `velocity` [x_dot, theta_dot]) and `steps` (a Tuple of one
Discrete: the steps since the reset).

`DictStateCartPole-v0`: CartPole-v1 (500-step limit, same reward) observing its state as a Dict of `cart`
[x, x_dot] and `pole` [theta, theta_dot]. The leaves, flattened and concatenated in key order, are CartPole's
observation, so a seeded run on it must compute exactly the CartPole-v1 run.

`DictPendulum-v0`: Pendulum-v1 (continuous actions, 200-step limit) observing a Dict of `cos_sin`
[cos theta, sin theta] and `velocity` [theta_dot].

`InfoReport-v0`: 5-step episodes whose info reports `bonus` 1.0 every step, `is_success` 1.0 on the last
step only and a string `label` every step (for `--info-keys`).
"""

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv
from gymnasium.envs.classic_control.pendulum import PendulumEnv

VISIBLE = [0, 2]  # cart position, pole angle (CartPole observes [x, x_dot, theta, theta_dot])


class CartPoleNoVelocityEnv(CartPoleEnv):
    """CartPole with the cart and pole velocities hidden: observation [x, theta], shape (2,)."""

    def __init__(self, render_mode: str | None = None):
        super().__init__(render_mode=render_mode)
        high = self.observation_space.high[VISIBLE]
        self.observation_space = gym.spaces.Box(-high, high, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = super().reset(seed=seed, options=options)
        return obs[VISIBLE], info

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs[VISIBLE], reward, terminated, truncated, info


if "CartPoleNoVelocity-v0" not in gym.registry:
    gym.register(
        id="CartPoleNoVelocity-v0",
        entry_point=CartPoleNoVelocityEnv,
        max_episode_steps=500,
        reward_threshold=475.0,
    )


class ConstantRewardEnv(gym.Env):
    """Reward 1 every step, the same observation always, never terminated (the time limit truncates)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action):
        return np.zeros(1, np.float32), 1.0, False, False, {}


if "ConstantReward-v0" not in gym.registry:
    gym.register(id="ConstantReward-v0", entry_point=ConstantRewardEnv, max_episode_steps=10)


class GreedyNeverEndsEnv(gym.Env):
    """Reward 1 a step; action 0 goes on forever (until the time limit), any other action ends the episode."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(4)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action):
        return np.zeros(1, np.float32), 1.0, int(action) != 0, False, {}


if "GreedyNeverEnds-v0" not in gym.registry:
    gym.register(id="GreedyNeverEnds-v0", entry_point=GreedyNeverEndsEnv, max_episode_steps=1000)


class MatrixObservationEnv(gym.Env):
    """A [3, 4] observation: neither a vector nor a frame stack."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (3, 4), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros((3, 4), np.float32), {}

    def step(self, action):
        return np.zeros((3, 4), np.float32), 0.0, True, False, {}


if "MatrixObservation-v0" not in gym.registry:
    gym.register(id="MatrixObservation-v0", entry_point=MatrixObservationEnv, max_episode_steps=10)


class InfoReportEnv(gym.Env):
    """Episodes of LENGTH steps; info: bonus 1.0 every step, is_success 1.0 on the last step, a string label."""

    LENGTH = 5
    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.t == self.LENGTH
        info = {"bonus": 1.0, "label": "text", **({"is_success": 1.0} if terminated else {})}
        return np.full(1, self.t / self.LENGTH, np.float32), 1.0, terminated, False, info


if "InfoReport-v0" not in gym.registry:
    gym.register(id="InfoReport-v0", entry_point=InfoReportEnv)


class CueRecallEnv(gym.Env):
    """Observation [cue, first-step flag]; the cue shows only at the reset. Episodes of LENGTH rewarded steps."""

    LENGTH = 9
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.cue, self.t = 0.0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.cue, self.t = float(self.np_random.uniform(-1.0, 1.0)), 0
        return np.array([self.cue, 1.0], np.float32), {}

    def step(self, action):
        self.t += 1
        reward = -float((np.asarray(action, np.float64).reshape(-1)[0] - self.cue) ** 2)
        return np.zeros(2, np.float32), reward, self.t == self.LENGTH, False, {}


if "CueRecall-v0" not in gym.registry:
    gym.register(id="CueRecall-v0", entry_point=CueRecallEnv)


class DictCartPoleEnv(CartPoleEnv):
    """CartPole observing Dict(pixels=uint8 [1, 8, 8], state=Dict(position, velocity), steps=Tuple(Discrete))."""

    def __init__(self, render_mode: str | None = None):
        super().__init__(render_mode=render_mode)
        high = self.observation_space.high
        self.observation_space = gym.spaces.Dict(
            pixels=gym.spaces.Box(0, 255, (1, 8, 8), np.uint8),
            state=gym.spaces.Dict(position=gym.spaces.Box(-high[[0, 2]], high[[0, 2]], dtype=np.float32),
                                  velocity=gym.spaces.Box(-high[[1, 3]], high[[1, 3]], dtype=np.float32)),
            steps=gym.spaces.Tuple((gym.spaces.Discrete(1000),)),
        )
        self.steps = 0

    def _observe(self, obs: np.ndarray) -> dict:
        pixels = np.zeros((1, 8, 8), np.uint8)
        limits = (self.x_threshold, self.theta_threshold_radians)
        for row, (value, limit) in enumerate(zip(obs[[0, 2]], limits)):
            pixels[0, row, int(np.clip((value / limit + 1) * 4, 0, 7))] = 255
        return {"pixels": pixels, "state": {"position": obs[[0, 2]], "velocity": obs[[1, 3]]},
                "steps": (np.int64(self.steps),)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = super().reset(seed=seed, options=options)
        self.steps = 0
        return self._observe(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        self.steps += 1
        return self._observe(obs), reward, terminated, truncated, info


if "DictCartPole-v0" not in gym.registry:
    gym.register(id="DictCartPole-v0", entry_point=DictCartPoleEnv, max_episode_steps=25)


class DictStateCartPoleEnv(CartPoleEnv):
    """CartPole observing Dict(cart=[x, x_dot], pole=[theta, theta_dot])."""

    def __init__(self, render_mode: str | None = None):
        super().__init__(render_mode=render_mode)
        high = self.observation_space.high
        self.observation_space = gym.spaces.Dict(
            cart=gym.spaces.Box(-high[:2], high[:2], dtype=np.float32),
            pole=gym.spaces.Box(-high[2:], high[2:], dtype=np.float32),
        )

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = super().reset(seed=seed, options=options)
        return {"cart": obs[:2], "pole": obs[2:]}, info

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return {"cart": obs[:2], "pole": obs[2:]}, reward, terminated, truncated, info


if "DictStateCartPole-v0" not in gym.registry:
    gym.register(id="DictStateCartPole-v0", entry_point=DictStateCartPoleEnv, max_episode_steps=500,
                 reward_threshold=475.0)


class DictPendulumEnv(PendulumEnv):
    """Pendulum observing Dict(cos_sin=[cos theta, sin theta], velocity=[theta_dot])."""

    def __init__(self, render_mode: str | None = None):
        super().__init__(render_mode=render_mode)
        self.observation_space = gym.spaces.Dict(
            cos_sin=gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
            velocity=gym.spaces.Box(-self.max_speed, self.max_speed, (1,), np.float32),
        )

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = super().reset(seed=seed, options=options)
        return {"cos_sin": obs[:2], "velocity": obs[2:]}, info

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return {"cos_sin": obs[:2], "velocity": obs[2:]}, reward, terminated, truncated, info


if "DictPendulum-v0" not in gym.registry:
    gym.register(id="DictPendulum-v0", entry_point=DictPendulumEnv, max_episode_steps=200)
