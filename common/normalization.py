"""Running normalisation statistics as `nn.Module`s: observation normalisation and reward scaling.

The statistics are buffers: checkpoints save them, `sampler.sync(model)` ships them to the sampler workers, and
evaluation uses them frozen. Scripts update them in the main process from each collected [T, B] batch, never per
step in the workers, so every copy of the model sees the same statistics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from common import distributed
from common.namedarraytuple import buffer_map_named


class RunningMeanStd(nn.Module):
    """Running mean and variance of a stream of batches of `shape`; forward standardises and clips. Before the first
    `update` the statistics are (mean 0, variance 1): forward only clips."""

    def __init__(self, shape: tuple[int, ...] = (), clip: float = 10.0, epsilon: float = 1e-8):
        super().__init__()
        self.clip, self.epsilon = clip, epsilon
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch `[N, *shape]` (any leading dims) into the statistics (Chan et al.'s parallel update)."""
        x = x.reshape((-1,) + self.mean.shape).double()
        n, batch_mean, batch_var = x.shape[0], x.mean(0), x.var(0, correction=0)
        if distributed.world_size() > 1:  # the batch of every rank, so replicas keep equal statistics
            sums = distributed.all_reduce_sum(torch.stack([torch.full_like(batch_mean, n), x.sum(0), (x * x).sum(0)]))
            n = sums[0].reshape(-1)[0]
            batch_mean = sums[1] / n
            batch_var = (sums[2] / n - batch_mean**2).clamp_min(0)
        delta, total = batch_mean - self.mean, self.count + n
        self.var.copy_((self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total)
        self.mean.add_(delta * n / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(x - mean) / std`, clipped to [-clip, clip], as float32; any leading dims."""
        std = torch.sqrt(self.var.float() + self.epsilon)
        return ((x.float() - self.mean.float()) / std).clamp(-self.clip, self.clip)


class ObservationNormalizer(nn.Module):
    """Per-leaf running standardisation of observations shaped like `example` (an array, or a namedarraytuple for Dict /
    Tuple spaces; no leading dims): each float leaf has a `RunningMeanStd` in `stats`, keyed by its path (`observation`,
    `observation/state/position`); integer leaves (uint8 images, discrete values) pass through unchanged."""

    def __init__(self, example: Any, clip: float = 10.0):
        super().__init__()
        self.stats = nn.ModuleDict()

        def add(path: str, leaf: Any) -> None:
            leaf = torch.as_tensor(leaf)
            if leaf.is_floating_point():
                self.stats[path] = RunningMeanStd(tuple(leaf.shape), clip)

        buffer_map_named(add, example, "observation")

    @torch.no_grad()
    def update(self, observation: Any) -> None:
        """Merge a batch (every leaf `[N, *leaf_shape]`, any leading dims) into each float leaf's statistics."""

        def update_leaf(path: str, leaf: torch.Tensor) -> None:
            if path in self.stats:
                self.stats[path].update(leaf)

        buffer_map_named(update_leaf, observation, "observation")

    def forward(self, observation: Any) -> Any:
        """The observation with each float leaf standardised and clipped (float32); integer leaves as they are."""
        return buffer_map_named(lambda path, leaf: self.stats[path](leaf) if path in self.stats else leaf, observation,
                                "observation")


class RewardScaler(nn.Module):
    """Divides rewards by the std of the running discounted returns (not centred, so signs stay). Each env's return
    carries over between batches, restarts at episode ends and is not checkpointed (resumed envs restart)."""

    def __init__(self, n_envs: int, gamma: float, clip: float = 10.0):
        super().__init__()
        self.gamma, self.clip = gamma, clip
        self.return_stats = RunningMeanStd()
        self.register_buffer("running_return", torch.zeros(n_envs, dtype=torch.float64), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "running_return", None)  # in checkpoints that kept it: the envs restart anyway
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def forward(self, reward: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Update the statistics with a batch (reward, done: [T, B]) and return its scaled rewards [T, B]."""
        returns = reward.new_empty(reward.shape, dtype=torch.float64)
        for t in range(reward.shape[0]):
            self.running_return.mul_(self.gamma).add_(reward[t])
            returns[t] = self.running_return
            self.running_return.masked_fill_(done[t], 0.0)
        self.return_stats.update(returns)
        scale = torch.sqrt(self.return_stats.var + self.return_stats.epsilon).float()
        return (reward / scale).clamp(-self.clip, self.clip)
