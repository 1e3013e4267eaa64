"""Policy-gradient scripts (a2c.py, ppo.py, ppo_atari.py, ppo_atari_lstm.py): learning thresholds, truncation
bootstrapping, recurrent sequence re-runs, normalisation statistics, every sampler kind on Atari.

Learning tests run the real CLI with each script's defaults and only the flags named in the issue, seeded.
The truncation tests use `tests.memory_envs:ConstantReward-v0` (reward 1 per step, truncated after 10
steps, never terminated).
"""

import csv
import json
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import load_script
from torch.distributions import Categorical

from common.envs import UsageError, make_env
from common.evaluate import evaluate_run
from common.namedarraytuple import buffer_map
from common.normalization import RunningMeanStd
from common.samplers import Samples, call_policy, make_sampler

CONSTANT_ENV = "tests.memory_envs:ConstantReward-v0"
MEMORY_ENV = "tests.memory_envs:CartPoleNoVelocity-v0"
LOSSES = ["losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
          "losses/explained_variance", "charts/learning_rate"]
DICT_CARTPOLE = "tests.memory_envs:DictStateCartPole-v0"  # CartPole-v1 observing Dict(cart, pole)
SAMPLERS = ["serial", "parallel-cpu", "parallel-gpu", "alternating-gpu"]


def progress_columns(run_dir: Path) -> set[str]:
    with open(run_dir / "progress.csv", newline="") as f:
        return set(next(csv.reader(f)))


# ---------------------------------------------------------------------------------------------- learning


@pytest.mark.learning
def test_a2c_cartpole_reaches_400(run_in):
    _, run_dir, summary = run_in("a2c", "--env-id", "CartPole-v1", "--total-timesteps", "200000", "--seed", "1")
    assert summary["global_step"] >= 200_000
    assert summary["final_eval_return"] >= 400, summary
    assert {"losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl",
            "losses/explained_variance", "charts/learning_rate"} <= progress_columns(run_dir)


@pytest.mark.learning
def test_ppo_inverted_pendulum_reaches_900_with_saved_normalisation(run_in):
    _, run_dir, summary = run_in("ppo", "--env-id", "InvertedPendulum-v5", "--total-timesteps", "50000",
                                 "--seed", "1")  # seed 1: 1000.0
    assert summary["final_eval_return"] >= 900, summary
    config = json.loads((run_dir / "config.json").read_text())  # the "auto" fields, resolved
    assert config["norm_obs"] is True and config["norm_reward"] is True and config["num_steps"] == 256
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["model"]["obs_norm.count"] > 45_000  # updated from every collected batch
    assert checkpoint["reward_scaler"]["return_stats.count"] > 45_000


@pytest.mark.parametrize("flags", [[], ["--norm-obs", "True"]], ids=["plain", "norm-obs"])
def test_ppo_on_dict_observations_computes_the_array_run(run_in, flags):
    # DICT_CARTPOLE's leaves, flattened and concatenated in key order, are CartPole-v1's observation: a seeded
    # run must act, learn and evaluate exactly as on CartPole-v1, so the CartPole learning tests hold for Dict
    # observations too.
    common = ["--total-timesteps", "8192", "--seed", "1", "--eval-episodes", "2", *flags]
    _, array_dir, array = run_in("ppo", "--env-id", "CartPole-v1", *common, run_name="array")
    _, dict_dir, dicts = run_in("ppo", "--env-id", DICT_CARTPOLE, *common, run_name="dict")
    assert (dict_dir / "episodes.csv").read_text() == (array_dir / "episodes.csv").read_text()
    assert dicts["final_eval_return"] == array["final_eval_return"]
    array_model = torch.load(array_dir / "checkpoint.pt", weights_only=True)["model"]
    dict_model = torch.load(dict_dir / "checkpoint.pt", weights_only=True)["model"]
    for key, value in array_model.items():
        if not key.startswith("obs_norm."):
            assert torch.equal(value, dict_model[key]), key
            continue
        # The Dict run keeps the statistics per leaf: cart, then pole.
        cart, pole = (dict_model[key.replace("obs_norm.", f"obs_norm.stats.observation/{leaf}.")]
                      for leaf in ("cart", "pole"))
        if value.dim():
            assert torch.equal(value, torch.cat([cart, pole])), key
        else:
            assert torch.equal(value, cart) and torch.equal(value, pole), key
    assert len(dict_model) == len(array_model) + (3 if flags else 0)  # mean, var, count: once per leaf
    assert ("obs_norm.mean" in array_model) == bool(flags)


@pytest.mark.learning
def test_recurrent_ppo_recalls_a_continuous_cue_where_feed_forward_ppo_cannot(run_in):
    # The Gaussian head on a memory task: the action must repeat a cue seen only at the first step.
    flags = ["--env-id", "tests.memory_envs:CueRecall-v0", "--total-timesteps", "50000", "--seed", "1"]
    _, run_dir, recurrent = run_in("ppo_atari_lstm", *flags, run_name="lstm")
    _, _, feed_forward = run_in("ppo", *flags, run_name="mlp")
    assert recurrent["final_eval_return"] >= -1.5, recurrent  # seed 1: -0.78
    assert feed_forward["final_eval_return"] < -2.0, feed_forward  # seed 1: -3.55 (at best about -8/3)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["ent_coef"] == 0.0 and config["norm_obs"] is True  # the continuous-action vector preset
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert checkpoint["log_std"].shape == (1,) and checkpoint["lstm.weight_ih_l0"].shape[1] == 64 + 1 + 1
    episodes = evaluate_run(run_dir)  # load_policy rebuilds the Gaussian model
    assert np.mean([e.ret for e in episodes]) == pytest.approx(recurrent["final_eval_return"])


@pytest.mark.learning
def test_recurrent_ppo_solves_the_memory_task_where_feed_forward_ppo_fails(run_in):
    flags = ["--env-id", MEMORY_ENV, "--total-timesteps", "100000", "--seed", "1"]  # seed 1: 500.0 and 42.7
    _, _, recurrent = run_in("ppo_atari_lstm", *flags, run_name="lstm")
    _, _, feed_forward = run_in("ppo", *flags, run_name="mlp")
    assert recurrent["final_eval_return"] >= 150, recurrent
    assert feed_forward["final_eval_return"] < 100, feed_forward


# ---------------------------------------------------------------------------------------------- truncation


def hand_made_batch(script, model, T: int = 6, B: int = 3):
    """A [T, B] batch of random observations with a truncation at (2, 1) and a termination at (3, 2)."""
    generator = torch.Generator().manual_seed(0)
    obs = torch.randn(T, B, 4, generator=generator)
    next_obs = torch.cat([obs[1:], torch.randn(1, B, 4, generator=generator)])
    next_obs[2, 1] = torch.randn(4, generator=generator)  # the final observation; obs[3, 1] is the reset one
    terminated, truncated = torch.zeros(T, B, dtype=torch.bool), torch.zeros(T, B, dtype=torch.bool)
    truncated[2, 1], terminated[3, 2] = True, True
    action, agent_info, _ = call_policy(script.policy_step, model, obs.flatten(0, 1).numpy(),
                                        np.zeros(T * B, np.int64), np.zeros(T * B, np.float32), None,
                                        torch.device("cpu"))
    agent_info = buffer_map(lambda x: torch.from_numpy(x).view(T, B, *x.shape[1:]), agent_info)
    return Samples(obs, next_obs, torch.from_numpy(action).view(T, B), torch.ones(T, B), terminated, truncated,
                   torch.zeros(T, B, dtype=torch.long), torch.zeros(T, B), agent_info)


@pytest.mark.parametrize("script_name", ["ppo", "a2c"])
def test_truncated_steps_bootstrap_from_their_final_observation(script_name):
    script = load_script(script_name)
    torch.manual_seed(0)
    if script_name == "ppo":
        model = script.ActorCritic(np.zeros(4, np.float32), gym.spaces.Discrete(2), 16, False)
    else:
        model = script.ActorCritic(np.zeros(4, np.float32), gym.spaces.Discrete(2), 16)
    batch = hand_made_batch(script, model)
    with torch.no_grad():
        next_value = script.next_values(model, batch)
        value_of = lambda o: model.value(o[None])[0]  # noqa: E731
        assert torch.allclose(next_value[2, 1], value_of(batch.next_observation[2, 1]))
        assert not torch.allclose(next_value[2, 1], value_of(batch.observation[3, 1]))
        assert torch.allclose(next_value[:-1][~batch.truncated[:-1]], batch.agent_info.value[1:][~batch.truncated[:-1]])
        assert torch.allclose(next_value[-1], model.value(batch.next_observation[-1]))


def test_recurrent_truncation_bootstraps_with_the_state_carried_through_the_step():
    script = load_script("ppo_atari_lstm")
    torch.manual_seed(0)
    model = script.RecurrentActorCritic(np.zeros(4, np.float32), gym.spaces.Discrete(2), 16, 8)
    for param in model.lstm.parameters():  # a strong recurrence, so that a wrong state shows
        param.data.mul_(3.0)
    batch = hand_made_batch(script, model)
    T, B = batch.reward.shape
    # Re-collect step by step, as the sampler does, so that the stored pre-step states are consistent.
    state = model.initial_state(B, torch.device("cpu"))
    states = []
    with torch.no_grad():
        for t in range(T):
            states.append(state)
            _, _, state = model(batch.observation[t:t + 1], batch.prev_action[t:t + 1], batch.prev_reward[t:t + 1],
                                state)
            done = (batch.terminated[t] | batch.truncated[t]).float().unsqueeze(-1)
            state = script.RnnState(state.h * (1 - done), state.c * (1 - done))
        rnn_state = script.RnnState(torch.stack([s.h for s in states]), torch.stack([s.c for s in states]))
        batch = batch._replace(agent_info=batch.agent_info._replace(rnn_state=rnn_state))
        next_value = script.next_values(model, batch)
        # The truncated episode (env 1) continued one more step with the final observation.
        _, expected, _ = model(torch.cat([batch.observation[:3, 1:2], batch.next_observation[2:3, 1:2]]),
                               torch.cat([batch.prev_action[:3, 1:2], batch.action[2:3, 1:2]]),
                               torch.cat([batch.prev_reward[:3, 1:2], batch.reward[2:3, 1:2]]),
                               script.RnnState(rnn_state.h[0, 1:2], rnn_state.c[0, 1:2]))
    assert torch.allclose(next_value[2, 1], expected[3, 0], atol=1e-6)
    assert not torch.allclose(next_value[2, 1], batch.agent_info.value[3, 1], atol=1e-3)


def test_ppo_learns_a_truncated_value_that_bootstraps(run_in):
    """Reward 1 per step, truncated at 10 steps: the start value tends to 1 / (1 - gamma) = 100, not <= 10."""
    _, run_dir, _ = run_in("ppo", "--env-id", CONSTANT_ENV, "--total-timesteps", "20000", "--no-clip-vloss",
                           "--eval-episodes", "1")
    ppo = load_script("ppo")
    model = ppo.ActorCritic(np.zeros(1, np.float32), gym.spaces.Discrete(2), 64, False)
    model.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])
    with torch.no_grad():
        start_value = model.value(torch.zeros(1, 1)).item()
    print(f"learned start value {start_value:.1f}")
    assert start_value > 20, start_value  # without bootstrapping it could not exceed sum(0.99^k, k < 10) < 10


def test_running_mean_std_matches_the_statistics_of_the_whole_stream():
    generator = torch.Generator().manual_seed(0)
    stream = torch.randn(1000, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]) + 3.0
    stats = RunningMeanStd((3,), clip=5.0)
    assert torch.equal(stats(torch.tensor([[1.0, 20.0, -3.0]])), torch.tensor([[1.0, 5.0, -3.0]]))  # clip only
    for chunk in stream.split(137):
        stats.update(chunk)
    assert torch.allclose(stats.mean, stream.mean(0), atol=1e-6)
    assert torch.allclose(stats.var, stream.var(0, correction=0), rtol=1e-4)
    normalised = stats(stream)
    assert torch.allclose(normalised.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(normalised.std(0, correction=0), torch.ones(3), atol=1e-3)
    assert set(stats.state_dict()) == {"mean", "var", "count"}


# ---------------------------------------------------------------------------------------------- recurrent


def test_recurrent_sequence_rerun_reproduces_the_collected_policy():
    """Re-running whole env sequences from the stored start state, with resets at episode ends, gives back
    the log-probs and values of collection; without the resets it does not."""
    script = load_script("ppo_atari_lstm")
    torch.manual_seed(0)
    model = script.RecurrentActorCritic(np.zeros(2, np.float32), gym.spaces.Discrete(2), 16, 8)
    for param in model.lstm.parameters():  # a strong recurrence and a decisive policy, so that state errors show
        param.data.mul_(3.0)
    model.actor.weight.data.mul_(100.0)
    env_fn = partial(make_env, MEMORY_ENV, training=True, max_episode_steps=20)
    sampler = make_sampler(SimpleNamespace(sampler="serial", n_envs=4, seed=1), env_fn, script.policy_step, model,
                           horizon=50)
    try:
        sampler.collect()  # the second batch starts mid-episode, from a non-zero state
        batch, _ = sampler.collect()
        done = batch.terminated | batch.truncated
        assert done.sum() >= 4 and batch.agent_info.rnn_state.h[0].abs().sum() > 0
        reset = torch.cat([torch.zeros_like(done[:1]), done[:-1]])
        start = batch.agent_info.rnn_state[0]
        with torch.no_grad():
            reset_steps = reset.any(1).nonzero().flatten().tolist()
            logits, value, _ = model(batch.observation, batch.prev_action, batch.prev_reward, start, reset, reset_steps)
            no_reset_logits, _, _ = model(batch.observation, batch.prev_action, batch.prev_reward, start)
        log_prob = Categorical(logits=logits).log_prob(batch.action)
        assert torch.allclose(log_prob, batch.agent_info.log_prob, atol=1e-6)
        assert torch.allclose(value, batch.agent_info.value, atol=1e-6)
        assert not torch.allclose(Categorical(logits=no_reset_logits).log_prob(batch.action),
                                  batch.agent_info.log_prob, atol=1e-3)
    finally:
        sampler.close()


# ---------------------------------------------------------------------------------------------- runs


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("script", ["ppo_atari", "ppo_atari_lstm"])
def test_atari_scripts_run_pong_under_every_sampler(run_in, script, sampler):
    # parallel-cpu pickles the script's model and policy to its workers (the default forkserver start method);
    # the env-only kinds (which only send env_fn) fork theirs, which is faster.
    start_method = "fork" if sampler in ("parallel-gpu", "alternating-gpu") else "forkserver"
    # Each script's default --n-envs (8), which every kind splits over the 2 workers.
    _, run_dir, summary = run_in(
        script, "--env-id", "ALE/Pong-v5", "--sampler", sampler, "--n-workers", "2",
        "--start-method", start_method, "--num-steps", "32", "--total-timesteps", "256",
        "--max-episode-steps", "40", "--eval-episodes", "1", "--log-every-s", "0",
    )
    assert summary["global_step"] == 256
    assert math.isfinite(summary["final_eval_return"])
    assert set(LOSSES) <= progress_columns(run_dir)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a2c_runs_pong_on_the_nature_cnn_under_every_sampler(run_in, sampler):
    start_method = "fork" if sampler in ("parallel-gpu", "alternating-gpu") else "forkserver"
    _, run_dir, summary = run_in(
        "a2c", "--env-id", "ALE/Pong-v5", "--sampler", sampler, "--n-workers", "2", "--n-envs", "4",
        "--start-method", start_method, "--num-steps", "5", "--total-timesteps", "100", "--log-every-updates", "1",
        "--max-episode-steps", "40", "--eval-episodes", "1", "--log-every-s", "0",
    )
    assert summary["global_step"] == 100 and math.isfinite(summary["final_eval_return"])
    assert set(LOSSES) - {"losses/clipfrac"} <= progress_columns(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["ent_coef"] == 0.01  # the image preset
    model = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert model["torso.net.0.weight"].shape[1] == 4 and model["actor.weight"].shape == (6, 512)
    episodes = evaluate_run(run_dir)
    assert [e.ret for e in episodes] == [summary["final_eval_return"]]


@pytest.mark.parametrize(("script", "sampler", "env_id"), [
    ("ppo", "parallel-cpu", "Pendulum-v1"),
    ("a2c", "parallel-gpu", "Pendulum-v1"),
    ("ppo_atari_lstm", "alternating-gpu", MEMORY_ENV),
    ("ppo_atari_lstm", "parallel-cpu", "tests.memory_envs:CueRecall-v0"),  # Box actions through shared memory
])
def test_vector_scripts_run_under_parallel_samplers(run_in, script, sampler, env_id):
    _, run_dir, summary = run_in(script, "--env-id", env_id, "--sampler", sampler, "--n-workers", "2",
                                 "--n-envs", "4", "--num-steps", "64", "--total-timesteps", "512",
                                 "--eval-episodes", "2")
    assert math.isfinite(summary["final_eval_return"])
    if script == "ppo":  # the workers ran with the normalisation statistics of the main process
        assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]["obs_norm.count"] > 0
    # load_policy rebuilds the model for common.evaluate: the same evaluation, the same return.
    episodes = evaluate_run(run_dir)
    assert np.mean([e.ret for e in episodes]) == pytest.approx(summary["final_eval_return"])


@pytest.mark.parametrize(("script", "env_id", "message"), [
    ("ppo_atari", "CartPole-v1", "image observations"),
    ("ppo_atari_lstm", "tests.memory_envs:MatrixObservation-v0", "vector observations or [C, 84, 84]"),
    ("a2c", "tests.memory_envs:MatrixObservation-v0", "vector observations or Atari frame stacks"),
])
def test_wrong_spaces_are_one_line_errors(run_in, script, env_id, message):
    proc, _, _ = run_in(script, "--env-id", env_id, check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last_line = proc.stderr.strip().splitlines()[-1]  # (ALE prints its banner to stderr first)
    assert last_line.startswith("error: ") and message in last_line


def test_recurrent_ppo_refuses_to_standardise_atari_frames():
    lstm = load_script("ppo_atari_lstm")
    args = lstm.Args(norm_obs=True)
    with pytest.raises(UsageError, match="--norm-obs standardises vector observations"):
        lstm.resolve_presets(args, "image")
    args = lstm.Args()
    lstm.resolve_presets(args, "image")  # the image preset leaves frames as they are
    assert args.norm_obs is False
