"""Tests of common/normalization.py's per-leaf observation normalisation."""

import io

import numpy as np
import torch

from common.namedarraytuple import runtime_namedarraytuple
from common.normalization import ObservationNormalizer, RewardScaler, RunningMeanStd

# What common.envs.observation_example makes of Dict(pixels=uint8 [1, 2, 2], state=Dict(position=[2], speed=[])).
Observation = runtime_namedarraytuple("Observation", ["pixels", "state"])
State = runtime_namedarraytuple("Observation", ["position", "speed"])


def dict_stream(n: int, seed: int) -> Observation:
    generator = torch.Generator().manual_seed(seed)
    return Observation(
        pixels=torch.randint(0, 256, (n, 4, 1, 2, 2), generator=generator, dtype=torch.uint8),
        state=State(position=torch.randn(n, 4, 2, generator=generator) * torch.tensor([2.0, 0.5]) + 1.0,
                    speed=torch.randn(n, 4, generator=generator, dtype=torch.float64) * 7.0 - 3.0),
    )


def test_every_float_leaf_has_its_own_statistics_and_uint8_leaves_pass_through():
    stream = dict_stream(300, seed=0)
    normalizer = ObservationNormalizer(stream[0, 0], clip=5.0)
    assert set(normalizer.stats) == {"observation/state/position", "observation/state/speed"}
    for t in range(0, 300, 70):
        normalizer.update(stream[t:t + 70])
    position = normalizer.stats["observation/state/position"]
    speed = normalizer.stats["observation/state/speed"]
    flat_position = stream.state.position.reshape(-1, 2).double()
    assert torch.allclose(position.mean, flat_position.mean(0), atol=1e-6)
    assert torch.allclose(position.var, flat_position.var(0, correction=0), rtol=1e-4)
    assert torch.allclose(speed.mean, stream.state.speed.mean(), atol=1e-6) and speed.mean.shape == ()

    normalised = normalizer(stream)
    assert type(normalised) is Observation and type(normalised.state) is State
    assert normalised.pixels is stream.pixels  # images are left to the torso
    assert torch.equal(normalised.state.position, position(stream.state.position))
    assert torch.equal(normalised.state.speed, speed(stream.state.speed))
    assert normalised.state.speed.dtype == torch.float32
    assert abs(normalised.state.speed.mean().item()) < 1e-3 and abs(normalised.state.speed.std().item() - 1) < 1e-2


def test_state_dict_round_trips_per_leaf_statistics():
    stream = dict_stream(50, seed=1)
    normalizer = ObservationNormalizer(stream[0, 0])
    normalizer.update(stream)
    assert set(normalizer.state_dict()) == {f"stats.observation/state/{leaf}.{buffer}"
                                            for leaf in ("position", "speed") for buffer in ("mean", "var", "count")}
    saved = io.BytesIO()
    torch.save(normalizer.state_dict(), saved)
    saved.seek(0)
    restored = ObservationNormalizer(dict_stream(1, seed=2)[0, 0])
    restored.load_state_dict(torch.load(saved, weights_only=True))
    expected, got = normalizer(stream), restored(stream)
    assert torch.equal(expected.state.position, got.state.position)
    assert torch.equal(expected.state.speed, got.state.speed)


def test_an_array_observation_is_one_leaf_like_running_mean_std():
    stream = torch.randn(100, 3, dtype=torch.float64) * 4.0
    normalizer, reference = ObservationNormalizer(np.zeros(3, np.float32)), RunningMeanStd((3,))
    normalizer.update(stream)
    reference.update(stream)
    assert list(normalizer.stats) == ["observation"]
    assert torch.equal(normalizer(stream), reference(stream))
    frames = torch.zeros(2, 4, 84, 84, dtype=torch.uint8)
    image_normalizer = ObservationNormalizer(frames[0])
    image_normalizer.update(frames)
    assert len(image_normalizer.stats) == 0 and image_normalizer(frames) is frames


def test_a_reward_scaler_checkpoint_keeps_the_statistics_and_not_the_running_returns():
    # A resumed run's environments start new episodes: their discounted returns start again from zero.
    scaler = RewardScaler(3, 0.99)
    scaler(torch.rand(5, 3) + 0.5, torch.zeros(5, 3, dtype=torch.bool))
    restored = RewardScaler(3, 0.99)
    restored.load_state_dict(scaler.state_dict())
    assert restored.return_stats.count == scaler.return_stats.count
    assert torch.equal(restored.return_stats.var, scaler.return_stats.var)
    assert (scaler.running_return > 0).all() and (restored.running_return == 0).all()
    restored.load_state_dict({**scaler.state_dict(), "running_return": scaler.running_return})  # as some kept it
    assert (restored.running_return == 0).all()
