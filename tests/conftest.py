import atexit
import csv
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))  # benchmark scripts import their siblings (launch.py) by name
os.environ.setdefault("WANDB_MODE", "offline")
# Seeded runs give the same numbers on every x86 CPU, Intel or AMD: MKL's matrix products take its
# COMPATIBLE code path (the one branch MKL keeps bit-identical across vendors; its AVX2/AVX-512 branches,
# strict or not, are honoured on Intel only and AMD gets its own kernels), torch's own kernels their AVX2
# versions and oneDNN's at most AVX2, whatever the CPU would pick by itself. Learning tests assert the
# returns of seeded runs; left to choose, two CPUs differ in the last bits of a matrix product, and a seeded
# run then learns differently. Set here, before torch is imported, so every process a test starts inherits them.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


def default_sigint() -> None:
    """A Popen preexec_fn: the child takes SIGINT as Ctrl-C, even where this test run was started in the
    background of a shell (which starts it with SIGINT ignored, a disposition every child inherits)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ScriptServer:
    """The client of this test process's fork server (tests/zygote.py): runs scripts as fresh processes
    would, without paying their imports each time. RLSOLO_TEST_SUBPROCESS=1 starts real processes instead."""

    def __init__(self):
        self.process = None

    def start(self, env: dict) -> None:
        self.env, self.pending = env, b""
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "zygote.py")], cwd=ROOT, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.reply(timeout=300) == {"ready": True}

    def reply(self, timeout: float | None) -> dict:
        """The server's next line (unbuffered reads: a line already read is never waited for again)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            if not select.select([self.process.stdout], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the script server ended (exit code {self.process.wait()})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        same_imports = all(env.get(k) == self.env.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")) \
            if self.process is not None else False
        if self.process is None or self.process.poll() is not None or not same_imports:
            self.close()
            self.start(env)
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.touch()
            err.touch()
            request = {"argv": argv, "cwd": str(ROOT), "env": env, "stdout": str(out), "stderr": str(err)}
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
            pid = self.reply(timeout=60)["pid"]
            try:
                returncode = self.reply(timeout)["returncode"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self.reply(timeout=60)
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(argv, returncode, out.read_text(), err.read_text())

    def close(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


SCRIPT_SERVER = ScriptServer()
atexit.register(SCRIPT_SERVER.close)


def run_script(script: str, *flags: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python algos/<script>.py <flags>` from the repository root; return the finished process."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [str(ROOT / "algos" / f"{script}.py"), *flags]
    if os.environ.get("RLSOLO_TEST_SUBPROCESS") == "1":
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    else:
        proc = SCRIPT_SERVER.run(argv, env, timeout)
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


def load_benchmark(name: str):
    """Import benchmark/<name>.py as a fresh module (its command line does not run)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmark" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
