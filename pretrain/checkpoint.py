"""Checkpoints and exported weights, written so that a crash mid-save never loses the last good one.

A checkpoint is a directory ``checkpoints/step_N/`` holding ``state.pt`` and ``meta.json``. It is
written under ``checkpoints/.tmp-step_N/`` (one name that every rank writes into) and published
by :func:`data.common.publish_dir` only once complete; ``weights.safetensors`` is written with
:func:`data.common.atomic_path`.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from data.common import PathNotFoundError, atomic_path, publish_dir, remove_temporaries

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointNotFoundError(PathNotFoundError):
    """A checkpoint or weights file the user asked for is missing or incomplete."""


class RunDirError(PathNotFoundError):
    """A run directory the user named does not exist or lacks a file it needs (config.yaml, weights)."""


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(run_dir: str | Path, step: int, write, meta: dict, keep_last: int = 2, rank: int = 0,
                    barrier=None) -> Path:
    """Write checkpoint ``step`` atomically and keep the last ``keep_last``.

    ``write(tmp_dir)`` is called on every rank to write its part into a shared temporary
    directory; rank 0 then adds ``meta.json`` and renames the directory to ``step_N``. A process
    killed before the rename leaves only a ``.tmp-step_N`` directory, which later saves remove;
    the previous checkpoints stay complete.
    """
    barrier = barrier or (lambda: None)
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_temporaries(root)  # what killed saves left: .tmp-step_N, side names of replaced checkpoints
        tmp.mkdir()
    barrier()
    write(tmp)
    barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1, default=str))
        publish_dir(tmp, final)  # same step saved again (a resumed run ending where it started): replaced
        if keep_last > 0:
            for _, p in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(p, ignore_errors=True)
    barrier()
    return final


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise CheckpointNotFoundError(f"checkpoint '{path}' is incomplete or missing (no meta.json)")
    return json.loads((path / "meta.json").read_text())


def save_weights(path: str | Path, state_dict: dict, metadata: dict[str, str]) -> None:
    """Export tensors to safetensors atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})


def load_weights(path: str | Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"weights file '{path}' does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta
