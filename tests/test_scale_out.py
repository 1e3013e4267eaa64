"""Scale-out paths on their defaults: parallel samplers pick a valid --n-envs, --n-procs runs the --n-gpus code."""


import pytest
from conftest import read_summary, run_script

# The Atari scripts run every sampler kind on their default --n-envs in their families' tests
# (test_deep_q.py, test_policy_gradient.py), with updates; these are the others.
SCRIPTS = ["a2c", "ppo", "dqn", "c51", "ddpg", "td3", "sac"]


@pytest.mark.parametrize("sampler", ["parallel-cpu", "parallel-gpu", "alternating-gpu"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_runs_each_parallel_sampler_on_its_defaults(run_in, script, sampler):
    # One collect of the script's defaults; no evaluation episodes (an untrained greedy Atari policy can
    # take the whole time limit).
    proc, _, summary = run_in(script, "--sampler", sampler, "--total-timesteps", "1", "--eval-episodes", "0",
                              timeout=300)
    config_n_envs = int(next(line.split()[1].rstrip(":") for line in [*proc.stdout.splitlines(), "--n-envs 0:"]
                             if line.startswith("--n-envs ")))
    assert summary is not None and summary["global_step"] >= 1
    groups = 2 if sampler == "alternating-gpu" else 1
    if config_n_envs:  # the default did not split: it was rounded up to workers x groups, and said so
        assert config_n_envs % (2 * groups) == 0


def test_headline_command_reports_the_missing_gpus_on_a_machine_without_them():
    proc = run_script("td3", "--sampler", "alternating-gpu", "--n-gpus", "2", check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--n-gpus 2" in proc.stderr and "--n-procs" in proc.stderr


def test_default_n_envs_is_rounded_up_and_logged(run_in):
    proc, run_dir, summary = run_in("td3", "--env-id", "Pendulum-v1", "--sampler", "alternating-gpu",
                                    "--n-workers", "3", "--total-timesteps", "1", "--eval-episodes", "0")
    assert "--n-envs 6: the default 1 rounded up to a multiple of --n-workers 3 x 2 alternating groups" in proc.stdout
    assert summary["global_step"] == 6  # one step of each of the 6 environments


@pytest.mark.parametrize("script, flags", [
    ("ppo", ["--total-timesteps", "4096"]),
    ("td3", ["--env-id", "Pendulum-v1", "--total-timesteps", "1200", "--learning-starts", "1000"]),
])
def test_n_procs_runs_the_local_data_parallel_launcher_on_cpu(tmp_path, script, flags):
    proc = run_script(script, "--n-procs", "2", "--device", "cpu", *flags, "--eval-episodes", "2",
                      "--output-dir", str(tmp_path), "--run-name", "ddp", timeout=600)
    summary = read_summary(tmp_path / "ddp")
    assert summary["global_step"] == int(flags[flags.index("--total-timesteps") + 1])
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # only rank 0 wrote a run directory
    assert proc.stdout.count("run directory:") == 1  # and only rank 0 reported


def test_n_gpus_and_n_procs_together_are_refused():
    proc = run_script("ppo", "--n-gpus", "1", "--n-procs", "2", check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--n-procs" in proc.stderr


def test_target_kl_stops_every_rank_at_the_same_epoch(tmp_path):
    # A KL target so small that the early stop fires; ranks deciding apart would hang in the next collective.
    proc = run_script("ppo", "--n-procs", "2", "--device", "cpu", "--total-timesteps", "8192", "--target-kl", "1e-4",
                      "--eval-episodes", "1", "--output-dir", str(tmp_path), "--run-name", "kl", timeout=300)
    assert read_summary(tmp_path / "kl")["global_step"] == 8192, proc.stdout[-2000:]
