"""Pure tensor functions for RL targets and updates: tensors in, tensors out, on any device.

Time-major layout: `[T, B]` is (time, environment). `terminated` and `truncated` stay separate: a terminated step
does not bootstrap, a truncated step bootstraps from the value of the episode's true final observation.
"""

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.namedarraytuple import buffer_leaves


def gae_advantages(reward: Tensor, value: Tensor, next_value: Tensor, terminated: Tensor, truncated: Tensor,
                   gamma: float, gae_lambda: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), truncation-aware; returns (advantage, returns).
    All inputs and outputs are `[T, B]`; `next_value[t]` is the value of step t's true next observation."""
    not_terminated = 1.0 - terminated.to(value.dtype)
    # The advantage recursion stops at any episode end; only termination also drops the bootstrap value.
    continues = not_terminated * (1.0 - truncated.to(value.dtype))
    delta = reward + gamma * not_terminated * next_value - value
    advantage, next_advantage = torch.empty_like(value), torch.zeros_like(value[0])
    for t in range(value.shape[0] - 1, -1, -1):
        next_advantage = delta[t] + gamma * gae_lambda * continues[t] * next_advantage
        advantage[t] = next_advantage
    return advantage, advantage + value


def n_step_returns(reward: Tensor, terminated: Tensor, truncated: Tensor, n_step: int,
                   gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """n-step discounted reward sums, cut at episode ends and at the end of the batch; n_step < 1 is a ValueError.
    Inputs `[T, B]`; returns `(returns [T, B], discount [T, B], last_index [T, B] long)`: the target of step t is
    `returns + discount * Q(next observation of step last_index)`, where `discount` is
    `gamma ** m * (1 - terminated[last_index])` for a window of m steps."""
    if n_step < 1:
        raise ValueError(f"n_step must be >= 1, got {n_step}")
    T = reward.shape[0]
    max_length = min(n_step, T)
    # A window stops after an episode end and after the batch's last step; padding keeps slices in range.
    stops = terminated.bool() | truncated.bool()
    stops[-1] = True
    stops = torch.cat([stops, stops.new_ones((max_length - 1, *stops.shape[1:]))])
    padded_reward = torch.cat([reward, reward.new_zeros((max_length - 1, *reward.shape[1:]))])
    returns = reward.clone()
    window_length = torch.ones_like(reward, dtype=torch.long)
    in_window = torch.ones_like(stops[:T])
    for k in range(1, max_length):
        in_window = in_window & ~stops[k - 1 : k - 1 + T]
        returns = returns + (gamma**k) * padded_reward[k : k + T] * in_window.to(reward.dtype)
        window_length = window_length + in_window.long()
    time_index = torch.arange(T, device=reward.device).view(T, *([1] * (reward.dim() - 1)))
    last_index = time_index + window_length - 1
    terminated_at_last = terminated.to(reward.dtype).gather(0, last_index)
    discount = gamma ** window_length.to(reward.dtype) * (1.0 - terminated_at_last)
    return returns, discount, last_index


def value_rescale(x: Tensor, eps: float = 1e-3) -> Tensor:
    """R2D2 value rescaling h(x) = sign(x) (sqrt(|x| + 1) - 1) + eps x (Kapturowski et al. 2019); any shape."""
    return torch.sign(x) * (torch.sqrt(x.abs() + 1.0) - 1.0) + eps * x


def inverse_value_rescale(x: Tensor, eps: float = 1e-3) -> Tensor:
    """Closed-form inverse of `value_rescale`; any shape."""
    # With s = sqrt(|h^-1(x)| + 1), h = x solves eps s^2 + s - (1 + eps + |x|) = 0. Its root is written as
    # 2c / (1 + sqrt(1 + 4 eps c)), not (sqrt(1 + 4 eps c) - 1) / (2 eps): no cancellation, and eps = 0 works.
    c = x.abs() + 1.0 + eps
    s = 2.0 * c / (1.0 + torch.sqrt(1.0 + 4.0 * eps * c))
    return torch.sign(x) * (s - 1.0) * (s + 1.0)


def categorical_projection(next_probs: Tensor, reward: Tensor, discount: Tensor, atoms: Tensor) -> Tensor:
    """C51 projection (Bellemare et al. 2017) of `next_probs` on `reward + discount * atoms` onto `atoms`.
    `next_probs` `[N, A]`, `reward` `[N]`, `discount` `[N]` (gamma^n (1 - terminated) included), `atoms` `[A]`
    evenly spaced; returns `[N, A]`."""
    n_atoms = atoms.shape[0]
    v_min, v_max = atoms[0], atoms[-1]
    target_atoms = (reward.unsqueeze(-1) + discount.unsqueeze(-1) * atoms).clamp(v_min, v_max)
    position = ((target_atoms - v_min) / ((v_max - v_min) / (n_atoms - 1))).clamp(0, n_atoms - 1)
    # Each target's mass is split between the neighbours `lower` and `lower + 1`; capping `lower` at A - 2 lets a
    # target exactly on an atom (v_max included) give all of it to that atom.
    lower = position.floor().clamp(max=n_atoms - 2)
    upper_weight = position - lower
    lower = lower.long()
    projected = torch.zeros_like(next_probs)
    projected.scatter_add_(-1, lower, next_probs * (1.0 - upper_weight))
    projected.scatter_add_(-1, lower + 1, next_probs * upper_weight)
    return projected


def polyak_update(target_params: Iterable[Tensor], source_params: Iterable[Tensor], tau: float) -> None:
    """In place, target <- (1 - tau) target + tau source, for each pair of tensors; tau = 1 copies."""
    targets, sources = list(target_params), list(source_params)
    if len(targets) != len(sources):
        raise ValueError(f"polyak_update: {len(targets)} target tensors but {len(sources)} source tensors")
    with torch.no_grad():
        if tau == 1.0:
            torch._foreach_copy_(targets, sources)
        else:
            torch._foreach_lerp_(targets, sources, tau)


def linear_schedule(start: float, end: float, duration: float, step: float) -> float:
    """`start` at step 0, moving linearly to `end` at step `duration`, `end` after (a duration < 1 counts as 1)."""
    duration = max(duration, 1)
    return end if step >= duration else start + (end - start) * (step / duration)


def epsilon_greedy(greedy: Callable[[], Tensor], observation: Any, n_actions: int, epsilon: float) -> Tensor:
    """Epsilon-greedy actions [B] for observations [B, ...] (a tensor or a namedarraytuple of them): each env's action
    is uniform over n_actions with probability `epsilon`, else the one `greedy()` returns. The coins, then the uniform
    actions, come from torch's CPU generator at every call whatever the coins show, so the random streams depend on
    neither the network nor the device; `greedy()` (the forward pass) runs only when some env exploits. With `epsilon`
    <= 0 it is `greedy()`, drawing nothing."""
    if epsilon <= 0:
        return greedy()
    leaf = buffer_leaves(observation)[0]
    threshold = float(np.float32(epsilon))  # the coins are float32: compare them with epsilon in float32
    explore = [coin < threshold for coin in torch.rand(leaf.shape[0]).tolist()]  # host-side: no device sync
    uniform = torch.randint(n_actions, (leaf.shape[0],))
    if all(explore):
        return uniform.to(leaf.device)
    action = greedy()
    if any(explore):
        action = torch.where(torch.tensor(explore, device=action.device), uniform.to(action.device), action)
    return action


def explained_variance(y_pred: Tensor, y_true: Tensor) -> float:
    """1 - Var[y_true - y_pred] / Var[y_true] over all elements; nan when y_true is constant."""
    y_pred, y_true = y_pred.flatten(), y_true.flatten()
    var_true = torch.var(y_true, correction=0)
    ratio = torch.var(y_true - y_pred, correction=0) / var_true
    result, var_true = torch.stack([1.0 - ratio, var_true]).tolist()
    return float("nan") if var_true == 0 else result
