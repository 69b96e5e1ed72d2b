"""VATT's results tables, from finished runs (and the same models untrained).

    python -m benchmarks.vatt_results results --row "VATT, shared=runs/vatt_md_shared" \\
        --row "modality-specific towers=runs/vatt_md_separate"
    python -m benchmarks.vatt_results droptoken --row 0=runs/vatt_md_dt0 --row 0.25=runs/vatt_md_dt25 \\
        --row 0.5=runs/vatt_md_shared --row 0.75=runs/vatt_md_dt75

``results``: for each ``NAME=RUN``, the run's held-out figures (video->text and text->video
recall, video<->audio recall, zero-shot top-1 by text prompts and by class recordings) and linear
probes (:func:`eval_probes.linear_probe`) of its pooled video and audio features (train split ->
test split, the clips that have a class), beside the same model at its initialisation (the run's config and seed, no step
taken): an "untrained" row before each trained one.

``droptoken``: for each ``RATE=RUN``, the training step time (median over ``--steps`` steps after
``--warmup``, batch and model of the run's config, DropToken at RATE) and the peak resident memory
of a fresh process doing just that, beside the run's held-out figures.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

COLUMNS = [("v->t R@1", "v2t_r1"), ("t->v R@5", "t2v_r5"), ("v->a R@10", "v2a_r10"), ("a->v R@10", "a2v_r10"),
           ("zero-shot (text)", "zeroshot_text_{src}_top1"), ("zero-shot (audio)", "zeroshot_audio_{src}_top1")]


def _model(run: Path, trained: bool):
    from pretrain.batches import schema_of
    from pretrain.loop import build_model
    from pretrain.objectives import objective_class
    from pretrain.probe import load_run, read_run_config

    cfg = read_run_config(run)
    schema = schema_of(objective_class(cfg.objective))
    test = schema.dataset(cfg, "test")
    if trained:
        _, model = load_run(run, cfg, test.info)
    else:
        torch.manual_seed(cfg.seed)  # the loop's initial weights
        model = build_model(cfg, test.info)
    return cfg, schema, model.eval(), test


@torch.no_grad()
def _features(model, ds, modality: str, batch_size: int = 128):
    from data.clips import ClipCollate
    from data.tokenize import create_tokenizer

    collate = ClipCollate(create_tokenizer("bytes", 8), ds.info.mean, ds.info.std)
    feats, labels = [], []
    for lo in range(0, len(ds), batch_size):
        batch = collate([ds[i] for i in range(lo, min(len(ds), lo + batch_size))])
        if batch["index"].numel():
            feats.append(model.pooled(batch[modality], modality).float())
            labels.append(batch["label"])
    x, y = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    return x[y >= 0], y[y >= 0]  # clips of a class (Tux Paint's small categories have none)


def evaluate(run: Path, trained: bool, probes: bool = True) -> dict:
    """Held-out figures of ``run``'s model (trained, or at its initialisation), and linear-probe
    accuracies of its pooled video and audio features."""
    from eval_probes import linear_probe

    cfg, schema, model, test = _model(run, trained)
    out = model.evaluate(schema.eval_loader(cfg, test.info, test), final=True)
    out["source"] = test.info.extra["sources"][0]["name"]
    if probes:
        train = schema.dataset(cfg, "train")
        for modality in ("video", "audio"):
            xtr, ytr = _features(model, train, modality)
            xte, yte = _features(model, test, modality)
            out[f"probe_{modality}"] = linear_probe(xtr, ytr, xte, yte, epochs=50)["test_acc"]
    return out


def _cells(m: dict) -> list[str]:
    return [f"{100 * m[key.format(src=m['source'])]:.1f}" if key.format(src=m["source"]) in m else "–"
            for _, key in COLUMNS]


def results(rows: list[tuple[str, str]]) -> str:
    head = [name for name, _ in COLUMNS] + ["probe video", "probe audio"]
    lines = ["| model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, run in rows:
        for trained in (False, True):
            m = evaluate(Path(run), trained)
            label = name if trained else f"{name}, untrained"
            lines.append(f"| {label} | " + " | ".join(_cells(m) + [f"{100 * m['probe_video']:.1f}",
                                                                   f"{100 * m['probe_audio']:.1f}"]) + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


_STEP_TIMER = r"""
import json, resource, statistics, sys, time
import torch
from pretrain.batches import schema_of
from pretrain.loop import build_model
from pretrain.objectives import objective_class
from pretrain.probe import read_run_config
run, rate, warmup, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = read_run_config(run)
cfg.objectives["vatt"].drop_token = rate
schema = schema_of(objective_class(cfg.objective))
ds = schema.dataset(cfg, "train")
torch.manual_seed(0)
model = build_model(cfg, ds.info).train()
batches = iter(schema.loader(cfg, model, ds.info, ds, 0, 1))
data = [next(batches) for _ in range(warmup + steps)]  # decoded beforehand: the step alone is timed
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
times = []
for i, batch in enumerate(data):
    t = time.perf_counter()
    loss = model(batch)["loss"]
    opt.zero_grad(); loss.backward(); opt.step()
    if i >= warmup:
        times.append(time.perf_counter() - t)
print(json.dumps({"step_ms": 1000 * statistics.median(times),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def step_cost(run: Path, rate: float, warmup: int, steps: int) -> dict:
    r = subprocess.run([sys.executable, "-c", _STEP_TIMER, str(run), str(rate), str(warmup), str(steps)],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def droptoken(rows: list[tuple[str, str]], warmup: int, steps: int) -> str:
    head = ["step (ms)", "vs rate 0", "peak RSS (MiB)"] + [name for name, _ in COLUMNS]
    lines = ["| DropToken rate | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    base = None
    for rate, run in rows:
        cost = step_cost(Path(run), float(rate), warmup, steps)
        base = base or cost["step_ms"]
        m = evaluate(Path(run), True, probes=False)
        lines.append(f"| {rate} | {cost['step_ms']:.0f} | {base / cost['step_ms']:.2f}x | {cost['peak_rss_mib']:.0f} | "
                     + " | ".join(_cells(m)) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("results")
    r.add_argument("--row", action="append", required=True, metavar="NAME=RUN")
    d = sub.add_parser("droptoken")
    d.add_argument("--row", action="append", required=True, metavar="RATE=RUN")
    d.add_argument("--warmup", type=int, default=3)
    d.add_argument("--steps", type=int, default=20)
    for q in (r, d):
        q.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    rows = [tuple(x.split("=", 1)) for x in args.row]
    table = results(rows) if args.cmd == "results" else droptoken(rows, args.warmup, args.steps)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
