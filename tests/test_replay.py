"""common.replay against brute-force references computed with plain Python loops over the raw stream."""

import io
import multiprocessing as mp
import os
import pickle

import numpy as np
import pytest
import torch

from common.envs import UsageError
from common.namedarraytuple import buffer_leaves, buffer_map, namedarraytuple, runtime_namedarraytuple
from common.replay import (
    FrameReplayBuffer,
    PrioritizedFrameReplayBuffer,
    PrioritizedFrameSequenceReplayBuffer,
    PrioritizedReplayBuffer,
    PrioritizedSequenceReplayBuffer,
    SequenceReplayBuffer,
    SumTree,
    UniformReplayBuffer,
)

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
RnnState = namedarraytuple("RnnState", ["h", "c"])
# What common.envs.observation_example makes of Dict(pixels=Box uint8 [1, 2, 2], state=Dict(vector=Box [3])).
DictObservation = runtime_namedarraytuple("Observation", ["pixels", "state"])
DictState = runtime_namedarraytuple("Observation", ["vector"])
GAMMA = 0.9


# --------------------------------------------------------------------------------------------------
# A random episode stream and its brute-force references
# --------------------------------------------------------------------------------------------------


def make_stream(n_steps, n_envs, seed, frame_stack=0, p_end=0.15, continuous=False, dict_observation=False):
    """Samples [n_steps, n_envs] (numpy) with random terminations and truncations, as a sampler emits them.

    Vector observations are random floats; frame observations are stacks of random frames built like a
    frame-stack wrapper: after a reset the slots before the first frame repeat it. `dict_observation`:
    DictObservation(pixels=random uint8 [1, 2, 2], state=DictState(vector=the vector observation)).
    """
    rng = np.random.default_rng(seed)
    ends = rng.random((n_steps, n_envs)) < p_end
    kind = rng.random((n_steps, n_envs))
    terminated = ends & (kind < 0.45)
    truncated = ends & (kind >= 0.4)  # a few steps carry both flags
    reward = rng.normal(size=(n_steps, n_envs)).astype(np.float32)
    if continuous:
        action = rng.normal(size=(n_steps, n_envs, 2)).astype(np.float32)
    else:
        action = rng.integers(0, 6, size=(n_steps, n_envs))
    first = np.ones((n_steps, n_envs), dtype=bool)
    first[1:] = ends[:-1]
    prev_action = np.where(first.reshape(first.shape + (1,) * (action.ndim - 2)), 0, np.roll(action, 1, axis=0))
    prev_reward = np.where(first, 0, np.roll(reward, 1, axis=0)).astype(np.float32)
    if frame_stack == 0:
        observation = rng.normal(size=(n_steps + 1, n_envs, 3)).astype(np.float32)
        next_observation = observation[1:].copy()
        next_observation[ends] = rng.normal(size=(ends.sum(), 3))
        observation = observation[:-1]
        if dict_observation:
            pixels = rng.integers(0, 256, size=(n_steps + 1, n_envs, 1, 2, 2), dtype=np.uint8)
            next_pixels = pixels[1:].copy()
            next_pixels[ends] = rng.integers(0, 256, size=(ends.sum(), 1, 2, 2), dtype=np.uint8)
            observation = DictObservation(pixels[:-1], DictState(observation))
            next_observation = DictObservation(next_pixels, DictState(next_observation))
    else:
        frames = rng.integers(1, 256, size=(n_steps + 1, n_envs, 2, 3), dtype=np.uint8)
        finals = rng.integers(1, 256, size=(n_steps, n_envs, 2, 3), dtype=np.uint8)
        observation = np.zeros((n_steps, n_envs, frame_stack, 2, 3), dtype=np.uint8)
        next_observation = np.zeros_like(observation)
        for b in range(n_envs):
            for t in range(n_steps):
                if first[t, b]:
                    stack = [frames[t, b]] * frame_stack
                else:
                    stack = stack[1:] + [frames[t, b]]
                observation[t, b] = np.stack(stack)
                newest = finals[t, b] if ends[t, b] else frames[t + 1, b]
                next_observation[t, b] = np.stack(stack[1:] + [newest])
    return Samples(observation, next_observation, action, reward, terminated, truncated, prev_action, prev_reward, None)


def to_torch(samples):
    return buffer_map(lambda x: torch.from_numpy(np.ascontiguousarray(x)), samples)


def same_observation(sampled, reference) -> bool:
    """Equal leaf by leaf, dtypes included: a sampled (tensor) observation and a reference (numpy) one."""
    sampled, reference = buffer_leaves(sampled), buffer_leaves(reference)
    return len(sampled) == len(reference) and all(
        x.numpy().dtype == y.dtype and np.array_equal(x.numpy(), y) for x, y in zip(sampled, reference)
    )


def chunks(n_steps, seed, max_length=13):
    """Random [start, stop) pieces covering range(n_steps): the batches of successive collect() calls."""
    rng = np.random.default_rng(seed + 1000)
    start = 0
    while start < n_steps:
        stop = min(n_steps, start + int(rng.integers(1, max_length + 1)))
        yield start, stop
        start = stop


def global_step(row, steps_written, n_rows):
    """The stream step stored at ring row `row` after `steps_written` steps."""
    return steps_written - 1 - (steps_written - 1 - row) % n_rows


def reference_transition(stream, g, b, n_step, gamma):
    """n-step return, done, discount and bootstrap observation of step g of env b, by plain loops."""
    n_step_return, length, done = 0.0, 0, False
    for j in range(n_step):
        n_step_return += gamma**j * float(stream.reward[g + j, b])
        length += 1
        if stream.terminated[g + j, b]:
            done = True
        if stream.terminated[g + j, b] or stream.truncated[g + j, b]:
            break
    bootstrap = stream.next_observation[g + length - 1, b]
    return n_step_return, done, gamma**length * (1.0 - done), bootstrap


def check_transitions(buffer, stream, samples, steps_written, history):
    n_envs = buffer.n_envs
    for i, index in enumerate(samples.index.tolist()):
        b = index % n_envs
        g = global_step(index // n_envs, steps_written, buffer.n_rows)
        # never an invalid index: the window, its next observation and the stack history are all stored
        assert max(0, steps_written - buffer.n_rows) + history <= g <= steps_written - buffer.n_step - 1
        n_step_return, _, discount, bootstrap = reference_transition(stream, g, b, buffer.n_step, GAMMA)
        assert same_observation(samples.observation[i], stream.observation[g, b])
        assert np.array_equal(samples.action[i].numpy(), stream.action[g, b])
        assert samples.n_step_return[i].item() == pytest.approx(n_step_return, abs=1e-5)
        assert samples.discount[i].item() == pytest.approx(discount, abs=1e-6)
        assert same_observation(samples.bootstrap_observation[i], bootstrap)


def check_tree(buffer, steps_written, history):
    """Sum-tree leaves equal the stored priorities on valid items and zero elsewhere; nodes are sums."""
    n_units = buffer.n_rows // buffer.interval
    unit = np.arange(n_units * buffer.n_envs) // buffer.n_envs
    start = global_step(unit * buffer.interval, steps_written, buffer.n_rows)
    first_valid = max(max(0, steps_written - buffer.n_rows) + history, int(buffer.counters[2]) + 1)
    valid = (start >= first_valid) & (start <= steps_written - buffer._tail) & (start >= 0)
    leaves = buffer.tree.get(np.arange(len(unit)))
    np.testing.assert_array_equal(leaves, np.where(valid, buffer.priority, 0.0))
    tree, n_leaves = buffer.tree.array, buffer.tree.n_leaves
    np.testing.assert_allclose(tree[1:n_leaves], tree[2 : 2 * n_leaves : 2] + tree[3 : 2 * n_leaves : 2])
    assert len(buffer) == valid.sum()


# --------------------------------------------------------------------------------------------------
# Sum tree
# --------------------------------------------------------------------------------------------------


def test_sum_tree_prefix_search_and_batch_update_match_brute_force():
    rng = np.random.default_rng(0)
    tree = SumTree(37)
    values = rng.random(37) * (rng.random(37) < 0.7)  # some zero leaves
    tree.update(np.arange(37), values)
    tree.update(np.array([5, 5, 9]), np.array([0.0, 2.5, 0.0]))  # duplicates: the last write wins
    values[5], values[9] = 2.5, 0.0
    assert tree.total == pytest.approx(values.sum())
    prefix = np.concatenate([rng.random(500) * values.sum(), [0.0, values.sum(), np.nextafter(values.sum(), 0)]])
    expected = np.minimum(np.searchsorted(np.cumsum(values), prefix, side="right"), np.flatnonzero(values)[-1])
    found = tree.find(prefix)
    assert np.array_equal(found, expected)
    assert (values[found] > 0).all()


# --------------------------------------------------------------------------------------------------
# n-step transitions (uniform, prioritized, frames) against the raw stream
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("buffer_class", [UniformReplayBuffer, PrioritizedReplayBuffer])
@pytest.mark.parametrize("n_step", [1, 3])
@pytest.mark.parametrize("continuous,dict_observation", [(False, False), (True, False), (False, True)])
def test_n_step_transitions_match_reference_across_wraparound(buffer_class, n_step, continuous, dict_observation):
    n_envs, n_steps = 3, 160
    stream = make_stream(n_steps, n_envs, seed=n_step, continuous=continuous, dict_observation=dict_observation)
    buffer = buffer_class(to_torch(stream)[0, 0], size=40 * n_envs, n_envs=n_envs, n_step=n_step, gamma=GAMMA)
    torch.manual_seed(0)
    for start, stop in chunks(n_steps, seed=n_step):
        buffer.append(to_torch(stream[start:stop]))
        if isinstance(buffer, PrioritizedReplayBuffer):
            check_tree(buffer, stop, history=0)
        if len(buffer) == 0:
            continue
        samples = buffer.sample(64)
        check_transitions(buffer, stream, samples, stop, history=0)
        if isinstance(buffer, PrioritizedReplayBuffer):
            buffer.update_priorities(samples.index, torch.rand(64) * 3)
        else:
            assert (samples.weight == 1).all()


@pytest.mark.parametrize("buffer_class", [UniformReplayBuffer, PrioritizedReplayBuffer])
def test_a_batch_buffer_rewritten_in_place_is_stored_as_it_is_at_each_append(buffer_class):
    # A sampler hands the replay the same [T, B] tensors at every collect, rewritten in place.
    n_envs, n_steps = 2, 90
    stream = make_stream(n_steps, n_envs, seed=11, dict_observation=True)
    torch_stream = to_torch(stream)
    batch = buffer_map(lambda x: x[:1].clone(), torch_stream)
    buffer = buffer_class(torch_stream[0, 0], size=40 * n_envs, n_envs=n_envs, n_step=3, gamma=GAMMA)
    torch.manual_seed(0)
    for t in range(n_steps):
        batch[0] = torch_stream[t]
        buffer.append(batch)
        if len(buffer):
            check_transitions(buffer, stream, buffer.sample(32), t + 1, history=0)
    assert int(buffer.counters[0]) == n_steps


@pytest.mark.parametrize("buffer_class", [FrameReplayBuffer, PrioritizedFrameReplayBuffer])
@pytest.mark.parametrize("n_step", [1, 3])
@pytest.mark.parametrize("frame_stack", [4, 1])
def test_frame_stacks_match_the_stacks_a_naive_buffer_stores(buffer_class, n_step, frame_stack):
    n_envs, n_steps = 3, 200
    stream = make_stream(n_steps, n_envs, seed=10 + n_step, frame_stack=frame_stack, p_end=0.2)
    # A pool of 12 final frames for ~20 episode ends in the ring: evictions happen and must stay invisible.
    buffer = buffer_class(
        to_torch(stream)[0, 0], size=40 * n_envs, n_envs=n_envs, n_step=n_step, gamma=GAMMA,
        frame_padding="repeat", final_capacity=12,
    )  # fmt: skip
    torch.manual_seed(1)
    for start, stop in chunks(n_steps, seed=n_step):
        buffer.append(to_torch(stream[start:stop]))
        if isinstance(buffer, PrioritizedReplayBuffer):
            check_tree(buffer, stop, history=frame_stack - 1)
        if len(buffer) == 0:
            continue
        samples = buffer.sample(64)
        check_transitions(buffer, stream, samples, stop, history=frame_stack - 1)
        if isinstance(buffer, PrioritizedReplayBuffer):
            buffer.update_priorities(samples.index, torch.rand(64))
    assert buffer.counters[2] >= 0, "the pool never evicted: the test does not exercise eviction"


def test_frame_buffer_stores_each_frame_once():
    stream = make_stream(8, 2, seed=0, frame_stack=4)
    example = to_torch(stream)[0, 0]
    frames = FrameReplayBuffer(example, size=1000, n_envs=2)
    full = UniformReplayBuffer(example, size=1000, n_envs=2)
    assert frames.observation.shape == (500, 2, 2, 3)
    assert frames.observation.nbytes * 4 == full.observation.nbytes
    assert frames.final_observation.shape[0] == 1000 // 16


# --------------------------------------------------------------------------------------------------
# Prioritized sampling: frequencies, weights, max priority, invalid window
# --------------------------------------------------------------------------------------------------


def test_prioritized_frequencies_follow_priority_to_the_alpha_and_weights_match_formula():
    stream = make_stream(40, 2, seed=3, p_end=0.0)
    buffer = PrioritizedReplayBuffer(to_torch(stream)[0, 0], size=200, n_envs=2, alpha=0.7, beta=0.5)
    buffer.append(to_torch(stream))
    n_valid = len(buffer)
    assert n_valid == 39 * 2  # steps 0..38: step 39 still needs observation 40 (its next observation)
    valid_index = np.arange(n_valid)  # rows 0..38 of both envs
    priority = np.random.default_rng(0).uniform(0.05, 3.0, n_valid)
    buffer.update_priorities(torch.from_numpy(valid_index), torch.from_numpy(priority))
    expected = (priority + buffer.eps) ** 0.7
    expected /= expected.sum()

    torch.manual_seed(0)
    counts = np.zeros(buffer.size)
    for _ in range(300):
        samples = buffer.sample(256)
        counts += np.bincount(samples.index.numpy() % buffer.size, minlength=buffer.size)
    assert counts[n_valid:].sum() == 0
    statistic = ((counts[:n_valid] - expected * counts.sum()) ** 2 / (expected * counts.sum())).sum()
    try:
        from scipy.stats import chi2

        critical = chi2.ppf(0.999, df=n_valid - 1)
    except ImportError:
        critical = 121.1  # chi2.ppf(0.999, df=77)
    assert statistic < critical

    samples = buffer.sample(64, beta=0.8)
    probability = expected[samples.index.numpy() % buffer.size]
    weight = (n_valid * probability) ** -0.8
    np.testing.assert_allclose(samples.weight.numpy(), weight / weight.max(), rtol=1e-5)


def test_new_items_enter_at_max_priority_and_the_tail_is_held_at_zero_until_valid():
    stream = make_stream(12, 1, seed=4, p_end=0.0)
    batches = to_torch(stream)
    buffer = PrioritizedReplayBuffer(batches[0, 0], size=100, n_envs=1, alpha=0.5, default_priority=2.0)
    buffer.append(batches[:10])
    assert np.array_equal(buffer.tree.get(np.arange(10)), [2.0**0.5] * 9 + [0.0])  # item 9 waits for step 10
    buffer.update_priorities(torch.arange(9), torch.full((9,), 5.0))
    top = (5.0 + buffer.eps) ** 0.5
    buffer.append(batches[10:11])
    assert buffer.tree.get(np.array([9, 10])).tolist() == [2.0**0.5, 0.0]  # restored at its own priority
    buffer.append(batches[11:12])
    assert buffer.tree.get(np.array([10, 11])).tolist() == [top, 0.0]  # entered at the max seen so far


def test_a_late_priority_update_never_reaches_the_item_written_over_the_sampled_one():
    # Asynchronous sampling: the sampler writes between the optimizer's sample and its update_priorities.
    stream = make_stream(11, 1, seed=4, p_end=0.0)
    batches = to_torch(stream)
    buffer = PrioritizedReplayBuffer(batches[0, 0], size=8, n_envs=1, alpha=0.5, default_priority=2.0)
    buffer.append(batches[:6])  # items 0..4 valid, item 5 waits for step 6
    torch.manual_seed(0)
    sampled = buffer.sample(64).index
    assert set(sampled.tolist()) == {0, 1, 2, 3, 4}
    buffer.append(batches[6:10])  # steps 8 and 9 overwrite the ring slots of items 0 and 1
    buffer.update_priorities(sampled, torch.full((64,), 100.0))
    entered, top = 2.0**0.5, (100.0 + buffer.eps) ** 0.5
    # Slot 0 holds item 8 (valid) and slot 1 item 9 (waiting): both keep the priority they entered with.
    assert buffer.tree.get(np.arange(5)).tolist() == [entered, 0.0, top, top, top]
    assert buffer.priority[:2].tolist() == [entered, entered]
    buffer.append(batches[10:11])  # item 9 becomes valid; step 10 overwrites item 2, which enters at the max
    assert buffer.tree.get(np.arange(5)).tolist() == [entered, entered, 0.0, top, top]
    assert buffer.priority[2] == top


# --------------------------------------------------------------------------------------------------
# Sequences (R2D1)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "buffer_class,dict_observation",
    [
        (SequenceReplayBuffer, False),
        (PrioritizedSequenceReplayBuffer, False),
        (PrioritizedFrameSequenceReplayBuffer, False),
        (SequenceReplayBuffer, True),
        (PrioritizedSequenceReplayBuffer, True),
    ],
)
def test_sequences_match_reference_slices_and_carry_the_stored_rnn_state(buffer_class, dict_observation):
    n_envs, n_steps, interval, frame_stack = 2, 260, 4, 3
    frames = buffer_class is PrioritizedFrameSequenceReplayBuffer
    stream = make_stream(n_steps, n_envs, seed=5, frame_stack=frame_stack if frames else 0, p_end=0.1,
                         dict_observation=dict_observation)
    # rnn state before step g of env b encodes (g, b) in both leaves
    code = np.arange(n_steps)[:, None] * 10.0 + np.arange(n_envs)[None]
    rnn_state = RnnState(h=np.repeat(code[..., None], 2, -1).astype(np.float32), c=(-code).astype(np.float32))
    rnn_example = RnnState(h=torch.zeros(2), c=torch.zeros(()))
    kwargs = dict(burn_in=3, train_length=5, n_step=2, rnn_state_interval=interval)
    buffer = buffer_class(to_torch(stream)[0, 0], 50 * n_envs, n_envs, rnn_example, **kwargs)
    length = buffer.sequence_length
    assert length == 10 and buffer.n_rows == 48
    history = frame_stack - 1 if frames else 0
    torch.manual_seed(2)
    for start, stop in chunks(n_steps, seed=7, max_length=20):
        buffer.append(to_torch(stream[start:stop]), RnnState(*(torch.from_numpy(x[start:stop]) for x in rnn_state)))
        if isinstance(buffer, PrioritizedReplayBuffer):
            check_tree(buffer, stop, history)
        if len(buffer) == 0:
            continue
        samples = buffer.sample(16)
        assert all(leaf.shape[:2] == (length, 16) for leaf in buffer_leaves(samples.observation))
        for i, index in enumerate(samples.index.tolist()):
            b = index % n_envs
            g = global_step(index // n_envs * interval, stop, buffer.n_rows)
            assert g % interval == 0
            assert max(0, stop - buffer.n_rows) + history <= g and g + length <= stop  # never past the cursor
            window = slice(g, g + length)
            assert same_observation(samples.observation[:, i], stream.observation[window, b])
            for name in ("action", "reward", "terminated", "truncated", "prev_action", "prev_reward"):
                assert np.array_equal(getattr(samples, name)[:, i].numpy(), getattr(stream, name)[window, b]), name
            ended = stream.terminated[window, b] | stream.truncated[window, b]
            expected_next = buffer_map(np.copy, stream.next_observation[window, b])
            expected_next[~ended] = 0
            assert same_observation(samples.next_observation[:, i], expected_next)
            assert np.array_equal(samples.rnn_state.h[i].numpy(), rnn_state.h[g, b])
            assert samples.rnn_state.c[i].item() == rnn_state.c[g, b]
        if isinstance(buffer, PrioritizedReplayBuffer):
            td_abs = torch.rand(buffer.train_length, 16)
            buffer.update_priorities(samples.index, -td_abs)  # sign does not matter
            last = {index: k for k, index in enumerate(samples.index.tolist())}  # duplicates: last one wins
            k = np.array(list(last.values()))
            expected = 0.9 * td_abs.max(0).values + 0.1 * td_abs.mean(0)
            stored = buffer.priority[np.array(list(last.keys())) % len(buffer.priority)]
            np.testing.assert_allclose(stored, (expected.double().numpy()[k] + buffer.eps) ** buffer.alpha)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("buffer_class,dict_observation", [
    (UniformReplayBuffer, False), (PrioritizedFrameReplayBuffer, False), (PrioritizedSequenceReplayBuffer, False),
    (PrioritizedReplayBuffer, True), (PrioritizedSequenceReplayBuffer, True),
])
def test_state_dict_round_trip_restores_identical_samples(buffer_class, dict_observation):
    sequence = buffer_class in (PrioritizedSequenceReplayBuffer, SequenceReplayBuffer)
    frame_stack = 4 if buffer_class is PrioritizedFrameReplayBuffer else 0
    stream = to_torch(make_stream(90, 2, seed=6, frame_stack=frame_stack, dict_observation=dict_observation))
    args = (torch.zeros(3),) if sequence else ()
    kwargs = dict(burn_in=2, train_length=4, n_step=2, rnn_state_interval=2) if sequence else dict(n_step=2)
    buffer = buffer_class(stream[0, 0], 60, 2, *args, **kwargs)
    append = (lambda b, s: b.append(s, torch.randn(len(s.reward), 2, 3))) if sequence else (lambda b, s: b.append(s))
    append(buffer, stream[:50])
    if buffer_class is not UniformReplayBuffer:
        buffer.update_priorities(buffer.sample(8).index, torch.rand(4, 8) if sequence else torch.rand(8))
    append(buffer, stream[50:])

    saved = io.BytesIO()
    torch.save(buffer.state_dict(), saved)
    saved.seek(0)
    restored = buffer_class(stream[0, 0], 60, 2, *args, **kwargs)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    if dict_observation:
        assert "observation.state.vector" in buffer.state_dict() and "final_observation.pixels" in buffer.state_dict()
    for _ in range(3):
        torch.manual_seed(123)
        expected = buffer.sample(32)
        torch.manual_seed(123)
        got = restored.sample(32)
        for name, value in zip(expected._fields, expected):
            value_leaves, got_leaves = buffer_leaves(value), buffer_leaves(getattr(got, name))
            assert len(value_leaves) == len(got_leaves), name
            assert all(torch.equal(x, y) for x, y in zip(value_leaves, got_leaves)), name
    assert len(restored) == len(buffer)


@pytest.mark.parametrize("buffer_class,frame_stack", [
    (UniformReplayBuffer, 0), (PrioritizedReplayBuffer, 0), (PrioritizedFrameReplayBuffer, 4),
])
def test_a_restored_buffer_ends_the_open_episodes_where_the_checkpoint_cut_them(buffer_class, frame_stack):
    # A resumed run's sampler starts new episodes after the restored steps. The items that reach the cut
    # must stop there and bootstrap from the true next observation of the step before it, as if each
    # episode still open at the checkpoint had been truncated; one that ended there stays as it ended.
    n_envs, cut = 3, 30
    before = make_stream(cut, n_envs, seed=21, frame_stack=frame_stack, p_end=0.1)
    before.terminated[-1] = [True, False, False]
    before.truncated[-1] = False
    after = make_stream(30, n_envs, seed=22, frame_stack=frame_stack, p_end=0.1)
    kwargs = dict(size=100 * n_envs, n_envs=n_envs, n_step=3, gamma=GAMMA)
    buffer = buffer_class(to_torch(before)[0, 0], **kwargs)
    buffer.append(to_torch(before))
    saved = io.BytesIO()
    torch.save(buffer.state_dict(), saved)
    saved.seek(0)
    restored = buffer_class(to_torch(before)[0, 0], **kwargs)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    restored.truncate_open_episodes()
    restored.append(to_torch(after))

    stream = Samples(*[None if x is None else np.concatenate([x, y]) for x, y in zip(before, after)])
    stream.truncated[cut - 1, 1:] = True  # the reference: episodes open at the cut were truncated there
    history = max(frame_stack - 1, 0)
    if isinstance(restored, PrioritizedReplayBuffer):
        check_tree(restored, 2 * cut, history)
    torch.manual_seed(0)
    samples = restored.sample(2000)
    check_transitions(restored, stream, samples, 2 * cut, history)
    first_steps = set((samples.index // n_envs).tolist())
    assert {cut - 3, cut - 2, cut - 1, cut} <= first_steps  # the items around the cut were checked


@pytest.mark.parametrize("buffer_class,frame_stack,interval", [
    (UniformReplayBuffer, 0, 1), (PrioritizedFrameReplayBuffer, 4, 1), (SequenceReplayBuffer, 0, 3),
    (PrioritizedFrameSequenceReplayBuffer, 4, 3), (PrioritizedFrameSequenceReplayBuffer, 4, 2),
])
def test_steps_to_first_item_is_the_first_append_that_can_be_sampled(buffer_class, frame_stack, interval):
    # The first update of a run waits for it (ReplayFeeder.learning_starts): never too early, never later.
    stream = to_torch(make_stream(40, 2, seed=8, frame_stack=frame_stack, p_end=0.0))
    sequence = issubclass(buffer_class, SequenceReplayBuffer)
    args = (torch.zeros(3),) if sequence else ()
    kwargs = dict(burn_in=2, train_length=4, n_step=2, rnn_state_interval=interval) if sequence else dict(n_step=2)
    buffer = buffer_class(stream[0, 0], 200, 2, *args, **kwargs)
    lengths = []
    for t in range(30):
        buffer.append(stream[t:t + 1], torch.zeros(1, 2, 3)) if sequence else buffer.append(stream[t:t + 1])
        lengths.append(len(buffer))
    first = buffer.steps_to_first_item
    assert lengths[first - 2] == 0 and lengths[first - 1] > 0, (first, lengths)


@pytest.mark.parametrize("buffer_class", [FrameReplayBuffer, PrioritizedFrameReplayBuffer])
def test_frame_buffers_refuse_dict_observations(buffer_class):
    example = to_torch(make_stream(4, 2, seed=0, dict_observation=True))[0, 0]
    with pytest.raises(UsageError, match=r"frame deduplication .* not a Dict / Tuple one \(fields pixels, state\)"):
        buffer_class(example, 100, 2)


# --------------------------------------------------------------------------------------------------
# Shared memory: a writer process and a reader process on one buffer
# --------------------------------------------------------------------------------------------------

N_ENVS, N_STEP = 3, 2


def encoded_batch(first_step, n_steps):
    """A batch whose every field is a function of (global step g, env b): torn reads cannot match."""
    g = np.arange(first_step, first_step + n_steps)[:, None] + np.zeros(N_ENVS, dtype=np.int64)
    b = np.zeros_like(g) + np.arange(N_ENVS)
    terminated = (g + b) % 7 == 6
    truncated = ((g + 2 * b) % 11 == 10) & ~terminated
    code = (g * N_ENVS + b).astype(np.float32)
    observation = np.stack([g, b, code], -1).astype(np.float32)
    next_observation = np.stack([g + 1, b, code + N_ENVS], -1).astype(np.float32)
    next_observation[terminated | truncated] = np.stack([g + 0.5, b, -code], -1)[terminated | truncated]
    batch = Samples(observation, next_observation, g * N_ENVS + b, code / 64, terminated, truncated, -g, -code, None)
    return to_torch(batch)


def expected_transition(g, b):
    """(n-step return, done, bootstrap observation) of step g, env b of the encoded stream, by plain loops."""
    n_step_return, done = 0.0, False
    for j in range(N_STEP):
        step = g + j
        n_step_return += GAMMA**j * float(np.float32((step * N_ENVS + b) / 64))
        done = (step + b) % 7 == 6
        if done or (step + 2 * b) % 11 == 10:
            return n_step_return, done, [step + 0.5, b, -(step * N_ENVS + b)]
    return n_step_return, done, [step + 1, b, (step + 1) * N_ENVS + b]


def writer_process(buffer, reader_done, report):
    rng = np.random.default_rng(0)
    steps = 0
    while not reader_done.is_set() and steps < 200_000:
        n_steps = int(rng.integers(1, 7))
        buffer.append(encoded_batch(steps, n_steps))
        steps += n_steps
    report.put(("writer", steps))


def reader_process(buffer, reader_done, report):
    try:
        report.put(("reader", check_samples(buffer)))
    except Exception as error:  # report at once instead of leaving the parent waiting
        report.put(("reader", repr(error)))
    finally:
        reader_done.set()


def check_samples(buffer):
    """Sample, check every transition against the encoding, update priorities; the count or the first error."""
    checked = 0
    while checked < 3000:
        if len(buffer) == 0:
            continue
        samples = buffer.sample(32)
        observation = samples.observation.tolist()
        for i, (g, b, code) in enumerate(observation):
            g, b = int(g), int(b)
            n_step_return, _, bootstrap = expected_transition(g, b)
            consistent = (
                code == g * N_ENVS + b
                and samples.index[i].item() % N_ENVS == b
                and samples.action[i].item() == g * N_ENVS + b
                and abs(samples.n_step_return[i].item() - n_step_return) < 1e-4
                and samples.bootstrap_observation[i].tolist() == bootstrap
            )
            if not consistent:
                return f"torn or wrong sample at step {g} env {b}: {samples[i]}"
        buffer.update_priorities(samples.index, torch.rand(32))
        checked += 32
    return checked


def test_shared_buffer_stays_consistent_under_a_concurrent_writer_and_reader():
    context = mp.get_context("spawn")
    example = encoded_batch(0, 1)[0, 0]
    buffer = PrioritizedReplayBuffer(example, 30 * N_ENVS, N_ENVS, n_step=N_STEP, gamma=GAMMA, share_memory=True)
    report, reader_done = context.Queue(), context.Event()
    # The writer appends until the reader has checked all its samples, so every sample races an append.
    writer = context.Process(target=writer_process, args=(buffer, reader_done, report))
    reader = context.Process(target=reader_process, args=(buffer, reader_done, report))
    try:
        writer.start()
        reader.start()
        results = dict(report.get(timeout=60) for _ in range(2))
        writer.join(timeout=10)
        reader.join(timeout=10)
    finally:
        for process in (writer, reader):
            if process.is_alive():
                process.terminate()
            process.join()
    assert writer.exitcode == 0 and reader.exitcode == 0
    assert results["reader"] == 3008, results["reader"]
    # The parent's object sees what the writer child wrote: same memory, same cursors, same tree.
    steps = results["writer"]
    assert int(buffer.counters[0]) == steps > 30
    check_tree(buffer, steps, history=0)
    assert len(buffer) == (30 - N_STEP) * N_ENVS  # steps - 30 .. steps - N_STEP - 1


def test_private_buffer_pickles_by_value():
    stream = to_torch(make_stream(20, 2, seed=8))
    buffer = UniformReplayBuffer(stream[0, 0], size=40, n_envs=2)
    buffer.append(stream)
    copy = pickle.loads(pickle.dumps(buffer))
    torch.manual_seed(0)
    expected = buffer.sample(8)
    torch.manual_seed(0)
    assert torch.equal(copy.sample(8).observation, expected.observation)
    copy.append(stream[:3])
    assert int(copy.counters[0]) == 23 and int(buffer.counters[0]) == 20
    assert np.array_equal(buffer.observation, stream.observation.numpy())


def append_in_child(buffer, batch):
    buffer.append(batch)


def test_shared_buffer_of_dict_observations_is_written_by_a_spawn_child():
    """The child loads the observation structure it never made and writes the parent's memory."""
    stream = make_stream(30, 2, seed=9, dict_observation=True)
    buffer = UniformReplayBuffer(to_torch(stream)[0, 0], size=80, n_envs=2, n_step=2, gamma=GAMMA, share_memory=True)
    child = mp.get_context("spawn").Process(target=append_in_child, args=(buffer, to_torch(stream)))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0 and int(buffer.counters[0]) == 30
    torch.manual_seed(0)
    check_transitions(buffer, stream, buffer.sample(64), 30, history=0)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_large_buffer_takes_memory_only_as_it_fills():
    # An Atari-sized ring (here 1 GB of frames) must not be zero-filled up front: a default dqn_atari run
    # would commit its whole 1M-frame buffer (7 GiB) before the first step.
    example = Samples(observation=torch.zeros(84, 84, dtype=torch.uint8), action=torch.zeros((), dtype=torch.int64),
                      reward=torch.zeros(()), terminated=torch.zeros((), dtype=torch.bool),
                      truncated=torch.zeros((), dtype=torch.bool), prev_action=torch.zeros((), dtype=torch.int64),
                      prev_reward=torch.zeros(()), next_observation=torch.zeros(84, 84, dtype=torch.uint8),
                      agent_info=None)
    before = resident_bytes()
    buffer = UniformReplayBuffer(example, size=150_000, n_envs=1)
    assert buffer.observation.nbytes > 10**9
    assert resident_bytes() - before < 2**27, "the ring was written when it was built"
    assert buffer.observation[123_456].sum() == 0 and buffer.final_index[99_999, 0] == 0
