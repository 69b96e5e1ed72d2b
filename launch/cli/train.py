"""``pretrain fit``, ``probe``, ``demo``, ``export`` and ``list``."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ._args import CliError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DEMO_RECIPE = RECIPES / "demo_mnist5k.yaml"


def _cmd_fit(args) -> int:
    from pretrain.config import load_config
    from pretrain.loop import fit

    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise CliError(f"--resume: '{run}' is not a run directory (no config.yaml)")
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
    from pretrain.probe import format_table, probe_run

    probes = _probe_names(args.probe)
    res = probe_run(args.run, probes, baselines=not args.no_baselines, progress=not args.quiet)
    print(format_table(res["rows"], probes))
    return 0


def _cmd_demo(args) -> int:
    from pretrain.config import load_config
    from pretrain.loop import fit
    from pretrain.probe import format_table, probe_run

    t0 = time.time()
    cfg = load_config(DEMO_RECIPE, [f"run_dir={args.run_dir}", *args.overrides])
    fit(cfg)
    t_fit = time.time() - t0
    res = probe_run(cfg.run_dir, ("linear", "knn"), baselines=True)
    table = format_table(res["rows"])
    print(f"\n{cfg.objective} on {cfg.data}, seed {cfg.seed}: {cfg.max_steps} steps in {t_fit:.0f} s, "
          f"total {time.time() - t0:.0f} s. Run directory: {cfg.run_dir}\n")
    print(table)
    return 0


def _cmd_export(args) -> int:
    if args.format == "open_clip":
        from pretrain.export_open_clip import export_open_clip

        out = export_open_clip(args.run, args.out, args.step)
        print(f"wrote {out} (load it with open_clip.create_model('local-dir:{out}'))")
        return 0
    if args.format == "timm":
        from pretrain.export_timm import STEM_KEY, export_timm

        out = export_timm(args.run, args.out, args.step)
        if STEM_KEY in json.loads((out / "config.json").read_text()):
            how = f"pretrain.export_timm.timm_model_from_export('{out}') (cifar stem: see {STEM_KEY} in config.json)"
        else:
            how = f"timm.create_model('local-dir:{out}', pretrained=True)"
        print(f"wrote {out} (load it with {how})")
        return 0
    from pretrain.export import export_weights

    out = export_weights(args.run, args.step, args.out)
    print(f"wrote {out}")
    return 0


def _cmd_shards(args) -> int:
    from data.pairs import is_pair_spec, write_pair_shards

    if not is_pair_spec(args.data):
        from data.pairs import list_pair_sources

        raise CliError(f"--data '{args.data}' is not a pair spec; sources: {', '.join(list_pair_sources())}")
    out, pattern, n = write_pair_shards(args.data, args.out, args.shard_size, args.image_size,
                                        progress=not args.quiet)
    print(f"wrote {n} pairs to {out}; train on them with data=wds:{pattern}")
    return 0


def _cmd_list(args) -> int:
    from data import list_datasets, list_tokenizers
    from data.clips import list_clip_sources
    from data.pairs import list_pair_sources
    from models import list_backbones
    from pretrain.batches import SCHEMAS
    from pretrain.engines import ENGINES
    from pretrain.objectives import list_objectives, objective_class

    print("objectives:", ", ".join(f"{n} ({'+'.join(objective_class(n).towers)}, {objective_class(n).batch})"
                                   for n in list_objectives()))
    print("backbones: ", ", ".join(list_backbones()))
    print("datasets:  ", ", ".join(list_datasets()))
    print("pairs:     ", ", ".join(list_pair_sources()), "(join with +: tuxpaint+mnist5k_captions)")
    print("clips:     ", ", ".join(list_clip_sources()), "(video, audio and text: objective=vatt)")
    print("engines:   ", ", ".join(ENGINES.names()))
    print("batches:   ", ", ".join(SCHEMAS.names()))
    print("tokenizers:", ", ".join(list_tokenizers()))
    print("recipes:   ", ", ".join(sorted(str(p.relative_to(RECIPES.parent.parent)) for p in RECIPES.glob("*.yaml"))))
    return 0


def add_parsers(sub) -> None:
    """Add fit, probe, demo, export and list to the ``pretrain`` sub-command parser."""
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

    d = sub.add_parser("demo", help="SimCLR on mnist5k (launch/recipes/demo_mnist5k.yaml), then probes beside raw-pixel and "
                                         "random-init baselines")
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("overrides", nargs="*", metavar="key=value")
    d.set_defaults(fn=_cmd_demo)

    ex = sub.add_parser("export", help="consolidate a checkpoint (plain or any DeepSpeed ZeRO stage) into "
                                       "weights.safetensors, or write a run for open_clip or timm")
    ex.add_argument("--run", required=True, metavar="RUN_DIR")
    ex.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ex.add_argument("--out", help="output file (default: RUN_DIR/weights.safetensors), or folder with "
                                  "--format open_clip / timm (default: RUN_DIR/open_clip, RUN_DIR/timm)")
    ex.add_argument("--format", default="safetensors", choices=["safetensors", "open_clip", "timm"],
                    help="safetensors (this project's weights file), open_clip (a clip run with a ViT image "
                         "tower: open_clip_config.json + open_clip_model.safetensors) or timm (a ViT or ResNet "
                         "image tower: config.json + model.safetensors for timm.create_model('local-dir:DIR'))")
    ex.set_defaults(fn=_cmd_export)

    sh = sub.add_parser("shards", help="write image-text pairs (any pair spec) as webdataset tar shards "
                                       "(img2dataset's layout), for data=wds:PATTERN")
    sh.add_argument("--data", required=True, metavar="SPEC", help="a pair spec, e.g. tuxpaint+mnist5k_captions")
    sh.add_argument("--out", required=True, metavar="DIR")
    sh.add_argument("--shard-size", type=int, default=1000, help="pairs per tar shard")
    sh.add_argument("--image-size", type=int, default=None, help="side of the stored images (default: the data's)")
    sh.add_argument("--quiet", action="store_true", help="no progress bar")
    sh.set_defaults(fn=_cmd_shards)

    ls = sub.add_parser("list", help="list objectives, backbones, datasets and recipes")
    ls.set_defaults(fn=_cmd_list)
