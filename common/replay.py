"""Replay buffers: uniform and prioritized n-step, frame-deduplicated (Atari), sequence (R2D1); shared memory.

Every buffer is a ring `[size // n_envs, n_envs]` in time, written one whole `[T, B]` sampler batch per `append`. Per
step it stores the observation the policy saw (frame buffers: its newest frame only), action, reward, terminated,
truncated, prev_action and prev_reward (not agent_info); each episode end's true final observation (frame buffers: its
newest frame) goes to a small FIFO pool, so truncated episodes bootstrap correctly, and per env the newest step's next
observation is kept for `truncate_open_episodes`.

The next observation of step t is `observation[t + 1]`, or the pool entry if step t ended an episode. Items (n-step
transitions, or sequences) are sampled by their first step, valid when every step the item reads is stored and
current: not older than the ring (plus a stack's frame history), not younger than the write cursor allows, and no pool
entry it needs evicted. Prioritized buffers hold invalid items at zero priority.

With `share_memory=True` all arrays, the sum tree and the cursors live in shared memory, a cross-process read-write lock
guards append / sample / update_priorities, and the buffer pickles to `spawn` children (as a Process argument), which
keep writing the same memory. Sampling draws from torch's global RNG (`torch.manual_seed` makes it reproducible).
Observations may be namedarraytuples (Dict / Tuple spaces; each leaf is handled like an array), except in frame buffers.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from common.envs import UsageError
from common.namedarraytuple import buffer_from_example, buffer_map, namedarraytuple, numpify_buffer, torchify_buffer

ReplaySamples = namedarraytuple("ReplaySamples", [
    "observation",  # [N, ...] observation at the window's first step t
    "action",  # [N, ...] action taken at t
    "n_step_return",  # [N] sum_{j<m} gamma^j r_{t+j}, the window cut at the first episode end
    "bootstrap_observation",  # [N, ...] true next observation of the window's last step
    "discount",  # [N] gamma^m * (1 - terminated at the window's last step)
    "weight",  # [N] importance weight (ones for uniform sampling)
    "index",  # [N] long: the item's id (global unit * n_envs + env), to pass back to update_priorities
])

SequenceSamples = namedarraytuple("SequenceSamples", [
    "observation", "action",  # [L, N, ...]
    "reward", "terminated", "truncated",  # [L, N] (terminated, truncated: bool)
    "prev_action", "prev_reward",  # [L, N, ...], [L, N]
    "next_observation",  # [L, N, ...] true next observation where the step ended an episode, else zeros
    "rnn_state",  # [N, ...] (nested) recurrent state before the sequence's first step
    "weight", "index",  # [N] (index: long)
])

_STEP_FIELDS = ("action", "reward", "terminated", "truncated", "prev_action", "prev_reward")
_STEPS, _FINALS, _EVICTED = 0, 1, 2  # counters: steps appended, pool entries written, last evicted step


class SumTree:
    """Binary sum tree over `capacity` non-negative float64 leaves, stored in one array (root at 1)."""

    def __init__(self, capacity: int, array: np.ndarray | None = None):
        self.n_leaves = 1 << max(0, (capacity - 1).bit_length())
        self.depth = self.n_leaves.bit_length() - 1
        self.array = np.zeros(2 * self.n_leaves) if array is None else array
        if self.array.shape != (2 * self.n_leaves,) or self.array.dtype != np.float64:
            raise ValueError(f"SumTree array must be float64 [{2 * self.n_leaves}], got {self.array.shape}")

    @staticmethod
    def array_size(capacity: int) -> int:
        """Length of the backing array for `capacity` leaves."""
        return 2 << max(0, (capacity - 1).bit_length())

    @property
    def total(self) -> float:
        return float(self.array[1])

    def get(self, index: np.ndarray) -> np.ndarray:
        """Leaf values at `index` [N]."""
        return self.array[self.n_leaves + index]

    def update(self, index: np.ndarray, value: np.ndarray | float) -> None:
        """Set leaves `index` [N] to `value` [N] (last write wins on duplicates), then re-sum their ancestors."""
        node = np.asarray(index, dtype=np.int64) + self.n_leaves
        self.array[node] = value
        for _ in range(self.depth):
            node = np.unique(node >> 1)
            self.array[node] = self.array[2 * node] + self.array[2 * node + 1]

    def find(self, prefix: np.ndarray) -> np.ndarray:
        """Leaf index [N] where the running sum of leaves passes each `prefix` [N]; never a zero leaf."""
        prefix = np.array(prefix, dtype=np.float64)
        node = np.ones(prefix.shape, dtype=np.int64)
        for _ in range(self.depth):
            node *= 2  # the left child
            left_sum = self.array[node]
            # Going right only into a positive subtree means rounding at a boundary cannot reach a zero leaf.
            go_right = (prefix >= left_sum) & (self.array[node + 1] > 0)
            prefix -= left_sum * go_right
            node += go_right
        return node - self.n_leaves

    def sample(self, batch_size: int) -> np.ndarray:
        """Stratified draw of `batch_size` leaf indices [N], one per equal slice of the total mass."""
        uniform = torch.rand(batch_size, dtype=torch.float64).numpy()
        return self.find((np.arange(batch_size) + uniform) * (self.total / batch_size))


class ReadWriteLock:
    """Many readers (`with lock.read():`) or one writer (`with lock.write():`) across processes; a waiting writer
    goes before new readers."""

    def __init__(self):
        # Spawn-context primitives: they pickle to spawn children (and are inherited by fork children).
        context = multiprocessing.get_context("spawn")
        self._condition = context.Condition(context.Lock())
        self._state = context.RawArray("l", 3)  # active readers, active writer, waiting writers

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not (self._state[1] or self._state[2]))
            self._state[0] += 1
        try:
            yield
        finally:
            with self._condition:
                self._state[0] -= 1
                if self._state[0] == 0:
                    self._condition.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._condition:
            self._state[2] += 1
            self._condition.wait_for(lambda: not (self._state[0] or self._state[1]))
            self._state[2] -= 1
            self._state[1] = 1
        try:
            yield
        finally:
            with self._condition:
                self._state[1] = 0
                self._condition.notify_all()


def _named_leaves(prefix: str, value: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) for every leaf of a (nested) tuple / namedtuple of tensors."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif value is not None:
        names = value._fields if hasattr(value, "_fields") else range(len(value))
        for name, field in zip(names, value):
            yield from _named_leaves(f"{prefix}.{name}", field)


class ReplaySizeError(ValueError):
    """A replay size too small for one item (the scripts report it as a --buffer-size error)."""


class UniformReplayBuffer:
    """n-step transitions sampled uniformly; `example` is one step of the sampler's batch (`batch[0, 0]`), and `len()`
    counts the transitions that can be sampled. Its final-observation pool never evicts (one entry per stored step;
    FrameReplayBuffer is the one for images)."""

    interval = 1  # items (transitions) may start at every step; sequence buffers override

    def __init__(self, example: Any, size: int, n_envs: int, n_step: int = 1, gamma: float = 0.99,
                 share_memory: bool = False):
        if n_envs < 1 or n_step < 1:
            raise ValueError(f"n_envs and n_step must be >= 1, got n_envs={n_envs}, n_step={n_step}")
        self.n_envs = n_envs
        self.n_rows = size // n_envs // self.interval * self.interval  # ring length in time
        self.size = self.n_rows * n_envs
        self.n_step, self.gamma, self.share_memory = n_step, gamma, share_memory
        min_rows = self._tail + self._history + 1
        if self.n_rows < min_rows:
            raise ReplaySizeError(f"replay size {size} holds {self.n_rows} steps per env, fewer than one item needs "
                                  f"({min_rows}); raise the size to at least {min_rows * n_envs}")
        example = torchify_buffer(example)
        if example.next_observation is None:
            raise ValueError("replay needs samples with next_observation (the true final observation at episode ends)")
        stored = self._compress(example.observation)
        n_finals = self._final_capacity()
        ring = (self.n_rows, n_envs)
        self._tensors = {"observation": buffer_from_example(stored, ring, share_memory)}
        for name in _STEP_FIELDS:
            self._tensors[name] = buffer_from_example(getattr(example, name), ring, share_memory)
        self._tensors["final_observation"] = buffer_from_example(stored, (n_finals,), share_memory)
        # The next observation of the newest stored step, per env: where truncate_open_episodes cuts.
        self._tensors["newest_next_observation"] = buffer_from_example(stored, (n_envs,), share_memory)
        self._tensors["final_index"] = self._zeros((self.n_rows, n_envs), torch.int64)
        self._tensors["final_step"] = self._zeros((n_finals,), torch.int64)
        self._tensors["counters"] = self._zeros((3,), torch.int64)
        self._tensors["counters"][_EVICTED] = -1
        self._lock = ReadWriteLock() if share_memory else None
        self._views_of = self._views = None  # the last appended batch and its numpy views
        self._bind()

    @property
    def _tail(self) -> int:
        """Newest steps that cannot start an item: the n-step window and the next observation after it."""
        return self.n_step + 1

    @property
    def _history(self) -> int:
        """Steps before an item's first step that it also reads (frame stacks)."""
        return 0

    def _final_capacity(self) -> int:
        """Pool entries for final observations."""
        return self.size

    def _compress(self, observation: Any) -> Any:
        """What is stored of an observation `[..., *obs_shape]`."""
        return observation

    def _observation(self, row: np.ndarray, env: np.ndarray) -> Any:
        """Observations of steps (row [M], env [M]): [M, *obs_shape] (every leaf of a structured one)."""
        return self.observation[row, env]

    def _next_observation(self, row: np.ndarray, env: np.ndarray) -> Any:
        """True next observations of steps (row [M], env [M]): [M, *obs_shape] (every leaf)."""
        next_observation = self.observation[(row + 1) % self.n_rows, env]
        self._put_finals(next_observation, row, env)
        return next_observation

    def _ended(self, row: np.ndarray, env: np.ndarray) -> np.ndarray:
        """Whether steps (row, env) ended an episode (terminated or truncated), any index shape."""
        return self.terminated[row, env] | self.truncated[row, env]

    def _put_finals(self, target: Any, row: np.ndarray, env: np.ndarray) -> None:
        """Overwrite target [M, ...] with the stored final observation where step (row [M], env [M]) ended."""
        ended = self._ended(row, env)
        target[ended] = self.final_observation[self.final_index[row[ended], env[ended]]]

    def _zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return buffer_from_example(torch.zeros((), dtype=dtype), shape, self.share_memory)

    def _bind(self) -> None:
        """Expose every stored tensor as a numpy view attribute of the same name (zero copy)."""
        for name, value in self._tensors.items():
            setattr(self, name, numpify_buffer(value))

    def __getstate__(self) -> dict:
        state = {name: value for name, value in self.__dict__.items() if name not in self._tensors}
        state["_views_of"] = state["_views"] = None  # a batch of the appending process, not part of the buffer
        # Shared tensors pickle by reference; private ones are cloned so pickling never moves them to shared memory.
        clone = (lambda x: x) if self.share_memory else torch.clone
        state["_tensors"] = {name: buffer_map(clone, value) for name, value in self._tensors.items()}
        state.pop("tree", None)  # prioritized buffers rebuild it around the shared array in _bind
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bind()

    def _flat_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key, value in self._tensors.items():
            yield from _named_leaves(key, value)

    def _reading(self):
        return self._lock.read() if self._lock is not None else nullcontext()

    def _writing(self):
        return self._lock.write() if self._lock is not None else nullcontext()

    def _unit_range(self) -> tuple[int, int]:
        """Valid items as (first global unit, count); unit u starts at global step u * interval."""
        steps = int(self.counters[_STEPS])
        first = max(max(0, steps - self.n_rows) + self._history, int(self.counters[_EVICTED]) + 1)
        last = steps - self._tail
        first_unit = -(-first // self.interval)
        return first_unit, max(0, last // self.interval - first_unit + 1)

    @property
    def steps_to_first_item(self) -> int:
        """Steps per env to append before the first item can be sampled (the first whose history is stored)."""
        return self._tail + self.interval * -(-self._history // self.interval)

    def __len__(self) -> int:
        with self._reading():
            return self._unit_range()[1] * self.n_envs

    def append(self, samples: Any) -> None:
        """Store a sampler batch: a namedarraytuple with leading dims [T, B] (B = n_envs)."""
        with self._writing():
            self._append(samples)

    def _append(self, samples: Any) -> tuple[int, int]:
        """Write `samples` [T, B]; returns (global step of its first stored row, rows stored)."""
        samples = self._numpy_views(samples)
        n_steps, n_envs = samples.reward.shape[:2]
        if n_envs != self.n_envs:
            raise ValueError(f"replay was built for {self.n_envs} envs, got a batch with {n_envs}")
        steps_before = int(self.counters[_STEPS])
        units_before = self._unit_range()
        skip = max(0, n_steps - self.n_rows)  # a batch longer than the ring: only its tail survives
        if skip:
            samples = samples[skip:]
        first_step, n_stored = steps_before + skip, n_steps - skip
        start = first_step % self.n_rows
        # A slice when the batch does not wrap around the ring's end (a cheaper write than an index array).
        rows = slice(start, start + n_stored) if start + n_stored <= self.n_rows \
            else (first_step + np.arange(n_stored)) % self.n_rows
        self.observation[rows] = self._compress(samples.observation)
        for name in _STEP_FIELDS:
            getattr(self, name)[rows] = getattr(samples, name)
        self._store_finals(samples, first_step)
        self.newest_next_observation[:] = self._compress(samples.next_observation[-1])
        self.counters[_STEPS] = first_step + n_stored
        self._after_append(units_before, steps_before)
        return first_step, n_stored

    def _numpy_views(self, samples: Any) -> Any:
        """numpy views of a batch's leaves, cached per batch object (a sampler hands over the same one each collect)."""
        if samples is not self._views_of:
            self._views_of, self._views = samples, numpify_buffer(samples)
        return self._views

    def _store_finals(self, samples: Any, first_step: int) -> None:
        """Put the final observation of every episode end into the FIFO pool; note what it evicts."""
        time, env = np.nonzero(samples.terminated | samples.truncated)
        if len(time):
            self._pool(first_step + time, env, self._compress(samples.next_observation[time, env]))

    def _pool(self, steps: np.ndarray, env: np.ndarray, final_observation: Any) -> None:
        """Pool the stored form [M, ...] of the final observations of episodes that ended at (steps, env) [M]."""
        n_new, capacity, written = len(steps), len(self.final_step), int(self.counters[_FINALS])
        if written + n_new > capacity:
            # Items reading an evicted entry end at or before its step: they all become invalid.
            evicted = written + n_new - capacity - 1
            evicted_step = steps[evicted - written] if evicted >= written else self.final_step[evicted % capacity]
            self.counters[_EVICTED] = max(int(self.counters[_EVICTED]), int(evicted_step))
        keep = slice(max(0, n_new - capacity), n_new)
        slots = (written + np.arange(n_new)[keep]) % capacity
        self.final_observation[slots] = final_observation[keep]
        self.final_step[slots] = steps[keep]
        self.final_index[steps[keep] % self.n_rows, env[keep]] = slots
        self.counters[_FINALS] = written + n_new

    def _after_append(self, units_before: tuple[int, int], steps_before: int) -> None:
        """Hook run inside the write lock after the cursors moved (prioritized buffers update the tree)."""

    def truncate_open_episodes(self) -> None:
        """End every episode still open at the newest stored step as a time-limit truncation that bootstraps from
        that step's true next observation. A resumed run calls this after `load_state_dict`, so its sampler's new
        episodes do not read as continuations of the cut ones (n-step windows, frame stacks and sequences stop)."""
        with self._writing():
            steps = int(self.counters[_STEPS])
            if steps == 0:
                return
            row, env = (steps - 1) % self.n_rows, np.arange(self.n_envs)
            env = env[~self._ended(row, env)]
            if len(env) == 0:
                return
            units_before = self._unit_range()
            self.truncated[row, env] = True
            self._pool(np.full(len(env), steps - 1), env, self.newest_next_observation[env])
            self._after_append(units_before, steps)

    def sample(self, batch_size: int) -> Any:
        """ReplaySamples (sequence buffers: SequenceSamples) of `batch_size` items drawn uniformly (torch CPU)."""
        return self._sample(batch_size)

    def _sample(self, batch_size: int, beta: float = 0.0) -> Any:
        with self._reading():
            index, weight = self._draw(batch_size, beta)
            samples = self._gather(index, weight)
            # The id names the item, not its ring slot: a late update_priorities can tell a rewritten slot.
            ring_units = self.n_rows // self.interval
            end_unit = -(-int(self.counters[_STEPS]) // self.interval)  # one past the newest unit written
            unit = end_unit - 1 - (end_unit - 1 - index // self.n_envs) % ring_units
            samples.index.copy_(torch.from_numpy(unit * self.n_envs + index % self.n_envs))
            return samples

    def _draw(self, batch_size: int, beta: float) -> tuple[np.ndarray, np.ndarray]:
        """Flat ring indices [N] (ring unit * n_envs + env) and their importance weights [N]."""
        first_unit, n_units = self._unit_range()
        if n_units == 0:
            raise ValueError(f"replay has no valid items yet: append at least {self.steps_to_first_item} steps")
        draw = torch.randint(n_units * self.n_envs, (batch_size,)).numpy()
        unit = (first_unit + draw // self.n_envs) % (self.n_rows // self.interval)
        return unit * self.n_envs + draw % self.n_envs, np.ones(batch_size, dtype=np.float32)

    def _gather(self, index: np.ndarray, weight: np.ndarray) -> Any:
        """n-step transitions starting at flat indices `index` [N]."""
        row, env = index // self.n_envs, index % self.n_envs
        if self.n_step == 1:  # a one-step window never needs cutting
            last, n_step_return = row, self.reward[row, env]
            discount = self.gamma * ~self.terminated[row, env]
        else:
            window = (row[:, None] + np.arange(self.n_step)) % self.n_rows  # [N, n_step]
            terminated = self.terminated[window, env[:, None]]
            ended = terminated | self.truncated[window, env[:, None]]
            # Step j of the window counts while no episode ended at steps 0..j-1 of it.
            in_window = np.ones_like(ended)
            in_window[:, 1:] = ~np.logical_or.accumulate(ended[:, :-1], axis=1)
            n_step_return = (self.reward[window, env[:, None]] * in_window) @ (self.gamma ** np.arange(self.n_step))
            length = in_window.sum(axis=1)
            discount = self.gamma**length * ~terminated[np.arange(len(index)), length - 1]
            last = window[np.arange(len(index)), length - 1]
        return ReplaySamples(
            observation=torchify_buffer(self._observation(row, env)), action=torch.from_numpy(self.action[row, env]),
            n_step_return=torch.from_numpy(n_step_return.astype(np.float32)),
            bootstrap_observation=torchify_buffer(self._next_observation(last, env)),
            discount=torch.from_numpy(discount.astype(np.float32)),
            weight=torch.from_numpy(np.asarray(weight, dtype=np.float32)),
            index=torch.from_numpy(np.asarray(index, dtype=np.int64)),
        )

    def state_dict(self) -> dict[str, Any]:
        """Every stored tensor (cloned) and the layout, as plain tensors and ints (`weights_only` loadable)."""
        with self._reading():
            state = {name: tensor.clone() for name, tensor in self._flat_tensors()}
        return {"n_rows": self.n_rows, "n_envs": self.n_envs, **state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy a `state_dict()` into this buffer's (possibly shared) memory; the layout must match."""
        rows, envs = state.get("n_rows"), state.get("n_envs")
        if (rows, envs) != (self.n_rows, self.n_envs):
            raise ValueError(f"replay checkpoint holds {rows} x {envs} steps, this buffer {self.n_rows} x {self.n_envs}"
                             ": build the buffer with the checkpoint's size and n_envs")
        with self._writing():
            for name, tensor in self._flat_tensors():
                if name not in state or state[name].shape != tensor.shape:
                    raise ValueError(f"replay checkpoint: {name!r} missing or shaped differently; rebuild the buffer")
                tensor.copy_(state[name])


class PrioritizedReplayBuffer(UniformReplayBuffer):
    """n-step transitions drawn with probability ∝ (priority + eps)^alpha, with importance weights (Schaul et al. 2016).
    Takes UniformReplayBuffer's arguments plus `alpha`, `beta` (the importance-weight exponent when `sample` is not
    given one) and `default_priority`; new items enter at the largest priority seen, at least `default_priority`."""

    eps = 1e-6

    def __init__(self, *args: Any, alpha: float = 0.6, beta: float = 0.4, default_priority: float = 1.0, **kwargs: Any):
        self.alpha, self.beta = alpha, beta
        super().__init__(*args, **kwargs)
        n_items = self.size // self.interval
        self._tensors["priority"] = self._zeros((n_items,), torch.float64)  # (p + eps)^alpha, valid or not
        self._tensors["sum_tree"] = self._zeros((SumTree.array_size(n_items),), torch.float64)
        self._tensors["max_priority"] = self._zeros((1,), torch.float64).fill_(default_priority**alpha)
        self._bind()

    def _bind(self) -> None:
        super()._bind()
        if "sum_tree" in self._tensors:
            self.tree = SumTree(self.size // self.interval, self.sum_tree)

    def sample(self, batch_size: int, beta: float | None = None) -> Any:
        """`batch_size` items drawn by priority; `beta` (default self.beta) sets the importance-weight exponent."""
        return self._sample(batch_size, self.beta if beta is None else beta)

    def _draw(self, batch_size: int, beta: float) -> tuple[np.ndarray, np.ndarray]:
        n_valid = self._unit_range()[1] * self.n_envs
        total = self.tree.total
        if n_valid == 0 or total <= 0:
            raise ValueError(f"replay has no valid items yet: append at least {self.steps_to_first_item} steps")
        index = self.tree.sample(batch_size)
        weight = (n_valid * self.tree.get(index) / total) ** -beta
        return index, (weight / weight.max()).astype(np.float32)

    def update_priorities(self, index: torch.Tensor | np.ndarray, priority: torch.Tensor | np.ndarray) -> None:
        """Set the priority of sampled items `index` [N] (their ids) to `priority` [N] >= 0 (e.g. |TD error|). An
        item that left the buffer since it was sampled (its slot rewritten, or its episode's final observation
        evicted) is skipped: the item now in its slot keeps the priority it entered with."""
        index = torch.as_tensor(index).detach().cpu().long().numpy()
        value = (torch.as_tensor(priority).detach().cpu().double().numpy() + self.eps) ** self.alpha
        with self._writing():
            first_unit, n_units = self._unit_range()
            unit = index // self.n_envs
            current = (unit >= first_unit) & (unit < first_unit + n_units)
            slot = index[current] % ((self.n_rows // self.interval) * self.n_envs)
            self.priority[slot] = value[current]
            self.tree.update(slot, value[current])
            self.max_priority[0] = max(self.max_priority[0], value.max(initial=0.0))

    def _after_append(self, units_before: tuple[int, int], steps_before: int) -> None:
        """New items get the max priority; the tree is refreshed where items were written or changed validity."""
        first_before, count_before = units_before
        first_unit, n_valid_units = self._unit_range()
        ring_units = self.n_rows // self.interval
        end_unit = -(-int(self.counters[_STEPS]) // self.interval)  # one past the newest unit written
        oldest_unit = end_unit - ring_units
        written = np.arange(max(-(-steps_before // self.interval), oldest_unit), end_unit)
        priority = self.priority.reshape(ring_units, self.n_envs)
        priority[written % ring_units] = self.max_priority[0]
        changed = np.concatenate([np.arange(first_before, first_unit),  # left the valid range at the old end
                                  np.arange(first_before + count_before, first_unit + n_valid_units),  # became valid
                                  written])
        changed = np.unique(changed[changed >= oldest_unit])
        valid = (changed >= first_unit) & (changed < first_unit + n_valid_units)
        rows = changed % ring_units
        index = (rows[:, None] * self.n_envs + np.arange(self.n_envs)).ravel()
        self.tree.update(index, (priority[rows] * valid[:, None]).ravel())


class FrameReplayBuffer(UniformReplayBuffer):
    """Uniform n-step replay of frame stacks `[K, H, W]` that stores each frame once; other arguments go to the class
    it is combined with. Stacks are rebuilt from the frames of the same episode, slots before its first frame repeating
    that frame (as envs.FrameStack pads after a reset; `frame_padding="repeat"` is the only padding). The final-frame
    pool holds `final_capacity` (default max(size // 16, n_envs)): items whose final frame was evicted stop being
    sampled."""

    def __init__(self, example: Any, *args: Any, frame_padding: str = "repeat", final_capacity: int | None = None,
                 **kwargs: Any):
        if frame_padding != "repeat":
            raise ValueError(f"frame_padding must be 'repeat' (as envs.FrameStack pads), got {frame_padding!r}")
        if isinstance(example.observation, tuple):
            raise UsageError(f"frame deduplication needs a single frame-stack observation, not a Dict / Tuple one "
                             f"(fields {', '.join(example.observation._fields)}): use a buffer class without "
                             f"frames (UniformReplayBuffer, PrioritizedReplayBuffer, SequenceReplayBuffer...)")
        shape = tuple(example.observation.shape)
        if len(shape) < 2:
            raise ValueError(f"frame replay needs stacked observations [K, *frame_shape], got {shape}")
        self.frame_stack = shape[0]
        self._newest_frame = (Ellipsis, -1) + (slice(None),) * (len(shape) - 1)
        self.final_capacity = final_capacity
        super().__init__(example, *args, **kwargs)

    @property
    def _history(self) -> int:
        return self.frame_stack - 1

    def _final_capacity(self) -> int:
        return self.final_capacity or max(self.size // 16, self.n_envs)

    def _compress(self, observation: Any) -> Any:
        return observation[self._newest_frame]

    def _stack(self, newest: np.ndarray, env: np.ndarray, ended_before: np.ndarray) -> np.ndarray:
        """Stacks [M, K, ...] with newest frame at row `newest` [M], cut at the first True of `ended_before` [M, K-1]:
        `ended_before[:, k - 1]` says whether an episode ended at the k-th older frame, so that frame and all older
        ones belong to an earlier episode, and the episode's first frame fills their slots."""
        n_older = (~np.logical_or.accumulate(ended_before, axis=1)).sum(axis=1)
        offset = np.minimum(np.arange(self.frame_stack - 1, -1, -1), n_older[:, None])  # oldest slot first
        return self.observation[(newest[:, None] - offset) % self.n_rows, env[:, None]]

    def _observation(self, row: np.ndarray, env: np.ndarray) -> np.ndarray:
        older = (row[:, None] - np.arange(1, self.frame_stack)) % self.n_rows
        return self._stack(row, env, self._ended(older, env[:, None]))

    def _next_observation(self, row: np.ndarray, env: np.ndarray) -> np.ndarray:
        # The next stack is this step's shifted by one frame: its newest frame is the next step's (or, at an
        # episode end, the pooled final frame), and this step's own frame belongs to it, so only earlier ends cut it.
        older = (row[:, None] - np.arange(self.frame_stack - 1)) % self.n_rows
        ended_before = self._ended(older, env[:, None])
        ended_before[:, :1] = False
        stack = self._stack((row + 1) % self.n_rows, env, ended_before)
        self._put_finals(stack[:, -1], row, env)
        return stack


class PrioritizedFrameReplayBuffer(FrameReplayBuffer, PrioritizedReplayBuffer):
    """FrameReplayBuffer sampled by priority: arguments of both (alpha, beta, default_priority, frame_padding...)."""


def _write_leaves(destination: Any, index: Any, source: Any) -> None:
    """destination[index] = source for every leaf of matching (nested) structures."""
    if isinstance(destination, np.ndarray):
        destination[index] = source
        return
    for destination_leaf, source_leaf in zip(destination, source):
        if destination_leaf is not None:
            _write_leaves(destination_leaf, index, source_leaf)


class SequenceReplayBuffer(UniformReplayBuffer):
    """Sequences of `burn_in + train_length + n_step` steps for recurrent Q-learning (R2D1), starting every
    `rnn_state_interval` steps, where the recurrent state the agent had before that step is stored (`size //
    n_envs` is rounded down to a multiple of it). They may cross episode boundaries (the learner resets on
    terminated / truncated) but never the write cursor."""

    def __init__(self, example: Any, size: int, n_envs: int, rnn_state_example: Any, burn_in: int = 40,
                 train_length: int = 40, n_step: int = 5, rnn_state_interval: int = 40, **kwargs: Any):
        if rnn_state_interval < 1 or burn_in < 0 or train_length < 1:
            raise ValueError("need rnn_state_interval >= 1, burn_in >= 0 and train_length >= 1")
        self.interval, self.burn_in, self.train_length = rnn_state_interval, burn_in, train_length
        self.sequence_length = burn_in + train_length + n_step
        super().__init__(example, size, n_envs, n_step=n_step, **kwargs)
        self._tensors["rnn_state"] = buffer_from_example(torchify_buffer(rnn_state_example),
                                                         (self.n_rows // self.interval, n_envs), self.share_memory)
        self._bind()

    @property
    def _tail(self) -> int:
        return self.sequence_length

    def append(self, samples: Any, rnn_state: Any) -> None:
        """Store a sampler batch [T, B] and the (nested) rnn state [T, B, ...] the agent had before each step."""
        rnn_state = numpify_buffer(rnn_state)
        with self._writing():
            first_step, n_stored = self._append(samples)
            steps = np.arange(first_step, first_step + n_stored)
            starts = steps % self.interval == 0
            source = samples.reward.shape[0] - n_stored + np.nonzero(starts)[0]
            units = (steps[starts] // self.interval) % (self.n_rows // self.interval)
            _write_leaves(self.rnn_state, units, buffer_map(lambda leaf: leaf[source], rnn_state))

    def _gather(self, index: np.ndarray, weight: np.ndarray) -> Any:
        """Sequences [L, N, ...] starting at items `index` [N], with their stored rnn state [N, ...]."""
        unit, env = index // self.n_envs, index % self.n_envs
        length, batch = self.sequence_length, len(index)
        row = ((unit * self.interval)[None] + np.arange(length)[:, None]) % self.n_rows
        env_of_row = np.broadcast_to(env, row.shape)
        flat_row, flat_env = row.ravel(), env_of_row.ravel()
        observation = self._observation(flat_row, flat_env)
        ended = self._ended(flat_row, flat_env)
        next_observation = buffer_map(np.zeros_like, observation)
        next_observation[ended] = self._next_observation(flat_row[ended], flat_env[ended])
        time_major = lambda array: torch.from_numpy(array.reshape(length, batch, *array.shape[1:]))  # [L, N, ...]
        steps = {name: torch.from_numpy(getattr(self, name)[row, env_of_row]) for name in _STEP_FIELDS}
        return SequenceSamples(
            observation=buffer_map(time_major, observation), next_observation=buffer_map(time_major, next_observation),
            rnn_state=buffer_map(lambda leaf: torch.from_numpy(leaf[unit, env]), self.rnn_state),
            weight=torch.from_numpy(np.asarray(weight, dtype=np.float32)),
            index=torch.from_numpy(np.asarray(index, dtype=np.int64)), **steps,
        )


class PrioritizedSequenceReplayBuffer(SequenceReplayBuffer, PrioritizedReplayBuffer):
    """SequenceReplayBuffer sampled by priority; a sequence's priority is eta max|δ| + (1 - eta) mean|δ|."""

    def __init__(self, *args: Any, eta: float = 0.9, **kwargs: Any):
        self.eta = eta
        super().__init__(*args, **kwargs)

    def update_priorities(self, index: torch.Tensor | np.ndarray, td_abs: torch.Tensor | np.ndarray) -> None:
        """Set the priorities of sampled sequences `index` [N] from their absolute TD errors `td_abs` [L', N]."""
        td_abs = torch.as_tensor(td_abs).detach().cpu().double().abs()
        priority = self.eta * td_abs.max(dim=0).values + (1.0 - self.eta) * td_abs.mean(dim=0)
        super().update_priorities(index, priority)


class PrioritizedFrameSequenceReplayBuffer(FrameReplayBuffer, PrioritizedSequenceReplayBuffer):
    """PrioritizedSequenceReplayBuffer of frame stacks, each frame stored once (see FrameReplayBuffer)."""
