"""Network building blocks that several scripts share.

The policy-gradient scripts' orthogonal initialisation and Nature CNN torso; `ObservationEncoder`, the input stage for
array or Dict observations; for ddpg.py, td3.py and sac.py a critic ensemble with stacked weights (one batched matmul
per layer), the action scaling between the actor's [-1, 1] and the env's bounds, and optimizer and compile helpers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.namedarraytuple import buffer_leaves, buffer_map_named


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Module:
    """`layer` with orthogonal weights of gain `std` and a constant bias (the PPO / A2C initialisation)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class NatureCNN(nn.Module):
    """Mnih et al. 2015's torso: three convolutions and a 512-unit layer on [C, 84, 84] uint8 frames."""

    def __init__(self, in_channels: int, out_features: int = 512):
        super().__init__()
        self.net = nn.Sequential(
            layer_init(nn.Conv2d(in_channels, 32, 8, stride=4)), nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(),
            nn.Flatten(), layer_init(nn.Linear(64 * 7 * 7, out_features)), nn.ReLU(),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.float() / 255.0)


class ObservationEncoder(nn.Module):
    """Features [..., out_features] of observations shaped like `example` (an array or a namedarraytuple): a NatureCNN
    for each uint8 [C, 84, 84] leaf (in `cnns`, keyed by its path, e.g. `observation/pixels`), any other leaf flattened
    to float32 (uint8 scaled to [0, 1]), concatenated in field order. Leading dims of any number are kept."""

    def __init__(self, example: Any, cnn_features: int = 512):
        super().__init__()
        self.cnns = nn.ModuleDict()
        self.leaves: list[tuple[str, int, int]] = []  # (path, dims without leading dims, features), in field order
        self.out_features = 0

        def add(path: str, leaf: Any) -> None:
            leaf = torch.as_tensor(leaf)
            if leaf.dtype == torch.uint8 and leaf.dim() == 3 and tuple(leaf.shape[1:]) == (84, 84):  # frame stack
                self.cnns[path] = NatureCNN(leaf.shape[0], cnn_features)
                size = cnn_features
            else:
                size = leaf.numel()
            self.leaves.append((path, leaf.dim(), size))
            self.out_features += size

        buffer_map_named(add, example, "observation")

    def forward(self, observation: Any) -> torch.Tensor:
        if not self.cnns and len(self.leaves) == 1 and self.leaves[0][1] == 1 and isinstance(observation, torch.Tensor):
            # A plain vector observation (the common case): the same values as below, without the copy.
            return observation.float() / 255.0 if observation.dtype == torch.uint8 else observation.float()
        features = []
        for (path, n_dims, size), leaf in zip(self.leaves, buffer_leaves(observation), strict=True):
            leading = leaf.shape[: leaf.dim() - n_dims]
            if path in self.cnns:
                feature = self.cnns[path](leaf.reshape(-1, *leaf.shape[len(leading):]))
            else:
                feature = leaf.float() / 255.0 if leaf.dtype == torch.uint8 else leaf.float()
            features.append(feature.reshape(*leading, size))  # (not -1: a leading dim may be 0)
        return torch.cat(features, dim=-1)


def observation_encoder(example: Any, cnn_features: int = 512) -> tuple[ObservationEncoder, int]:
    """An `ObservationEncoder` for observations shaped like `example` (no leading dims) and its output size."""
    encoder = ObservationEncoder(example, cnn_features)
    return encoder, encoder.out_features


class EnsembleLinear(nn.Module):
    """`n` independent linear layers applied in one batched matmul: [n, B, in] -> [n, B, out]."""

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialization, per member
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, detach: bool = False, first: int | None = None) -> torch.Tensor:
        """`first`: only the first members (x is then [first, B, in]); `detach`: no gradient to the weights."""
        weight, bias = self.weight[:first], self.bias[:first]
        if detach:
            weight, bias = weight.detach(), bias.detach()
        return torch.baddbmm(bias, x, weight)


class Critics(nn.Module):
    """`n` Q-functions Q(s, a), MLPs with stacked weights; `forward` returns [n, B] ([first, B] with `first`).
    Observations are shaped like `example` (an array or a namedarraytuple); one `ObservationEncoder` serves all `n`."""

    def __init__(self, example: Any, act_dim: int, hidden: int, n: int = 2):
        super().__init__()
        self.n = n
        self.encoder, obs_dim = observation_encoder(example)
        sizes = [obs_dim + act_dim, hidden, hidden, 1]
        self.layers = nn.ModuleList(EnsembleLinear(n, i, o) for i, o in zip(sizes[:-1], sizes[1:]))

    def forward(self, obs: Any, action: torch.Tensor, detach: bool = False, first: int | None = None) -> torch.Tensor:
        """`detach`: no gradient reaches the critics' parameters (it still reaches `action`)."""
        features = self.encoder(obs)
        x = torch.cat([features.detach() if detach else features, action], -1).expand(first or self.n, -1, -1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x, detach, first))
        return self.layers[-1](x, detach, first).squeeze(-1)


class ScaledActions(nn.Module):
    """Base of the actors: they act in [-1, 1], and `to_env` / `from_env` map to and from the env's bounds."""

    def __init__(self, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.register_buffer("action_scale", torch.as_tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.as_tensor((high + low) / 2.0, dtype=torch.float32))

    def to_env(self, action: torch.Tensor) -> torch.Tensor:
        return self.action_bias + self.action_scale * action

    def from_env(self, action: torch.Tensor) -> torch.Tensor:
        return (action - self.action_bias) / self.action_scale

    def uniform_action(self, obs: Any) -> torch.Tensor:
        """Uniformly random actions in [-1, 1] [B, act_dim] for observations [B, ...] (the warm-up before learning)."""
        leaf = buffer_leaves(obs)[0]
        return torch.rand((leaf.shape[0],) + self.action_scale.shape, device=leaf.device) * 2.0 - 1.0


def qpg_defaults(args: Any, env) -> bool:
    """Fill the ddpg / td3 / sac flags left at None by the env's kind; returns whether it is a MuJoCo env. MuJoCo:
    256 hidden units and 10000 uniformly random steps before the first update; otherwise 64 units and 1000."""
    mujoco = "mujoco" in type(env.unwrapped).__module__
    if args.hidden_size is None:
        args.hidden_size = 256 if mujoco else 64
    if args.learning_starts is None:
        args.learning_starts = 10_000 if mujoco else 1_000
    return mujoco


def adam(params: Iterable, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam with its fused kernel where torch has one (CUDA, CPU), else the foreach implementation."""
    return torch.optim.Adam(params, lr=lr, **({"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}))


def compile_fn(fn: Callable, compile: bool, cudagraphs: bool = False) -> Callable:
    """torch.compile `fn` with `compile`; `cudagraphs` also captures it in CUDA graphs ('reduce-overhead')."""
    if cudagraphs:
        return torch.compile(fn, mode="reduce-overhead")
    return torch.compile(fn) if compile else fn
