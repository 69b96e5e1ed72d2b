"""SimCLRv2 fine-tuning and distillation (``pretrain finetune`` / ``pretrain distill``) on real tiny data."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data as data_lib
from losses import distillation_loss
from models import MLPHead, create_backbone, layer_ids, list_backbones, num_blocks, num_layers
from launch.cli import main
from pretrain.config import ConfigError
from pretrain.finetune import (Classifier, evaluate, init_from_run, labelled_subset, load_classifier,
                               param_groups)
from pretrain.objectives import create_objective, list_objectives
from pretrain.objectives.distill import Distill, DistillConfig
from pretrain.optim import build_optimizer
from pretrain.schedules import LRSchedule

TINY_FIT = ["data=digits", "image_size=16", "model.width=8", "batch_size=32", "precision=fp32", "progress=false",
            "simclr.proj_dim=16", "byol.proj_hidden=32", "byol.pred_hidden=32", "max_steps=3"]
TINY_FT = ["max_steps=6", "batch_size=32", "log_every=1", "progress=false", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny SimCLR pretraining run and a fine-tuned run (1 EMA) on digits."""
    root = tmp_path_factory.mktemp("ft")
    pre = root / "simclr"
    assert main(["fit", "objective=simclr", *TINY_FIT, f"run_dir={pre}"]) == 0
    ft = root / "ft"
    assert main(["finetune", "--run", str(pre), "--labels", "0.1", *TINY_FT, "ema_decay=0.8", "layer_decay=0.8",
                 f"run_dir={ft}"]) == 0
    return {"root": root, "pre": pre, "ft": ft}


def _digits_train():
    return data_lib.build_dataset("digits", "train")


# ------------------------------------------------------------------------------------------ labelled subset


def test_labelled_subset_is_class_balanced_seeded_and_deterministic():
    y = _digits_train().labels.numpy()
    counts = np.bincount(y)
    for frac in (0.01, 0.1, 0.5, 1.0):
        idx = labelled_subset(y, frac, seed=3)
        assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
        got = np.bincount(y[idx], minlength=10)
        want = np.maximum(1, np.round(frac * counts)).astype(int)
        assert got.tolist() == want.tolist(), frac
    assert np.array_equal(labelled_subset(y, 0.1, seed=3), labelled_subset(torch.from_numpy(y), 0.1, seed=3))
    assert not np.array_equal(labelled_subset(y, 0.1, seed=3), labelled_subset(y, 0.1, seed=4))
    assert np.array_equal(labelled_subset(y, 1.0, seed=9), np.arange(len(y)))
    torch.manual_seed(123)  # the global RNG plays no part
    np.random.seed(123)
    assert np.array_equal(labelled_subset(y, 0.1, seed=3), labelled_subset(y, 0.1, seed=3))
    for bad in (0, -0.1, 1.5, "x"):
        with pytest.raises(ConfigError, match="expected a fraction"):
            labelled_subset(y, bad)


# ------------------------------------------------------------------------------------------ layer ids and LLRD


def _tiny(name):
    """A small instance of any registered backbone: each factory takes the sizes it knows."""
    from pretrain.config import TowerConfig
    from pretrain.towers import tower_kwargs

    tower = TowerConfig(backbone=name, width=8, patch_size=4, depth=2, embed_dim=32, num_heads=2, heads=2)
    vocab = 30522 if name.startswith("minilm") else 64  # a pretrained text tower takes its own tokenizer's ids only
    return create_backbone(name, **tower_kwargs(tower, in_chans=1, image_size=16, vocab_size=vocab, context_length=16))


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_has_layer_ids(name):
    model = _tiny(name)
    ids = layer_ids(model)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(ids) == sorted(names)
    assert min(ids.values()) == 0 and max(ids.values()) <= num_layers(model) == num_blocks(model) + 1
    # every block has its own id, and ids grow with depth along the forward pass
    assert len({v for v in ids.values()}) >= num_blocks(model) + 1
    order = [ids[n] for n in names]
    assert order == sorted(order)


def _group_lr(opt, param):
    for g in opt.param_groups:
        if any(p is param for p in g["params"]):
            return g["lr"], g["weight_decay"]
    raise AssertionError("parameter in no group")


def _opt(model, decay, name="lars", base=0.4):
    groups = param_groups(model, decay)
    opt = build_optimizer(groups, name, base, weight_decay=1e-4)
    LRSchedule(opt, base, max_steps=10, warmup_steps=0)
    return opt


def test_llrd_learning_rates_resnet():
    bb = create_backbone("resnet18", in_chans=1, width=8)
    proj = MLPHead(bb.embed_dim, 32, 16, num_layers=3, norm="bn", last_norm=True)
    model = Classifier(bb, proj.truncate(1), 32, 10)
    assert model.depth == 10  # stem 0, blocks 1-8, neck 9, classifier 10
    opt, d, base = _opt(model, 0.5), 0.5, 0.4
    expect = {bb.conv1.weight: d ** 10, bb.bn1.weight: d ** 10, bb.layer1[0].conv1.weight: d ** 9,
              bb.layer2[0].downsample[0].weight: d ** 7, bb.layer3[1].conv2.weight: d ** 4,
              bb.layer4[1].bn2.bias: d ** 2, model.neck[0][0].weight: d, model.neck[0][1].weight: d,
              model.head.weight: 1.0, model.head.bias: 1.0}
    for p, scale in expect.items():
        lr, wd = _group_lr(opt, p)
        assert lr == pytest.approx(base * scale, rel=1e-12)
        assert wd == (0.0 if p.ndim <= 1 else 1e-4)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))
    # decay 1 = one LR everywhere
    assert all(g["lr"] == pytest.approx(0.4, rel=1e-12) for g in _opt(model, 1.0).param_groups)


def test_llrd_learning_rates_vit():
    bb = _tiny("vit_tiny")
    model = Classifier(bb, torch.nn.Sequential(), bb.embed_dim, 10)
    assert model.depth == 3  # embeddings 0, blocks 1-2, final norm and classifier 3
    opt, d, base = _opt(model, 0.65, "adamw", 1e-3), 0.65, 1e-3
    expect = {bb.patch_embed.proj.weight: d ** 3, bb.cls_token: d ** 3, bb.pos_embed: d ** 3,
              bb.blocks[0].attn.qkv.weight: d ** 2, bb.blocks[1].mlp.fc2.weight: d, bb.norm.weight: 1.0,
              model.head.weight: 1.0}
    for p, scale in expect.items():
        lr, _ = _group_lr(opt, p)
        assert lr == pytest.approx(base * scale, rel=1e-12)
    assert _group_lr(opt, bb.pos_embed)[1] == 0.0 and _group_lr(opt, bb.cls_token)[1] == 0.0
    assert _group_lr(opt, bb.blocks[0].attn.qkv.weight)[1] == 1e-4


# ------------------------------------------------------------------------------------------ initialisation


def test_finetune_starts_from_backbone_and_first_projection_layer(runs):
    state = load_file(str(runs["pre"] / "weights.safetensors"))
    model, spec, run_cfg = init_from_run(runs["pre"], head_layers=1, num_classes=10)
    assert spec["layers"] == 1 and run_cfg.objective == "simclr"
    mine = model.state_dict()
    backbone = [k for k in state if k.startswith("backbone.")]
    assert backbone
    for k in backbone:
        assert torch.equal(mine[k], state[k]), k
    first = [k for k in state if k.startswith("projector.layers.0.")]
    assert {k.split(".")[-1] for k in first} >= {"weight", "running_mean", "running_var"}
    for k in first:
        assert torch.equal(mine["neck.0." + k[len("projector.layers.0."):]], state[k]), k
    assert not any(k.startswith("neck.1.") for k in mine)  # the 2nd and 3rd projection layers are dropped
    assert torch.count_nonzero(mine["head.weight"]) == 0
    bare, spec0, _ = init_from_run(runs["pre"], head_layers=0, num_classes=10)
    assert spec0["layers"] == 0 and len(bare.neck) == 0 and bare.head.in_features == bare.backbone.embed_dim


# ------------------------------------------------------------------------------------------ end to end


def test_finetune_command_artefacts_and_ema_evaluation(runs):
    ft = runs["ft"]
    for name in ("config.yaml", "metrics.jsonl", "weights.safetensors", "summary.json"):
        assert (ft / name).is_file(), name
    s = json.loads((ft / "summary.json").read_text())
    y = _digits_train().labels.numpy()
    idx = labelled_subset(y, 0.1, seed=0)
    assert s["num_labels"] == len(idx) and s["labels_per_class"] == {str(c): int(n) for c, n in
                                                                      enumerate(np.bincount(y[idx]))}
    assert s["seed"] == 0 and s["wall_s"] > 0 and s["head_layers_used"] == 1 and s["evaluated"] == "ema"
    rows = [json.loads(ln) for ln in (ft / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["test_acc"] == s["test_acc"]
    # the saved weights are the EMA weights, they differ from the raw ones, and they are what was evaluated
    model, meta = load_classifier(ft)
    assert meta["kind"] == "finetune" and meta["ema"] == "True"
    # the checkpoint holds the objective: the trained classifier (backbone., neck., head.) and its EMA copy (ema.)
    raw = torch.load(ft / "checkpoints" / "step_6" / "state.pt", weights_only=False)["engine"]["model"]
    raw = {k: v for k, v in raw.items() if not k.startswith("ema.")}
    ema = model.state_dict()
    diffs = [not torch.equal(raw[k], v) for k, v in ema.items() if v.is_floating_point()
             and "running" not in k]
    assert any(diffs)
    test = data_lib.build_dataset("digits", "test")
    assert evaluate(model, test, 16) == pytest.approx(s["test_acc"])
    raw_model, _ = load_classifier(ft)
    raw_model.load_state_dict(raw)
    assert evaluate(raw_model, test, 16) == pytest.approx(s["test_acc_raw_weights"])


def test_finetune_from_scratch_and_from_byol(runs):
    root = runs["root"]
    assert main(["finetune", "--from-scratch", "--labels", "0.01", *TINY_FT, "data=digits", "model.width=8",
                 "image_size=16", f"run_dir={root / 'scratch'}"]) == 0
    s = json.loads((root / "scratch" / "summary.json").read_text())
    assert s["source"] == "scratch" and s["num_labels"] == 10 and s["head_layers_used"] == 0
    assert set(s["labels_per_class"].values()) == {1}
    byol = root / "byol"
    assert main(["fit", "objective=byol", *TINY_FIT, "max_steps=1", f"run_dir={byol}"]) == 0
    assert main(["finetune", "--run", str(byol), *TINY_FT, "max_steps=2", "head_layers=0",
                 f"run_dir={root / 'ft_byol'}"]) == 0
    s = json.loads((root / "ft_byol" / "summary.json").read_text())
    assert s["source_objective"] == "byol" and s["head_layers_used"] == 0 and 0 <= s["test_acc"] <= 1


def _straight_and_resumed(root, command, common, stop_at, straight, stopped):
    """Run ``command`` straight and with a planned stop + ``--resume``: the stop leaves no weights, and both
    runs end with the same weights. Returns both summaries."""
    assert main([command, *common, f"run_dir={root / straight}"]) == 0
    assert main([command, *common, f"stop_at={stop_at}", f"run_dir={root / stopped}"]) == 0
    assert not (root / stopped / "weights.safetensors").exists()
    assert main([command, "--resume", str(root / stopped)]) == 0
    a, b = (load_file(str(root / d / "weights.safetensors")) for d in (straight, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return [json.loads((root / d / "summary.json").read_text()) for d in (straight, stopped)]


def test_finetune_resume_continues_exactly(runs):
    root = runs["root"]
    common = ["--run", str(runs["pre"]), *TINY_FT, "ema_decay=0.9"]
    sa, sb = _straight_and_resumed(root, "finetune", common, 3, "straight", "stopped")
    assert sb["resumed_from_step"] == 3 and sa["test_acc"] == sb["test_acc"]


def test_distill_command_end_to_end(runs):
    out = runs["root"] / "distill"
    assert main(["distill", "--teacher", str(runs["ft"]), "--student", "resnet18", "student.width=4",
                 "max_steps=4", "batch_size=64", "progress=false", "distill.alpha=0.5", "distill.temperature=2",
                 f"run_dir={out}"]) == 0
    for name in ("config.yaml", "metrics.jsonl", "weights.safetensors", "summary.json"):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    teacher = json.loads((runs["ft"] / "summary.json").read_text())
    assert s["kind"] == "distill" and s["teacher_test_acc"] == teacher["test_acc"]
    assert s["num_labels"] == teacher["num_labels"]  # the teacher's labelled subset by default
    assert s["params"] < s["teacher_params"] and s["num_train_images"] == 1438
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("distill_loss" in r and "ce_loss" in r for r in rows if "loss" in r)
    student, meta = load_classifier(out)
    assert meta["kind"] == "distill" and student.backbone.width == 4


# ------------------------------------------------------------------------------------------ distillation loss


def test_distillation_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    for tau in (1.0, 0.5, 3.0):
        want = 0.0
        for i in range(5):
            pt = [np.exp(t[i, c].item() / tau) for c in range(4)]
            ps = [np.exp(s[i, c].item() / tau) for c in range(4)]
            want += -sum(pt[c] / sum(pt) * np.log(ps[c] / sum(ps)) for c in range(4))
        assert distillation_loss(s, t, tau).item() == pytest.approx(want / 5, rel=1e-5)
    # minimised (at the teacher's entropy) when the student equals the teacher
    ent = -(F.softmax(t, 1) * F.log_softmax(t, 1)).sum(1).mean()
    assert distillation_loss(t, t).item() == pytest.approx(ent.item(), rel=1e-6)
    assert distillation_loss(s, t).item() > ent.item()
    sg, tg = s.clone().requires_grad_(), t.clone().requires_grad_()
    distillation_loss(sg, tg, 2.0).backward()
    assert sg.grad is not None and tg.grad is None
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(s, t[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, 0.0)


def test_distill_objective_keeps_teacher_frozen_in_eval_mode():
    def clf():
        bb = create_backbone("resnet18", in_chans=1, width=4)
        return Classifier(bb, torch.nn.Sequential(), bb.embed_dim, 3)

    teacher = clf()
    task = Distill(create_backbone("resnet18", in_chans=1, width=4), DistillConfig(temperature=2.0, alpha=0.0),
                   teacher=teacher).train()
    assert task.training and task.backbone.training and not task.teacher.training
    before = teacher.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    out = task({"views": [torch.randn(6, 1, 16, 16)]})
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN statistics untouched


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("argv,needle", [
    (["finetune", "--run", "{root}/nope"], "run directory '{root}/nope' does not exist"),
    (["finetune", "--run", "{root}/noweights"], "has no weights.safetensors"),
    (["finetune", "--run", "{pre}", "--labels", "2"], "--labels: expected a fraction"),
    (["finetune", "--run", "{pre}", "--labels", "ten"], "--labels: expected a fraction"),
    (["finetune"], "give --run RUN_DIR"),
    (["finetune", "--run", "{pre}", "layer_decay=1.5"], "'layer_decay'"),
    (["distill", "--teacher", "{ft}", "--student", "resnet19"], "unknown backbone 'resnet19'"),
    (["distill", "--teacher", "{pre}"], "is not a fine-tuned run"),
    (["distill", "--teacher", "{root}/nope"], "does not exist"),
])
def test_bad_input_is_one_line_with_exit_code_2(runs, capsys, argv, needle):
    root = runs["root"]
    (root / "noweights").mkdir(exist_ok=True)
    (root / "noweights" / "config.yaml").write_text((runs["pre"] / "config.yaml").read_text())
    fmt = {"root": root, "pre": runs["pre"], "ft": runs["ft"]}
    capsys.readouterr()
    rc = main([a.format(**fmt) for a in argv] + ["progress=false"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert needle.format(**fmt) in lines[0] and lines[0].startswith(f"pretrain {argv[0]}: error:")


def test_recipes_load():
    from pretrain.finetune import load_finetune_config

    root = Path(__file__).resolve().parents[1] / "launch" / "recipes"
    ft = load_finetune_config(root / "finetune_mnist5k.yaml", ["labels=0.01"])
    assert ft.head_layers == 1 and ft.labels == 0.01 and ft.data == "mnist5k"
    ds = load_finetune_config(root / "distill_mnist5k.yaml", ["student.width=32"])
    assert ds.student.backbone == "resnet18" and ds.student.width == 32 and ds.distill.temperature > 0
    vit = load_finetune_config(root / "finetune_vit.yaml")
    assert vit.optim.name == "adamw" and 0 < vit.layer_decay < 1 and vit.ema_decay > 0
    with pytest.raises(ConfigError, match="unknown config key 'distil'"):
        load_finetune_config(root / "distill_mnist5k.yaml", ["distil.alpha=0.5"])


# ------------------------------------------------------------------------------------------ one loop


def test_finetune_and_distill_are_objectives_trained_by_fit(runs):
    assert {"supervised", "distill"} <= set(list_objectives())
    ft = runs["ft"]
    cfg = (ft / "config.yaml").read_text()
    assert "objective: supervised" in cfg and "labels: 0.1" in cfg
    trained = json.loads((ft / "train_summary.json").read_text())
    s = json.loads((ft / "summary.json").read_text())
    assert trained["test_acc"] == s["test_acc"] and trained["steps"] == 6
    rows = [json.loads(ln) for ln in (ft / "metrics.jsonl").read_text().splitlines()]
    assert all("lr" in r and "images_per_s" in r and "train_acc" in r for r in rows if "loss" in r)
    assert list((ft / "tb").iterdir()), "no TensorBoard event files"
    # the objective alone: one lightly augmented view of each labelled image, evaluated on the test split
    obj = create_objective("supervised", create_backbone("resnet18", in_chans=1, width=4), num_classes=3)
    assert obj.labelled_only and obj.eval_split == "test" and obj.num_views == 1 and obj.view_recipe == "light"
    assert sorted(k.split(".")[0] for k in obj.state_dict()) == sorted(
        k.split(".")[0] for k in Classifier(obj.backbone, obj.neck, obj.backbone.embed_dim, 3).state_dict())


def test_supervised_objective_trains_through_pretrain_fit(tmp_path):
    """The objective without the command: the number of classes comes from the data, the labelled subset from
    ``labels``, and the run exports a classifier."""
    run = tmp_path / "sup"
    assert main(["fit", "objective=supervised", "data=digits", "image_size=16", "model.width=8", "labels=0.1",
                 "batch_size=16", "max_steps=2", "eval_every=1", "log_every=1", "precision=fp32", "progress=false",
                 "optim.name=sgd", "optim.lr=0.05", f"run_dir={run}"]) == 0
    assert "num_classes: 10" in (run / "config.yaml").read_text()
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "test_acc" in r] == [1, 2]  # every eval_every steps, then at the end
    model, meta = load_classifier(run)
    assert meta["kind"] == "finetune" and model.head.out_features == 10
    trained = json.loads((run / "train_summary.json").read_text())
    assert evaluate(model, data_lib.build_dataset("digits", "test"), 16) == pytest.approx(trained["test_acc"])


def test_distill_with_labelled_stream_resumes_exactly(runs):
    root = runs["root"]
    common = ["--teacher", str(runs["ft"]), "--student", "resnet18", "student.width=4", "max_steps=4", "batch_size=32",
              "log_every=1", "progress=false", "distill.alpha=0.5", "ema_decay=0.5"]
    sa, sb = _straight_and_resumed(root, "distill", common, 2, "d_straight", "d_stopped")
    rows = [[json.loads(ln) for ln in (root / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("d_straight", "d_stopped")]
    ce = [[r["ce_loss"] for r in rs if "loss" in r] for rs in rows]
    assert len(ce[0]) == 4 and ce[0] == ce[1]
    assert sb["resumed_from_step"] == 2 and sb["evaluated"] == "ema" and sb["kind"] == "distill"
    assert sa["test_acc"] == sb["test_acc"]


def test_finetune_runs_under_deepspeed_on_two_ranks(tmp_path):
    """``pretrain finetune`` under the deepspeed launcher, 2 ranks with ZeRO-2 and global batch norm, gives
    the loss curve of one process with the doubled batch, and the same run files."""
    import os
    import subprocess
    import sys

    from dist_helpers import find_free_port

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["finetune", "--from-scratch", "--labels", "0.25", "data=digits", "image_size=16", "model.width=8",
              "max_steps=4", "log_every=1", "progress=false", "optim.warmup_steps=0", "optim.lr=0.001"]
    one = subprocess.run([sys.executable, "-m", "launch", *common, "batch_size=32", f"run_dir={tmp_path / 'one'}"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port",
                          str(find_free_port()), "--module", "--no_local_rank", "launch", *common, "batch_size=16",
                          "engine=deepspeed", "deepspeed.zero_stage=2", f"run_dir={tmp_path / 'two'}"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    rows = [[json.loads(ln) for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")]
    losses = [[r["loss"] for r in rs if "loss" in r] for rs in rows]
    assert len(losses[0]) == len(losses[1]) == 4
    for a, b in zip(*losses):
        assert b == pytest.approx(a, rel=1e-4)
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["engine"] == "deepspeed" and s["world_size"] == 2 and s["batch_size"] == 16
    assert rows[1][-1]["test_acc"] == s["test_acc"]
    model, meta = load_classifier(tmp_path / "two")
    assert meta["kind"] == "finetune"
    assert evaluate(model, data_lib.build_dataset("digits", "test"), 16) == pytest.approx(s["test_acc"])
