"""Distributed set-up for adaptation: this rank's place in the world, the process group, ports, the
single-process environment, and dying with the parent process.

No other module of ``card.adapt`` is imported here, so the launcher and the workers can both use it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Topology:
    """This process's rank, the world size and its rank on this node (torchrun's environment)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Topology":
        env = os.environ
        return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_env() -> Iterator[None]:
    """The distributed environment of a world of one on a free local port, restored on exit."""
    import torch

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    if not torch.cuda.is_available() and "DS_ACCELERATOR" not in os.environ:
        env["DS_ACCELERATOR"] = "cpu"  # read when deepspeed picks its accelerator
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def worker_env(nproc_per_node: int) -> dict[str, str]:
    """The workers' environment: this one, plus CPU settings when there is no GPU.

    On CPU each rank gets cores // nproc threads (1 on a 2-core machine with 2 ranks, as torchrun's
    default) unless OMP_NUM_THREADS is set, and DeepSpeed is told its accelerator is the CPU.
    """
    import torch

    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    return env


def init_distributed(cuda: bool) -> None:
    """torch.distributed via DeepSpeed (gloo on CPU, NCCL on GPUs); a no-op when the group exists.

    On CPU, DeepSpeed JIT-compiles its shared-memory communication op at the first init (45-80 s with a
    C++ compiler, a crash without one); that op only speeds up inference all-reduce, so it is skipped
    unless CARD_DS_SHM=1. The patch must go through sys.modules: ``import deepspeed.comm.torch as m``
    binds PyTorch's ``torch`` (deepspeed.comm re-exports it).
    """
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401
    import torch

    if not cuda and os.environ.get("CARD_DS_SHM") != "1":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")


def barrier() -> None:
    import torch

    torch.distributed.barrier()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """The sum over ranks of each value (float64, one collective)."""
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None


_PRCTL = _prctl()


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so a killed launcher leaves no orphan
    torchrun or workers that would go on writing checkpoints. (Also the pre-exec hook of torchrun, so it
    only calls a function resolved beforehand.)"""
    if _PRCTL is not None:
        _PRCTL(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
