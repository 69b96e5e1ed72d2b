"""``pretrain finetune`` and ``pretrain distill`` (SimCLRv2 steps 2 and 3; see :mod:`pretrain.finetune`)."""
from __future__ import annotations

from typing import Any, Callable

from ._args import CliError


def _print_summary(s: dict, run_dir: str) -> None:
    if "rank" in s:  # under the deepspeed launcher rank 0 reports
        return
    if "stopped_at" in s:
        print(f"{s['kind']}: stopped after step {s['stopped_at']} of {s['max_steps']} with a checkpoint; continue "
              f"with --resume {run_dir}")
        return
    print(f"{s['kind']}: test accuracy {100 * s['test_acc']:.2f}% ({s['evaluated']} weights) with "
          f"{s['num_labels']} labels, {s['steps']} steps in {s['train_wall_s']:.0f} s; run directory: {run_dir}")


def _run(args, fresh_flags: tuple, train: Callable[..., dict], new_config: Callable[[], Any]) -> int:
    """Resume the run ``--resume`` names (none of ``fresh_flags`` may be set) or train ``new_config()``.

    Under the deepspeed launcher (``engine=deepspeed``; ``deepspeed --module --no_local_rank launch
    finetune ...``) every rank runs this; the process group is shut down at the end.
    """
    from pretrain.engines import shutdown_distributed
    from pretrain.finetune import resume

    ok = False
    try:
        if args.resume:
            if any(fresh_flags):
                raise CliError("--resume takes the run's own config.yaml; give only key=value overrides with it")
            run_dir = args.resume
            summary = resume(args.resume, args.overrides)
        else:
            cfg = new_config()
            summary = train(cfg)
            run_dir = cfg.run_dir
        ok = True
    finally:
        shutdown_distributed(wait=ok)  # nothing to do outside a launcher job
    _print_summary(summary, run_dir)
    return 0


def _cmd_finetune(args) -> int:
    from pretrain.finetune import check_fraction, finetune, load_finetune_config

    def new_config():
        if args.from_scratch and args.run and args.run != "none":
            raise CliError(f"--from-scratch and --run {args.run} contradict each other; give one of them")
        if not args.from_scratch and not args.run:
            raise CliError("give --run RUN_DIR (a pretrained run), --from-scratch or --resume RUN_DIR")
        extra = [] if args.labels is None else [f"labels={check_fraction(args.labels, '--labels')}"]
        run = "none" if args.from_scratch else args.run
        return load_finetune_config(args.recipe, [*args.overrides, *extra, f"run={run}"])

    return _run(args, (args.run, args.from_scratch, args.recipe, args.labels), finetune, new_config)


def _cmd_distill(args) -> int:
    from models import list_backbones
    from pretrain.finetune import check_fraction, distill, load_finetune_config, teacher_labels

    def new_config():
        if not args.teacher:
            raise CliError("give --teacher RUN_DIR (a fine-tuned run) or --resume RUN_DIR")
        extra = [f"distill.teacher={args.teacher}"]
        if args.student:
            if args.student not in list_backbones():
                raise CliError(f"--student: unknown backbone '{args.student}'; valid backbones: "
                               f"{', '.join(list_backbones())}")
            extra.append(f"student.backbone={args.student}")
        if args.labels is not None:
            extra.append(f"labels={check_fraction(args.labels, '--labels')}")
        # by default the teacher's labelled subset, for the optional cross-entropy term
        return load_finetune_config(args.recipe, [*args.overrides, *extra], base=teacher_labels(args.teacher))

    return _run(args, (args.teacher, args.student, args.recipe, args.labels), distill, new_config)


def add_parsers(sub) -> None:
    """Add finetune and distill to the ``pretrain`` sub-command parser."""
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
