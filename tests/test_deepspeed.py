"""Real 2-rank DeepSpeed launches on the CPU (gloo), against one plain process."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_helpers import find_free_port

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
# Same global batch (2 x 16 = 32) and seed, fp32. The LR is small because these tiny BN nets amplify
# float rounding chaotically at large steps (one process with 1 vs 2 threads drifts apart just as much);
# at this LR the losses still move by 1-5% over the steps compared, so a wrong gradient would show.
TINY = ["data=digits", "image_size=16", "model.width=8", "precision=fp32", "log_every=1", "progress=false",
        "optim.name=sgd", "optim.lr=0.001", "optim.warmup_steps=0", "byol.proj_hidden=64", "byol.pred_hidden=64",
        "byol.base_momentum=0.9", "simclr.proj_dim=32"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(*args, ranks=2, check=True, port=None):
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port or find_free_port()), "launch/train.py",
           *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=_env())
    if check and r.returncode != 0:
        raise AssertionError(f"deepspeed run failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def plain(*args):
    r = subprocess.run([sys.executable, "-m", "launch", "fit", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env=_env())
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def losses(run):
    rows = [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r["loss"] for r in rows if "loss" in r]  # evaluation rows carry metrics, not a loss


def recipe(objective):
    return ["--recipe", f"launch/recipes/{objective.split('_')[0]}_mnist5k.yaml"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process runs (batch 32) of each objective, the yardstick for the 2-rank runs."""
    out = {}
    for obj in ("byol", "simclr", "simclr_vit", "swav", "clip"):
        run = tmp_path_factory.mktemp("ref") / obj
        plain(*recipe(obj), *TINY, *EXTRA.get(obj, []), "batch_size=32", "max_steps=6", f"run_dir={run}")
        out[obj] = losses(run)
    return out


# SwAV: multi-crop (2 x 16 px + 4 x 8 px), Sinkhorn over the global batch, prototypes free from step 3
EXTRA = {"swav": ["swav.proj_hidden=64", "swav.proj_dim=32", "aug.local_size=8", "swav.freeze_prototypes_steps=2"],
         # CLIP: image-text InfoNCE over the global batch (each rank's rows against both ranks' columns).
         # A ViT image tower: with no batch statistics the two layouts compute the same sums, so a
         # larger LR still compares exactly (a BN tower at this size drifts as 1 vs 2 threads do).
         "clip": ["data=mnist5k_captions", "model.image.backbone=vit_tiny", "model.image.patch_size=4",
                  "model.image.depth=1", "model.image.embed_dim=32", "model.image.num_heads=2",
                  "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "tokenizer.context_length=24",
                  "clip.embed_dim=16", "optim.lr=0.003"],
         # SimCLR on a ViT with a LayerNorm head (no batch statistics anywhere), so that gradient
         # caching is exact: each rank's 16 images in 2 chunks
         "simclr_vit": ["model.image.backbone=vit_tiny", "model.image.patch_size=4", "model.image.depth=1",
                        "model.image.embed_dim=32", "model.image.num_heads=2", "simclr.head_norm=ln",
                        "optim.name=adamw", "optim.lr=0.003"]}


@pytest.mark.parametrize("objective,stage", [("byol", 0), ("byol", 1), ("byol", 2), ("simclr", 0), ("simclr", 2),
                                             ("simclr_vit", 1), ("swav", 2), ("clip", 2), ("clip", 3)])
def test_two_ranks_match_one_process(tmp_path, reference, objective, stage):
    run = tmp_path / "ds"
    # under ZeRO-3 CLIP also caches gradients: each rank's 16 rows in 4 chunks, still the global
    # loss; so does SimCLR (ZeRO-1, 2 chunks)
    chunks = {("clip", 3): ["grad_chunks=4"], ("simclr_vit", 1): ["grad_chunks=2"]}.get((objective, stage), [])
    launch(*recipe(objective), *TINY, *EXTRA.get(objective, []), "batch_size=16", "max_steps=6", "engine=deepspeed",
           f"deepspeed.zero_stage={stage}", *chunks, f"run_dir={run}")
    got, ref = losses(run), reference[objective]
    assert len(got) == len(ref) == 6
    for a, b in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-4)
    meta = json.loads((run / "checkpoints" / "step_6" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["engine"] == "deepspeed" and meta["step"] == 6
    assert (run / "weights.safetensors").is_file()


def test_deepspeed_resume_continues_the_same_losses(tmp_path):
    common = [*recipe("byol"), *TINY, "batch_size=16", "max_steps=8", "engine=deepspeed", "deepspeed.zero_stage=2"]
    launch(*common, f"run_dir={tmp_path / 'straight'}")
    launch(*common, f"run_dir={tmp_path / 'stopped'}", "stop_at=4")
    assert len(losses(tmp_path / "stopped")) == 4
    launch("--resume", str(tmp_path / "stopped"))
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert len(b) == 8
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=1e-6, abs=1e-7)


def test_zero3_simclr_runs_and_exports(tmp_path):
    run = tmp_path / "z3"
    launch(*recipe("simclr"), *TINY, "batch_size=16", "max_steps=3", "engine=deepspeed", "deepspeed.zero_stage=3",
           f"run_dir={run}")
    r = subprocess.run([sys.executable, "-m", "launch", "probe", "--run", str(run), "--probe", "knn", "--quiet",
                        "--no-baselines"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "simclr (resnet18, trained)" in r.stdout
    # consolidating the partitioned checkpoint offline gives the weights the run exported
    from safetensors.torch import load_file
    import torch

    r = subprocess.run([sys.executable, "-m", "launch", "export", "--run", str(run), "--out", str(tmp_path / "x.st")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(tmp_path / "x.st")), load_file(str(run / "weights.safetensors"))
    params = [k for k in b if "running" not in k and "num_batches" not in k]
    assert params and all(torch.equal(a[k], b[k]) for k in params)


def test_zero3_ema_teacher_follows_the_formula(tmp_path):
    """BYOL's teacher under ZeRO-3: every rank averages its own shards; gathered, the result equals
    m * teacher + (1 - m) * online, and so do the whole copies ZeRO-3 keeps of small params."""
    out = tmp_path / "ema.json"
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(find_free_port()), "tests/ds_ema_worker.py", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world"] == 2 and got["ema_fn"] == "_zero3_ema_update"
    assert got["moved"] > 1e-3  # the teacher really moves (lr 0.5, momentum 0.7)
    assert got["err"] < 1e-6
    assert got["n_whole"] > 0 and got["whole_err"] < 1e-6


def test_zero3_byol_matches_one_process_and_exports(tmp_path, reference):
    run = tmp_path / "z3"
    launch(*recipe("byol"), *TINY, "batch_size=16", "max_steps=6", "engine=deepspeed", "deepspeed.zero_stage=3",
           f"run_dir={run}")
    got, ref = losses(run), reference["byol"]
    assert len(got) == len(ref) == 6
    for a, b in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-4)
    from safetensors.torch import load_file

    w = load_file(str(run / "weights.safetensors"))
    assert any(k.startswith("target_backbone.") for k in w) and any(k.startswith("backbone.") for k in w)


def test_refusals_are_clear(tmp_path):
    port = find_free_port()
    r = launch(*recipe("simclr"), *TINY, "batch_size=16", "max_steps=2", "engine=deepspeed", "deepspeed.zero_stage=2",
               "optim.name=lars", f"run_dir={tmp_path / 'b'}", check=False, port=port)
    assert r.returncode != 0 and "optim.name=lars computes a trust ratio per layer" in r.stderr + r.stdout
    # a failed job still removes its ranks' shared-memory all-reduce buffers
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
