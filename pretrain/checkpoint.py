"""Checkpoints and exported weights, written so that a crash mid-save never loses the last good one.

A checkpoint is a directory ``checkpoints/step_N/`` holding ``state.pt`` and ``meta.json``. It is
written under ``checkpoints/.tmp-step_N-<pid>/`` and renamed into place only once complete;
``weights.safetensors`` is written to a temporary file and ``os.replace``d.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step_(\d+)$")


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


def save_checkpoint(run_dir: str | Path, step: int, state: dict, meta: dict, keep_last: int = 2) -> Path:
    """Write ``state`` (torch-saved) and ``meta`` (JSON) as checkpoint ``step``; keep the last ``keep_last``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1, default=str))
    _fsync_dir(tmp)
    if final.exists():  # same step saved again (e.g. a resumed run ending where it started)
        old = root / f".old-step_{step}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last > 0:
        for _, p in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step_*"):  # leftovers of killed saves
        if p != tmp and not _pid_alive(p.name.rsplit("-", 1)[-1]):
            shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    path = Path(path)
    if not (path / "meta.json").is_file() or not (path / "state.pt").is_file():
        raise FileNotFoundError(f"checkpoint '{path}' is incomplete or missing (needs state.pt and meta.json)")
    meta = json.loads((path / "meta.json").read_text())
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    return state, meta


def save_weights(path: str | Path, state_dict: dict, metadata: dict[str, str]) -> None:
    """Export tensors to safetensors atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)


def load_weights(path: str | Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
