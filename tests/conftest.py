import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")


def default_sigint() -> None:
    """A Popen preexec_fn: the child takes SIGINT as Ctrl-C, even where this test run was started in the
    background of a shell (which starts it with SIGINT ignored, a disposition every child inherits)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_script(script: str, *flags: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python algos/<script>.py <flags>` from the repository root; return the finished process."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "algos" / f"{script}.py"), *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(flags)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def load_script(name: str):
    """Import algos/<name>.py as a module (its `main` does not run)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "algos" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def read_progress(run_dir: Path) -> list[dict]:
    """The rows of a run's progress.csv (a metric not logged in a row reads as "")."""
    with open(run_dir / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def run_in(tmp_path):
    """Run a script with its output under tmp_path; returns (process, run_dir, summary or None)."""

    def _run(script: str, *flags: str, run_name: str = "run", **kwargs):
        proc = run_script(script, *flags, "--output-dir", str(tmp_path), "--run-name", run_name, **kwargs)
        run_dir = tmp_path / run_name
        summary = read_summary(run_dir) if (run_dir / "summary.json").exists() else None
        return proc, run_dir, summary

    return _run


def pytest_collection_modifyitems(config, items):
    """Half of the seeded learning runs (the longest tests) open each half of the collection. `--dist worksteal`
    (pyproject.toml) gives each of the two workers one half, and a worker that runs dry takes tests from the
    end of the other's queue, so the suite ends on short tests."""
    learning = [item for item in items if item.get_closest_marker("learning")]
    rest = [item for item in items if not item.get_closest_marker("learning")]
    first, second = learning[0::2], learning[1::2]
    split = max(0, len(items) // 2 - len(first))
    items[:] = first + rest[:split] + second + rest[split:]
