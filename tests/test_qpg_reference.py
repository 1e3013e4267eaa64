"""sac.py's and td3.py's updates against the textbook updates, written here with separate nn.Sequential critics,
torch.distributions' tanh-squashed Normal and plain Adam: same initial weights, same batches, same noise draws.

The scripts' stacked critics (one baddbmm per layer), closed-form squashed log-probability, in-[-1, 1] action
convention, loss sums and polyak kernel must give the same parameters, update after update.
"""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import load_script
from torch.distributions import Normal, TanhTransform, TransformedDistribution

from common.kernels import polyak_update
from common.networks import Critics, adam

OBS_DIM, ACT_DIM, HIDDEN, BATCH = 5, 2, 16, 32
LOW, HIGH = np.array([-2.0, -0.5], np.float32), np.array([2.0, 1.5], np.float32)  # not [-1, 1]: scaling counts
GAMMA, TAU, POLICY_LR, Q_LR = 0.99, 0.005, 3e-4, 1e-3


def batches(n: int) -> list[SimpleNamespace]:
    """Random replay samples with env-scaled actions and some terminations (discount 0)."""
    gen = torch.Generator().manual_seed(7)
    low, high = torch.as_tensor(LOW), torch.as_tensor(HIGH)
    out = []
    for _ in range(n):
        terminated = (torch.rand(BATCH, generator=gen) < 0.2).float()
        out.append(SimpleNamespace(
            observation=torch.randn(BATCH, OBS_DIM, generator=gen),
            action=low + (high - low) * torch.rand(BATCH, ACT_DIM, generator=gen),
            n_step_return=torch.randn(BATCH, generator=gen),
            discount=GAMMA * (1.0 - terminated),
            bootstrap_observation=torch.randn(BATCH, OBS_DIM, generator=gen)))
    return out


def separate_critics(critics: Critics) -> list[nn.Sequential]:
    """Each member of the stacked ensemble as its own MLP on [obs, action]."""
    members = []
    for i in range(critics.n):
        linears = []
        for layer in critics.layers:
            linear = nn.Linear(layer.weight.shape[1], layer.weight.shape[2])
            with torch.no_grad():
                linear.weight.copy_(layer.weight[i].T)
                linear.bias.copy_(layer.bias[i, 0])
            linears.append(linear)
        members.append(nn.Sequential(linears[0], nn.ReLU(), linears[1], nn.ReLU(), linears[2]))
    return members


def assert_critics_equal(critics: Critics, members: list[nn.Sequential]) -> None:
    for i, member in enumerate(members):
        for layer, linear in zip(critics.layers, member[::2], strict=True):
            torch.testing.assert_close(layer.weight[i].T, linear.weight, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(layer.bias[i, 0], linear.bias, rtol=1e-4, atol=1e-6)


def assert_modules_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)


def soft_update(targets: list[nn.Module], sources: list[nn.Module]) -> None:
    """target <- (1 - tau) target + tau source, parameter by parameter."""
    with torch.no_grad():
        for target, source in zip(targets, sources, strict=True):
            for t, p in zip(target.parameters(), source.parameters(), strict=True):
                t.mul_(1.0 - TAU).add_(TAU * p)


def q_of(members: list[nn.Sequential], obs: torch.Tensor, action: torch.Tensor) -> list[torch.Tensor]:
    return [member(torch.cat([obs, action], -1)).squeeze(-1) for member in members]


@pytest.mark.parametrize("clip_log_std", [False, True])
def test_sac_update_is_the_textbook_update(clip_log_std):
    sac = load_script("sac")
    torch.manual_seed(0)
    actor = sac.Actor(np.zeros(OBS_DIM, np.float32), ACT_DIM, HIDDEN, LOW, HIGH, clip_log_std)
    if clip_log_std:  # log-std outputs spread so that some are clipped at 2 and some lie below -5
        with torch.no_grad():
            actor.net[-1].weight[ACT_DIM:] *= 12.0
            actor.net[-1].bias[ACT_DIM:] = torch.tensor([1.5, -6.0])
    critics = Critics(np.zeros(OBS_DIM, np.float32), ACT_DIM, HIDDEN)
    target_critics = copy.deepcopy(critics).requires_grad_(False)
    log_alpha = torch.tensor(np.log(0.2), dtype=torch.float32, requires_grad=True)
    target_entropy = -float(ACT_DIM)
    # As sac.py's main builds them: the temperature in the actor's optimizer, at the critics' learning rate.
    critic_optimizer = adam(critics.parameters(), Q_LR, torch.device("cpu"))
    actor_optimizer = adam([{"params": actor.parameters()}, {"params": [log_alpha], "lr": Q_LR}], POLICY_LR,
                           torch.device("cpu"))

    ref_actor = copy.deepcopy(actor.net)
    ref_critics = separate_critics(critics)
    ref_targets = [copy.deepcopy(m).requires_grad_(False) for m in ref_critics]
    ref_log_alpha = log_alpha.detach().clone().requires_grad_(True)
    ref_critic_optimizer = torch.optim.Adam([p for m in ref_critics for p in m.parameters()], lr=Q_LR)
    ref_actor_optimizer = torch.optim.Adam(ref_actor.parameters(), lr=POLICY_LR)
    ref_alpha_optimizer = torch.optim.Adam([ref_log_alpha], lr=Q_LR)
    scale, bias = torch.as_tensor((HIGH - LOW) / 2), torch.as_tensor((HIGH + LOW) / 2)

    clipped = []

    def ref_policy(obs):
        mean, raw = ref_actor(obs).chunk(2, -1)
        if clip_log_std:
            clipped.append(((raw > 2.0).float().mean().item(), (raw < -5.0).float().mean().item()))
            log_std = raw.clamp(-20.0, 2.0)
        else:
            log_std = -5.0 + 3.5 * (torch.tanh(raw) + 1.0)  # [-5, 2]
        dist = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform(cache_size=1)])
        action = dist.rsample()
        return action, dist.log_prob(action).sum(-1)

    for s in batches(6):
        rng = torch.get_rng_state()
        q_loss, _ = sac.soft_q_loss(critics, target_critics, actor, log_alpha, s)
        critic_optimizer.zero_grad(set_to_none=True)
        q_loss.backward()
        critic_optimizer.step()
        loss, (actor_loss, alpha_loss, _, entropy) = sac.actor_and_alpha_loss(
            actor, critics, log_alpha, s.observation, target_entropy)
        actor_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        actor_optimizer.step()
        polyak_update(target_critics.parameters(), critics.parameters(), TAU)

        torch.set_rng_state(rng)  # the same two noise draws, in the same order
        with torch.no_grad():
            next_action, next_log_prob = ref_policy(s.bootstrap_observation)
            next_q = torch.min(*q_of(ref_targets, s.bootstrap_observation, next_action))
            y = s.n_step_return + s.discount * (next_q - ref_log_alpha.exp() * next_log_prob)
        q1, q2 = q_of(ref_critics, s.observation, (s.action - bias) / scale)
        ref_q_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        ref_critic_optimizer.zero_grad()
        ref_q_loss.backward()
        ref_critic_optimizer.step()
        action, log_prob = ref_policy(s.observation)
        q_pi = torch.min(*q_of(ref_critics, s.observation, action))
        ref_actor_loss = (ref_log_alpha.exp().detach() * log_prob - q_pi).mean()
        ref_actor_optimizer.zero_grad()
        ref_actor_loss.backward()
        ref_actor_optimizer.step()
        ref_alpha_loss = -(ref_log_alpha * (log_prob.detach() + target_entropy)).mean()
        ref_alpha_optimizer.zero_grad()
        ref_alpha_loss.backward()
        ref_alpha_optimizer.step()
        soft_update(ref_targets, ref_critics)

        torch.testing.assert_close(q_loss, ref_q_loss, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(actor_loss, ref_actor_loss, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(alpha_loss, ref_alpha_loss, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(entropy, -log_prob.mean().detach(), rtol=1e-4, atol=1e-6)
        assert_modules_equal(actor.net, ref_actor)
        assert_critics_equal(critics, ref_critics)
        assert_critics_equal(target_critics, ref_targets)
        torch.testing.assert_close(log_alpha, ref_log_alpha, rtol=1e-5, atol=1e-7)
    assert abs(log_alpha.item() - np.log(0.2)) > 1e-3  # the temperature did move, in both
    if clip_log_std:
        above, below = np.mean(clipped, axis=0)
        assert 0.02 < above < 0.5 and below > 0.1, clipped  # the clip bit on some outputs, not on all


@pytest.mark.parametrize("policy_frequency", [1, 2])
def test_td3_update_is_the_textbook_update(policy_frequency):
    td3 = load_script("td3")
    torch.manual_seed(0)
    policy_noise, noise_clip = 0.4, 0.3  # a clip that bites: about half the draws
    actor = td3.Actor(np.zeros(OBS_DIM, np.float32), ACT_DIM, HIDDEN, LOW, HIGH)
    target_actor = copy.deepcopy(actor).requires_grad_(False)
    critics = Critics(np.zeros(OBS_DIM, np.float32), ACT_DIM, HIDDEN)
    target_critics = copy.deepcopy(critics).requires_grad_(False)
    critic_optimizer = adam(critics.parameters(), Q_LR, torch.device("cpu"))
    actor_optimizer = adam(actor.parameters(), POLICY_LR, torch.device("cpu"))

    ref_actor = copy.deepcopy(actor.net)
    ref_target_actor = copy.deepcopy(actor.net).requires_grad_(False)
    ref_critics = separate_critics(critics)
    ref_targets = [copy.deepcopy(m).requires_grad_(False) for m in ref_critics]
    ref_critic_optimizer = torch.optim.Adam([p for m in ref_critics for p in m.parameters()], lr=Q_LR)
    ref_actor_optimizer = torch.optim.Adam(ref_actor.parameters(), lr=POLICY_LR)
    scale, bias = torch.as_tensor((HIGH - LOW) / 2), torch.as_tensor((HIGH + LOW) / 2)

    for n_updates, s in enumerate(batches(6), start=1):
        rng = torch.get_rng_state()
        # td3.py's main, one update: the critics every time, the actor and both targets every policy_frequency.
        q_loss, _ = td3.td3_critic_loss(critics, target_critics, target_actor, s, policy_noise, noise_clip)
        critic_optimizer.zero_grad(set_to_none=True)
        q_loss.backward()
        critic_optimizer.step()
        if n_updates % policy_frequency == 0:
            actor_loss = td3.td3_actor_loss(actor, critics, s.observation)
            actor_optimizer.zero_grad(set_to_none=True)
            actor_loss.backward()
            actor_optimizer.step()
            polyak_update(target_actor.parameters(), actor.parameters(), TAU)
            polyak_update(target_critics.parameters(), critics.parameters(), TAU)

        torch.set_rng_state(rng)  # the same target-smoothing noise
        with torch.no_grad():
            next_action = torch.tanh(ref_target_actor(s.bootstrap_observation))
            noise = (torch.randn_like(next_action) * policy_noise).clamp(-noise_clip, noise_clip)
            next_action = (next_action + noise).clamp(-1.0, 1.0)
            y = s.n_step_return + s.discount * torch.min(*q_of(ref_targets, s.bootstrap_observation, next_action))
        q1, q2 = q_of(ref_critics, s.observation, (s.action - bias) / scale)
        ref_q_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        ref_critic_optimizer.zero_grad()
        ref_q_loss.backward()
        ref_critic_optimizer.step()
        if n_updates % policy_frequency == 0:
            obs = s.observation
            ref_actor_loss = -ref_critics[0](torch.cat([obs, torch.tanh(ref_actor(obs))], -1)).mean()
            ref_actor_optimizer.zero_grad()
            ref_actor_loss.backward()
            ref_actor_optimizer.step()
            soft_update([ref_target_actor], [ref_actor])
            soft_update(ref_targets, ref_critics)
            torch.testing.assert_close(actor_loss, ref_actor_loss, rtol=1e-4, atol=1e-6)

        torch.testing.assert_close(q_loss, ref_q_loss, rtol=1e-4, atol=1e-6)
        assert_modules_equal(actor.net, ref_actor)
        assert_modules_equal(target_actor.net, ref_target_actor)
        assert_critics_equal(critics, ref_critics)
        assert_critics_equal(target_critics, ref_targets)
