"""The GPU check: install the carried wheels, run the CUDA tests and the GPU benchmarks, one table row per step.

    bash benchmark/gpu_wheels.sh                           # with network: the wheels the GPU machine lacks, in .whl/
    bash benchmark/gpu_check.sh --out results/gpu          # on the GPU machine: under 8 minutes
    bash benchmark/gpu_check.sh --out /tmp/gpu --dry-run   # anywhere, no CUDA needed: what can be checked without it

gpu_check.sh checks its flags and runs this file with the Python that has torch. The steps, in order, each
under `timeout` (limits in LIMITS_S; with the kill grace they add up to under 8 minutes), each appending its
row (status, seconds, key numbers or the tail of its log; whole logs in <out>/logs/) to <out>/gpu_check.md as
soon as it ends, so the table is whole and valid after every step, whatever happens to the next one:

1. install: `pip install --no-index --no-deps --target <out>/site .whl/*.whl` (plus benchmark/cv2_numpy/cv2.py
   where the machine has no cv2); every later step runs with <out>/site and the repository on PYTHONPATH.
   The row names torch, CUDA, the GPU and what was installed.
2. pytest: `pytest -m cuda tests/test_cuda.py`, on xdist workers (half the cores, at most 8).
3. algo_speed: `benchmark/algo_speed.py --device cuda`: sac and td3 updates per second, the straightforward
   reference against the scripts' update eager, compiled and in CUDA graphs.
4. sampler_throughput: `benchmark/sampler_throughput.py --device cuda` with the CNN policy, 2 Pong envs per
   core over one worker per core: parallel-gpu and alternating-gpu against parallel-cpu, gymnasium's vector
   envs and ale-py's.
5. ppo_atari: `algos/ppo_atari.py` on ALE/Pong-v5 with the fastest parallel kind of step 4, stopped (SIGINT)
   at its time limit: SPS and the returns it reached.

`--dry-run` needs neither CUDA nor network. Step 1 checks the wheel set instead of installing it: every
module-level import of common/, algos/, the benchmark scripts and the tests the check runs, every module
imported at run time here when an Atari and a MuJoCo env are made, and every dependency the wheels declare
must come from a wheel in .whl/, from the GPU machine's own packages (PREINSTALLED) or from a stand-in
(STAND_INS); without .whl/ (a fresh clone) the row says so. Step 2 runs (its tests skip without CUDA); steps
3-5 are reported skipped; a last row runs `sleep 30` under a 1 s limit, to show that an overrunning step is
stopped and reported. The exit code is 0 when every step ended as it should (ok; in a dry run also skipped
or without .whl/), else 1.
"""

from __future__ import annotations

import argparse
import ast
import csv
import email.parser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".whl"
STEPS = ("install", "pytest", "algo_speed", "sampler_throughput", "ppo_atari")
# Seconds each step may run; then TERM (ppo_atari: INT, so that the run stops cleanly) and, GRACE_S later, KILL.
LIMITS_S = {"install": 40, "pytest": 130, "algo_speed": 65, "sampler_throughput": 50, "ppo_atari": 170}
GRACE_S = {"install": 2, "pytest": 2, "algo_speed": 2, "sampler_throughput": 2, "ppo_atari": 10}
TIMED_OUT = "timed out"
NO_CUDA, DRY = "skipped (no CUDA)", "skipped (dry run)"
NO_WHEELS = "no .whl: run benchmark/gpu_wheels.sh"

# What the GPU machine has without the wheels: Python, torch (CUDA), numpy and torch's own dependencies
# (and its nvidia-* / cuda-* libraries).
PREINSTALLED = {
    "distributions": {"torch", "numpy", "triton", "filelock", "typing-extensions", "sympy", "mpmath", "networkx",
                      "jinja2", "markupsafe", "fsspec", "setuptools"},
    "modules": {"torch", "torchgen", "functorch", "numpy", "triton", "filelock", "typing_extensions", "sympy",
                "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "setuptools", "pkg_resources",
                "_distutils_hack"},
}
STAND_INS = {"cv2": ROOT / "benchmark" / "cv2_numpy" / "cv2.py"}
# The files the GPU machine runs (and the test modules they import, found by following their imports).
SCANNED = ["common/*.py", "algos/*.py", "benchmark/algo_speed.py", "benchmark/sampler_throughput.py",
           "benchmark/gpu_check.py", "tests/conftest.py", "tests/test_cuda.py"]
# The GPU machine's Python and platform, for the environment markers of the wheels' requirements.
TARGET_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.0", "implementation_name": "cpython",
                  "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
                  "platform_machine": "x86_64", "os_name": "posix", "extra": ""}


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------

HEADER = "| step | status | seconds | result |\n|---|---|---|---|\n"


def cell(text: str, limit: int = 700) -> str:
    """`text` as one markdown table cell: lines joined by <br>, pipes escaped, at most `limit` characters
    (the end kept: the end of a log says most)."""
    text = "<br>".join(line.strip() for line in str(text).splitlines() if line.strip())
    if len(text) > limit:
        text = "..." + text[-limit:]
    return text.replace("|", "\\|")


class Table:
    """<out>/gpu_check.md: a title line, then a markdown table that every `add` extends by one row."""

    def __init__(self, path: Path, title: str, append: bool = False):
        self.path = path
        if not (append and path.is_file() and HEADER in path.read_text()):
            path.write_text(f"# GPU check\n\n{title}\n\n{HEADER}")

    def add(self, step: str, status: str, seconds: float, result: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"| {cell(step)} | {cell(status)} | {seconds:.1f} | {cell(result)} |\n")
            f.flush()
            os.fsync(f.fileno())


def table_rows(path: Path) -> list[list[str]]:
    """The rows of the table in `path` (header and separator excluded) as lists of cells."""
    lines = path.read_text().splitlines()
    start = lines.index(HEADER.splitlines()[0])
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[start + 2:]]


# --------------------------------------------------------------------------------------------------
# Running a step under `timeout`
# --------------------------------------------------------------------------------------------------


@dataclass
class StepRun:
    returncode: int
    seconds: float
    output: str

    @property
    def timed_out(self) -> bool:
        return self.returncode in (124, 137)  # timeout's own status, or the command's after the KILL


def run_step(command: list[str], limit_s: float, log: Path, env: dict | None = None, signal: str = "TERM",
             grace_s: float = 2) -> StepRun:
    """Run `command` under `timeout` (its process group gets `signal`, then KILL); output to `log` too."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(command)}\n")
        f.flush()
        proc = subprocess.run(["timeout", "-s", signal, "-k", f"{grace_s:g}", f"{limit_s:g}", *command], cwd=ROOT,
                              env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return StepRun(proc.returncode, time.monotonic() - start, log.read_text())


def tail(output: str, n_lines: int = 4) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return "\n".join(lines[-n_lines:])


def status_of(run: StepRun) -> str:
    if run.timed_out:
        return TIMED_OUT
    return "ok" if run.returncode == 0 else f"failed (exit {run.returncode})"


# --------------------------------------------------------------------------------------------------
# The wheel set against the imports
# --------------------------------------------------------------------------------------------------


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Wheel:
    path: Path
    name: str
    version: str
    tags: str
    modules: set[str] = field(default_factory=set)
    requires: list[str] = field(default_factory=list)


def read_wheel(path: Path) -> Wheel:
    """A wheel's distribution name, version, tags, top-level modules (from the files it holds) and Requires-Dist."""
    name, version, *_, python, abi, platform = path.stem.split("-")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
    modules = set()
    for entry in names:
        top = entry.split("/")[0]
        if top.endswith((".dist-info", ".data", ".libs")) or top == "__pycache__" or top.endswith(".pth"):
            continue
        modules.add(top.split(".")[0] if "/" not in entry else top)
    return Wheel(path, normalize(metadata["Name"] or name), metadata["Version"] or version,
                 f"{python}-{abi}-{platform}", modules, metadata.get_all("Requires-Dist") or [])


def module_level_imports(source: str) -> set[str]:
    """Top-level names of the modules a file imports at module level (not inside functions), absolute only."""
    names: set[str] = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):  # run when the module is imported
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(source).body)
    return names


def repo_imports(root: Path = ROOT, patterns: list[str] = SCANNED) -> dict[str, list[str]]:
    """Third-party modules imported at module level by the scanned files (and the test modules they import):
    {module: [files]}. Standard-library and the repository's own modules are left out."""
    tests = {p.stem: p for p in (root / "tests").glob("*.py")}
    local = {"common", "algos", "benchmark", "__future__"} | set(tests)
    queue = [p for pattern in patterns for p in sorted(root.glob(pattern))]
    seen: set[Path] = set()
    found: dict[str, list[str]] = {}
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in module_level_imports(path.read_text()):
            if module in tests:
                queue.append(tests[module])
            elif module not in local and module not in sys.stdlib_module_names:
                found.setdefault(module, []).append(str(path.relative_to(root)))
    return found


def unmet_requirements(wheels: list[Wheel], preinstalled: set[str] = PREINSTALLED["distributions"]) -> list[str]:
    """'wheel needs requirement' for every declared dependency (for TARGET_MARKERS) that no wheel or
    preinstalled distribution provides (any version is taken to do)."""
    from packaging.requirements import Requirement

    have = {w.name for w in wheels} | {normalize(n) for n in preinstalled}
    unmet = []
    for wheel in wheels:
        for text in wheel.requires:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(TARGET_MARKERS):
                continue
            name = normalize(requirement.name)
            if name not in have and not name.startswith(("nvidia-", "cuda-")):  # torch's CUDA libraries
                unmet.append(f"{wheel.name} needs {text}")
    return unmet


def uncovered_modules(modules: dict[str, list[str]] | set[str], wheels: list[Wheel],
                      preinstalled: set[str] = PREINSTALLED["modules"]) -> list[str]:
    """The modules no wheel, preinstalled package or stand-in (STAND_INS) provides, sorted."""
    provided = {m for w in wheels for m in w.modules} | preinstalled | set(STAND_INS)
    return sorted(m for m in modules if m not in provided)


def bad_tags(wheels: list[Wheel]) -> list[str]:
    """Wheels that CPython 3.12 on manylinux x86_64 cannot install."""
    bad = []
    for w in wheels:
        python, abi, platform = w.tags.split("-")
        pythons_ok = any(p in ("py3", "py2", "cp312") or (p.startswith("cp3") and abi == "abi3")
                         for p in python.split("."))
        platform_ok = platform == "any" or ("x86_64" in platform and ("manylinux" in platform))
        if not (pythons_ok and platform_ok):
            bad.append(w.path.name)
    return bad


def runtime_imports() -> list[str]:
    """Third-party top-level modules loaded here by the repository's modules and by making, resetting and
    stepping an Atari and a MuJoCo env (what their packages import at run time)."""
    import importlib

    for module in ("common.envs", "common.config", "common.logger", "common.samplers", "common.replay",
                   "common.async_mode", "common.evaluate", "common.networks", "tyro", "pytest", "xdist"):
        importlib.import_module(module)
    from common.envs import make_env

    for env_id in ("ALE/Pong-v5", "Hopper-v5"):
        env = make_env(env_id, 0)
        env.reset(seed=0)
        env.step(env.action_space.sample())
        env.close()
    # Top-level modules that come from files (extension modules also create modules of their own, fileless).
    names = {name for name, module in list(sys.modules.items())
             if "." not in name and (getattr(module, "__file__", None) or getattr(module, "__path__", None))}
    local = {"common", "algos", "benchmark", "tests", "__main__", "__mp_main__", "gpu_check"}
    return sorted(n for n in names if n not in sys.stdlib_module_names and n not in local
                  and not n.startswith("__editable__"))


def check_wheels(wheel_dir: Path = WHEEL_DIR, with_runtime: bool = True) -> tuple[bool, str]:
    """(complete, report) of the wheel set in `wheel_dir` against the imports and declared dependencies."""
    wheels = [read_wheel(p) for p in sorted(wheel_dir.glob("*.whl"))]
    size_mib = sum(w.path.stat().st_size for w in wheels) / 2**20
    problems = []
    if bad := bad_tags(wheels):
        problems.append(f"not for CPython 3.12 manylinux x86_64: {', '.join(bad)}")
    imports = {**repo_imports(), "xdist": ["step 2 (pytest -n)"]}
    if missing := uncovered_modules(imports, wheels):
        problems.append("imported, in no wheel: " + ", ".join(f"{m} ({imports[m][0]})" for m in missing))
    try:
        if unmet := unmet_requirements(wheels):
            problems.append("dependencies missing: " + "; ".join(unmet))
    except ImportError:
        problems.append("the declared dependencies were not checked (needs the packaging module)")
    runtime_note = ""
    if with_runtime:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, __file__, "--runtime-imports"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        if proc.returncode == 0:
            loaded = json.loads(proc.stdout.strip().splitlines()[-1])
            if missing := uncovered_modules(set(loaded), wheels):
                problems.append("loaded at run time, in no wheel: " + ", ".join(missing))
            runtime_note = f", {len(loaded)} modules loaded at run time"
        else:
            runtime_note = " (the run-time imports were not checked: this Python cannot make the envs)"
    summary = (f"{len(wheels)} wheels, {size_mib:.1f} MiB; {len(imports)} third-party modules imported"
               f"{runtime_note}")
    if problems:
        return False, summary + "; " + "; ".join(problems)
    return True, summary + ": every import and dependency is covered"


# --------------------------------------------------------------------------------------------------
# The GPU machine's software
# --------------------------------------------------------------------------------------------------


def probe(packages: bool = True) -> dict:
    """Versions of Python, torch and CUDA, the GPUs, the cores, a C compiler, and (with `packages`) the
    versions of the packages the check uses and where cv2 comes from."""
    import importlib
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "gpus": [], "cores": len(os.sched_getaffinity(0)),
            "cc": shutil.which("cc") or shutil.which("gcc"), "packages": {}}
    if info["cuda_available"]:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    for module in ("numpy", "gymnasium", "ale_py", "mujoco", "tyro", "pytest", "xdist", "cv2") if packages else ():
        try:
            info["packages"][module] = getattr(importlib.import_module(module), "__version__", "?")
        except Exception as error:  # a missing or broken package is what this reports
            info["packages"][module] = f"missing ({type(error).__name__})"
    return info


def describe(info: dict) -> str:
    gpus = f"{len(info['gpus'])} x {info['gpus'][0]}" if info["gpus"] else "no CUDA device"
    packages = ", ".join(f"{name} {version}" for name, version in info["packages"].items())
    return (f"Python {info['python']}, torch {info['torch']}, CUDA {info['cuda']}, {gpus}, {info['cores']} cores, "
            f"C compiler {info['cc'] or 'none (torch.compile needs one)'}; {packages}")


def install_into(site: Path) -> int:
    """Install .whl/*.whl into `site` (pip, or unzipped where pip is missing), add the cv2 stand-in where there
    is no cv2, and print the probe of the result as JSON (the last line)."""
    wheels = sorted(WHEEL_DIR.glob("*.whl"))
    if not wheels:
        print(f"error: no wheels in {WHEEL_DIR}: run bash benchmark/gpu_wheels.sh where there is network")
        return 1
    site.mkdir(parents=True, exist_ok=True)
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade",
                        "--no-compile", "--target", str(site), *map(str, wheels)], check=True)
    else:
        print("pip is missing: unzipping the wheels")
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    has_cv2 = subprocess.run([sys.executable, "-c", "import cv2"], env=env, capture_output=True).returncode == 0
    if not has_cv2:
        shutil.copy(STAND_INS["cv2"], site / "cv2.py")
        print("no cv2 here: installed benchmark/cv2_numpy/cv2.py")
    proc = subprocess.run([sys.executable, __file__, "--probe", "all"], env=env, capture_output=True, text=True)
    print(proc.stdout, proc.stderr, sep="", end="")
    return proc.returncode


# --------------------------------------------------------------------------------------------------
# Reading the steps' output
# --------------------------------------------------------------------------------------------------


def pytest_counts(output: str) -> dict[str, int]:
    """{outcome: count} from pytest's final summary line, or, when the run was cut short, from its -v lines."""
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)", line)
               and re.search(r" in [\d.]+s", line)]
    if summary:
        return {word.rstrip("s") if word.startswith("error") else word: int(n)
                for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary[-1])}
    counts: dict[str, int] = {}
    for outcome in re.findall(r"\b(PASSED|FAILED|SKIPPED|ERROR)\b", output):
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    return counts


def pytest_result(output: str) -> str:
    counts = pytest_counts(output)
    text = ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) or tail(output)
    failed = sorted({m.split("::", 1)[1].split(" ")[0] for m in re.findall(r"(?:FAILED|ERROR) (\S+::\S+)", output)})
    return text + (f"; failed: {', '.join(failed)}" if failed else "")


def algo_speed_result(output: str) -> str:
    """'sac updates/s: reference R, eager E (x), ...' from algo_speed.py's update table (wall clock)."""
    rows: dict[str, list[str]] = {}
    row = r"^\| (sac|td3) (reference|rlsolo [a-z]+) \| (\d+) \| \d+ \| ([\d.]+x) \|$"
    for algo, name, wall, ratio in re.findall(row, output, re.MULTILINE):
        short = name.replace("rlsolo ", "")
        rows.setdefault(algo, []).append(f"{short} {wall}" + ("" if short == "reference" else f" ({ratio})"))
    return "; ".join(f"{algo} updates/s: {', '.join(items)}" for algo, items in rows.items())


def sampler_rates(output: str) -> dict[str, float]:
    """{configuration: steps/s} of the CNN policy from sampler_throughput.py's table."""
    return {config: float(sps) for config, sps in
            re.findall(r"^cnn\s+(\S+)\s+\d+\s+(\d+)\s+\d+\s+[\d.]+$", output, re.MULTILINE)}


def ppo_result(run_dir: Path) -> tuple[bool, str]:
    """(trained, 'N steps, SPS; episodes and returns') of a ppo_atari run directory."""
    progress = run_dir / "progress.csv"
    if not progress.is_file():
        return False, "no progress.csv"
    with open(progress, newline="") as f:
        rows = list(csv.DictReader(f))
    sps = [float(r["charts/SPS"]) for r in rows if r.get("charts/SPS")]
    steps = max((int(float(r["global_step"])) for r in rows), default=0)
    returns = []
    if (run_dir / "episodes.csv").is_file():
        with open(run_dir / "episodes.csv", newline="") as f:
            returns = [float(r["return"]) for r in csv.DictReader(f)]
    text = f"{steps} steps, SPS {sps[-1]:.0f}" if sps else f"{steps} steps"
    if returns:
        last = returns[-20:]
        text += (f"; {len(returns)} episodes, mean return of the last {len(last)} {sum(last) / len(last):.1f}, "
                 f"first {returns[0]:.0f}, best {max(returns):.0f}")
    return bool(sps), text


# --------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message}: see bash benchmark/gpu_check.sh --help\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="directory of gpu_check.md, the logs, the runs and site/")
    parser.add_argument("--dry-run", action="store_true", help="check what can be checked without CUDA")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)} "
                        "(the rows are appended to an existing table)")
    parser.add_argument("--limit", action="append", default=[], metavar="STEP=SECONDS",
                        help="another time limit for a step")
    parser.add_argument("--check-wheels", action="store_true", help="check .whl/ against the imports and exit")
    parser.add_argument("--probe", choices=["all", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--runtime-imports", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--install-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.out or args.check_wheels or args.probe or args.runtime_imports or args.install_into):
        parser.error("--out DIR is required (where gpu_check.md and the logs go)")
    args.steps = [s for s in args.steps.split(",") if s]
    if unknown := [s for s in args.steps if s not in STEPS]:
        parser.error(f"unknown step {unknown[0]!r} in --steps: use {', '.join(STEPS)}")
    args.limits = dict(LIMITS_S)
    for item in args.limit:
        step, _, seconds = item.partition("=")
        if step not in STEPS or not re.fullmatch(r"\d+(\.\d+)?", seconds):
            parser.error(f"--limit {item}: use STEP=SECONDS with STEP one of {', '.join(STEPS)}")
        args.limits[step] = float(seconds)
    return args


def last_json(output: str) -> dict | None:
    """The JSON object on the last line of `output`, or None."""
    try:
        return json.loads(output.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return None


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(packages=args.probe == "all")))
        return 0
    if args.runtime_imports:
        print(json.dumps(runtime_imports()))
        return 0
    if args.install_into:
        return install_into(args.install_into)
    if args.check_wheels:
        if not list(WHEEL_DIR.glob("*.whl")):
            print(f"error: {NO_WHEELS}", file=sys.stderr)
            return 1
        complete, report = check_wheels()
        print(report)
        return 0 if complete else 1

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs, site = out / "logs", out / "site"
    command = shlex.join(["bash", "benchmark/gpu_check.sh", *(sys.argv[1:] if argv is None else argv)])
    table = Table(out / "gpu_check.md", f"`{command}` at commit {git_commit()}, started "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", append=args.steps != list(STEPS))
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    paths = [str(ROOT)] if args.dry_run else [str(site), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    python = sys.executable
    expected = {"ok"} | ({NO_CUDA, DRY, NO_WHEELS} if args.dry_run else set())
    statuses: list[str] = []

    def add(step: str, status: str, seconds: float, result: str) -> None:
        statuses.append(status)
        table.add(step, status, seconds, result)
        print(f"{step}: {status} ({seconds:.1f} s) {result}", flush=True)

    def run(name: str, command: list[str], **kwargs) -> StepRun:
        return run_step(command, args.limits[name], logs / f"{name}.log", env, grace_s=GRACE_S[name], **kwargs)

    # 1. install
    info = None
    if "install" in args.steps and args.dry_run:
        start = time.monotonic()
        if list(WHEEL_DIR.glob("*.whl")):
            complete, report = check_wheels()
            add("1 install (dry run: the wheel set)", "ok" if complete else "failed", time.monotonic() - start, report)
        else:
            add("1 install (dry run: the wheel set)", NO_WHEELS, time.monotonic() - start, f"no wheels in {WHEEL_DIR}")
    elif "install" in args.steps:
        step = run("install", [python, __file__, "--install-into", str(site)])
        info = last_json(step.output) if step.returncode == 0 else None
        if info is not None:
            (out / "probe.json").write_text(json.dumps(info, indent=2) + "\n")
        status = status_of(step) if step.returncode or info else "failed"  # exit 0 but no probe: a broken install
        add("1 install", status, step.seconds, describe(info) if info else tail(step.output))
    if info is None:  # a dry run, a rerun of later steps, or a failed install: is there CUDA?
        proc = subprocess.run([python, __file__, "--probe", "torch"], cwd=ROOT, env=env, capture_output=True,
                              text=True)
        info = last_json(proc.stdout) or {"cuda_available": False, "cores": 1}
    cuda, cores = info["cuda_available"], info["cores"]
    skip = DRY if (args.dry_run and cuda) else NO_CUDA if not cuda else None

    # 2. pytest -m cuda
    if "pytest" in args.steps:
        workers = 0 if skip == DRY or cores < 4 else min(8, cores // 2)
        if skip == DRY:
            add("2 pytest -m cuda", DRY, 0.0, "")
        else:
            step = run("pytest", [python, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-n", str(workers),
                                  "-p", "no:cacheprovider", "-v", "-rfE"])
            counts = pytest_counts(step.output)
            status = status_of(step)
            if status == "ok" and not cuda and counts.get("skipped") and not counts.get("passed"):
                status = NO_CUDA
            add("2 pytest -m cuda", status, step.seconds, pytest_result(step.output))

    # 3. algo_speed
    if "algo_speed" in args.steps:
        if skip:
            add("3 algo_speed", skip, 0.0, "")
        else:
            step = run("algo_speed", [python, "benchmark/algo_speed.py", "--device", "cuda", "--no-end-to-end",
                                      "--seconds", "1", "--rounds", "2"])
            result = algo_speed_result(step.output)
            if step.returncode or not result:
                result += "\n" + tail(step.output)
            add("3 algo_speed", status_of(step), step.seconds, result)

    # 4. sampler_throughput
    n_workers, n_envs = cores, 2 * cores
    rates: dict[str, float] = {}
    if "sampler_throughput" in args.steps:
        if skip:
            add("4 sampler_throughput", skip, 0.0, "")
        else:
            step = run("sampler_throughput", [
                python, "benchmark/sampler_throughput.py", "--device", "cuda", "--policies", "cnn", "--n-envs",
                str(n_envs), "--n-workers", str(n_workers), "--rounds", "1", "--seconds", "2", "--configs",
                "parallel-cpu", "parallel-gpu", "alternating-gpu", "gym-sync", "gym-async", "ale-vector"])
            rates = sampler_rates(step.output)
            result = (f"CNN on CUDA, {n_envs} Pong envs, {n_workers} workers, steps/s: "
                      + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())) if rates else tail(step.output)
            add("4 sampler_throughput", status_of(step), step.seconds, result)

    # 5. ppo_atari on Pong with the fastest parallel kind
    if "ppo_atari" in args.steps:
        if skip:
            add("5 ppo_atari Pong", skip, 0.0, "")
        else:
            ours = {k: v for k, v in rates.items() if k in ("parallel-cpu", "parallel-gpu", "alternating-gpu")}
            kind = max(ours, key=ours.get) if ours else "parallel-gpu"
            run_dir = out / "runs" / "ppo_atari_pong"
            shutil.rmtree(run_dir, ignore_errors=True)
            step = run("ppo_atari", [
                python, "algos/ppo_atari.py", "--env-id", "ALE/Pong-v5", "--device", "cuda", "--sampler", kind,
                "--n-envs", str(n_envs), "--n-workers", str(n_workers), "--total-timesteps", "50000000",
                "--eval-episodes", "0", "--log-every-s", "5", "--output-dir", str(out / "runs"), "--run-name",
                run_dir.name], signal="INT")
            trained, result = ppo_result(run_dir)
            # Stopped at its limit is how this step ends; it fails if it trained nothing or crashed.
            ended = step.returncode == 0 or step.timed_out
            status = "ok" if trained and ended else "failed" if ended else status_of(step)
            add("5 ppo_atari Pong", status, step.seconds, f"--sampler {kind}, {n_envs} envs: {result}"
                + ("" if trained else "\n" + tail(step.output, 2)))

    ok = all(s in expected for s in statuses)
    # The time limit itself, in a dry run: a step that overruns is stopped and reported.
    if args.dry_run:
        step = run_step(["sleep", "30"], 1, logs / "time_limit.log", env, grace_s=1)
        add("time limit (dry run)", status_of(step), step.seconds, "`sleep 30` under a 1 s limit")
        ok = ok and statuses[-1] == TIMED_OUT
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
