"""Checkpoints from one declaration: every declared object, the counters and the RNG states round-trip."""

import json
import math
import os
import random
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import ROOT, load_script, read_summary, run_script

from common.envs import UsageError
from common.logger import Counters, checkpoint_state, load_checkpoint, restore_checkpoint, save_checkpoint
from common.networks import Critics


def step_once(optimizer: torch.optim.Optimizer) -> None:
    """One Adam step on a made-up loss, so that the optimizer has state to save."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad()
    sum((p.float() - 0.5).square().sum() for p in params).backward()
    optimizer.step()


def ppo_family(seed: int) -> dict:
    ppo = load_script("ppo")
    torch.manual_seed(seed)
    space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    model = ppo.ActorCritic(np.zeros(3, np.float32), space, 16, norm_obs=True)
    model.obs_norm.update(torch.randn(32, 3) * seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, eps=1e-5)
    step_once(optimizer)
    reward_scaler = ppo.RewardScaler(4, 0.99)
    reward_scaler(torch.rand(5, 4) * seed, torch.zeros(5, 4, dtype=torch.bool))
    return dict(model=model, optimizer=optimizer, reward_scaler=reward_scaler)


def dqn_family(seed: int) -> dict:
    dqn = load_script("dqn")
    torch.manual_seed(seed)
    q_net, target_net = (dqn.QNetwork(np.zeros(4, np.float32), 2, 16, dueling=True) for _ in range(2))
    optimizer = torch.optim.Adam(q_net.parameters(), lr=1e-3)
    step_once(optimizer)
    return dict(q_net=q_net, target_net=target_net, optimizer=optimizer)


def sac_family(seed: int) -> dict:
    sac = load_script("sac")
    torch.manual_seed(seed)
    actor = sac.Actor(np.zeros(3, np.float32), 1, 16, np.array([-2.0]), np.array([2.0]))
    critics, target_critics = (Critics(np.zeros(3, np.float32), 1, 16) for _ in range(2))
    log_alpha = torch.tensor(math.log(0.2) * seed, requires_grad=True)
    critic_optimizer = torch.optim.Adam(critics.parameters(), lr=1e-3)
    actor_optimizer = torch.optim.Adam([{"params": actor.parameters()}, {"params": [log_alpha], "lr": 1e-3}], lr=3e-4)
    step_once(critic_optimizer)
    step_once(actor_optimizer)
    return dict(actor=actor, critics=critics, target_critics=target_critics, log_alpha=log_alpha,
                critic_optimizer=critic_optimizer, actor_optimizer=actor_optimizer)


def flat_state(obj) -> list:
    """Every tensor and number in an object's state, in a fixed order."""
    state = obj.detach() if isinstance(obj, torch.Tensor) else obj.state_dict()

    def walk(x):
        if isinstance(x, dict):
            return [item for key in sorted(x, key=str) for item in walk(x[key])]
        if isinstance(x, (list, tuple)):
            return [item for value in x for item in walk(value)]
        return [x]

    return walk(state)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


@pytest.mark.parametrize("family", [ppo_family, dqn_family, sac_family], ids=["policy-gradient", "deep-q", "qpg"])
def test_every_declared_object_the_counters_and_the_rng_round_trip(tmp_path, family):
    saved = family(seed=1)
    counters = Counters(global_step=12_345, n_updates=678, updates_owed=0.75, owed_through=12_344, wall_time_s=91.5)
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    np.random.normal()  # numpy's generator now holds the second normal of its pair, which the checkpoint keeps
    save_checkpoint(tmp_path, checkpoint_state(saved, counters))
    draws = (torch.rand(4), np.random.rand(4), random.random(), np.random.normal())

    restored = family(seed=2)
    for name in saved:  # the two builds differ before the restore, so the comparison below can fail
        assert not same(flat_state(saved[name]), flat_state(restored[name])), name
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restored_counters, checkpoint = restore_checkpoint(tmp_path, restored)

    for name in saved:
        assert same(flat_state(saved[name]), flat_state(restored[name])), name
    assert restored_counters == counters
    assert torch.equal(torch.rand(4), draws[0]) and np.array_equal(np.random.rand(4), draws[1])
    assert random.random() == draws[2] and np.random.normal() == draws[3]
    assert set(checkpoint) == set(saved) | {"global_step", "n_updates", "updates_owed", "owed_through", "wall_time_s",
                                            "rng"}
    # The restored optimizer steps the restored parameters (not the ones it was built with).
    optimizer = next(obj for obj in restored.values() if isinstance(obj, torch.optim.Optimizer))
    before = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
    step_once(optimizer)
    after = [p.detach() for group in optimizer.param_groups for p in group["params"]]
    assert any(not torch.equal(x, y) for x, y in zip(before, after))


def test_the_replay_ratio_pays_updates_for_the_steps_since_the_last_call_and_none_in_the_warm_up():
    count, due = Counters(), []
    for step in range(1, 11):  # one step a collect, learning from step 4, an update every other step
        count.global_step = step
        due.append(len(count.updates_due(0.5, learning_starts=4)))
    assert due == [0, 0, 0, 0, 1, 0, 1, 0, 1, 0]
    count.global_step = 22  # a collect of 12 steps at 0.25 owes 3 updates, and the half left over carries
    assert len(count.updates_due(0.25, learning_starts=4)) == 3 and count.updates_owed == 0.5


def test_updates_due_runs_the_updates_that_paying_one_at_a_time_runs():
    rng = random.Random(0)
    for _ in range(200):
        ratio, count, owed, step = rng.choice([0.1, 0.25, 1 / 3, 0.7, 1.0, 4.0]), Counters(), 0.0, 0
        for _ in range(50):
            step += rng.choice([1, 4, 8, 128])
            owed += ratio * (step - count.global_step)
            count.global_step = step
            expected = 0
            while owed >= 1:  # the rule the scripts ran before: one update owed less at a time
                owed -= 1
                expected += 1
            assert len(count.updates_due(ratio)) == expected and count.updates_owed == owed


def test_a_resumed_run_owes_updates_only_for_the_steps_it_takes(tmp_path):
    counters = Counters(global_step=5_000, n_updates=4_000, updates_owed=0.5, owed_through=5_000)
    state = checkpoint_state({}, counters)
    del state["owed_through"]  # a checkpoint written before the counter existed
    save_checkpoint(tmp_path, state)
    count, _ = restore_checkpoint(tmp_path, {})
    count.global_step += 3
    assert len(count.updates_due(0.5)) == 2 and count.updates_owed == 0.0


def test_restore_names_what_the_checkpoint_lacks(tmp_path):
    save_checkpoint(tmp_path, checkpoint_state(dqn_family(seed=1), Counters()))
    with pytest.raises(UsageError, match="has no actor"):
        restore_checkpoint(tmp_path, {"actor": torch.nn.Linear(2, 2)})
    with pytest.raises(UsageError, match="no checkpoint.pt"):
        restore_checkpoint(tmp_path / "missing", {})
    assert restore_checkpoint(None, {}) == (Counters(), None)


@pytest.mark.parametrize("script, flags, declared", [
    ("ppo", ["--total-timesteps", "1024"], {"model", "optimizer", "reward_scaler"}),
    ("dqn", ["--total-timesteps", "700", "--learning-starts", "500", "--replay-ratio", "1", "--n-envs", "1",
             "--checkpoint-replay"],
     {"q_net", "target_net", "optimizer", "replay"}),
    ("sac", ["--env-id", "Pendulum-v1", "--total-timesteps", "1100", "--learning-starts", "1000"],
     {"actor", "critics", "target_critics", "log_alpha", "critic_optimizer", "actor_optimizer"}),
])
def test_a_run_checkpoints_what_its_script_declares(run_in, script, flags, declared):
    _, run_dir, summary = run_in(script, *flags, "--eval-episodes", "1")
    checkpoint = load_checkpoint(run_dir)
    assert set(checkpoint) == declared | {"global_step", "n_updates", "updates_owed", "owed_through", "wall_time_s",
                                          "rng"}
    assert checkpoint["global_step"] == summary["global_step"] == int(flags[flags.index("--total-timesteps") + 1])
    if script != "ppo":  # one update per step from step learning_starts on, that step included
        learning_starts = int(flags[flags.index("--learning-starts") + 1])
        assert checkpoint["n_updates"] == checkpoint["global_step"] - learning_starts + 1


@pytest.mark.parametrize("family", [ppo_family, dqn_family, sac_family], ids=["policy-gradient", "deep-q", "qpg"])
def test_init_from_loads_networks_and_statistics_and_leaves_optimizers_and_counters_fresh(tmp_path, family):
    saved = family(seed=2)
    save_checkpoint(tmp_path, checkpoint_state(saved, Counters(global_step=500, n_updates=40)))
    fresh = family(seed=5)
    fresh_optimizers = {name: flat_state(obj) for name, obj in fresh.items() if isinstance(obj, torch.optim.Optimizer)}
    count, checkpoint = restore_checkpoint(None, fresh, init_from=tmp_path)
    assert checkpoint is None
    for name, obj in fresh.items():
        if isinstance(obj, torch.optim.Optimizer):
            assert same(flat_state(obj), fresh_optimizers[name]), name  # untouched
        else:
            assert same(flat_state(obj), flat_state(saved[name])), name  # networks, statistics, learned tensors
    assert count == Counters()


def test_init_from_a_network_of_another_shape_is_a_one_line_error(tmp_path):
    save_checkpoint(tmp_path, checkpoint_state(dqn_family(seed=1), Counters()))
    dqn = load_script("dqn")
    wider = {name: dqn.QNetwork(np.zeros(4, np.float32), 2, 32, dueling=True) for name in ("q_net", "target_net")}
    with pytest.raises(UsageError, match="its q_net does not fit") as error:
        restore_checkpoint(None, wider, init_from=tmp_path)
    assert "\n" not in str(error.value) and "config.json" in str(error.value)
    with pytest.raises(UsageError, match="no checkpoint.pt"):
        restore_checkpoint(None, wider, init_from=tmp_path / "missing")


def test_a_run_started_from_another_evaluates_as_that_run_before_it_trains(run_in, tmp_path):
    flags = ["--env-id", "CartPole-v1", "--eval-episodes", "3"]
    _, _, untrained = run_in("ppo", *flags, "--total-timesteps", "512", "--learning-rate", "0", run_name="untrained")
    _, first_dir, first = run_in("ppo", *flags, "--total-timesteps", "8192", run_name="first")
    # No learning in the second run (learning rate 0): its final evaluation is the first run's network's.
    _, second_dir, second = run_in("ppo", *flags, "--total-timesteps", "512", "--learning-rate", "0",
                                   "--init-from", str(first_dir), run_name="second")
    assert first["final_eval_return"] != untrained["final_eval_return"]
    assert second["final_eval_return"] == first["final_eval_return"]
    assert load_checkpoint(second_dir)["global_step"] == 512



@pytest.mark.parametrize("script, env_id", [("dqn", "CartPole-v1"), ("sac", "Pendulum-v1")])
def test_a_run_killed_in_its_warm_up_resumes_from_a_checkpoint_of_the_warm_up(tmp_path, script, env_id):
    flags = ["--env-id", env_id, "--n-envs", "1", "--replay-ratio", "1", "--checkpoint-replay", "--buffer-size", "5000",
             "--eval-episodes", "1"]
    # A warm-up longer than the run is given: it is killed once it has checkpointed, while it fills the replay.
    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "algos" / f"{script}.py"), *flags, "--total-timesteps", "1000000000",
               "--learning-starts", "1000000000", "--checkpoint-every-s", "0.2", "--output-dir", str(tmp_path),
               "--run-name", "run"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not (run_dir / "checkpoint.pt").exists():
            time.sleep(0.05)
        time.sleep(0.5)  # a few more checkpoints of the warm-up
    finally:
        proc.kill()
        proc.wait()
    saved = load_checkpoint(run_dir)
    step = saved["global_step"]
    assert 0 < step and saved["n_updates"] == 0
    assert saved["replay"]["counters"][0] == step  # the replay of every step so far (one env)
    # Resumed with its replay and a budget that ends 200 steps after its warm-up: it fills the replay for
    # 100 more steps, then makes the updates of an uninterrupted run, one per step from the warm-up's end on.
    config = json.loads((run_dir / "config.json").read_text())
    config.update(learning_starts=step + 100, total_timesteps=step + 300)
    (run_dir / "config.json").write_text(json.dumps(config))
    resumed = run_script(script, "--resume", str(run_dir), timeout=300)
    assert f"resumed from step {step}" in resumed.stdout
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint["global_step"] == read_summary(run_dir)["global_step"] == step + 300
    assert checkpoint["n_updates"] == 201
