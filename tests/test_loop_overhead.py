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
