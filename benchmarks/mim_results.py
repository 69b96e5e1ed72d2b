"""The masked-image-modelling results tables, from finished runs.

    python -m benchmarks.mim_results codebook runs/vqkd_mnist5k runs/vqkd_mnist5k_norestart
    python -m benchmarks.mim_results finetune --labels 0.01 0.1 \\
        --row "ViT from scratch=runs/ft/scratch_vit-ft{pct}" \\
        --row "BEiT v2=runs/ft/beit_v2_mnist5k-ft{pct}:runs/beit_v2_mnist5k" ...

``codebook``: each vqkd run's held-out numbers (its ``train_summary.json``: codes used, usage,
perplexity and reconstruction loss on the test split) and the training log's last dead-code count
and restarts.

``finetune``: one row per ``NAME=FT_PATTERN[:PRETRAINED_RUN]``: the fine-tuned test accuracy of
``FT_PATTERN`` with ``{pct}`` replaced by each label percentage (its ``summary.json``), and beside
it a linear probe on the frozen features of ``PRETRAINED_RUN`` trained on the same labelled subset
(``data.labelled_subset``, label seed 0: the images fine-tuning saw; where a class has a single label
there is no validation split, and the probe trains one configuration, marked ``*``); without a pretrained run,
the probe is of the randomly initialised backbone of the first fine-tuning run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def _last_metrics(run: Path) -> dict:
    last = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            last = rec
    return last


def codebook(runs: list[str]) -> str:
    lines = ["| tokenizer | dead-code restart | codes | test codes used | test usage | test perplexity | test 1 - cos | "
             "dead codes (train, last step) | restarts | steps | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    from pretrain.probe import read_run_config

    for r in runs:
        run = Path(r)
        s = json.loads((run / "train_summary.json").read_text())
        cfg = read_run_config(run).objective_config
        m = _last_metrics(run)
        restart = f"after {cfg.dead_code_steps} unused steps" if cfg.restart_dead_codes and cfg.dead_code_steps else "off"
        lines.append(
            f"| {run.name} | {restart} | {cfg.num_codes} | "
            f"{int(s['test_codes_used'])} | {100 * s['test_codebook_usage']:.1f}% | "
            f"{s['test_codebook_perplexity']:.1f} | {s['test_rec_loss']:.4f} | {int(m.get('dead_codes', 0))} | "
            f"{int(m.get('codebook_restarts', 0))} | {s['steps']} | {s['train_wall_s']:.0f} s |")
    return "\n".join(lines)


def _features(run: str | None, ft_run: str) -> tuple:
    """(train features, train labels, test features, test labels) of a pretrained run's frozen
    backbone, or of the fine-tuning run's architecture at random init when ``run`` is None."""
    import data as data_lib
    from eval_probes.features import extract_features
    from pretrain.finetune import classifier_from_arch, load_classifier
    from pretrain.probe import _embed_fn, load_run, read_run_config, run_datasets

    if run:
        cfg = read_run_config(run)
        cfg, model = load_run(run, cfg)
        embed = _embed_fn(model, cfg)
        train, test = run_datasets(cfg)
        side = cfg.image_size or train.info.image_size
    else:
        _, meta = load_classifier(ft_run)
        torch.manual_seed(0)
        clf = classifier_from_arch(meta["arch"]).eval()
        s = json.loads((Path(ft_run) / "summary.json").read_text())
        side = s["image_size"]
        train = data_lib.build_dataset(s["data"], "train", image_size=side)
        test = data_lib.build_dataset(s["data"], "test", image_size=side)

        @torch.no_grad()
        def embed(batch):
            return clf.backbone.forward_pooled(batch["image"]).float()

    xtr, ytr = extract_features(embed, data_lib.eval_loader(train, side), progress=False)
    xte, yte = extract_features(embed, data_lib.eval_loader(test, side), progress=False)
    return xtr, ytr, xte, yte


# the probe's one configuration where a class has a single label (the grid's middle)
FIXED_LR, FIXED_WD = (1e-2,), (1e-4,)


def finetune(rows: list[str], labels: list[float]) -> str:
    from data import labelled_subset
    from eval_probes import linear_probe

    head = ["| pretraining |"] + [f" fine-tuned, {100 * f:g}% labels |" for f in labels] + \
        [f" linear probe, {100 * f:g}% labels |" for f in labels]
    lines = ["".join(head), "|---|" + "---|" * (2 * len(labels))]
    for spec in rows:
        name, rest = spec.split("=", 1)
        pattern, _, run = rest.partition(":")
        ft_cells, probe_cells = [], []
        feats = None
        for f in labels:
            ft_run = pattern.format(pct=f"{100 * f:g}")
            s = json.loads((Path(ft_run) / "summary.json").read_text())
            ft_cells.append(f" {100 * s['test_acc']:.1f}% ({s['num_labels']} labels, {s['steps']} steps) |")
            if feats is None:
                feats = _features(run or None, ft_run)
            xtr, ytr, xte, yte = feats
            idx = np.asarray(labelled_subset(torch.as_tensor(ytr), f, s["label_seed"]))
            fixed = np.bincount(ytr[idx]).min() < 2  # one label in some class: no validation split to select on
            grid = dict(lrs=FIXED_LR, weight_decays=FIXED_WD) if fixed else {}
            res = linear_probe(xtr[idx], ytr[idx], xte, yte, seed=0, **grid)
            probe_cells.append(f" {100 * res['test_acc']:.1f}%{'*' if fixed else ''} |")
        lines.append(f"| {name} |" + "".join(ft_cells) + "".join(probe_cells))
    if any("*" in ln for ln in lines[2:]):
        lines.append(f"\n\\* one label in some class: no validation split, so the probe trains one configuration "
                     f"(lr {FIXED_LR[0]:g}, weight decay {FIXED_WD[0]:g}) instead of selecting from the grid.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="table", required=True)
    c = sub.add_parser("codebook", help="codebook health of vqkd runs")
    c.add_argument("runs", nargs="+")
    f = sub.add_parser("finetune", help="fine-tuning and linear-probe accuracy at label fractions")
    f.add_argument("--labels", nargs="+", type=float, default=[0.01, 0.1])
    f.add_argument("--row", action="append", required=True, help="NAME=FT_PATTERN[:PRETRAINED_RUN]")
    args = ap.parse_args()
    if args.table == "codebook":
        print(codebook(args.runs))
    else:
        print(finetune(args.row, args.labels))


if __name__ == "__main__":
    main()
