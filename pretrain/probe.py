"""Probe a finished run: linear and k-NN accuracy of its frozen features, beside two baselines
measured by the same probes (raw pixels, and the same backbone at random initialisation)."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

import data as data_lib
from data.common import UnknownNameError, write_json, write_text
from eval_probes import extract_features, knn_probe, linear_probe

from .checkpoint import RunDirError, load_weights
from .config import RunConfig, build_config
from .engines import autocast_context
from .loop import RunError, build_model, uses_channels_last
from .objectives import objective_class

PROBES = ("linear", "knn")


def run_datasets(cfg: RunConfig):
    """The run's (train, test) datasets, built once and shared by every probe row."""
    size = cfg.image_size or None
    return data_lib.build_dataset(cfg.data, "train", image_size=size), data_lib.build_dataset(cfg.data, "test",
                                                                                             image_size=size)


def read_run_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"'{run_dir}' is not a run directory (no config.yaml)")
    return build_config(yaml.safe_load((run_dir / "config.yaml").read_text()))


def load_run(run_dir: str | Path, cfg: RunConfig | None = None, info: data_lib.DatasetInfo | None = None,
             weights_path: str | Path | None = None) -> tuple[RunConfig, torch.nn.Module]:
    """Rebuild a run's objective from ``config.yaml`` and load ``weights.safetensors`` (or the
    weights file ``weights_path``) into it."""
    run_dir = Path(run_dir)
    cfg = cfg or read_run_config(run_dir)
    if info is None:
        from .batches import schema_of
        from .objectives import objective_class

        info = schema_of(objective_class(cfg.objective)).dataset(cfg, "test").info
    model = build_model(cfg, info)
    state, _ = load_weights(weights_path or run_dir / "weights.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
        raise RunError(f"weights.safetensors in '{run_dir}' do not fit objective '{cfg.objective}' with backbone "
                       f"'{cfg.model.backbone}': missing {missing[:3]}, unexpected {unexpected[:3]}")
    return cfg, model


def _embed_fn(model, cfg: RunConfig):
    model.eval()

    def embed(batch):
        x = batch["image"]
        if uses_channels_last(cfg, x.shape[1]):
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(cfg.precision):
            return model.embed({**batch, "image": x}).float()

    return embed


def _pixels(batch):
    return batch["image"].flatten(1)


def probe_features(cfg: RunConfig, embed, datasets, probes=PROBES, progress: bool = True, desc: str = "") -> dict:
    """Run the requested probes on ``embed``'s features of ``datasets`` = (train, test)."""
    bad = [p for p in probes if p not in PROBES]
    if bad:
        raise UnknownNameError(f"unknown probe '{bad[0]}'; valid probes: {', '.join(PROBES)}, all", kind="probe",
                               name=bad[0], valid=PROBES)
    train, test = datasets
    side = cfg.image_size or train.info.image_size
    xtr, ytr = extract_features(embed, data_lib.eval_loader(train, side), desc=f"{desc} train", progress=progress)
    xte, yte = extract_features(embed, data_lib.eval_loader(test, side), desc=f"{desc} test", progress=progress)
    out = {}
    if "linear" in probes:
        out["linear"] = linear_probe(xtr, ytr, xte, yte, epochs=cfg.probe.epochs, seed=cfg.seed)
    if "knn" in probes:
        out["knn"] = knn_probe(xtr, ytr, xte, yte, k=cfg.probe.knn_k, temperature=cfg.probe.knn_temperature)
    return out


def probe_run(run_dir: str | Path, probes=PROBES, baselines: bool | None = None, progress: bool = True) -> dict:
    """Probe a run and its baselines; writes ``probes.json`` and ``probes.md`` into the run directory."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if "image" not in objective_class(cfg.objective).towers:
        raise RunError(f"'{run_dir}' is a run of objective '{cfg.objective}', which trains no image tower; "
                       f"probes measure the image features of a pretraining run")
    datasets = run_datasets(cfg)
    info = datasets[1].info
    cfg, model = load_run(run_dir, cfg, info)
    baselines = cfg.probe.baselines if baselines is None else baselines
    rows = {}
    rows[f"{cfg.objective} ({cfg.model.backbone}, trained)"] = probe_features(
        cfg, _embed_fn(model, cfg), datasets, probes, progress, desc=cfg.objective)
    if baselines:
        torch.manual_seed(cfg.seed)  # the initialisation the trained run started from
        random_model = build_model(cfg, info)
        rows[f"{cfg.model.backbone}, random init"] = probe_features(
            cfg, _embed_fn(random_model, cfg), datasets, probes, progress, desc="random-init")
        rows["raw pixels"] = probe_features(cfg, _pixels, datasets, probes, progress, desc="pixels")
    result = {"run": str(run_dir), "data": cfg.data, "seed": cfg.seed, "rows": rows}
    write_json(run_dir / "probes.json", result, default=float)
    table = format_table(rows, probes)
    write_text(run_dir / "probes.md", table + "\n")
    return result


def format_table(rows: dict, probes=PROBES) -> str:
    header = "| features | " + " | ".join(f"{p} test acc" for p in probes) + " |"
    lines = [header, "|" + "---|" * (len(probes) + 1)]
    for name, res in rows.items():
        cells = [f"{100 * res[p]['test_acc']:.2f}%" if p in res else "-" for p in probes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
