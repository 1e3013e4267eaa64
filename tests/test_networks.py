"""Tests of common/networks.py's observation encoder on array and Dict observations."""

import numpy as np
import torch

from common.namedarraytuple import buffer_map, runtime_namedarraytuple
from common.networks import NatureCNN, ObservationEncoder, observation_encoder

# What common.envs.observation_example makes of Dict(frames=uint8 [4, 84, 84], goal=[2],
# state=Dict(joints=[3, 2], speed=[]), steps=Discrete).
Observation = runtime_namedarraytuple("Observation", ["frames", "goal", "state", "steps"])
State = runtime_namedarraytuple("Observation", ["joints", "speed"])
EXAMPLE = Observation(frames=np.zeros((4, 84, 84), np.uint8), goal=np.zeros(2, np.float32),
                      state=State(joints=np.zeros((3, 2), np.float32), speed=np.float32(0)), steps=np.int64(0))


def random_batch(leading: tuple[int, ...], seed: int = 0) -> Observation:
    generator = torch.Generator().manual_seed(seed)
    return Observation(
        frames=torch.randint(0, 256, (*leading, 4, 84, 84), generator=generator, dtype=torch.uint8),
        goal=torch.randn(*leading, 2, generator=generator),
        state=State(joints=torch.randn(*leading, 3, 2, generator=generator), speed=torch.randn(leading)),
        steps=torch.randint(0, 100, leading, generator=generator),
    )


def test_one_encoder_per_leaf_concatenated():
    torch.manual_seed(0)
    encoder, size = observation_encoder(EXAMPLE, cnn_features=32)
    assert isinstance(encoder, ObservationEncoder) and size == encoder.out_features == 32 + 2 + 6 + 1 + 1
    assert list(encoder.cnns) == ["observation/frames"]
    batch = random_batch((5,))
    features = encoder(batch)
    assert features.shape == (5, size) and features.dtype == torch.float32
    assert torch.equal(features[:, :32], encoder.cnns["observation/frames"](batch.frames))
    assert torch.equal(features[:, 32:34], batch.goal)  # float leaves in field order, flattened
    assert torch.equal(features[:, 34:40], batch.state.joints.reshape(5, 6))
    assert torch.equal(features[:, -1], batch.steps.float())
    sequence = buffer_map(lambda leaf: leaf.reshape(1, 5, *leaf.shape[1:]), batch)  # leading dims [T, B]
    assert torch.equal(encoder(sequence), features.reshape(1, 5, size))


def test_every_leaf_changes_the_features_and_the_cnn_learns():
    torch.manual_seed(0)
    encoder, _ = observation_encoder(EXAMPLE, cnn_features=32)
    batch = random_batch((3,))
    features = encoder(batch)
    changed = [
        batch._replace(frames=255 - batch.frames), batch._replace(goal=batch.goal + 1),
        batch._replace(state=batch.state._replace(joints=batch.state.joints + 1)),
        batch._replace(state=batch.state._replace(speed=batch.state.speed + 1)), batch._replace(steps=batch.steps + 1),
    ]
    for other in changed:
        assert not torch.equal(encoder(other), features)
    encoder(batch).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.cnns.parameters())


def test_array_observations_are_one_leaf():
    torch.manual_seed(0)
    vector, size = observation_encoder(np.zeros(4, np.float32))
    assert size == 4 and len(list(vector.parameters())) == 0
    x = torch.randn(7, 4)
    assert torch.equal(vector(x), x)
    frames, size = observation_encoder(torch.zeros(4, 84, 84, dtype=torch.uint8))
    assert size == 512
    torch.manual_seed(1)
    reference = NatureCNN(4)
    frames.cnns["observation"].load_state_dict(reference.state_dict())
    x = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    assert torch.equal(frames(x), reference(x))
    small_image, size = observation_encoder(np.zeros((1, 8, 8), np.uint8))  # not a frame stack: flattened, scaled
    assert size == 64 and torch.equal(small_image(torch.full((1, 1, 8, 8), 255, dtype=torch.uint8)), torch.ones(1, 64))
