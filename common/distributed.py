"""Synchronous data-parallel training: N full replicas, gradients averaged after every backward pass.

Each replica (process) has its own sampler and environments (seeds offset by rank) and computes the loss on its own
batch. Every script calls `all_reduce_gradients` between `backward()` and gradient clipping / `optimizer.step()`, so
every rank clips and steps the mean gradient, as one process would on the union of the batches. Replicas start identical
because every rank seeds torch alike before building its networks. Only rank 0 logs, evaluates and checkpoints; episode
statistics are gathered from every rank. Processes come from torchrun, single or multi-node (its environment variables
are read here), or from `--n-gpus N`, which starts N local processes itself (one GPU each, NCCL).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Imported before any process group exists: torch.distributed.nn.functional (imported by torch._dynamo with the first
# optimizer) binds the default group as a default argument when first imported. Imported after init, it keeps the group
# alive past `shutdown`, and gloo's threads run into interpreter exit, where one releasing tensors aborts the process.
import torch.distributed.nn  # noqa: F401


def launched() -> bool:
    """True inside a process started by torchrun or by `spawn_local` (WORLD_SIZE and RANK are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on the process that logs, evaluates and checkpoints (rank 0, or the only process)."""
    return rank() == 0


def init(device_type: str, timeout_s: float = 1800.0) -> None:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) once, if launched. `timeout_s` bounds a collective's
    wait, so it must outlast rank 0's evaluations and checkpoints; a rank that dies ends the run at once."""
    if not launched() or dist.is_initialized():
        return
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (call once after building or loading)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def all_reduce_gradients(parameters: Iterable[torch.Tensor]) -> None:
    """Average the gradients of `parameters` over all ranks, in one flattened all-reduce."""
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all ranks (a new tensor; on one rank, `tensor` itself)."""
    if world_size() == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all ranks (a new tensor, the input left unchanged; on one rank, `tensor` itself)."""
    return tensor if world_size() == 1 else all_reduce_sum(tensor) / world_size()


def replica_seed(seed: int) -> int:
    """The environment seed of this rank's replica. Ranks are 2**32 seeds apart, more than any run's steps: whatever
    step a resumed run offsets seeds by (`samplers.training_seed`), no rank takes another's seeds or the eval envs'."""
    return seed + (rank() << 32)


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise minimum of `tensor` over all ranks (a new tensor on its device; on one rank, `tensor` itself)."""
    if world_size() == 1:
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    out = tensor.to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out.to(tensor.device)


def gather_objects(items: Sequence[Any]) -> list[Any]:
    """Concatenate a small list (episode statistics) from every rank, in rank order, on every rank."""
    if world_size() == 1:
        return list(items)
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn of a local rank: SIGKILL it when the launching process dies, so that no rank is orphaned."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def spawn_local(n_processes: int, argv: Sequence[str] | None = None, poll_s: float = 0.2) -> int:
    """Run this script as `n_processes` local ranks with torchrun's environment; return the exit code. The first rank
    to fail ends the others (SIGTERM, then SIGKILL after 5 s); Ctrl-C is passed on."""
    argv = list(sys.argv if argv is None else argv)
    port = free_port()
    procs = []
    for r in range(n_processes):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n_processes),
               "LOCAL_WORLD_SIZE": str(n_processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, preexec_fn=_die_with_parent))
    code = 0
    try:
        while True:
            running = any(p.poll() is None for p in procs)
            code = next((p.returncode for p in procs if p.returncode not in (None, 0)), 0)
            if code or not running:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        code = 130
    finally:
        if code not in (0, 130):  # a failed rank: the others may be blocked in a collective
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        deadline = time.time() + 5
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return code if code >= 0 else 128 - code
