"""Replay memory and sampling speed, against a plain numpy ring buffer measured in the same run.

    python benchmark/replay_memory.py

Prints bytes per stored Atari transition (frame-deduplicated buffer vs a naive buffer that stores the
stacked observation and next observation, uint8 4x84x84 each), then a table of sample throughput
(batches/s) for uniform and prioritized sampling next to the same operation (random index + gather of
every field) on a numpy ring. The last line is the memory ratio (target >= 7x).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from common.namedarraytuple import namedarraytuple
from common.replay import FrameReplayBuffer, PrioritizedFrameReplayBuffer, PrioritizedReplayBuffer, UniformReplayBuffer

Samples = namedarraytuple(
    "Samples",
    [
        "observation",
        "next_observation",
        "action",
        "reward",
        "terminated",
        "truncated",
        "prev_action",
        "prev_reward",
        "agent_info",
    ],
)

N_ENVS = 8
HORIZON = 128
ATARI_SIZE = 40_000
VECTOR_SIZE = 200_000
BATCH_SIZES = (32, 256)
SECONDS_PER_CELL = 1.0


def random_batch(rng: np.random.Generator, observation_shape: tuple[int, ...], dtype: type) -> Samples:
    """A [HORIZON, N_ENVS] batch of random data with an episode end every ~200 steps."""
    shape = (HORIZON, N_ENVS)
    if dtype is np.uint8:
        observation = rng.integers(0, 256, size=shape + observation_shape, dtype=np.uint8)
    else:
        observation = rng.standard_normal(shape + observation_shape, dtype=np.float32)
    ends = rng.random(shape) < 1 / 200
    batch = Samples(
        observation=observation,
        next_observation=observation,
        action=rng.integers(0, 6, size=shape),
        reward=rng.standard_normal(shape, dtype=np.float32),
        terminated=ends & (rng.random(shape) < 0.9),
        truncated=ends & (rng.random(shape) >= 0.9),
        prev_action=rng.integers(0, 6, size=shape),
        prev_reward=rng.standard_normal(shape, dtype=np.float32),
        agent_info=None,
    )
    return Samples(*(None if x is None else torch.from_numpy(x) for x in batch))


@dataclass
class NumpyRing:
    """The reference: a ring of whole transitions (observation and next observation stored in full)."""

    fields: dict[str, np.ndarray]
    filled: int

    @classmethod
    def allocate(cls, size: int, observation_shape: tuple[int, ...], dtype: type) -> NumpyRing:
        rng = np.random.default_rng(0)

        def random_observations() -> np.ndarray:
            if dtype is np.uint8:
                return rng.integers(0, 256, size=(size, *observation_shape), dtype=np.uint8)
            return rng.standard_normal((size, *observation_shape), dtype=np.float32)

        fields = {
            "observation": random_observations(),
            "next_observation": random_observations(),
            "action": rng.integers(0, 6, size=size),
            "reward": rng.standard_normal(size, dtype=np.float32),
            "terminated": rng.random(size) < 0.01,
            "truncated": np.zeros(size, dtype=bool),
            "prev_action": rng.integers(0, 6, size=size),
            "prev_reward": rng.standard_normal(size, dtype=np.float32),
        }
        return cls(fields, size)

    def bytes_per_transition(self) -> float:
        return sum(array.nbytes for array in self.fields.values()) / self.filled

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        index = torch.randint(self.filled, (batch_size,)).numpy()
        return {name: torch.from_numpy(array[index]) for name, array in self.fields.items()}


def bytes_per_transition(buffer: UniformReplayBuffer) -> float:
    return sum(tensor.nbytes for _, tensor in buffer._flat_tensors()) / buffer.size


def filled(buffer_class: type, size: int, observation_shape: tuple[int, ...], dtype: type, **kwargs):
    rng = np.random.default_rng(0)
    example = random_batch(rng, observation_shape, dtype)
    buffer = buffer_class(example[0, 0], size, N_ENVS, **kwargs)
    while len(buffer) < size - N_ENVS * 8:
        buffer.append(random_batch(rng, observation_shape, dtype))
    return buffer


def batches_per_second(sample, batch_size: int) -> float:
    sample(batch_size)
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < SECONDS_PER_CELL:
        sample(batch_size)
        count += 1
    return count / elapsed


def main() -> None:
    torch.manual_seed(0)
    atari = ((4, 84, 84), np.uint8)
    vector = ((17,), np.float32)

    frames = filled(FrameReplayBuffer, ATARI_SIZE, *atari, n_step=3)
    prioritized_frames = filled(PrioritizedFrameReplayBuffer, ATARI_SIZE, *atari, n_step=3)
    atari_ring = NumpyRing.allocate(ATARI_SIZE, *atari)
    frame_bytes = bytes_per_transition(frames)
    naive_bytes = atari_ring.bytes_per_transition()
    print("Atari transition storage (uint8 4x84x84 observations, n_envs 8):")
    print(f"  naive buffer (observation + next observation stacks): {naive_bytes:10.0f} bytes/transition")
    print(f"  FrameReplayBuffer (frames once + final-frame pool):   {frame_bytes:10.0f} bytes/transition")
    print(f"  PrioritizedFrameReplayBuffer (+ sum tree):            {bytes_per_transition(prioritized_frames):10.0f}")

    rows = [
        ("vector 17 f32", "numpy ring (reference)", NumpyRing.allocate(VECTOR_SIZE, *vector).sample),
        ("vector 17 f32", "UniformReplayBuffer", filled(UniformReplayBuffer, VECTOR_SIZE, *vector, n_step=3).sample),
        (
            "vector 17 f32",
            "PrioritizedReplayBuffer",
            filled(PrioritizedReplayBuffer, VECTOR_SIZE, *vector, n_step=3).sample,
        ),
        ("atari 4x84x84", "numpy ring (reference)", atari_ring.sample),
        ("atari 4x84x84", "FrameReplayBuffer", frames.sample),
        ("atari 4x84x84", "PrioritizedFrameReplayBuffer", prioritized_frames.sample),
    ]
    header = f"{'observation':<15}{'buffer (n_step 3)':<31}" + "".join(
        f"{f'batch {b} /s':>14}{'vs ring':>9}" for b in BATCH_SIZES
    )
    print(f"\nSample throughput, batches/s ({SECONDS_PER_CELL:.0f} s per cell, one process):")
    print(header)
    reference: dict[tuple[str, int], float] = {}
    for observation, name, sample in rows:
        line = f"{observation:<15}{name:<31}"
        for batch_size in BATCH_SIZES:
            rate = batches_per_second(sample, batch_size)
            reference.setdefault((observation, batch_size), rate)
            line += f"{rate:14.0f}{rate / reference[(observation, batch_size)]:8.2f}x"
        print(line, flush=True)
    print(f"memory ratio (naive / frame buffer): {naive_bytes / frame_bytes:.2f}x")


if __name__ == "__main__":
    main()
