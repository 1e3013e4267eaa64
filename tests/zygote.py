"""A fork server for the tests' script runs.

A fresh `python algos/<script>.py` spends about 5 s of CPU on imports before its first line of work (torch,
then torch._dynamo, which the first `torch.optim` optimizer imports), and the suite runs scripts a few
hundred times. Each test process starts one server (`python tests/zygote.py`) that imports the heavy
modules once; every script run is then a child forked from it, which runs the script as the interpreter
would run `python <script> <flags>`:

- as `__main__` (runpy), with `sys.argv` = [script, *flags], `sys.path[0]` the script's directory, then
  PYTHONPATH, the working directory and environment of the request, stdin from /dev/null and stdout /
  stderr into the request's files;
- SIGINT raises KeyboardInterrupt, every other signal at its default;
- an uncaught exception prints its traceback and exits 1, `sys.exit(x)` exits as the interpreter would, and
  the atexit handlers (multiprocessing's clean-up among them) run before the process ends.

The server only imports (no torch op runs in it, no thread starts), so the forked child starts as clean as a
fresh interpreter. Tests of signals, process trees and launchers start real processes with subprocess.

Protocol, one JSON object per line: the test process writes {"argv", "cwd", "env", "stdout", "stderr"};
the server answers {"pid": ...} when the child has started, then {"returncode": ...} when it has ended
(negative: killed by that signal, as subprocess reports it).
"""

from __future__ import annotations

import json
import os
import signal
import sys

PRELOAD = ["numpy", "torch", "torch._dynamo", "torch.distributed", "gymnasium", "tyro", "common.config",
           "common.envs", "common.logger", "common.samplers", "common.replay", "common.async_mode",
           "common.evaluate", "common.networks", "common.normalization", "common.kernels", "common.distributed"]


def run_child(request: dict) -> None:
    """In the forked child: become `python <argv...>` and never return."""
    import atexit
    import runpy
    import traceback

    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                               (2, request["stderr"], os.O_WRONLY)):
            target = os.open(path, mode)
            os.dup2(target, fd)
            os.close(target)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = os.path.abspath(request["argv"][0])
        python_path = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(script), *python_path, *BASE_PATH]
        sys.argv[:] = [request["argv"][0], *request["argv"][1:]]
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exit_:
            if exit_.code is None:
                code = 0
            elif isinstance(exit_.code, int):
                code = exit_.code
            else:
                print(exit_.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream must not keep the child alive
                pass
        os._exit(code & 0xFF)


def serve() -> None:
    """Read requests from stdin; fork a child for each, report its pid and its exit status."""
    for module in PRELOAD:
        __import__(module)
    import torch.optim  # noqa: F401

    channel = sys.stdout
    print(json.dumps({"ready": True}), file=channel, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)
        print(json.dumps({"pid": pid}), file=channel, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=channel, flush=True)


if __name__ == "__main__":
    own_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    BASE_PATH = [p for p in sys.path[1:] if p not in own_path]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the test process ends the server, not a Ctrl-C
    serve()
