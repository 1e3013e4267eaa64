"""benchmark/loop_overhead.py: a smoke run of every case, and the plain loops do the scripts' amount of work."""

import math
import os
import subprocess
import sys

from conftest import ROOT

CASES = ["dqn", "ppo", "sac", "td3"]


def table_rows(stdout: str) -> dict[str, dict[str, str]]:
    """The markdown table's rows by case, as {column: cell}."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    return {row["case"]: row for row in rows}


def test_quick_run_reports_every_case_and_the_plain_dqn_loop_does_the_scripts_updates():
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark" / "loop_overhead.py"), "--quick"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    output = f"exit code {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    rows = table_rows(proc.stdout) if "| case |" in proc.stdout else {}
    assert sorted(rows) == sorted(CASES), output
    for case, row in rows.items():
        for column in ["rlsolo CPU s", "plain CPU s", "CPU ratio", "rlsolo wall s", "plain wall s", "wall ratio"]:
            value = float(row[column])
            assert math.isfinite(value) and value > 0, (case, column, output)
        start_ups = [float(value) for value in row["start-up CPU s (rlsolo / plain)"].split(" / ")]
        assert len(start_ups) == 2 and all(math.isfinite(v) and v > 0 for v in start_ups), (case, output)
        rlsolo_steps, plain_steps = row["env steps"].split(" / ")
        assert int(rlsolo_steps) == int(plain_steps) > 0, (case, output)
    rlsolo_updates, plain_updates = (int(n) for n in rows["dqn"]["updates (rlsolo / plain)"].split(" / "))
    assert rlsolo_updates == plain_updates > 0, output
    assert proc.returncode == 0, output


def test_profile_split_puts_each_sample_in_the_first_category_its_stack_reaches(tmp_path):
    from conftest import load_benchmark

    split = load_benchmark("profile_split")
    raw = tmp_path / "run.raw"
    raw.write_text("\n".join([
        # the first optimizer's dynamo import: optimizer construction, not imports
        "<module> (dqn.py:1);main (dqn.py:9);Adam.__init__ (torch/optim/adam.py:102);"
        "_find_and_load (<frozen importlib._bootstrap>:1176) 30",
        "<module> (dqn.py:1);_find_and_load (<frozen importlib._bootstrap>:1176) 20",
        # an env step under the vector env: the environment, not the vector env's lines
        "plain (loop.py:5);RecordEpisodeStatistics.step (gymnasium/wrappers/vector/common.py:9);"
        "SyncVectorEnv.step (gymnasium/vector/sync_vector_env.py:10);TimeLimit.step (gymnasium/wrappers/common.py:3) 7",
        "plain (loop.py:5);RecordEpisodeStatistics.step (gymnasium/wrappers/vector/common.py:9);"
        "SyncVectorEnv.step (gymnasium/vector/sync_vector_env.py:11) 2",
        "main (dqn.py:9);collect (common/samplers.py:4);EpisodeStatistics.step (common/envs.py:8) 3",
        # the loop's own lines: listed by the innermost own frame, below any library frame
        "main (dqn.py:9);collect (common/samplers.py:4);epsilon_greedy (common/kernels.py:140);"
        "Tensor.tolist (torch/_tensor.py:1) 5",
        "main (dqn.py:9);collect (common/samplers.py:4) 4",
        "main (dqn.py:9);td_loss (dqn.py:50);Module._call_impl (torch/nn/modules/module.py:1) 6",
        " 1",
    ]) + "\n")
    with open(raw) as f:
        categories, own, total = split.read_raw(f)
    assert total == 78
    assert categories == {
        "start-up: optimizer construction (and the imports it triggers)": 30, "start-up: imports": 20,
        "environments (env, wrappers, episode statistics)": 10,
        "vector env (SyncVectorEnv and its wrappers' own lines)": 2,
        split.OWN: 9, "network forward (nn.Module calls)": 6, split.NO_FRAME: 1,
    }
    assert own == {"epsilon_greedy (kernels.py)": 5, "collect (samplers.py)": 4}
