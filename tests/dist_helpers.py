"""Run a function on N local gloo ranks and collect what each rank returns.

Reusable by any test that needs real ``torch.distributed`` collectives on a
CPU-only machine::

    from dist_helpers import run_distributed

    def _worker(rank, world_size, x):
        ...                      # process group is initialised here
        return some_tensor       # detached, picklable

    results = run_distributed(_worker, world_size=2, args=(x,))

``fn`` must be a module-level (picklable) function: ranks are started with
``torch.multiprocessing.spawn`` (fresh interpreters), which re-import the
module that defines it.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
from typing import Any, Callable, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["find_free_port", "run_distributed"]

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_cpu_detached(obj: Any) -> Any:
    """Detaches tensors (recursively in lists/tuples/dicts) so they pickle."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu_detached(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu_detached(v) for v in obj)
    return obj


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    args: Sequence[Any],
    out_dir: str,
    timeout_s: float,
) -> None:
    # Child interpreters inherit the parent's sys.path from spawn, but make the
    # project importable even if the parent was started from elsewhere.
    if _REPO_ROOT not in sys.path:
        sys.path.insert(0, _REPO_ROOT)
    # The CI machine has very few cores; N ranks x M intra-op threads would
    # oversubscribe them and slow everything down.
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    # Keep gloo on loopback: otherwise it resolves the hostname, which in some
    # containers maps to an interface the ranks cannot reach each other on.
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        backend="gloo",
        init_method="env://",
        rank=rank,
        world_size=world_size,
        # A rank that dies mid-collective must not hang the others forever.
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(_to_cpu_detached(result), os.path.join(out_dir, f"rank{rank}.pt"))
        # Nobody tears down the group while a peer is still communicating.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    timeout_s: float = 120.0,
    max_attempts: int = 3,
) -> List[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks.

    Each rank is a fresh process with the default process group already
    initialised (backend gloo, MASTER_ADDR 127.0.0.1, a free port) and one
    intra-op thread. Return values are detached, moved to CPU and passed back
    through ``torch.save`` files in a temporary directory.

    Args:
        fn: Module-level function ``fn(rank, world_size, *args)``.
        world_size: Number of ranks to spawn.
        args: Extra positional arguments (must be picklable).
        timeout_s: gloo timeout for init and every collective.
        max_attempts: Retries with a new port if the chosen one was taken
            between picking and binding it.

    Returns:
        List of the per-rank return values, indexed by rank.

    Raises:
        torch.multiprocessing.ProcessRaisedException: If any rank raised; the
            message carries that rank's traceback.
    """
    for attempt in range(max_attempts):
        with tempfile.TemporaryDirectory(prefix="dist_test_") as out_dir:
            port = find_free_port()
            try:
                mp.spawn(
                    _entry,
                    args=(fn, world_size, port, tuple(args), out_dir, timeout_s),
                    nprocs=world_size,
                    join=True,
                )
            except Exception as exc:  # noqa: BLE001 - re-raised unless port race
                msg = str(exc).lower()
                port_race = "address already in use" in msg or "eaddrinuse" in msg
                if port_race and attempt + 1 < max_attempts:
                    continue
                raise
            return [
                torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)
            ]
    raise RuntimeError("unreachable")  # pragma: no cover
