"""Deep-Q family: learning on CartPole and on a memory task, Atari runs under every sampler kind, bad input.

Learning tests run the real CLI with each script's default hyper-parameters and only the flags named in
the test.
"""

import json
import os
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script, read_progress, read_summary, run_script

from common.envs import make_env
from common.evaluate import evaluate_run
from common.kernels import categorical_projection
from common.replay import SequenceReplayBuffer
from common.samplers import make_sampler

CARTPOLE = ["--env-id", "CartPole-v1", "--total-timesteps", "100000", "--seed", "1"]
MEMORY_TASK = ["--env-id", "tests.memory_envs:CartPoleNoVelocity-v0", "--total-timesteps", "100000", "--seed", "1"]
DICT_CARTPOLE = "tests.memory_envs:DictStateCartPole-v0"  # CartPole-v1 observing Dict(cart, pole)
SAMPLERS = ["serial", "parallel-cpu", "parallel-gpu", "alternating-gpu"]
DEEP_Q_SCRIPTS = ["dqn", "dqn_atari", "c51", "c51_atari", "rainbow_atari", "r2d1"]
EXPECTED_METRICS = {"losses/td_loss", "losses/q_values", "charts/epsilon", "charts/updates_per_second", "charts/SPS"}


def logged_metrics(run_dir) -> set[str]:
    return {key for row in read_progress(run_dir) for key, value in row.items() if value not in ("", None)}


@pytest.mark.learning
@pytest.mark.parametrize("flags", [
    [],
    ["--dueling", "--sampler", "parallel-cpu", "--n-workers", "2"],
    ["--prioritized", "--sampler", "alternating-gpu", "--n-workers", "1"],
], ids=["double-3-step", "dueling-parallel-cpu", "prioritized-alternating-gpu"])
def test_dqn_variants_cartpole_reach_400(run_in, flags):
    # The variants share runs with the parallel sampler kinds: the kinds give the serial sampler's data for a
    # deterministic policy (tests/test_samplers.py), and here they also learn end to end (all end at 500).
    _, _, summary = run_in("dqn", *CARTPOLE, *flags)
    assert summary["global_step"] >= 100_000
    assert summary["final_eval_return"] >= 400, summary


@pytest.mark.learning
@pytest.mark.parametrize("script", ["dqn", "c51", "td3"])
def test_learning_starts_below_the_replays_first_item_waits_for_it(run_in, script):
    # --learning-starts 0: the first update waits until the buffer can give an item (n_step + 1 steps per env),
    # on every data-parallel rank alike (the replay scripts ran into an empty buffer, or skipped on some ranks).
    env = ["--env-id", "Pendulum-v1"] if script == "td3" else []
    _, run_dir, summary = run_in(script, *env, "--learning-starts", "0", "--n-envs", "2", "--n-step", "3",
                                 "--total-timesteps", "64", "--replay-ratio", "1", "--eval-episodes", "0")
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    first_update = (3 + 1) * 2  # steps_to_first_item (the 3-step window and its next observation) x n_envs
    assert summary["global_step"] == 64 and checkpoint["n_updates"] == 64 - first_update + 2


def test_dqn_one_step_target_learns_cartpole(run_in):
    # The 2015 target (one step, no double Q-learning) learns, then may fall back before the end, as dqn.py's
    # docstring says: seeds 1, 2, 3 end at 262.0, 500.0 and 199.6 at 100k steps. Seed 1's evaluations every
    # 10k steps: 169, 95, 138, 405, then 500 from 50k to 90k, then 262. So the test asks that it reaches 400.
    _, run_dir, summary = run_in("dqn", *CARTPOLE, "--no-double", "--n-step", "1", "--eval-every", "10000")
    rows = [row for row in read_progress(run_dir) if row.get("eval/episodic_return")]
    evaluations = [float(row["eval/episodic_return"]) for row in rows]
    # One evaluation every 10k steps, the last of them the final one (not evaluated and logged twice).
    assert [int(row["global_step"]) // 10_000 for row in rows] == list(range(1, 11))
    assert int(rows[-1]["global_step"]) == summary["global_step"] and evaluations[-1] == summary["final_eval_return"]
    assert max(evaluations) >= 400, evaluations


def test_dqn_on_dict_observations_computes_the_array_run(run_in):
    # DICT_CARTPOLE's leaves, flattened and concatenated in key order, are CartPole-v1's observation: a seeded
    # run must act, learn and evaluate exactly as on CartPole-v1, so the CartPole learning tests above hold for
    # Dict observations.
    flags = ["--total-timesteps", "12000", "--seed", "1", "--eval-episodes", "2"]
    _, array_dir, array = run_in("dqn", "--env-id", "CartPole-v1", *flags, run_name="array")
    _, dict_dir, dicts = run_in("dqn", "--env-id", DICT_CARTPOLE, *flags, run_name="dict")
    assert (dict_dir / "episodes.csv").read_text() == (array_dir / "episodes.csv").read_text()
    assert dicts["final_eval_return"] == array["final_eval_return"]
    array_model = torch.load(array_dir / "checkpoint.pt", weights_only=True)
    dict_model = torch.load(dict_dir / "checkpoint.pt", weights_only=True)
    assert array_model["q_net"].keys() == dict_model["q_net"].keys() and dict_model["n_updates"] > 2500
    assert all(torch.equal(array_model["q_net"][key], dict_model["q_net"][key]) for key in array_model["q_net"])


@pytest.mark.learning
def test_c51_cartpole_reaches_400(run_in):
    _, run_dir, summary = run_in("c51", *CARTPOLE)
    assert summary["global_step"] >= 100_000
    assert summary["final_eval_return"] >= 400, summary
    assert EXPECTED_METRICS <= logged_metrics(run_dir)


@pytest.mark.learning
def test_r2d1_learns_the_memory_task(run_in):
    _, run_dir, summary = run_in("r2d1", *MEMORY_TASK)  # seed 1 ends at 179.4
    assert summary["global_step"] >= 100_000
    assert summary["final_eval_return"] >= 150, summary
    assert EXPECTED_METRICS <= logged_metrics(run_dir)


@pytest.mark.learning
def test_feed_forward_dqn_does_not_learn_the_memory_task(run_in):
    # Feed-forward DQN plateaus near 40 on r2d1's budget (measured with the defaults, seed 1: 39.7 after 100k
    # steps).
    _, _, summary = run_in("dqn", *MEMORY_TASK)
    assert summary["final_eval_return"] < 100, summary


ATARI_SMOKE = ["--env-id", "ALE/Pong-v5", "--total-timesteps", "1200", "--learning-starts", "800",
               "--buffer-size", "4000", "--batch-size", "4", "--max-episode-steps", "150", "--eval-episodes", "1",
               "--n-workers", "2", "--seed", "2"]  # each script's default --n-envs (rounded up to split)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("script", ["dqn_atari", "c51_atari", "rainbow_atari", "r2d1"])
def test_atari_scripts_run_under_every_sampler(run_in, script, sampler):
    flags = ["--n-step", "3", "--prioritized"] if script == "dqn_atari" else []
    if script == "r2d1":
        flags = ["--num-steps", "25", "--batch-size", "2", "--burn-in", "4", "--train-length", "8",
                 "--replay-ratio", "0.05"]
    _, run_dir, summary = run_in(script, *ATARI_SMOKE, "--sampler", sampler, *flags, timeout=600)
    assert summary["global_step"] >= 1200
    n_envs = json.loads((run_dir / "config.json").read_text())["n_envs"]
    assert n_envs % {"serial": 1, "alternating-gpu": 4}.get(sampler, 2) == 0  # the default split over the workers
    assert summary["final_eval_return"] <= 0  # Pong scores of an untrained agent, capped at 150 steps
    assert EXPECTED_METRICS <= logged_metrics(run_dir)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["global_step"] == summary["global_step"] and checkpoint["n_updates"] > 0


@pytest.mark.parametrize("script", DEEP_Q_SCRIPTS)
def test_continuous_actions_are_refused(script):
    proc = run_script(script, "--env-id", "Pendulum-v1", check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "discrete" in proc.stderr and proc.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("script, env_id", [("dqn", "ALE/Pong-v5"), ("c51", "ALE/Pong-v5"),
                                            ("dqn_atari", "CartPole-v1"), ("rainbow_atari", "CartPole-v1")])
def test_wrong_observation_kind_is_refused(script, env_id):
    proc = run_script(script, "--env-id", env_id, check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and env_id in proc.stderr


def test_r2d1_resume_continues_from_the_checkpoint(run_in, tmp_path):
    flags = ["--env-id", "tests.memory_envs:CartPoleNoVelocity-v0", "--total-timesteps", "6400",
             "--learning-starts", "1600", "--eval-episodes", "2", "--checkpoint-replay"]
    _, run_dir, first = run_in("r2d1", *flags, run_name="first")
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["global_step"] == 6400 and checkpoint["n_updates"] > 0 and "replay" in checkpoint
    # A run killed in its final evaluation (no summary.json yet) goes straight to it when resumed, with the
    # same weights.
    (run_dir / "summary.json").unlink()
    run_script("r2d1", "--resume", str(run_dir), timeout=300)
    assert read_summary(run_dir)["final_eval_return"] == first["final_eval_return"]
    # common.evaluate rebuilds the network through load_policy and reproduces the final evaluation.
    proc = subprocess.run([sys.executable, "-m", "common.evaluate", str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"eval return: {first['final_eval_return']:.2f}" in proc.stdout


@pytest.mark.parametrize("script, flags, head, outputs", [
    ("c51", ["--double", "--dueling", "--total-timesteps", "3000"], "net.4.weight", (2 + 1) * 51),
    ("r2d1", ["--dueling", "--total-timesteps", "4000", "--learning-starts", "1600"], "head.2.weight", 2 + 1),
], ids=["c51-double-dueling", "r2d1-dueling"])
def test_double_and_dueling_runs_on_cartpole(run_in, script, flags, head, outputs):
    _, run_dir, summary = run_in(script, "--env-id", "CartPole-v1", *flags, "--eval-episodes", "2")
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["n_updates"] > 0 and checkpoint["q_net"][head].shape[0] == outputs  # value + 2 advantages
    assert EXPECTED_METRICS <= logged_metrics(run_dir)
    # common.evaluate rebuilds the dueling network from the saved config and reproduces the final evaluation.
    episodes = evaluate_run(run_dir)
    assert np.mean([e.ret for e in episodes]) == pytest.approx(summary["final_eval_return"], rel=1e-6)


# ------------------------------------------------------------------------------------------------ units


def test_c51_dueling_logits_are_value_plus_mean_free_advantage():
    c51 = load_script("c51")
    torch.manual_seed(0)
    n_actions, atoms = 3, torch.linspace(-10, 10, 11)
    model = c51.CategoricalQNetwork(np.zeros(4, np.float32), n_actions, 16, atoms, dueling=True)
    obs = torch.randn(5, 4)
    with torch.no_grad():
        streams = model.net(obs).view(5, 1 + n_actions, 11)  # [value, advantage of each action], per atom
        logits = model.logits(obs)
        torch.testing.assert_close(logits.mean(1), streams[:, 0])  # the mean over actions is the value stream
        torch.testing.assert_close(logits - logits.mean(1, keepdim=True),
                                   streams[:, 1:] - streams[:, 1:].mean(1, keepdim=True))
        torch.testing.assert_close(model(obs), logits.log_softmax(-1))  # a distribution over atoms per action
        # Identifiable: an advantage shift shared by all actions changes nothing; a value shift moves every logit.
        bias = model.net[-1].bias.view(1 + n_actions, 11)
        shift = torch.randn(11)
        bias[1:] += shift
        torch.testing.assert_close(model.logits(obs), logits)
        bias[0] += shift
        torch.testing.assert_close(model.logits(obs), logits + shift)


def test_c51_double_lets_the_online_network_pick_the_bootstrap_action():
    c51 = load_script("c51")
    atoms = torch.linspace(-10, 10, 11)
    torch.manual_seed(1)
    q_net = c51.CategoricalQNetwork(np.zeros(4, np.float32), 3, 16, atoms)
    target_net = c51.CategoricalQNetwork(np.zeros(4, np.float32), 3, 16, atoms)
    n = 64
    s = SimpleNamespace(observation=torch.randn(n, 4), bootstrap_observation=torch.randn(n, 4),
                        action=torch.randint(0, 3, (n,)), n_step_return=torch.randn(n),
                        discount=0.99 * (torch.rand(n) > 0.2), weight=torch.ones(n))
    with torch.no_grad():
        rows = torch.arange(n)
        chosen = q_net(s.observation)[rows, s.action]
        online_pick = q_net.q_values(q_net(s.bootstrap_observation)).argmax(-1)
        target_pick = target_net.q_values(target_net(s.bootstrap_observation)).argmax(-1)
        assert (online_pick != target_pick).any()  # the two rules differ on this sample
        for double, pick in ((True, online_pick), (False, target_pick)):
            next_probs = target_net(s.bootstrap_observation)[rows, pick].exp()  # the target network's distribution
            target = categorical_projection(next_probs, s.n_step_return, s.discount, atoms)
            _, per_sample, _ = c51.categorical_loss(q_net, target_net, s, double)
            torch.testing.assert_close(per_sample, -(target * chosen).sum(-1))


def test_r2d1_dueling_q_is_value_plus_mean_free_advantage():
    r2d1 = load_script("r2d1")
    torch.manual_seed(0)
    model = r2d1.R2D1Network(np.zeros(2, np.float32), 3, hidden=16, lstm_size=8, dueling=True)
    obs, prev_action, prev_reward = torch.randn(5, 2), torch.randint(0, 3, (5,)), torch.randn(5)
    with torch.no_grad():
        q, (h, _) = model(obs, prev_action, prev_reward, model.initial_state(5, torch.device("cpu")))
        streams = model.head(h)  # [value, advantage of each action]
        torch.testing.assert_close(q, streams[:, :1] + streams[:, 1:] - streams[:, 1:].mean(-1, keepdim=True))
        torch.testing.assert_close(q.mean(-1), streams[:, 0])  # V is the mean Q
        model.head[-1].bias[1:] += 5.0  # an advantage shift shared by all actions changes no Q-value
        torch.testing.assert_close(model.q_values(h), q)


def test_r2d1_unroll_reproduces_the_actor_states_and_bootstraps_truncations():
    r2d1 = load_script("r2d1")
    torch.manual_seed(0)
    model = r2d1.R2D1Network(np.zeros(2, np.float32), 2, hidden=16, lstm_size=8)
    args = type("SamplerFlags", (), {"sampler": "serial", "n_envs": 3, "seed": 1})
    env_fn = partial(make_env, "tests.memory_envs:CartPoleNoVelocity-v0", max_episode_steps=15)
    sampler = make_sampler(args, env_fn, r2d1.policy_step, model, horizon=7)
    period, burn_in = 5, 4
    replay = SequenceReplayBuffer(sampler.example, 600, 3, sampler.example.agent_info.rnn_state, burn_in=burn_in,
                                  train_length=6, n_step=2, rnn_state_interval=period)
    for _ in range(20):
        batch, _ = sampler.collect(epsilon=0.5)
        replay.append(batch, batch.agent_info.rnn_state)
    sampler.close()
    s = replay.sample(64)
    with torch.no_grad():
        hs, cs = r2d1.unroll(model, s, burn_in)
        # After `period` steps the learner's state is the actor's state stored with the next sequence
        # (which the actor zeroed if that step ended an episode).
        unit, env = s.index // 3, s.index % 3
        stored = torch.from_numpy(replay.rnn_state.h[(unit + 1).numpy() % (replay.n_rows // period), env.numpy()])
        ended = s.terminated[period - 1] | s.truncated[period - 1]
        expected = torch.where(ended.unsqueeze(-1), torch.zeros_like(stored), hs[period - 1])
        torch.testing.assert_close(expected, stored, rtol=0, atol=1e-6)
        next_q = r2d1.next_q_values(model, s, model.q_values(hs), hs, cs)
        assert s.truncated.any() and s.terminated.any()
        t, n = s.truncated.nonzero(as_tuple=True)
        final_q, _ = model(s.next_observation[t, n], s.action[t, n], s.reward[t, n], r2d1.RnnState(hs[t, n], cs[t, n]))
        torch.testing.assert_close(next_q[t, n], final_q)
        inside = ~(s.terminated | s.truncated)[:-1]
        torch.testing.assert_close(next_q[:-1][inside], model.q_values(hs[1:])[inside])


def test_rainbow_noise_is_fresh_per_forward_and_off_when_deterministic():
    rainbow = load_script("rainbow_atari")
    torch.manual_seed(0)
    model = rainbow.RainbowNetwork(4, 3, torch.linspace(-10, 10, 11), noisy_std=0.5)
    obs = torch.randint(0, 255, (2, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        assert not torch.equal(model(obs), model(obs))
        torch.testing.assert_close(model(obs, noise=False), model(obs, noise=False))
        mean_only = rainbow.RainbowNetwork(4, 3, torch.linspace(-10, 10, 11), noisy_std=0.0)
        mean_only.load_state_dict(model.state_dict())
        torch.testing.assert_close(mean_only(obs), model(obs, noise=False))


def test_r2d1_feeds_atari_previous_rewards_sign_clipped_in_evaluation_as_in_training():
    r2d1 = load_script("r2d1")
    atari = r2d1.R2D1Network(np.zeros((4, 84, 84), np.uint8), 6, hidden=16, lstm_size=8, sign_reward=True)
    vector = r2d1.R2D1Network(np.zeros(2, np.float32), 2, hidden=16, lstm_size=8)
    raw = torch.tensor([[7.0, -3.0, 0.0]])  # evaluation envs report raw scores
    assert torch.equal(atari.inputs(torch.zeros(1, 3, 4, 84, 84), torch.zeros(1, 3), raw)[..., -1],
                       torch.tensor([[1.0, -1.0, 0.0]]))
    assert torch.equal(vector.inputs(torch.zeros(1, 3, 2), torch.zeros(1, 3), raw)[..., -1], raw)
    # What training sees: the training env's rewards are already signs, so training is unchanged.
    env = make_env("ALE/Pong-v5", 1, training=True)
    env.reset(seed=1)
    rewards = {env.step(env.action_space.sample())[1] for _ in range(400)}
    env.close()
    assert rewards <= {-1.0, 0.0, 1.0} and rewards != {0.0}
    args = r2d1.Args(env_id="ALE/Pong-v5")  # evaluation rebuilds the network with the clipping on
    saved = r2d1.R2D1Network(np.zeros((4, 84, 84), np.uint8), 6, args.hidden_size, args.lstm_size).state_dict()
    assert r2d1.load_policy(args, {"q_net": saved}, torch.device("cpu"))[0].sign_reward


def test_rainbow_draws_one_noise_sample_per_network_per_update():
    rainbow = load_script("rainbow_atari")
    atoms = torch.linspace(-10, 10, 51)
    q_net, target_net = rainbow.RainbowNetwork(4, 6, atoms, 0.5), rainbow.RainbowNetwork(4, 6, atoms, 0.5)
    calls = {"online": 0, "target": 0}

    def count(key):
        return lambda *_: calls.__setitem__(key, calls[key] + 1)

    for key, net in (("online", q_net), ("target", target_net)):
        for layer in net.modules():
            if isinstance(layer, rainbow.NoisyLinear):
                layer.register_forward_hook(count(key))
    n = 5
    s = SimpleNamespace(observation=torch.randint(0, 255, (n, 4, 84, 84), dtype=torch.uint8),
                        bootstrap_observation=torch.randint(0, 255, (n, 4, 84, 84), dtype=torch.uint8),
                        action=torch.randint(0, 6, (n,)), n_step_return=torch.randn(n), discount=torch.full((n,), 0.99),
                        weight=torch.ones(n))
    loss, per_sample, _ = rainbow.rainbow_loss(q_net, target_net, s)
    assert calls == {"online": 4, "target": 4}  # each noisy layer of each network ran once
    assert per_sample.shape == (n,) and torch.isfinite(loss)
