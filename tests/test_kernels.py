"""common.kernels against brute-force references that loop over every (t, b) in plain Python."""

import math

import pytest
import torch
from torch.testing import assert_close

from common.kernels import (
    categorical_projection,
    epsilon_greedy,
    explained_variance,
    gae_advantages,
    inverse_value_rescale,
    linear_schedule,
    n_step_returns,
    polyak_update,
    value_rescale,
)

T, B = 17, 5
SEEDS = [0, 1, 2, 3, 4]


def random_rollout(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Random [T, B] rollout with episode ends at random places plus a few forced ones."""
    generator = torch.Generator().manual_seed(seed)
    terminated = torch.rand(T, B, generator=generator) < 0.15
    truncated = torch.rand(T, B, generator=generator) < 0.15
    terminated[3, 0], truncated[3, 0] = True, False  # env 0: a termination, then a truncation later
    terminated[9, 0], truncated[9, 0] = False, True
    terminated[-1, 1], truncated[-1, 1] = False, True  # truncation on the last step
    terminated[-1, 2], truncated[-1, 2] = True, False  # termination on the last step
    terminated[5, 3], truncated[5, 3] = True, True  # both flags on one step
    terminated[:, 4], truncated[:, 4] = False, False  # no episode end at all
    return {
        "reward": torch.randn(T, B, generator=generator, dtype=dtype),
        "value": torch.randn(T, B, generator=generator, dtype=dtype),
        "next_value": torch.randn(T, B, generator=generator, dtype=dtype),
        "terminated": terminated,
        "truncated": truncated,
    }


def reference_gae(reward, value, next_value, terminated, truncated, gamma, gae_lambda):
    advantage = torch.zeros_like(value)
    for b in range(value.shape[1]):
        for t in reversed(range(value.shape[0])):
            term, trunc = float(terminated[t, b]), float(truncated[t, b])
            delta = reward[t, b] + gamma * (1 - term) * next_value[t, b] - value[t, b]
            following = 0.0 if t == value.shape[0] - 1 else advantage[t + 1, b]
            advantage[t, b] = delta + gamma * gae_lambda * (1 - term) * (1 - trunc) * following
    return advantage, advantage + value


def reference_n_step(reward, terminated, truncated, n_step, gamma):
    returns = torch.zeros_like(reward)
    discount = torch.zeros_like(reward)
    last_index = torch.zeros(reward.shape, dtype=torch.long)
    for b in range(reward.shape[1]):
        for t in range(reward.shape[0]):
            total, length = 0.0, 0
            for j in range(n_step):
                if t + j >= reward.shape[0]:
                    break
                total += gamma**j * float(reward[t + j, b])
                length += 1
                if terminated[t + j, b] or truncated[t + j, b]:
                    break
            last = t + length - 1
            returns[t, b] = total
            discount[t, b] = gamma**length * (1.0 - float(terminated[last, b]))
            last_index[t, b] = last
    return returns, discount, last_index


def reference_projection(next_probs, reward, discount, atoms):
    """Algorithm 1 of Bellemare et al. 2017, one sample and one atom at a time."""
    n_atoms = len(atoms)
    v_min, v_max = float(atoms[0]), float(atoms[-1])
    delta_z = (v_max - v_min) / (n_atoms - 1)
    projected = torch.zeros_like(next_probs)
    for i in range(next_probs.shape[0]):
        for j in range(n_atoms):
            target = float(reward[i]) + float(discount[i]) * float(atoms[j])
            target = min(max(target, v_min), v_max)
            position = (target - v_min) / delta_z
            lower, upper = math.floor(position), math.ceil(position)
            p = float(next_probs[i, j])
            if lower == upper:
                projected[i, lower] += p
            else:
                projected[i, lower] += p * (upper - position)
                projected[i, upper] += p * (position - lower)
    return projected


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("as_float", [False, True])
def test_gae_matches_reference(seed, as_float):
    rollout = random_rollout(seed)
    if as_float:
        rollout["terminated"] = rollout["terminated"].double()
        rollout["truncated"] = rollout["truncated"].double()
    advantage, returns = gae_advantages(**rollout, gamma=0.97, gae_lambda=0.9)
    expected_advantage, expected_returns = reference_gae(**rollout, gamma=0.97, gae_lambda=0.9)
    assert_close(advantage, expected_advantage)
    assert_close(returns, expected_returns)


def test_gae_by_hand():
    # One env, three steps: truncated at step 0 (bootstraps from its own final observation, does not
    # carry the later advantage back), terminated at step 2.
    reward = torch.tensor([[1.0], [2.0], [3.0]])
    value = torch.tensor([[0.5], [1.0], [2.0]])
    next_value = torch.tensor([[4.0], [2.0], [9.0]])
    terminated = torch.tensor([[False], [False], [True]])
    truncated = torch.tensor([[True], [False], [False]])
    advantage, _ = gae_advantages(reward, value, next_value, terminated, truncated, gamma=0.5, gae_lambda=0.5)
    delta_2 = 3.0 - 2.0
    delta_1 = 2.0 + 0.5 * 2.0 - 1.0
    delta_0 = 1.0 + 0.5 * 4.0 - 0.5
    assert_close(advantage, torch.tensor([[delta_0], [delta_1 + 0.25 * delta_2], [delta_2]]))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_step", [1, 3, 5, 40])
def test_n_step_returns_matches_reference(seed, n_step):
    rollout = random_rollout(seed)
    args = (rollout["reward"], rollout["terminated"], rollout["truncated"], n_step, 0.9)
    returns, discount, last_index = n_step_returns(*args)
    expected_returns, expected_discount, expected_last_index = reference_n_step(*args)
    assert last_index.dtype == torch.long
    assert_close(returns, expected_returns)
    assert_close(discount, expected_discount)
    assert torch.equal(last_index, expected_last_index)


def test_n_step_returns_float_masks_and_float32():
    rollout = random_rollout(7, dtype=torch.float32)
    args = (rollout["reward"], rollout["terminated"].float(), rollout["truncated"].float(), 4, 0.99)
    returns, discount, last_index = n_step_returns(*args)
    expected = reference_n_step(rollout["reward"], rollout["terminated"], rollout["truncated"], 4, 0.99)
    assert returns.dtype == discount.dtype == torch.float32
    assert_close(returns, expected[0])
    assert_close(discount, expected[1])
    assert torch.equal(last_index, expected[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_rescale_round_trip(dtype):
    magnitudes = torch.logspace(-6, 4, 2001, dtype=torch.float64)
    x = torch.cat([-magnitudes.flip(0), torch.zeros(1, dtype=torch.float64), magnitudes]).to(dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    assert_close(inverse_value_rescale(value_rescale(x)), x, **tolerance)
    y = value_rescale(x)  # covers |y| up to about 110
    assert_close(value_rescale(inverse_value_rescale(y)), y, **tolerance)


def test_value_rescale_values():
    x = torch.tensor([-8.0, 0.0, 3.0, 99.0], dtype=torch.float64)
    expected = torch.tensor([-2.0 - 8e-3, 0.0, 1.0 + 3e-3, 9.0 + 99e-3], dtype=torch.float64)
    assert_close(value_rescale(x), expected)
    assert_close(inverse_value_rescale(expected), x)
    assert_close(inverse_value_rescale(torch.tensor([2.0, -1.0]), eps=0.0), torch.tensor([8.0, -3.0]))


def test_categorical_projection_matches_reference():
    generator = torch.Generator().manual_seed(0)
    atoms = torch.linspace(-10.0, 10.0, 51, dtype=torch.float64)
    n = 64
    next_probs = torch.softmax(torch.randn(n, 51, generator=generator, dtype=torch.float64), dim=-1)
    reward = 6.0 * torch.randn(n, generator=generator, dtype=torch.float64)
    discount = 0.99 * (torch.rand(n, generator=generator) > 0.2).double()
    projected = categorical_projection(next_probs, reward, discount, atoms)
    assert_close(projected, reference_projection(next_probs, reward, discount, atoms))
    assert_close(projected.sum(-1), torch.ones(n, dtype=torch.float64))
    assert (projected >= 0).all()


def test_categorical_projection_exact_atom_hits():
    atoms = torch.linspace(-2.0, 2.0, 5)  # spacing 1
    next_probs = torch.softmax(torch.randn(3, 5, generator=torch.Generator().manual_seed(1)), dim=-1)
    # Discount 1 with an integer reward shifts every target onto an atom; discount 0 puts all mass on one.
    reward = torch.tensor([1.0, 0.0, -1.0])
    discount = torch.tensor([1.0, 1.0, 0.0])
    projected = categorical_projection(next_probs, reward, discount, atoms)
    shifted = torch.zeros(5)
    shifted[1:4] = next_probs[0, :3]
    shifted[4] = next_probs[0, 3:].sum()
    assert_close(projected[0], shifted)
    assert_close(projected[1], next_probs[1])
    assert_close(projected[2], torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    assert_close(projected, reference_projection(next_probs, reward, discount, atoms))


def test_categorical_projection_clamps_to_support():
    atoms = torch.linspace(-1.0, 1.0, 11)
    next_probs = torch.softmax(torch.randn(4, 11, generator=torch.Generator().manual_seed(2)), dim=-1)
    reward = torch.tensor([50.0, -50.0, 1.0, -1.0])
    discount = torch.tensor([0.9, 0.9, 0.0, 0.0])
    projected = categorical_projection(next_probs, reward, discount, atoms)
    expected = torch.zeros(4, 11)
    expected[[0, 2], -1] = 1.0
    expected[[1, 3], 0] = 1.0
    assert_close(projected, expected)


def test_linear_schedule():
    # Decaying and rising, checked against the line through (0, start) and (duration, end).
    for start, end, duration in [(1.0, 0.02, 40.0), (0.4, 1.0, 3.0)]:
        for step in range(0, 60):
            expected = end if step >= duration else start + (end - start) * step / duration
            assert math.isclose(linear_schedule(start, end, duration, step), expected, rel_tol=1e-12)
    assert linear_schedule(1.0, 0.05, 100.0, 50) == pytest.approx(0.525)
    assert linear_schedule(1.0, 0.05, 100.0, 100) == 0.05 and linear_schedule(1.0, 0.05, 100.0, 10**6) == 0.05
    # A schedule shorter than one step lasts one step.
    assert linear_schedule(1.0, 0.1, 0.0, 0) == 1.0 and linear_schedule(1.0, 0.1, 0.0, 1) == 0.1


def test_polyak_update():
    generator = torch.Generator().manual_seed(0)
    target = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
    source = [torch.nn.Parameter(torch.randn(3, 4, generator=generator)), torch.randn(5, generator=generator)]
    before = [t.clone() for t in target]
    polyak_update(target, source, tau=0.3)
    for updated, old, new in zip(target, before, source):
        assert_close(updated, 0.7 * old + 0.3 * new.detach())
    polyak_update(target, source, tau=1.0)
    for updated, new in zip(target, source):
        assert torch.equal(updated, new.detach())


def test_polyak_update_modules():
    source, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    expected = [0.9 * t.detach() + 0.1 * s.detach() for t, s in zip(target.parameters(), source.parameters())]
    polyak_update(target.parameters(), source.parameters(), tau=0.1)
    for updated, want in zip(target.parameters(), expected):
        assert_close(updated.detach(), want)
        assert updated.grad is None


def test_explained_variance():
    generator = torch.Generator().manual_seed(0)
    y_true = torch.randn(6, 7, generator=generator, dtype=torch.float64)
    y_pred = y_true + 0.3 * torch.randn(6, 7, generator=generator, dtype=torch.float64)
    residual = (y_true - y_pred).flatten().tolist()
    true = y_true.flatten().tolist()

    def variance(values):
        mean = sum(values) / len(values)
        return sum((v - mean) ** 2 for v in values) / len(values)

    assert explained_variance(y_pred, y_true) == pytest.approx(1.0 - variance(residual) / variance(true))
    assert explained_variance(y_true, y_true) == pytest.approx(1.0)
    assert math.isnan(explained_variance(torch.randn(5), torch.full((5,), 2.0)))


def test_epsilon_greedy_draws_the_coins_and_uniform_actions_then_runs_the_network_only_if_some_env_exploits():
    from common.namedarraytuple import namedarraytuple

    Obs = namedarraytuple("Obs", ["position", "velocity"])
    obs = Obs(torch.zeros(64, 2), torch.zeros(64, 3))  # a Dict observation: B from its first leaf
    greedy_action = torch.arange(64) % 3 + 10  # outside [0, 5): a greedy action is never a uniform one
    calls = []

    def greedy():
        calls.append(1)
        return greedy_action

    for epsilon in (0.3, 0.7, 1.0):  # 0.7 rounds down in float32
        torch.manual_seed(5)
        explore = torch.rand(64) < epsilon
        uniform = torch.randint(5, (64,))
        after = torch.rand(1)
        torch.manual_seed(5)
        calls.clear()
        action = epsilon_greedy(greedy, obs, 5, epsilon)
        assert torch.equal(action, torch.where(explore, uniform, greedy_action))
        assert torch.equal(torch.rand(1), after)  # exactly those two draws, whatever the coins
        assert len(calls) == (0 if epsilon == 1.0 else 1)
        assert 0 < int(explore.sum()) < 64 or epsilon == 1.0
    torch.manual_seed(5)
    first = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(epsilon_greedy(greedy, obs, 5, 0.0), greedy_action)
    assert torch.equal(torch.rand(1), first)  # epsilon 0 draws nothing
