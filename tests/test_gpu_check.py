"""benchmark/gpu_check.sh without a GPU: the dry run end to end; its table, time limits, wheel-set checks and
output readers on inputs made here; the cv2 stand-in against OpenCV."""

import importlib.util
import os
import re
import subprocess
import sys
import zipfile

import ale_py
import cv2
import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import ROOT
from test_samplers import process_gone


def load(name: str, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


gpu_check = load("gpu_check", ROOT / "benchmark" / "gpu_check.py")
cv2_numpy = load("cv2_numpy", ROOT / "benchmark" / "cv2_numpy" / "cv2.py")


def check_script(*args: str, cwd=ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "benchmark" / "gpu_check.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


def test_dry_run_writes_a_row_per_step_with_the_statuses_this_machine_calls_for(tmp_path):
    proc = check_script("--dry-run", "--out", "out", cwd=tmp_path)  # --out relative to where it is run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = gpu_check.table_rows(tmp_path / "out" / "gpu_check.md")
    assert [row[0] for row in rows] == ["1 install (dry run: the wheel set)", "2 pytest -m cuda", "3 algo_speed",
                                        "4 sampler_throughput", "5 ppo_atari Pong", "time limit (dry run)"]
    assert all(len(row) == 4 for row in rows)
    # A fresh clone has no .whl/ (it is ignored by git): the row says so and the dry run still passes.
    has_wheels = any((ROOT / ".whl").glob("*.whl"))
    assert rows[0][1] == ("ok" if has_wheels else gpu_check.NO_WHEELS), rows[0]
    if has_wheels:
        assert "every import and dependency is covered" in rows[0][3]
    cuda = torch.cuda.is_available()
    assert [row[1] for row in rows[1:5]] == [gpu_check.DRY if cuda else gpu_check.NO_CUDA] * 4
    if not cuda:  # the pytest step ran: every CUDA test was collected and skipped
        n_skipped = int(rows[1][3].split()[0])
        assert rows[1][3] == f"{n_skipped} skipped" and n_skipped >= 20, rows[1]
    assert rows[5][1] == gpu_check.TIMED_OUT and 0.9 <= float(rows[5][2]) < 5, rows[5]


@pytest.mark.parametrize("args, message", [
    ([], "--out DIR is required"),
    (["--out"], "--out needs a value"),
    (["--out", "x", "--fast"], "unknown argument '--fast'"),
    (["--out", "x", "--steps", "pytest,lint"], "unknown step 'lint'"),
    (["--out", "x", "--limit", "pytest=soon"], "--limit pytest=soon"),
])
def test_bad_input_is_a_one_line_error(args, message, tmp_path):
    proc = check_script(*args, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------
# The table and the time limits
# --------------------------------------------------------------------------------------------------


def test_the_table_is_valid_after_every_row(tmp_path):
    path = tmp_path / "gpu_check.md"
    table = gpu_check.Table(path, "title")
    rows = [("1 a", "ok", 1.234, "x | y"), ("2 b", "failed (exit 3)", 2, "line one\n\n  line two\n"),
            ("3 c", "timed out", 3, "z" * 2000)]
    for n, row in enumerate(rows, 1):
        table.add(*row)
        assert [len(cells) for cells in gpu_check.table_rows(path)] == [4] * n
    read = gpu_check.table_rows(path)
    assert read[0] == ["1 a", "ok", "1.2", "x \\| y"]
    assert read[1][3] == "line one<br>line two"
    assert read[2][3] == "..." + "z" * 700
    gpu_check.Table(path, "a rerun of some steps", append=True).add("4 d", "ok", 0.0, "")
    assert [cells[0] for cells in gpu_check.table_rows(path)] == ["1 a", "2 b", "3 c", "4 d"]
    gpu_check.Table(path, "a new check")
    assert gpu_check.table_rows(path) == []


def test_the_step_limits_with_their_kill_graces_fit_in_8_minutes_as_documented():
    assert set(gpu_check.LIMITS_S) == set(gpu_check.GRACE_S) == set(gpu_check.STEPS)
    assert sum(gpu_check.LIMITS_S.values()) + sum(gpu_check.GRACE_S.values()) < 8 * 60
    readme = (ROOT / "benchmark" / "README.md").read_text()
    documented = {step: int(limit) for n, step in enumerate(gpu_check.STEPS, 1)
                  for limit in re.findall(rf"^\| {n} {step} \| (\d+) \|", readme, re.MULTILINE)}
    assert documented == gpu_check.LIMITS_S


def test_a_step_past_its_limit_is_stopped_with_its_children(tmp_path):
    script = ("import subprocess, time\n"
              "child = subprocess.Popen(['sleep', '60'])\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(60)\n")
    step = gpu_check.run_step([sys.executable, "-c", script], 1, tmp_path / "step.log", grace_s=1)
    assert step.timed_out and gpu_check.status_of(step) == gpu_check.TIMED_OUT
    assert 0.9 <= step.seconds < 5
    assert process_gone(int(step.output.splitlines()[-1])), "the step's child outlived the time limit"


def test_an_interrupted_step_gets_sigint_first_and_a_failed_one_its_exit_code(tmp_path):
    script = ("import time\n"
              "try:\n"
              "    time.sleep(60)\n"
              "except KeyboardInterrupt:\n"
              "    print('stopped cleanly', flush=True)\n"
              "    raise\n")
    step = gpu_check.run_step([sys.executable, "-c", script], 1, tmp_path / "int.log", signal="INT", grace_s=5)
    assert step.timed_out and "stopped cleanly" in step.output and step.seconds < 5
    step = gpu_check.run_step([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30,
                              tmp_path / "fail.log")
    assert gpu_check.status_of(step) == "failed (exit 3)" and gpu_check.tail(step.output).endswith("boom")
    assert (tmp_path / "fail.log").read_text().startswith("$ ")


# --------------------------------------------------------------------------------------------------
# The wheel set against the imports
# --------------------------------------------------------------------------------------------------


def make_wheel(directory, name: str, version: str, files: list[str], requires: list[str],
               tag: str = "py3-none-any"):
    path = directory / f"{name}-{version}-{tag}.whl"
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as archive:
        for file in files:
            archive.writestr(file, "")
        archive.writestr(f"{info}/METADATA", metadata)
        archive.writestr(f"{info}/RECORD", "".join(f"{f},,\n" for f in [*files, f"{info}/METADATA"]))
    return path


def test_wheels_give_their_modules_and_unmet_requirements(tmp_path):
    alpha = gpu_check.read_wheel(make_wheel(
        tmp_path, "alpha_pkg", "1.0",
        ["alpha/__init__.py", "alpha/core.py", "_alpha_speedups.cpython-312-x86_64-linux-gnu.so",
         "alpha_pkg.libs/libz.so", "alpha_pkg-1.0.data/scripts/alpha"],
        ["beta>=2", "gamma; extra == 'docs'", "delta; python_version < '3.10'", "torch>=2", "nvidia-cublas-cu12",
         "epsilon; sys_platform == 'linux'"],
        tag="cp312-cp312-manylinux_2_28_x86_64"))
    beta = gpu_check.read_wheel(make_wheel(tmp_path, "Beta", "2.0", ["beta.py"], ["zeta_lib"]))
    assert (alpha.name, alpha.version, alpha.modules) == ("alpha-pkg", "1.0", {"alpha", "_alpha_speedups"})
    assert beta.modules == {"beta"}
    # gamma is an extra and delta not for Python 3.12; torch and the CUDA libraries are the GPU machine's own.
    assert gpu_check.unmet_requirements([alpha, beta]) == ["alpha-pkg needs epsilon; sys_platform == 'linux'",
                                                           "beta needs zeta_lib"]
    # cv2 has a stand-in; torch and numpy are preinstalled.
    assert gpu_check.uncovered_modules({"alpha", "beta", "torch", "numpy", "cv2", "yaml"}, [alpha, beta]) == ["yaml"]
    assert gpu_check.bad_tags([alpha, beta]) == []
    old = gpu_check.read_wheel(make_wheel(tmp_path, "old", "1", ["old.py"], [],
                                          tag="cp311-cp311-manylinux_2_17_x86_64"))
    windows = gpu_check.read_wheel(make_wheel(tmp_path, "win", "1", ["win.py"], [], tag="py3-none-win_amd64"))
    abi3 = gpu_check.read_wheel(make_wheel(tmp_path, "stable", "1", ["stable.py"], [],
                                           tag="cp37-abi3-manylinux2014_x86_64"))
    assert gpu_check.bad_tags([old, windows, abi3]) == [old.path.name, windows.path.name]


def test_module_level_imports_are_those_run_at_import_time():
    source = ("import os, numpy as np\n"
              "import gymnasium.spaces\n"
              "from torch import nn\n"
              "from . import sibling\n"
              "from .pkg import thing\n"
              "if os.name == 'posix':\n"
              "    import alpha\n"
              "try:\n"
              "    import beta\n"
              "except ImportError:\n"
              "    import gamma\n"
              "class Model:\n"
              "    import delta\n"
              "def later():\n"
              "    import wandb\n")
    assert gpu_check.module_level_imports(source) == {"os", "numpy", "gymnasium", "torch", "alpha", "beta", "gamma",
                                                      "delta"}


def test_repo_imports_follow_the_test_modules_a_scanned_file_imports(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "common" / "envs.py").write_text("import json\nimport gymnasium\nfrom common import kernels\n")
    (tmp_path / "tests" / "test_x.py").write_text("import pytest\nfrom helpers import thing\n")
    (tmp_path / "tests" / "helpers.py").write_text("import yaml\n")
    (tmp_path / "tests" / "test_unscanned.py").write_text("import matplotlib\n")
    found = gpu_check.repo_imports(tmp_path, ["common/*.py", "tests/test_x.py"])
    assert found == {"gymnasium": ["common/envs.py"], "pytest": ["tests/test_x.py"], "yaml": ["tests/helpers.py"]}


# --------------------------------------------------------------------------------------------------
# Reading the steps' output
# --------------------------------------------------------------------------------------------------


def test_pytest_results_from_the_summary_or_from_a_run_cut_short():
    finished = ("[gw1] [ 50%] FAILED tests/test_cuda.py::test_b[sac]\n"
                "FAILED tests/test_cuda.py::test_b[sac] - AssertionError: x\n"
                "======= 27 passed, 1 failed, 2 skipped, 1 error in 101.23s (0:01:41) =======\n")
    assert gpu_check.pytest_counts(finished) == {"passed": 27, "failed": 1, "skipped": 2, "error": 1}
    assert gpu_check.pytest_result(finished) == "27 passed, 1 failed, 2 skipped, 1 error; failed: test_b[sac]"
    cut_short = ("[gw0] [  3%] PASSED tests/test_cuda.py::test_a\n"
                 "[gw1] [  6%] FAILED tests/test_cuda.py::test_b[td3]\n"
                 "[gw0] [  9%] PASSED tests/test_cuda.py::test_c\n")
    assert gpu_check.pytest_counts(cut_short) == {"passed": 2, "failed": 1}
    assert gpu_check.pytest_result(cut_short) == "2 passed, 1 failed; failed: test_b[td3]"


def test_algo_speed_stopped_after_its_first_algorithm_keeps_that_algorithms_rows(monkeypatch, capsys):
    # The GPU check stops algo_speed at its time limit (compiling cold can take most of it): the rows of the
    # algorithm timed before the stop must already be out, for the check's table to read them.
    algo_speed = load("algo_speed", ROOT / "benchmark" / "algo_speed.py")
    timed = []

    def time_rounds(configs, batches, args, device):
        if timed:
            raise KeyboardInterrupt  # stands for the time limit, while td3 is timed
        timed.append(list(configs))
        return {name: (100.0 * (i + 1), 50.0 * (i + 1)) for i, name in enumerate(configs)}

    monkeypatch.setattr(algo_speed, "time_rounds", time_rounds)
    with pytest.raises(KeyboardInterrupt):
        algo_speed.main(algo_speed.Args(batch_size=16, hidden_size=32, compile=False))
    assert timed == [["reference", "rlsolo eager"]]
    assert gpu_check.algo_speed_result(capsys.readouterr().out) == "sac updates/s: reference 100, eager 200 (2.00x)"


def test_benchmark_outputs_are_read_into_their_key_numbers(tmp_path):
    algo_speed = ("| update (updates/s) | wall clock | CPU time | ratio (wall clock) |\n|---|---|---|---|\n"
                  "| sac reference | 500 | 480 | 1.00x |\n| sac rlsolo eager | 900 | 850 | 1.80x |\n"
                  "| sac rlsolo cudagraphs | 4000 | 3900 | 8.00x |\n| td3 reference | 700 | 690 | 1.00x |\n")
    assert gpu_check.algo_speed_result(algo_speed) == (
        "sac updates/s: reference 500, eager 900 (1.80x), cudagraphs 4000 (8.00x); td3 updates/s: reference 700")
    sampler = ("policy   sampler          main threads   steps/s    median  CPU ms/step\n"
               "cnn      parallel-cpu                1      9000      8800        1.500\n"
               "cnn      alternating-gpu             1     12000     11900        0.900\n"
               "random   parallel-cpu                1     20000     19000        0.400\n")
    assert gpu_check.sampler_rates(sampler) == {"parallel-cpu": 9000.0, "alternating-gpu": 12000.0}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert gpu_check.ppo_result(run_dir) == (False, "no progress.csv")
    (run_dir / "progress.csv").write_text("global_step,wall_time_s,charts/SPS,losses/value_loss\n"
                                          "4096,1.0,,0.5\n8192,2.0,4100,0.4\n12288,3.0,4200,\n")
    (run_dir / "episodes.csv").write_text("global_step,return,length\n4096,-21.0,800\n8192,-19.0,900\n"
                                          "12288,-17.0,1000\n")
    assert gpu_check.ppo_result(run_dir) == (True, "12288 steps, SPS 4200; 3 episodes, mean return of the last 3 "
                                                   "-19.0, first -21, best -17")


# --------------------------------------------------------------------------------------------------
# The cv2 stand-in
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, size", [((210, 160), (84, 84)), ((250, 160), (84, 84)), ((210, 160), (105, 80)),
                                         ((210, 160), (80, 84)), ((97, 77), (31, 40)), ((84, 84), (84, 84))])
def test_the_cv2_stand_in_resizes_as_opencv_bit_for_bit(shape, size):
    frames = np.random.default_rng(0).integers(0, 256, (50, *shape), dtype=np.uint8)
    for frame in frames:
        expected = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        assert np.array_equal(cv2_numpy.resize(frame, size, interpolation=cv2_numpy.INTER_AREA), expected)


def test_the_cv2_stand_in_makes_the_atari_frames_opencv_makes():
    gym.register_envs(ale_py)
    env = gym.make("ALE/Breakout-v5", obs_type="grayscale")
    env.reset(seed=1)
    try:
        for _ in range(60):
            frame = env.step(env.action_space.sample())[0]
            assert np.array_equal(cv2_numpy.resize(frame, (84, 84), interpolation=cv2_numpy.INTER_AREA),
                                  cv2.resize(frame, (84, 84), interpolation=cv2.INTER_AREA))
    finally:
        env.close()


@pytest.mark.parametrize("frame, size, interpolation", [
    (np.zeros((168, 168), np.uint8), (84, 84), cv2_numpy.INTER_AREA),  # an integer factor: OpenCV's other path
    (np.zeros((50, 50), np.uint8), (84, 84), cv2_numpy.INTER_AREA),  # upscaling
    (np.zeros((210, 160, 3), np.uint8), (84, 84), cv2_numpy.INTER_AREA),  # colour
    (np.zeros((210, 160), np.float32), (84, 84), cv2_numpy.INTER_AREA),
    (np.zeros((210, 160), np.uint8), (84, 84), 1),  # INTER_LINEAR
])
def test_the_cv2_stand_in_refuses_what_it_would_not_do_as_opencv(frame, size, interpolation):
    with pytest.raises(ValueError, match="install opencv-python"):
        cv2_numpy.resize(frame, size, interpolation=interpolation)
