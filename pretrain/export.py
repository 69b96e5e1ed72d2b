"""Turn any checkpoint of a run (plain, or DeepSpeed of any ZeRO stage) into ``weights.safetensors``."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import CheckpointNotFoundError, latest_checkpoint, list_checkpoints, read_meta, save_weights


def export_weights(run_dir: str | Path, step: int | None = None, out: str | Path | None = None) -> Path:
    """Consolidate checkpoint ``step`` (default: the latest) of ``run_dir`` into a safetensors file.

    Runs in one process, without a process group: DeepSpeed ZeRO partitions are merged into
    full fp32 tensors. Returns the path written (default ``RUN_DIR/weights.safetensors``).
    """
    run_dir = Path(run_dir)
    if step is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointNotFoundError(f"no checkpoint under '{run_dir / 'checkpoints'}'")
    else:
        found = dict(list_checkpoints(run_dir))
        if step not in found:
            raise CheckpointNotFoundError(f"no checkpoint for step {step} under '{run_dir / 'checkpoints'}'; "
                                    f"available steps: {sorted(found) or 'none'}")
        ckpt = found[step]
    meta = read_meta(ckpt)
    if meta.get("engine", "plain") == "deepspeed":
        from .engines import consolidate_deepspeed_checkpoint

        state = consolidate_deepspeed_checkpoint(ckpt)
    else:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)["engine"]["model"]
    cfg = meta.get("config", {})
    out = Path(out) if out else run_dir / "weights.safetensors"
    save_weights(out, state, {"objective": meta.get("objective", ""), "backbone": cfg.get("model", {}).get("backbone", ""),
                              "format": "ssl-pretrain/1", "config": json.dumps(cfg), "step": str(meta["step"])})
    return out
