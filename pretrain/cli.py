"""The ``pretrain`` command: fit, probe, finetune, distill, export, demo, list."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "launch" / "recipes"
DEMO_RECIPE = RECIPES / "byol_mnist5k.yaml"


def _cmd_fit(args) -> int:
    from .config import load_config
    from .loop import fit

    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise _UserError(f"--resume: '{run}' is not a run directory (no config.yaml)")
        cfg = load_config(run / "config.yaml", ["stop_at=0", *args.overrides, f"run_dir={run}"])
    else:
        cfg = load_config(args.recipe, args.overrides)
    t0 = time.time()
    run_dir = fit(cfg, resume=bool(args.resume))
    print(f"run directory: {run_dir}  ({time.time() - t0:.0f} s)")
    return 0


def _probe_names(p: str) -> tuple[str, ...]:
    return ("linear", "knn") if p == "all" else (p,)


def _cmd_probe(args) -> int:
    from .probe import format_table, probe_run

    probes = _probe_names(args.probe)
    res = probe_run(args.run, probes, baselines=not args.no_baselines, progress=not args.quiet)
    print(format_table(res["rows"], probes))
    return 0


def _cmd_demo(args) -> int:
    from .config import load_config
    from .loop import fit
    from .probe import format_table, probe_run

    t0 = time.time()
    cfg = load_config(DEMO_RECIPE, [f"run_dir={args.run_dir}", *args.overrides])
    fit(cfg)
    t_fit = time.time() - t0
    res = probe_run(cfg.run_dir, ("linear", "knn"), baselines=True)
    table = format_table(res["rows"])
    print(f"\nBYOL on {cfg.data}, seed {cfg.seed}: {cfg.max_steps} steps in {t_fit:.0f} s, "
          f"total {time.time() - t0:.0f} s. Run directory: {cfg.run_dir}\n")
    print(table)
    return 0


def _cmd_export(args) -> int:
    from .export import export_weights

    out = export_weights(args.run, args.step, args.out)
    print(f"wrote {out}")
    return 0


def _cmd_finetune(args) -> int:
    from .finetune import cli_finetune

    return cli_finetune(args)


def _cmd_distill(args) -> int:
    from .finetune import cli_distill

    return cli_distill(args)


def _cmd_list(args) -> int:
    from data import list_datasets
    from models import list_backbones

    from .objectives import list_objectives

    print("objectives:", ", ".join(list_objectives()))
    print("backbones: ", ", ".join(list_backbones()))
    print("datasets:  ", ", ".join(list_datasets()))
    print("recipes:   ", ", ".join(sorted(str(p.relative_to(RECIPES.parent.parent)) for p in RECIPES.glob("*.yaml"))))
    return 0


class _UserError(Exception):
    """A command-line mistake; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain", description="Self-supervised pretraining on shared backbones: "
                                "train (fit), evaluate frozen features (probe), or run the demo.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    f = sub.add_parser("fit", help="train an objective from a YAML recipe with key=value overrides",
                       description="Train. Example: pretrain fit --recipe launch/recipes/simclr_mnist5k.yaml "
                                   "max_steps=50 run_dir=runs/x")
    f.add_argument("--recipe", help="YAML recipe (see launch/recipes/)")
    f.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its latest checkpoint")
    f.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.5")
    f.set_defaults(fn=_cmd_fit)

    pr = sub.add_parser("probe", help="linear / k-NN probes of a run's frozen features, with baselines")
    pr.add_argument("--run", required=True, metavar="RUN_DIR")
    pr.add_argument("--probe", default="all", choices=["linear", "knn", "all"])
    pr.add_argument("--no-baselines", action="store_true", help="skip the raw-pixel and random-init rows")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    pr.set_defaults(fn=_cmd_probe)

    d = sub.add_parser("demo", help="BYOL on mnist5k, then probes beside raw-pixel and random-init baselines")
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("overrides", nargs="*", metavar="key=value")
    d.set_defaults(fn=_cmd_demo)

    ex = sub.add_parser("export", help="consolidate a checkpoint (plain or any DeepSpeed ZeRO stage) into "
                                       "weights.safetensors")
    ex.add_argument("--run", required=True, metavar="RUN_DIR")
    ex.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ex.add_argument("--out", help="output file (default: RUN_DIR/weights.safetensors)")
    ex.set_defaults(fn=_cmd_export)

    ft = sub.add_parser("finetune", help="fine-tune a run (SimCLRv2: from the first projection layer) or train "
                                         "from scratch on a class-balanced labelled subset",
                        description="Example: pretrain finetune --run runs/simclr_mnist5k --labels 0.01 "
                                    "--recipe launch/recipes/finetune_mnist5k.yaml")
    ft.add_argument("--run", metavar="RUN_DIR", help="pretrained run directory ('none' = from scratch)")
    ft.add_argument("--from-scratch", action="store_true", help="no pretrained run: a new model.* backbone")
    ft.add_argument("--labels", metavar="FRACTION", help="fraction of each class's train labels, e.g. 0.01, 0.1, 1.0")
    ft.add_argument("--recipe", help="YAML recipe (see launch/recipes/finetune_*.yaml)")
    ft.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped fine-tuning run")
    ft.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. layer_decay=0.7 ema_decay=0.999")
    ft.set_defaults(fn=_cmd_finetune)

    ds = sub.add_parser("distill", help="distil a fine-tuned run into a (smaller) student on unlabelled images",
                        description="Example: pretrain distill --teacher runs/simclr_mnist5k-ft1pct --student "
                                    "resnet18 --recipe launch/recipes/distill_mnist5k.yaml student.width=32")
    ds.add_argument("--teacher", metavar="RUN_DIR", help="a fine-tuned run (pretrain finetune)")
    ds.add_argument("--student", metavar="BACKBONE", help="student backbone (default: resnet18); student.width=...")
    ds.add_argument("--labels", metavar="FRACTION", help="labelled subset for the alpha x cross-entropy term "
                                                         "(default: the teacher's)")
    ds.add_argument("--recipe", help="YAML recipe (see launch/recipes/distill_*.yaml)")
    ds.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped distillation run")
    ds.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. distill.temperature=2 distill.alpha=0.5")
    ds.set_defaults(fn=_cmd_distill)

    ls = sub.add_parser("list", help="list objectives, backbones, datasets and recipes")
    ls.set_defaults(fn=_cmd_list)

    from .search_cli import add_parsers as add_search_parsers

    add_search_parsers(sub)  # embed, search {build, query, eval, ...}
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data import DataError

    from .config import ConfigError
    from .loop import RunError

    name = getattr(args, "label", args.command)  # e.g. "search build"
    try:
        return args.fn(args)
    except (ConfigError, DataError, RunError, _UserError, FileNotFoundError) as exc:
        print(f"pretrain {name}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # registry look-ups (unknown backbone, probe, optimizer)
        print(f"pretrain {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pretrain {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
