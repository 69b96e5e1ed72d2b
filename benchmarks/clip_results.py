"""The CLIP results table: trained runs beside the same towers untrained, on the test split of
their pairs (or of ``eval_data``), measured by the objective's own evaluation.

    python -m benchmarks.clip_results --runs runs/clip_pairs runs/clip_lit [--untrained runs/clip_pairs]

Each run's numbers come from its ``train_summary.json`` (the evaluation at its last step); for
each ``--untrained`` run the same model is built from its config with fresh weights (seed 0) and
evaluated the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

COLUMNS = [("zero-shot mnist5k top-1", "zeroshot_mnist5k_captions_top1"),
           ("zero-shot Tux Paint top-1", "zeroshot_tuxpaint_top1"),
           ("zero-shot icons top-1", "zeroshot_icons_top1"),
           ("image->text R@10", "i2t_r10"), ("text->image R@10", "t2i_r10")]


def untrained(run_dir: str) -> dict:
    from pretrain.batches import schema_of
    from pretrain.loop import EvalBatches, build_model
    from pretrain.objectives import objective_class
    from pretrain.probe import read_run_config

    cfg = read_run_config(run_dir)
    schema = schema_of(objective_class(cfg.objective))
    info = schema.dataset(cfg, "train").info
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, info).eval()
    eval_cfg = dataclasses.replace(cfg, data=cfg.eval_data) if cfg.eval_data else cfg
    split = cfg.eval_split or model.eval_split
    ds = schema.dataset(eval_cfg, split)
    return {f"{split}_{k}": float(v) for k, v in
            model.evaluate(EvalBatches(schema.eval_loader(cfg, info, ds), lambda b: b), final=True).items()}


def row(name: str, metrics: dict, split: str = "test") -> str:
    cells = []
    for _, key in COLUMNS:
        v = metrics.get(f"{split}_{key}")
        cells.append("-" if v is None else f"{100 * v:.1f}%")
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="*", default=[], help="trained run directories")
    ap.add_argument("--untrained", nargs="*", default=[], help="run directories whose towers to evaluate untrained")
    args = ap.parse_args()
    print("| model | " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    out = {}
    for r in args.untrained:
        m = untrained(r)
        out[f"untrained:{r}"] = m
        print(row(f"{Path(r).name}, untrained", m), flush=True)
    for r in args.runs:
        m = json.loads((Path(r) / "train_summary.json").read_text())
        out[r] = {k: v for k, v in m.items() if k.startswith("test_")}
        print(row(f"{Path(r).name} ({m['steps']} steps, {m['train_wall_s']:.0f} s)", m), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
