"""Pipeline and tensor parallelism: real 2-rank DeepSpeed launches on the CPU (gloo), against one process.

Several runs share one launch (tests/ds_fits_worker.py), which pays for the launcher, DeepSpeed's
imports and its communication op once.
"""
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_helpers import find_free_port
from test_deepspeed import DEEPSPEED, ROOT, _env, losses, plain  # one process, launcher, logged losses


# A supervised ViT (2 blocks of width 32) on sklearn's digits, fp32, no batch statistics anywhere: one
# process and the pipeline compute the same sums, so the losses agree to float rounding; 4 micro-batches
# of 16 per step (DeepSpeed's 1F1B schedule over them)
VIT = ["objective=supervised", "data=digits", "image_size=16", "model.image.backbone=vit_tiny",
       "model.image.patch_size=4", "model.image.depth=2", "model.image.embed_dim=32", "model.image.num_heads=2",
       "supervised.head_layers=0", "batch_size=16", "optim.grad_accum=4", "optim.name=adamw", "optim.lr=0.003",
       "optim.warmup_steps=0", "precision=fp32", "log_every=1", "progress=false", "checkpoint_every=3"]


# VATT on moving digits (16 px, 4 frames, 0.25 s of audio), fp32, DropToken 0.5 (each clip's kept
# tokens drawn from its step and index, whichever rank holds it). The heads use layer norm here: with
# batch norm (global over the ranks, first losses equal to 1e-7) AdamW's first steps turn the
# rounding noise of gradients that batch norm makes ~0 (shifts of a channel) into whole-LR steps of
# either sign, and the runs part by ~1e-3 within 5 steps, as two one-process runs with differently
# ordered sums would
VATT = ["--recipe", "launch/recipes/vatt_moving_digits.yaml", "image_size=16", "clips.frames=4",
        "clips.audio_seconds=0.25", "model.video.depth=1", "model.video.embed_dim=32", "model.video.num_heads=2",
        "vatt.va_dim=32", "vatt.vt_dim=16", "vatt.head_norm=ln", "tokenizer.context_length=24",
        "optim.warmup_steps=0", "optim.lr=0.001", "precision=fp32", "log_every=1", "progress=false"]


def launch_runs(tmp_path, runs, ranks=2, check=True):
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(find_free_port()), "tests/ds_fits_worker.py",
           str(spec)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=_env())
    if check and r.returncode != 0:
        raise AssertionError(f"deepspeed launch failed ({r.returncode}):\n{r.stdout[-5000:]}\n{r.stderr[-3000:]}")
    return r


def records(run):
    return [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def weights(run):
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "weights.safetensors"))


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    """One-process references, then every 2-rank run of this file but the matrix in one launch (which
    pays for the launcher and DeepSpeed's start once): pp=2 (parameter-balanced stages, and uniform
    with activation checkpointing), a pp=2 run stopped at step 3 and resumed, runs stopped under one
    layout for resuming under another, the tensor-parallel runs (:func:`tensor_parallel_cells`) and
    the masked-modelling runs (:func:`mim_cells`)."""
    root = tmp_path_factory.mktemp("pp")
    plain(*VIT, "max_steps=5", f"run_dir={root / 'one'}")
    plain(*VIT, "max_steps=5", "stop_at=3", f"run_dir={root / 'plain_to_pp'}")
    plain(*VIT, "max_steps=5", "stop_at=3", f"run_dir={root / 'plain_to_zero2'}")
    mim_references(root / "mim")
    plain(*VATT, "batch_size=16", "max_steps=5", f"run_dir={root / 'vatt_one'}")
    pp = [*VIT, "engine=deepspeed", "parallel.pp=2", "max_steps=5"]
    launch_runs(root, [[*pp, f"run_dir={root / 'pp'}"],
                       [*pp, "parallel.partition=uniform", "parallel.activation_checkpoint=1",
                        f"run_dir={root / 'pp_uniform'}"],
                       [*pp, "stop_at=3", f"run_dir={root / 'stopped'}"],
                       ["--resume", str(root / "stopped")],
                       # for resuming on other layouts: a 2-rank data-parallel run (2 x 8 images a
                       # micro-batch) and a pp=2 run, stopped; a one-process run resumed as pp=2
                       [*VIT, "engine=deepspeed", "batch_size=8", "max_steps=5", "stop_at=3",
                        f"run_dir={root / 'dp2_to_one'}"],
                       [*pp, "stop_at=3", f"run_dir={root / 'pp_to_one'}"],
                       ["--resume", str(root / "plain_to_pp"), "engine=deepspeed", "parallel.pp=2"],
                       # ZeRO-2: the optimizer state in flat partitions, read and set per parameter
                       [*VIT, "engine=deepspeed", "deepspeed.zero_stage=2", "batch_size=8", "max_steps=5",
                        "stop_at=3", f"run_dir={root / 'zero2_to_one'}"],
                       ["--resume", str(root / "plain_to_zero2"), "engine=deepspeed", "deepspeed.zero_stage=2",
                        "batch_size=8"],
                       # dp=2 -> pp=2 on the same 2 ranks: 2 replicas of 8 images become one pipeline of 16
                       [*VIT, "engine=deepspeed", "batch_size=8", "max_steps=5", "stop_at=3",
                        f"run_dir={root / 'dp2_to_pp'}"],
                       ["--resume", str(root / "dp2_to_pp"), "parallel.pp=2", "batch_size=16"],
                       [*VATT, "engine=deepspeed", "deepspeed.zero_stage=2", "batch_size=8", "max_steps=5",
                        f"run_dir={root / 'vatt_zero2'}"],
                       *tensor_parallel_cells(root / "tp"), *mim_cells(root / "mim")])
    plain("--resume", str(root / "tp" / "tp_to_one"), "engine=plain", "parallel.tp=1")
    plain("--resume", str(root / "tp" / "tp_zero1_to_one"), "engine=plain", "parallel.tp=1")
    plain("--resume", str(root / "dp2_to_one"), "engine=plain", "batch_size=16")
    plain("--resume", str(root / "zero2_to_one"), "engine=plain", "batch_size=16")
    plain("--resume", str(root / "pp_to_one"), "engine=plain", "parallel.pp=1")
    return root


def test_pipeline_matches_one_process(pipeline_runs):
    ref = losses(pipeline_runs / "one")
    assert len(ref) == 5 and ref[-1] < ref[0]  # it learns
    for name in ("pp", "pp_uniform"):
        got = losses(pipeline_runs / name)
        assert len(got) == 5
        for a, b in zip(got, ref):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    # the metrics besides the loss cross the stages too, and so does the final evaluation
    one, pp = records(pipeline_runs / "one"), records(pipeline_runs / "pp")
    assert [r["train_acc"] for r in pp if "loss" in r] == pytest.approx([r["train_acc"] for r in one if "loss" in r])
    summary = json.loads((pipeline_runs / "pp" / "train_summary.json").read_text())
    assert summary["layout"] == "dp=1 x tp=1 x pp=2"
    assert summary["test_acc"] == pytest.approx(json.loads((pipeline_runs / "one" / "train_summary.json")
                                                           .read_text())["test_acc"], abs=1e-9)


def test_vatt_two_ranks_under_zero2_match_one_process(pipeline_runs):
    """VATT's NCE and MIL-NCE take their negatives from both ranks: 2 x 8 clips under ZeRO-2 train
    as one process with 16 (losses to 1e-4)."""
    ref, got = losses(pipeline_runs / "vatt_one"), losses(pipeline_runs / "vatt_zero2")
    assert len(ref) == len(got) == 5 and ref[-1] < ref[0]
    assert got == pytest.approx(ref, rel=1e-4)
    one, two = records(pipeline_runs / "vatt_one")[-1], records(pipeline_runs / "vatt_zero2")[-1]
    assert two["test_zeroshot_text_moving_digits_top1"] == pytest.approx(one["test_zeroshot_text_moving_digits_top1"],
                                                                          abs=0.01)


def test_pipeline_weights_consolidate_to_the_one_process_weights(pipeline_runs):
    from pretrain.engines import consolidate_deepspeed_checkpoint

    ref = weights(pipeline_runs / "one")
    got = weights(pipeline_runs / "pp")
    assert sorted(got) == sorted(ref)
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-5
    # offline, from the per-layer checkpoint files and the layer map
    ckpt = pipeline_runs / "pp" / "checkpoints" / "step_5"
    assert (ckpt / "ds" / "pipeline_layers.json").is_file()
    state = consolidate_deepspeed_checkpoint(ckpt)
    for k, v in got.items():
        assert torch.equal(state[k], v), k


def test_pipeline_resume_continues_exactly(pipeline_runs):
    straight, resumed = losses(pipeline_runs / "pp"), losses(pipeline_runs / "stopped")
    assert len(resumed) == 5
    assert resumed == pytest.approx(straight, rel=1e-6, abs=1e-7)


def test_pipeline_refusals_name_the_reason():
    """What a user sees before any rank starts work: ZeRO-2/3, pp x tp, objectives (or settings)
    that cannot be cut into stages."""
    from pretrain.config import load_config
    from pretrain.engines.pipeline import PipelineConfigError, build_pipeline
    from pretrain.objectives import create_objective
    from models import create_backbone as create_model

    cfg = load_config(None, [*VIT, "engine=deepspeed", "parallel.pp=2"])
    vit = create_model("vit_tiny", in_chans=1, image_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    sup = create_objective("supervised", vit, num_classes=10, head_layers=0)
    lay = SimpleNamespace(pp=2, tp=1, dp=1)
    with pytest.raises(PipelineConfigError, match="does not support ZeRO-2/3"):
        build_pipeline(cfg, sup, None, None, lay, {"zero_optimization": {"stage": 2}})
    with pytest.raises(PipelineConfigError, match="pipeline and tensor parallelism together"):
        build_pipeline(cfg, sup, None, None, SimpleNamespace(pp=2, tp=2, dp=1), {})
    ema = create_objective("supervised", vit, num_classes=10, head_layers=0, ema_decay=0.99)
    with pytest.raises(PipelineConfigError, match="supervised.ema_decay"):
        build_pipeline(cfg, ema, None, None, lay, {})
    swav = create_objective("swav", create_model("resnet18", in_chans=1, stem="cifar", width=8))
    with pytest.raises(PipelineConfigError, match="objective 'swav' cannot run as pipeline stages"):
        build_pipeline(cfg, swav, None, None, lay, {})


def test_model_parallelism_needs_the_deepspeed_engine():
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="parallel.pp=2.*engine=deepspeed"):
        load_config(None, ["parallel.pp=2"])
    with pytest.raises(ConfigError, match="parallel.tp"):
        load_config(None, ["engine=deepspeed", "parallel.tp=0"])


@pytest.fixture(scope="module")
def tensor_parallel_runs(pipeline_runs):
    """tp=2 under ZeRO-0, ZeRO-1 and ZeRO-3, and tp=2 runs stopped at step 3 and resumed (on tp=2,
    ZeRO-0 and ZeRO-3, and as one process), trained in :func:`pipeline_runs`' launch."""
    return pipeline_runs / "tp"


def tensor_parallel_cells(root):
    tp = [*VIT, "engine=deepspeed", "parallel.tp=2", "max_steps=5"]
    return [[*tp, f"run_dir={root / 'tp'}"],
            [*tp, "deepspeed.zero_stage=1", f"run_dir={root / 'tp_z1'}"],
            [*tp, "deepspeed.zero_stage=3", f"run_dir={root / 'tp_z3'}"],
            [*tp, "stop_at=3", f"run_dir={root / 'stopped'}"],
            ["--resume", str(root / "stopped")],
            [*tp, "deepspeed.zero_stage=3", "stop_at=3", f"run_dir={root / 'stopped_z3'}"],
            ["--resume", str(root / "stopped_z3")],
            [*tp, "stop_at=3", f"run_dir={root / 'tp_to_one'}"],
            [*tp, "deepspeed.zero_stage=1", "stop_at=3", f"run_dir={root / 'tp_zero1_to_one'}"]]


def test_tensor_parallel_matches_one_process(pipeline_runs, tensor_parallel_runs):
    ref = losses(pipeline_runs / "one")
    for name in ("tp", "tp_z1", "tp_z3"):
        got = losses(tensor_parallel_runs / name)
        assert len(got) == 5
        for a, b in zip(got, ref):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    summary = json.loads((tensor_parallel_runs / "tp" / "train_summary.json").read_text())
    assert summary["layout"] == "dp=1 x tp=2 x pp=1"
    # the exported weights are the one-process layout (blocks' shards put back together)
    ref_w = weights(pipeline_runs / "one")
    for name in ("tp", "tp_z3"):  # ZeRO-3: DeepSpeed gathers its partitions of the shards when it saves
        got_w = weights(tensor_parallel_runs / name)
        assert sorted(got_w) == sorted(ref_w)
        assert max((got_w[k] - ref_w[k]).abs().max().item() for k in ref_w) < 1e-5, name
        assert got_w["backbone.blocks.0.attn.qkv.weight"].shape == (96, 32)
    # offline consolidation of the per-rank files gives the same tensors
    from pretrain.engines import consolidate_deepspeed_checkpoint

    for name in ("tp", "tp_z1", "tp_z3"):
        state = consolidate_deepspeed_checkpoint(tensor_parallel_runs / name / "checkpoints" / "step_5")
        w = weights(tensor_parallel_runs / name)
        for k, v in w.items():
            assert torch.equal(state[k], v), (name, k)


def test_tensor_parallel_resume_continues_exactly(tensor_parallel_runs):
    for straight, stopped in (("tp", "stopped"), ("tp_z3", "stopped_z3")):
        straight, resumed = losses(tensor_parallel_runs / straight), losses(tensor_parallel_runs / stopped)
        assert len(resumed) == 5
        assert resumed == pytest.approx(straight, rel=1e-6, abs=1e-7)


def test_tensor_parallel_refuses_models_without_transformer_blocks():
    from pretrain.parallel import TensorParallelError, check_tensor_parallel
    from models import create_backbone

    with pytest.raises(TensorParallelError, match="no transformer blocks"):
        check_tensor_parallel(create_backbone("resnet18", in_chans=1, stem="cifar", width=8), 2)
    assert check_tensor_parallel(create_backbone("resnet18", in_chans=1, stem="cifar", width=8), 1) == 0


def test_data_parallel_pipelines_and_tensor_groups_match_one_process(tmp_path):
    """4 ranks: dp=2 x pp=2 under ZeRO-1 and dp=2 x tp=2 under ZeRO-2, against one process with
    the same global batch (2 x 16 images per micro-batch, 4 micro-batches a step)."""
    common = [*VIT, "max_steps=4"]
    plain(*common, "batch_size=32", f"run_dir={tmp_path / 'one'}")
    ds = [*common, "engine=deepspeed", "batch_size=16"]
    launch_runs(tmp_path, [[*ds, "parallel.pp=2", "deepspeed.zero_stage=1", f"run_dir={tmp_path / 'dp_pp'}"],
                           [*ds, "parallel.tp=2", "deepspeed.zero_stage=2", f"run_dir={tmp_path / 'dp_tp'}"]],
                ranks=4)
    ref = losses(tmp_path / "one")
    for name, layout in (("dp_pp", "dp=2 x tp=1 x pp=2"), ("dp_tp", "dp=2 x tp=2 x pp=1")):
        got = losses(tmp_path / name)
        assert len(got) == 4
        for a, b in zip(got, ref):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
        assert json.loads((tmp_path / name / "train_summary.json").read_text())["layout"] == layout
        w, ref_w = weights(tmp_path / name), weights(tmp_path / "one")
        assert max((w[k] - ref_w[k]).abs().max().item() for k in ref_w) < 1e-5


def test_a_deepspeed_json_without_gradient_clipping_does_not_clip(tmp_path):
    """DeepSpeed clips at 1.0 when its JSON has no ``gradient_clipping``; the recipe's optim.grad_clip decides."""
    from pretrain.engines import ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert ds_config(str(path), None, 16, 1, 2, 0.0)["gradient_clipping"] == 0.0
    assert ds_config(str(path), None, 16, 1, 2, 2.5)["gradient_clipping"] == 2.5
    path.write_text(json.dumps({"gradient_clipping": 0.5}))
    assert ds_config(str(path), None, 16, 1, 2, 0.0)["gradient_clipping"] == 0.5


# the masked-modelling objectives on the same tiny ViT: BEiT v2 (a tokenizer distilled from the
# supervised run above; mask-token embedding, early-layer tap into the aggregation head) and data2vec 2.0
# (EMA teacher blocks beside the student's, visible-only student, conv decoder, gradient clipping at 4)
MIM_VIT = ["data=digits", "image_size=16", "model.image.backbone=vit_tiny", "model.image.patch_size=4",
           "model.image.depth=2", "model.image.embed_dim=32", "model.image.num_heads=2", "precision=fp32",
           "log_every=1", "progress=false", "batch_size=16", "optim.grad_accum=2", "max_steps=5"]
BEIT = ["objective=beit_v2", *MIM_VIT, "optim.name=adamw", "optim.lr=0.003", "optim.scale_lr=false",
        "optim.warmup_steps=0"]
D2V = ["--recipe", "launch/recipes/data2vec2_mnist5k.yaml", *MIM_VIT, "data2vec2.clones=2", "data2vec2.top_k=2",
       "data2vec2.decoder_depth=2", "data2vec2.mask_fill=zeros", "data2vec2.ema_start=0.9", "data2vec2.ema_end=0.99",
       "optim.lr=0.02", "optim.warmup_steps=2"]


def mim_references(root):
    """One-process runs, before the launch: a tokenizer distilled from the supervised run, and BEiT v2
    and data2vec 2.0 references."""
    plain("objective=vqkd", "vqkd.num_codes=64", "vqkd.code_dim=8", *BEIT[1:], f"vqkd.teacher={root.parent / 'one'}",
          f"run_dir={root / 'vqkd'}")
    plain(*BEIT, f"beit_v2.tokenizer={root / 'vqkd'}", f"run_dir={root / 'beit_one'}")
    plain(*D2V, f"run_dir={root / 'd2v_one'}")


def mim_cells(root):
    runs = []
    for name, args in (("beit", [*BEIT, f"beit_v2.tokenizer={root / 'vqkd'}"]), ("d2v", D2V)):
        for layout in ("pp", "tp"):
            runs.append([*args, "engine=deepspeed", f"parallel.{layout}=2", f"run_dir={root / f'{name}_{layout}'}"])
    return runs


@pytest.fixture(scope="module")
def mim_runs(pipeline_runs):
    """pp=2 and tp=2 runs of BEiT v2 and data2vec 2.0, trained in :func:`pipeline_runs`' launch."""
    return pipeline_runs / "mim"


@pytest.mark.parametrize("name", ["beit_pp", "beit_tp", "d2v_pp", "d2v_tp"])
def test_masked_modelling_matches_one_process(mim_runs, name):
    ref = losses(mim_runs / f"{name.split('_')[0]}_one")
    got = losses(mim_runs / name)
    assert len(got) == len(ref) == 5 and ref[-1] < ref[0]
    for a, b in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    ref_w, got_w = weights(mim_runs / f"{name.split('_')[0]}_one"), weights(mim_runs / name)
    assert sorted(got_w) == sorted(ref_w)
    assert max((got_w[k] - ref_w[k]).abs().max().item() for k in ref_w) < 1e-4
    if name.startswith("d2v"):  # the EMA teacher, cut into the same stages / shards, follows the student alike
        assert any(k.startswith("target_backbone.blocks.1.") for k in got_w)


# -- the support matrix (docs/parallel.md): every cell trains 2 steps or fails with its documented message --

MATRIX_VIT = ["data=digits", "image_size=16", "model.image.backbone=vit_tiny", "model.image.patch_size=4",
              "model.image.depth=2", "model.image.embed_dim=32", "model.image.num_heads=2", "precision=fp32",
              "progress=false", "batch_size=8", "optim.grad_accum=2", "max_steps=2", "log_every=1",
              "optim.name=adamw", "optim.lr=0.001", "optim.warmup_steps=0"]
# the matrix's columns under the deepspeed launcher: (column, ranks, overrides)
MATRIX_COLUMNS = [("ZeRO-0", 2, ["deepspeed.zero_stage=0"]), ("ZeRO-1", 2, ["deepspeed.zero_stage=1"]),
                  ("ZeRO-2", 2, ["deepspeed.zero_stage=2"]), ("ZeRO-3", 2, ["deepspeed.zero_stage=3"]),
                  ("pp=2", 2, ["parallel.pp=2"]), ("tp=2", 2, ["parallel.tp=2"]),
                  ("dp=2 x pp=2", 4, ["parallel.pp=2", "deepspeed.zero_stage=1"]),
                  ("dp=2 x tp=2", 4, ["parallel.tp=2", "deepspeed.zero_stage=2"])]


def matrix_objectives(teacher, tokenizer) -> dict:
    """Per objective: (recipe or None, tiny overrides) on the ViT above."""
    return {
        "supervised": (None, ["objective=supervised", *MATRIX_VIT, "supervised.head_layers=0"]),
        "distill": (None, ["objective=distill", *MATRIX_VIT, f"distill.teacher={teacher}"]),
        "byol": (None, ["objective=byol", *MATRIX_VIT, "byol.proj_hidden=64", "byol.pred_hidden=64"]),
        "simclr": (None, ["objective=simclr", *MATRIX_VIT, "simclr.proj_dim=32", "simclr.head_norm=ln"]),
        "swav": (None, ["objective=swav", *MATRIX_VIT, "swav.proj_hidden=64", "swav.proj_dim=32",
                        "aug.local_size=8"]),
        "clip": (None, ["objective=clip", *MATRIX_VIT, "data=mnist5k_captions", "model.text.backbone=text_tiny",
                        "model.text.width=32",
                        "model.text.depth=1", "model.text.heads=2", "tokenizer.context_length=24",
                        "clip.embed_dim=16"]),
        "vqkd": (None, ["objective=vqkd", *MATRIX_VIT, "vqkd.num_codes=64", "vqkd.code_dim=8",
                        f"vqkd.teacher={teacher}"]),
        "beit_v2": (None, ["objective=beit_v2", *MATRIX_VIT, f"beit_v2.tokenizer={tokenizer}"]),
        "vatt": ("launch/recipes/vatt_moving_digits.yaml",
                 [*[a for a in VATT[2:] if not a.startswith("optim.lr")], "batch_size=8", "optim.grad_accum=2",
                  "max_steps=2"]),
        "data2vec2": ("launch/recipes/data2vec2_mnist5k.yaml",
                      [*MATRIX_VIT, "data2vec2.clones=2", "data2vec2.top_k=2", "data2vec2.decoder_depth=1",
                       "data2vec2.mask_fill=zeros"]),
    }


@pytest.mark.parametrize("run,layouts", [("plain_to_pp", ("dp=1 x tp=1 x pp=1", "dp=1 x tp=1 x pp=2")),
                                         ("pp_to_one", ("dp=1 x tp=1 x pp=2", "dp=1 x tp=1 x pp=1")),
                                         ("dp2_to_one", ("dp=2 x tp=1 x pp=1", "dp=1 x tp=1 x pp=1")),
                                         ("tp_to_one", ("dp=1 x tp=2 x pp=1", "dp=1 x tp=1 x pp=1")),
                                         ("zero2_to_one", ("dp=2 x tp=1 x pp=1", "dp=1 x tp=1 x pp=1")),
                                         ("plain_to_zero2", ("dp=1 x tp=1 x pp=1", "dp=2 x tp=1 x pp=1")),
                                         ("tp_zero1_to_one", ("dp=1 x tp=2 x pp=1", "dp=1 x tp=1 x pp=1")),
                                         ("dp2_to_pp", ("dp=2 x tp=1 x pp=1", "dp=1 x tp=1 x pp=2"))])
def test_resume_on_another_layout_continues_the_loss_curve(pipeline_runs, tensor_parallel_runs, run, layouts):
    """Stopped at step 3 under one layout, resumed under another (model, AdamW state, LR schedule,
    data position from the checkpoint's one-process copy): steps 4-5 continue the run that never
    stopped. Tolerance 1e-4, that of a change of layout (sums in another order), not 1e-6."""
    root = tensor_parallel_runs if run.startswith("tp_") else pipeline_runs
    got, ref = losses(root / run), losses(pipeline_runs / "one")
    assert len(got) == 5
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-6)
    import yaml

    meta3 = json.loads((root / run / "checkpoints" / "step_3" / "meta.json").read_text())
    meta5 = json.loads((root / run / "checkpoints" / "step_5" / "meta.json").read_text())
    assert (meta3["layout"], meta5["layout"]) == layouts
    assert yaml.safe_load((root / run / "config.yaml").read_text())["max_steps"] == 5


def test_resume_refuses_a_model_cut_differently():
    from pretrain.loop import RunError, check_resume_layout, same_layout
    from pretrain.parallel import ParallelLayout

    # the engine's own files only for the same engine and layout; another dp goes through portable.pt
    assert same_layout({"engine": "deepspeed", "layout": "dp=2 x tp=1 x pp=1"}, "deepspeed", ParallelLayout(dp=2))
    assert not same_layout({"engine": "deepspeed", "layout": "dp=2 x tp=1 x pp=1"}, "deepspeed", ParallelLayout(dp=1))
    assert not same_layout({"engine": "deepspeed", "layout": "dp=1 x tp=1 x pp=1"}, "plain", ParallelLayout())

    check_resume_layout({"layout": "dp=1 x tp=1 x pp=2"}, ParallelLayout(dp=1, pp=2), "ckpt")
    with pytest.raises(RunError, match="written by 2 data-parallel replicas, this run has 1; DeepSpeed reloads its ZeRO "
                                       "partitions only on the data-parallel size"):
        check_resume_layout({"layout": "dp=2 x tp=1 x pp=1"}, ParallelLayout(dp=1), "ckpt")
    with pytest.raises(RunError, match="written with parallel.tp=1 parallel.pp=2, this run has tp=1 pp=1"):
        check_resume_layout({"layout": "dp=1 x tp=1 x pp=2"}, ParallelLayout(dp=2), "ckpt")
    with pytest.raises(RunError, match="parallel.tp=2"):
        check_resume_layout({"layout": "dp=1 x tp=2 x pp=1"}, ParallelLayout(), "ckpt")


def documented_matrix() -> tuple[dict, dict]:
    """docs/parallel.md's support matrix: ``{(objective, column): "ok" | refusal key}`` and
    ``{refusal key: message}``."""
    text = (ROOT / "docs" / "parallel.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| objective | plain |"))
    columns = [c.strip() for c in lines[head].strip("|").split("|")][1:]
    cells = {}
    for ln in lines[head + 1:]:
        row = [c.strip() for c in ln.strip("|").split("|")]
        if len(row) != len(columns) + 1:
            break
        for col, mark in zip(columns, row[1:]):
            cells[(row[0], col)] = "ok" if mark == "✓" else mark.split()[-1] if mark.startswith("✗") else None
    messages = {}
    for ln in text.splitlines():
        if ln.startswith("- ") and ": `" in ln and ln.rstrip().endswith("`"):
            key, msg = ln[2:].split(": `", 1)
            messages[key.strip()] = msg.rstrip().rstrip("`")
    return cells, messages


def test_support_matrix(pipeline_runs, mim_runs, tmp_path):
    """Every DeepSpeed cell of docs/parallel.md's matrix for the objectives trained by ``pretrain
    fit``: 2 steps that train, or the documented refusal. Two launches (2 and 4 ranks)."""
    cells, messages = documented_matrix()
    objectives = matrix_objectives(pipeline_runs / "one", mim_runs / "vqkd")
    from pretrain.objectives import list_objectives

    assert set(objectives) | {"align"} == set(list_objectives())  # a new objective gets a row
    # a refusal on 4 ranks is the 2-rank column's (the same check, before any rank starts work), so
    # the 4-rank launch walks only the cells that train
    same = {"dp=2 x pp=2": "pp=2", "dp=2 x tp=2": "tp=2"}

    def skipped(name, col):
        return col in same and cells[(name, col)] != "ok" and cells[(name, col)] == cells[(name, same[col])]

    outcomes = {}
    for ranks in (2, 4):
        todo = [{"name": f"{name}|{col}", "recipe": recipe,
                 "args": [*args, "engine=deepspeed", *extra, f"run_dir={tmp_path / name / col.replace(' ', '')}"]}
                for col, r, extra in MATRIX_COLUMNS if r == ranks for name, (recipe, args) in objectives.items()
                if not skipped(name, col)]
        (tmp_path / "cells.json").write_text(json.dumps(todo))
        out = tmp_path / f"out{ranks}.json"
        cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(find_free_port()),
               "tests/ds_matrix_worker.py", str(tmp_path / "cells.json"), str(out)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500, env=_env())
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
        outcomes.update(json.loads(out.read_text()))
    for name in objectives:
        for col, _, _ in MATRIX_COLUMNS:
            if skipped(name, col):
                continue
            want, got = cells[(name, col)], outcomes[f"{name}|{col}"]
            if want == "ok":
                assert got == "ok", (name, col, got)
                assert len(losses(tmp_path / name / col.replace(" ", ""))) == 2
            else:
                assert got.startswith("refused: ") and messages[want] in got, (name, col, got)


def test_support_matrix_align_row():
    """align (heads on cached embeddings, trained by ``pretrain search align``): its refusals."""
    from test_objectives import _tiny_objective
    from pretrain.engines.pipeline import PipelineConfigError, build_pipeline
    from pretrain.config import load_config
    from pretrain.parallel import TensorParallelError, check_tensor_parallel

    cells, messages = documented_matrix()
    align = _tiny_objective("align")
    cfg = load_config(None, [*VIT, "engine=deepspeed", "parallel.pp=2"])
    with pytest.raises(PipelineConfigError) as exc:
        build_pipeline(cfg, align, None, None, SimpleNamespace(pp=2, tp=1, dp=1), {})
    assert messages[cells[("align", "pp=2")]] in str(exc.value)
    with pytest.raises(TensorParallelError) as exc:
        check_tensor_parallel(align, 2)
    assert messages[cells[("align", "tp=2")]] in str(exc.value)
