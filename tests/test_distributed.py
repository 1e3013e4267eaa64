"""Data-parallel training over gloo on CPU: gradient averaging, parameter sync, launching."""

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT

from common import distributed

STEPS, BATCH, WORLD = 5, 16, 2


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def make_batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH * WORLD, 3, generator=gen), torch.randn(BATCH * WORLD, 1, generator=gen))
            for _ in range(STEPS)]


def train(model, batches, rank=None):
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for x, y in batches:
        if rank is not None:
            x, y = x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        distributed.all_reduce_gradients(model.parameters())
        optimizer.step()
    return model


def _rank_main(rank, port, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init("cpu")
    model = make_model()
    if rank == 1:  # a different start: broadcast_parameters must make the replicas identical
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    distributed.broadcast_parameters(model)
    train(model, make_batches(), rank)
    episodes = distributed.gather_objects([(float(rank), rank + 1)])
    mean = distributed.all_reduce_mean(torch.tensor([float(rank)]))
    queue.put((rank, {k: v.numpy().copy() for k, v in model.state_dict().items()}, episodes, float(mean)))
    distributed.shutdown()


def test_two_ranks_stay_identical_and_match_one_process_on_the_whole_batch():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = distributed.free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        results = dict((r, (s, e, m)) for r, s, e, m in (queue.get(timeout=120) for _ in range(WORLD)))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    reference = train(make_model(), make_batches()).state_dict()
    for rank in range(WORLD):
        state, episodes, mean = results[rank]
        for name, value in reference.items():
            torch.testing.assert_close(torch.from_numpy(state[name]), value, rtol=1e-5, atol=1e-6)
        assert episodes == [(0.0, 1), (1.0, 2)] and mean == pytest.approx(0.5)
    assert all((results[0][0][k] == results[1][0][k]).all() for k in reference)


def test_single_process_helpers_are_identity():
    model = make_model()
    model(torch.randn(4, 3)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    distributed.all_reduce_gradients(model.parameters())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert distributed.gather_objects([1, 2]) == [1, 2] and distributed.world_size() == 1


def test_n_gpus_without_gpus_is_a_one_line_error():
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, str(ROOT / "algos" / "ppo.py"), "--n-gpus", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--n-gpus 2" in proc.stderr and proc.stderr.strip().count("\n") == 0


def torchrun(*args, timeout=900):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


SHUTDOWN_SCRIPT = """
import os, sys, torch
from common import distributed
distributed.init("cpu")
model = torch.nn.Linear(3, 1)
optimizer = torch.optim.Adam(model.parameters())  # the first optimizer imports torch._dynamo
model(torch.randn(4, 3)).sum().backward()
distributed.all_reduce_gradients(model.parameters())
optimizer.step()
distributed.shutdown()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(os.path.join(sys.argv[1], "threads-" + os.environ["RANK"]), "w") as f:
    f.write(" ".join(sorted(n for n in names if "gloo" in n)))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_shutdown_stops_gloo_threads_after_an_optimizer_was_built(tmp_path):
    # A gloo group that outlives shutdown leaves its worker threads running into interpreter exit, where one
    # still releasing the last collective's tensors aborts the rank ("terminate called without an active
    # exception"), now and then.
    script = tmp_path / "shutdown.py"
    script.write_text(SHUTDOWN_SCRIPT)
    proc = torchrun("--nproc-per-node", "2", "--master-port", str(distributed.free_port()), str(script),
                    str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Before the fix: "gloo_tcp_loop pt_gloo_runloop pt_gloo_runloop" on both ranks.
    assert [(tmp_path / f"threads-{r}").read_text() for r in range(2)] == ["", ""]


@pytest.mark.learning
def test_torchrun_two_ranks_ppo_learns_cartpole(tmp_path):
    proc = torchrun("--nproc-per-node", "2", "--master-port", str(distributed.free_port()), "algos/ppo.py",
                    "--device", "cpu", "--env-id", "CartPole-v1", "--total-timesteps", "100000", "--seed", "1",
                    "--output-dir", str(tmp_path), "--run-name", "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["global_step"] >= 100_000 and summary["final_eval_return"] >= 475, summary
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # only rank 0 wrote a run directory


def test_two_node_rendezvous_on_localhost(tmp_path):
    port = str(distributed.free_port())
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
              f"127.0.0.1:{port}", "--rdzv-id", "test"]
    script = ["algos/ppo.py", "--device", "cpu", "--total-timesteps", "1024", "--eval-episodes", "1",
              "--output-dir", str(tmp_path), "--run-name", "two-node"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *common, "--node-rank", str(r), *script],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in outputs]
    assert json.loads((tmp_path / "two-node" / "summary.json").read_text())["global_step"] >= 1024


def _exploration_rank_main(rank, world, port, queue):
    from types import SimpleNamespace

    from common.envs import make_env
    from common.samplers import make_sampler

    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        distributed.init("cpu")
    torch.set_num_threads(1)
    torch.manual_seed(1)  # what setup() does on every rank
    model = make_model()
    args = SimpleNamespace(seed=1, sampler="serial", n_envs=2)
    env_fn = partial(make_env, "tests.memory_envs:ConstantReward-v0")
    sampler = make_sampler(args, env_fn, _uniform_policy_step, model, horizon=5)
    batch, _ = sampler.collect()
    sampler.close()
    queue.put((rank, batch.action.numpy().copy(), [p.detach().numpy().copy() for p in model.parameters()]))
    distributed.shutdown()


def _uniform_policy_step(model, obs, prev_action, prev_reward, rnn_state, deterministic=False):
    """Random numbers from the process's global generator as actions (the env ignores them)."""
    return torch.randint(0, 2**20, (obs.shape[0],)), None, None


def _run_ranks(world):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = distributed.free_port()
    procs = [ctx.Process(target=_exploration_rank_main, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return dict((r, (a, params)) for r, a, params in (queue.get(timeout=120) for _ in range(world)))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def test_ranks_explore_with_their_own_generators_and_rank_0_keeps_the_single_process_stream():
    first, again, single = _run_ranks(2), _run_ranks(2), _run_ranks(1)
    assert not np.array_equal(first[0][0], first[1][0])  # the two ranks' warm-up actions differ
    assert np.array_equal(first[0][0], again[0][0]) and np.array_equal(first[1][0], again[1][0])  # seeded
    assert np.array_equal(first[0][0], single[0][0])  # rank 0 draws what a single process draws
    assert all(np.array_equal(a, b) for a, b in zip(first[0][1], first[1][1]))  # identical networks


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if b"algos/ppo.py" not in cmdline:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_rank_killed_ends_the_whole_run_and_resume_continues(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = ["algos/ppo.py", "--device", "cpu", "--sampler", "parallel-cpu", "--n-envs", "4", "--total-timesteps",
           "16000", "--checkpoint-every-s", "1", "--eval-episodes", "1", "--output-dir", str(tmp_path),
           "--run-name", "r"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                             str(distributed.free_port()), *run], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "r" / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "r" / "checkpoint.pt").exists(), "no checkpoint within 300 s"
        family = _descendants(proc.pid)
        rank1 = next(pid for pid in family if _rank_of(pid) == "1")
        os.kill(rank1, signal.SIGKILL)
        killed_at = time.monotonic()
        code = proc.wait(timeout=60)
        assert code != 0 and time.monotonic() - killed_at < 30
        time.sleep(2.0)  # sampler workers notice their rank is gone
        assert not [pid for pid in family if _alive(pid)], "processes of the run outlived it"
    finally:
        if proc.poll() is None:
            proc.kill()
    step = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["global_step"]
    resumed = torchrun("--nproc-per-node", "2", "--master-port", str(distributed.free_port()), "algos/ppo.py",
                       "--resume", str(tmp_path / "r"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step}" in resumed.stdout
    final_step = json.loads((tmp_path / "r" / "summary.json").read_text())["global_step"]
    batch = 4 * 64  # --n-envs x the CartPole preset's --num-steps
    assert 16000 <= final_step < 16000 + batch and (final_step - step) % batch == 0  # whole batches from `step`


# ---- Two ranks on halves of a fixed batch against one process on the whole, with clipping that fires ----

HALF, UPDATES, MAX_GRAD_NORM = 32, 4, 0.05


def _batch(family: str) -> dict:
    """A fixed batch of 2 x HALF samples with the fields the family's loss reads."""
    gen = torch.Generator().manual_seed(5)
    n = 2 * HALF
    if family == "ppo":
        return {"obs": torch.randn(n, 4, generator=gen), "action": torch.randint(0, 2, (n,), generator=gen),
                "old_log_prob": -torch.rand(n, generator=gen) - 0.5, "advantage": torch.randn(n, generator=gen),
                "returns": torch.randn(n, generator=gen), "old_value": torch.randn(n, generator=gen)}
    obs_dim, act = (4, torch.randint(0, 2, (n,), generator=gen)) if family == "dqn" else \
        (3, torch.rand(n, 1, generator=gen) * 4 - 2)
    return {"observation": torch.randn(n, obs_dim, generator=gen), "action": act,
            "bootstrap_observation": torch.randn(n, obs_dim, generator=gen),
            "n_step_return": torch.randn(n, generator=gen), "discount": torch.full((n,), 0.99),
            "weight": torch.ones(n)}


def _deterministic_noise(like: torch.Tensor) -> torch.Tensor:
    """Stand-in for torch.randn_like: a function of each row's values, so a sample's noise does not depend on
    where it sits in the batch (one process on the whole batch draws what the two ranks draw on their halves)."""
    return torch.sin(1000.0 * like.detach().sum(-1, keepdim=True) + torch.arange(like.shape[-1]))


def _update(family: str, rank: int | None) -> list[torch.Tensor]:
    """UPDATES steps of the family's script update (loss, backward, all-reduce, clip, step); the parameters.

    Plain SGD: Adam would turn float rounding in near-zero gradients into steps of its full learning rate.
    """
    randn_like = torch.randn_like
    try:
        return _update_sgd(family, rank)
    finally:
        torch.randn_like = randn_like


def _update_sgd(family: str, rank: int | None) -> list[torch.Tensor]:
    from types import SimpleNamespace

    from conftest import load_script

    batch = _batch(family)
    if rank is not None:
        batch = {k: v[rank * HALF:(rank + 1) * HALF] for k, v in batch.items()}
    torch.manual_seed(0)
    if family == "ppo":
        ppo = load_script("ppo")
        model = ppo.ActorCritic(np.zeros(4, np.float32), __import__("gymnasium").spaces.Discrete(2), 16, norm_obs=False)
        args = SimpleNamespace(clip_coef=0.2, norm_adv=False, clip_vloss=True, ent_coef=0.01, vf_coef=0.5)
        optimizers = [(torch.optim.SGD(model.parameters(), lr=0.5), model.parameters,
                       lambda: ppo.ppo_loss(model, *batch.values(), args)[0])]
    elif family == "dqn":
        dqn = load_script("dqn")
        q_net, target_net = (dqn.QNetwork(np.zeros(4, np.float32), 2, 16, dueling=True) for _ in range(2))
        model, sample = q_net, SimpleNamespace(**batch)
        optimizers = [(torch.optim.SGD(q_net.parameters(), lr=0.5), q_net.parameters,
                       lambda: dqn.td_loss(q_net, target_net, sample, True)[0])]
    else:
        sac = load_script("sac")
        torch.randn_like = _deterministic_noise
        actor = sac.Actor(np.zeros(3, np.float32), 1, 16, np.array([-2.0]), np.array([2.0]))
        critics, target_critics = (sac.Critics(np.zeros(3, np.float32), 1, 16) for _ in range(2))
        log_alpha = torch.tensor(-1.0, requires_grad=True)
        model, sample = torch.nn.ModuleList([actor, critics]), SimpleNamespace(**batch)
        optimizers = [
            (torch.optim.SGD(critics.parameters(), lr=0.5), critics.parameters,
             lambda: sac.soft_q_loss(critics, target_critics, actor, log_alpha, sample)[0]),
            (torch.optim.SGD([*actor.parameters(), log_alpha], lr=0.5), lambda: [*actor.parameters(), log_alpha],
             lambda: sac.actor_and_alpha_loss(actor, critics, log_alpha, sample.observation, -1.0)[0]),
        ]
    clipped = 0
    for _ in range(UPDATES):
        for optimizer, parameters, loss in optimizers:
            optimizer.zero_grad()
            loss().backward()
            distributed.all_reduce_gradients(parameters())
            clipped += float(torch.nn.utils.clip_grad_norm_(parameters(), MAX_GRAD_NORM)) > MAX_GRAD_NORM
            optimizer.step()
    assert clipped > 0  # the clipping fired, so its order relative to the averaging matters
    return [p.detach().clone() for p in model.parameters()]


def _equality_rank_main(rank, port, family, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init("cpu")
    queue.put((rank, [p.numpy() for p in _update(family, rank)]))
    distributed.shutdown()


@pytest.mark.parametrize("family", ["ppo", "dqn", "sac"])
def test_two_ranks_with_clipping_equal_one_process_on_the_whole_batch(family):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = distributed.free_port()
    procs = [ctx.Process(target=_equality_rank_main, args=(r, port, family, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        ranks = dict(queue.get(timeout=120) for _ in range(2))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    reference = _update(family, None)
    for rank in range(2):
        for got, want in zip(ranks[rank], reference):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("script", sorted(p.stem for p in (ROOT / "algos").glob("*.py")))
def test_every_script_averages_gradients_before_clipping_and_stepping(script):
    lines = (ROOT / "algos" / f"{script}.py").read_text().splitlines()
    backward = [i for i, line in enumerate(lines) if ".backward()" in line]
    assert backward
    for i in backward:
        after = lines[i + 1:i + 4]
        assert "distributed.all_reduce_gradients(" in after[0], f"{script}.py:{i + 2}: {after[0].strip()}"
