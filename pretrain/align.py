"""``pretrain search align``: alignment heads trained by the training loop.

:func:`align_embeddings` turns the command's settings (:class:`~eval_probes.search.align.AlignConfig`:
epochs, batch size, AdamW LR and weight decay, temperature, ...) into a run of the ``align``
objective (:mod:`pretrain.objectives.align`) and trains it with :func:`~pretrain.loop.fit`, so the
heads get both engines, checkpoints with exact resume (``stop_at`` + :func:`resume_alignment`),
metrics.jsonl, TensorBoard and the progress bar. HEAD_DIR is the run directory; at the end it
also holds ``heads.json``, which :meth:`AlignmentHeads.load` reads with ``weights.safetensors``.

The schedule is the one the heads always had: ``epochs x (train pairs // batch_size)`` full
batches, linear warm-up over the first 5% of the steps, then cosine decay to 0.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from data.common import write_json
from eval_probes.search.align import AlignConfig, AlignmentHeads, CaptionedEmbeddings

from .checkpoint import RunDirError
from .config import RunConfig, build_config, load_config
from .loop import fit, launcher_world_size, process_rank

__all__ = ["align_embeddings", "alignment_run_config", "resume_alignment"]


def alignment_run_config(emb_dir, captions, out_dir, cfg: AlignConfig, progress: bool = True) -> RunConfig:
    """The run config of the ``align`` objective that trains ``cfg`` on EMB_DIR and CAPTIONS into
    HEAD_DIR (``out_dir``)."""
    cfg.validate()
    train = CaptionedEmbeddings(emb_dir, captions, "train", cfg.val_fraction, cfg.seed, cfg.text_encoder)
    world = launcher_world_size(cfg.engine)
    batch = max(1, min(cfg.batch_size, len(train)) // world)  # per rank; InfoNCE gathers the global batch
    steps_per_epoch = max(1, len(train) // (batch * world))
    total = cfg.epochs * steps_per_epoch
    values = {
        "objective": "align", "data": str(Path(emb_dir).resolve()), "batch_size": batch, "max_steps": total,
        "seed": cfg.seed, "precision": "fp32", "engine": cfg.engine, "log_every": 1, "stop_at": cfg.stop_at,
        "run_dir": str(out_dir), "progress": progress,
        "optim": {"name": "adamw", "lr": cfg.lr, "scale_lr": False, "weight_decay": cfg.weight_decay,
                  "warmup_steps": max(1, total // 20), "min_lr_ratio": 0.0},
        "align": {"captions": str(Path(captions).resolve()), "text_encoder": cfg.text_encoder,
                  "out_dim": cfg.out_dim, "hidden_dim": cfg.hidden_dim, "temperature": cfg.temperature,
                  "learn_temperature": cfg.learn_temperature, "dropout": cfg.dropout,
                  "val_fraction": cfg.val_fraction},
    }
    return build_config(values)


def _finish(run_cfg: RunConfig, t0: float) -> AlignmentHeads | dict:
    """After :func:`fit`: on rank 0 of a complete run, write heads.json and return the heads; after a
    planned stop, where it stopped."""
    run_dir = Path(run_cfg.run_dir)
    trained = json.loads((run_dir / "train_summary.json").read_text())
    if trained["steps"] < run_cfg.max_steps:
        return {"stopped_at": trained["steps"], "max_steps": run_cfg.max_steps}
    ocfg, o = run_cfg.objective_config, run_cfg.optim
    train = CaptionedEmbeddings(run_cfg.data, ocfg.captions, "train", ocfg.val_fraction, run_cfg.seed,
                                ocfg.text_encoder)
    steps_per_epoch = max(1, len(train) // (run_cfg.batch_size * trained["world_size"]))
    settings = AlignConfig(text_encoder=ocfg.text_encoder, out_dim=ocfg.out_dim, hidden_dim=ocfg.hidden_dim,
                           epochs=max(1, run_cfg.max_steps // steps_per_epoch),
                           batch_size=run_cfg.batch_size * trained["world_size"],
                           lr=o.lr, weight_decay=o.weight_decay, temperature=ocfg.temperature,
                           learn_temperature=ocfg.learn_temperature, dropout=ocfg.dropout,
                           val_fraction=ocfg.val_fraction, seed=run_cfg.seed, engine=run_cfg.engine)
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    metrics = {"train_loss": float(np.mean(losses[-steps_per_epoch:])),
               "train_loss_first_epoch": float(np.mean(losses[:steps_per_epoch])),
               "pairs": train.info.extra["pairs"], "train_pairs": train.info.extra["train_pairs"],
               "val_pairs": train.info.extra["val_pairs"], "steps": run_cfg.max_steps,
               "resumed_from_step": trained.get("start_step") or None}
    for key in ("val_loss", "val_caption_acc"):
        if key in trained:
            metrics[key] = trained[key]
    metrics["wall_s"] = round(time.time() - t0, 2)
    from safetensors.torch import load_file

    heads = AlignmentHeads(ocfg.image_dim, ocfg.text_dim, ocfg.out_dim, ocfg.hidden_dim,
                           text_encoder=ocfg.text_encoder)
    heads.load_state_dict(load_file(str(run_dir / "weights.safetensors")))
    heads.eval()
    heads.info = {"config": dataclasses.asdict(settings), "metrics": metrics,
                  "trained_on": {"embeddings": run_cfg.data, "captions": ocfg.captions, "pairs": train.info.extra["pairs"]}}
    write_json(run_dir / "heads.json", heads.config_json())  # last: a HEAD_DIR is complete once it is there
    return heads


def align_embeddings(emb_dir, captions, out_dir, config: AlignConfig | None = None,
                     progress: bool = True) -> AlignmentHeads | dict:
    """Train alignment heads on EMB_DIR's embeddings of the images CAPTIONS describes; HEAD_DIR
    (``out_dir``) is the run directory. Returns the heads (on rank 0 of a complete run), or
    ``{"stopped_at", "max_steps"}`` after ``config.stop_at``."""

    t0 = time.time()
    cfg = dataclasses.replace(config) if config is not None else AlignConfig()
    run_cfg = alignment_run_config(emb_dir, captions, out_dir, cfg, progress)
    fit(run_cfg)
    if process_rank() != 0:
        return {"rank": process_rank()}
    return _finish(run_cfg, t0)


def resume_alignment(head_dir, overrides: list[str] | None = None, progress: bool = True) -> AlignmentHeads | dict:
    """Continue a stopped ``pretrain search align`` run in HEAD_DIR to its last step, exactly as an
    uninterrupted run (``overrides``: run config keys, e.g. ``max_steps=...``)."""

    t0 = time.time()
    path = Path(head_dir)
    if not (path / "config.yaml").is_file():
        raise RunDirError(f"--resume: '{head_dir}' is not a heads run directory (no config.yaml)")
    run_cfg = load_config(path / "config.yaml", ["stop_at=0", f"progress={str(progress).lower()}",
                                                *(overrides or []), f"run_dir={head_dir}"])
    if run_cfg.objective != "align":
        raise RunDirError(f"--resume: '{head_dir}' is a {run_cfg.objective} run, not an alignment run")
    fit(run_cfg, resume=True)
    if process_rank() != 0:
        return {"rank": process_rank()}
    return _finish(run_cfg, t0)
