"""SwAV: Sinkhorn-Knopp, the swapped-prediction loss, multi-crop batches, prototypes and the queue."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data as D
from dist_helpers import run_distributed
from losses import sinkhorn, swav_loss
from models import create_backbone
from pretrain.config import ConfigError, load_config
from pretrain.engines import PlainEngine
from pretrain.loop import fit, view_augments
from pretrain.objectives import create_objective
from pretrain.schedules import LRSchedule


def _scores(b, k, seed=0, d=16):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.T


def _sinkhorn_loops(scores, eps, iters):
    """Algorithm 1 of the paper written out element by element, in float64."""
    b, k = scores.shape
    q = [[float(torch.exp(scores[i, j].double() / eps)) for i in range(b)] for j in range(k)]  # K x B
    tot = sum(sum(r) for r in q)
    q = [[v / tot for v in r] for r in q]
    for _ in range(iters):
        for j in range(k):  # every prototype gets mass 1/K
            s = sum(q[j])
            q[j] = [v / s / k for v in q[j]]
        for i in range(b):  # every sample gets mass 1/B
            s = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / s / b
    return torch.tensor([[q[j][i] * b for j in range(k)] for i in range(b)], dtype=torch.float64)


def test_sinkhorn_marginals_and_loop_reference():
    s = _scores(24, 8)
    # after any number of rounds the last rescaling is per sample: rows sum to 1 exactly
    for iters in (1, 3):
        q = sinkhorn(s, 0.05, iters)
        assert q.dtype == torch.float32 and q.shape == (24, 8) and (q >= 0).all()
        assert torch.allclose(q.sum(1), torch.ones(24), atol=1e-6)
        assert torch.allclose(q.double(), _sinkhorn_loops(s, 0.05, iters), atol=1e-6)
    # the prototype marginals only converge to B/K: 3 rounds are visibly off, 300 are within 1e-3
    cols3 = sinkhorn(s, 0.05, 3).sum(0)
    q = sinkhorn(s.double(), 0.05, 300)
    assert q.dtype == torch.float64
    assert torch.allclose(q.sum(1), torch.ones(24, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q.sum(0), torch.full((8,), 24 / 8, dtype=torch.float64), atol=1e-3)
    assert (cols3 - 3).abs().max() > (q.sum(0) - 3).abs().max()
    # large scores do not overflow (a common constant is subtracted before exp), bf16 input works
    big = s.double() * 100
    assert torch.allclose(sinkhorn(big + 1e4, 5.0, 3), sinkhorn(big, 5.0, 3), atol=1e-9)  # exp(2000) overflows
    assert torch.isfinite(sinkhorn(s.bfloat16(), 0.05, 3)).all()
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        sinkhorn(s, 0.0, 3)


def _swav_loss_loops(scores, temperature, eps, iters, num_global, queue=None):
    n_crops, b = len(scores), scores[0].shape[0]
    total = 0.0
    for i in range(num_global):
        s = scores[i].detach()
        if queue is not None:
            s = torch.cat([queue[i], s])
        q = _sinkhorn_loops(s, eps, iters)[-b:]
        pair_sum = 0.0
        for v in range(n_crops):
            if v == i:
                continue
            per_sample = 0.0
            for n in range(b):
                logits = scores[v][n] / temperature
                logp = logits - torch.logsumexp(logits, 0)
                per_sample = per_sample - (q[n].float() * logp).sum()
            pair_sum = pair_sum + per_sample / b
        total = total + pair_sum / (n_crops - 1)
    return total / num_global


@pytest.mark.parametrize("with_queue", [False, True])
def test_swav_loss_matches_loops(with_queue):
    b, k = 6, 5
    scores = [_scores(b, k, seed=s).requires_grad_() for s in range(4)]  # 2 global + 2 local crops
    queue = [_scores(10, k, seed=10 + i) for i in range(2)] if with_queue else None
    got = swav_loss(scores, 0.1, 0.05, 3, num_global=2, queue_scores=queue)
    ref = _swav_loss_loops(scores, 0.1, 0.05, 3, 2, queue)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    g1 = torch.autograd.grad(got, scores)
    g2 = torch.autograd.grad(ref, scores)
    for a, r in zip(g1, g2):
        assert torch.allclose(a, r, atol=1e-6)
    if with_queue:  # the queue changes the codes
        assert got.item() != pytest.approx(swav_loss(scores, 0.1, 0.05, 3).item(), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 crops"):
        swav_loss(scores[:1])


def _sinkhorn_worker(rank, world_size, scores, sizes):
    lo = sum(sizes[:rank])
    return sinkhorn(scores[lo:lo + sizes[rank]], 0.05, 3)


def test_sinkhorn_over_two_ranks_equals_one_process():
    scores, sizes = _scores(13, 6, seed=3), [6, 7]  # unequal local batches
    parts = run_distributed(_sinkhorn_worker, world_size=2, args=(scores, sizes))
    assert [p.shape[0] for p in parts] == sizes
    assert torch.allclose(torch.cat(parts), sinkhorn(scores, 0.05, 3), atol=1e-6)
    assert not torch.allclose(parts[0], sinkhorn(scores[:6], 0.05, 3), atol=1e-3)  # the plan really spans ranks


def test_multicrop_batches_shapes_and_rank_invariance():
    ds = D.build_dataset("digits", "train")
    specs = D.multicrop_specs("simclr", 16, 3, 8, color=False, flip=False)
    assert [s.size for s in specs] == [16, 16, 8, 8, 8]
    assert [s.crop_scale for s in specs] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 3
    augs = [D.ViewAugment(s, ds.info.mean, ds.info.std) for s in specs]
    one = next(iter(D.train_loader(ds, 16, augs, seed=2, start_step=3)))
    assert len(one["views"]) == 5
    assert [tuple(v.shape) for v in one["views"]] == [(16, 1, 16, 16)] * 2 + [(16, 1, 8, 8)] * 3
    assert all(v.dtype == torch.float32 for v in one["views"])
    # the global views are the ones the loader draws without local views
    two = next(iter(D.train_loader(ds, 16, augs[:2], seed=2, start_step=3)))
    assert all(torch.equal(a, b) for a, b in zip(two["views"], one["views"][:2]))
    parts = [next(iter(D.train_loader(ds, 8, augs, seed=2, rank=r, world_size=2, start_step=3))) for r in (0, 1)]
    for v in range(5):
        assert torch.equal(torch.cat([p["views"][v] for p in parts]), one["views"][v])
    assert D.multicrop_specs("byol", 224, 6)[-1].size == 96  # the paper's 224 -> 96
    with pytest.raises(ValueError, match=r"local_size must be in \[1, 16\]"):
        D.multicrop_specs("simclr", 16, 2, 32)


def test_loop_draws_the_objectives_views():
    info = D.build_dataset("digits", "train").info
    cfg = load_config(overrides=["objective=swav", "data=digits", "image_size=24"])
    obj = create_objective("swav", create_backbone("resnet18", in_chans=1, width=8), proj_hidden=16, proj_dim=8,
                           num_prototypes=5)
    sizes = [a.spec.size for a in view_augments(cfg, obj, info)]
    assert sizes == [24, 24] + [10] * 6  # the objective's default: 6 local views at round(24 * 96 / 224)
    cfg = load_config(overrides=["objective=swav", "data=digits", "image_size=16", "aug.local_views=2",
                                 "aug.local_size=6"])
    assert [a.spec.size for a in view_augments(cfg, obj, info)] == [16, 16, 6, 6]
    byol = create_objective("byol", create_backbone("resnet18", in_chans=1, width=8), proj_hidden=16, proj_dim=8,
                            pred_hidden=16)
    cfg = load_config(overrides=["objective=byol", "data=digits", "aug.local_views=2"])
    with pytest.raises(ConfigError, match="objective 'byol' does not take local views"):
        view_augments(cfg, byol, info)
    cfg = load_config(overrides=["objective=swav", "data=digits", "image_size=16", "aug.local_size=20"])
    with pytest.raises(ConfigError, match=r"aug.local_size must be in \[1, 16\].*got 20"):
        view_augments(cfg, obj, info)
    with pytest.raises(ValueError, match="swav.temperature must be > 0; got 0"):
        create_objective("swav", create_backbone("resnet18", in_chans=1, width=8), temperature=0.0)


def _multicrop_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(n, 1, 16, 16, generator=g) for _ in range(2)]
            + [torch.randn(n, 1, 8, 8, generator=g) for _ in range(2)]}


def test_prototypes_freeze_normalisation_and_queue():
    torch.manual_seed(0)
    n = 8
    obj = create_objective("swav", create_backbone("resnet18", in_chans=1, width=8), proj_hidden=32, proj_dim=16,
                           num_prototypes=10, freeze_prototypes_steps=2, queue_length=2 * n, queue_start_epoch=2)
    obj.on_train_start(steps_per_epoch=1.5)  # the queue starts at step ceil(2 * 1.5) = 3
    assert obj.queue_start_step == 3
    opt = torch.optim.SGD(obj.param_groups(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    engine = PlainEngine(obj, opt, LRSchedule(opt, 0.5, 100, 0))
    w0 = obj.prototypes.weight.detach().clone()
    assert torch.allclose(w0.norm(dim=1), torch.ones(10), atol=1e-6)
    used, frozen, extras = [], [], {}
    for step in range(7):
        out = engine(_multicrop_batch(n, step))
        engine.backward(out["loss"])
        engine.step()
        obj.on_step_end(step, 100)
        used.append(int(out["queue_used"]))
        frozen.append(int(out["prototypes_frozen"]))
        w = obj.prototypes.weight.detach()
        assert torch.allclose(w.norm(dim=1), torch.ones(10), atol=1e-6), step
        if step < 2:
            assert torch.allclose(w, w0, atol=1e-6), "prototypes moved while frozen"
        if step == 2:
            assert not torch.allclose(w, w0, atol=1e-3)
        assert (obj.queue is None) == (step < 3)
        extras[step] = obj.state_dict_extra()
    assert frozen == [1, 1, 0, 0, 0, 0, 0]
    assert used == [0, 0, 0, 0, 0, 1, 1]  # created at step 3, full after 2 batches, used from step 5
    assert obj.queue.shape == (2, 2 * n, 16) and obj.queue_count == 2 * n
    # the queue and counters survive a checkpoint round trip: the next loss is the same
    clone = create_objective("swav", create_backbone("resnet18", in_chans=1, width=8), proj_hidden=32, proj_dim=16,
                             num_prototypes=10, freeze_prototypes_steps=2, queue_length=2 * n, queue_start_epoch=2)
    clone.load_state_dict(obj.state_dict())
    clone.on_train_start(steps_per_epoch=1.5)
    clone.load_state_dict_extra(torch.load(_roundtrip(extras[6]), weights_only=False))
    assert clone.step == 7 and clone.queue_count == 2 * n and torch.equal(clone.queue, obj.queue)
    batch = _multicrop_batch(n, 99)
    assert clone(batch)["loss"].item() == pytest.approx(obj(batch)["loss"].item(), rel=1e-6)


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


TINY = ["objective=swav", "data=digits", "image_size=16", "model.width=8", "batch_size=32", "precision=fp32",
        "log_every=1", "progress=false", "optim.warmup_steps=3", "aug.local_views=2", "aug.local_size=8",
        "swav.proj_hidden=64", "swav.proj_dim=16", "swav.num_prototypes=20", "swav.freeze_prototypes_steps=3",
        "swav.queue_length=64", "swav.queue_start_epoch=0"]


def _fit(*overrides, resume_run=None):
    """``pretrain fit [--resume RUN]`` in this process (cheaper than a fresh interpreter per run)."""
    if resume_run is not None:  # as the CLI does: the run's own config.yaml, stop_at cleared
        cfg = load_config(Path(resume_run) / "config.yaml", ["stop_at=0", f"run_dir={resume_run}"])
    else:
        cfg = load_config(overrides=list(overrides))
    fit(cfg, resume=resume_run is not None)


def _metrics(run):
    return [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_swav_with_vit_takes_local_crops(tmp_path):
    """A ViT backbone takes multi-crop's smaller local views (positions resampled to their grid)."""
    run = tmp_path / "vit"
    _fit(*TINY, "model.backbone=vit_tiny", "model.patch_size=4", "max_steps=3", f"run_dir={run}")
    rows = _metrics(run)
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    # the default local size is rounded to a multiple of the patch size; other sizes are refused by name
    cfg = load_config(overrides=[*TINY, "model.backbone=vit_tiny", "model.patch_size=4", "image_size=24",
                                 "aug.local_size=0"])
    obj = create_objective("swav", create_backbone("vit_tiny", in_chans=1, image_size=24, patch_size=4, depth=1))
    assert [a.spec.size for a in view_augments(cfg, obj, D.build_dataset("digits", "train").info)] == [24, 24, 12, 12]
    bad = load_config(overrides=[*TINY, "model.backbone=vit_tiny", "model.patch_size=4", "aug.local_size=10"])
    with pytest.raises(ConfigError, match="aug.local_size=10 must be a multiple of model.patch_size=4"):
        view_augments(bad, obj, D.build_dataset("digits", "train").info)


def test_swav_resume_with_queue_is_exact(tmp_path):
    """10 straight steps equal 5 + resume + 5 while the queue (full from step 3) is in use."""
    _fit(*TINY, "max_steps=10", f"run_dir={tmp_path / 'straight'}")
    _fit(*TINY, "max_steps=10", "stop_at=5", f"run_dir={tmp_path / 'stopped'}")
    _fit(resume_run=tmp_path / "stopped")
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "stopped")
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["queue_used"] for r in a] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert [r["prototypes_frozen"] for r in a] == [1, 1, 1] + [0] * 7
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-7), ra["step"]


def _deepspeed_worker(rank, world_size, stage):
    """2-rank DeepSpeed SwAV: after each step the optimizer's fp32 master prototypes are unit-norm."""
    import os

    from deepspeed.utils import safe_get_full_fp32_param

    os.environ["LOCAL_RANK"] = str(rank)  # what the deepspeed launcher sets

    from pretrain.engines import DeepSpeedEngine, ds_config
    from pretrain.optim import build_optimizer

    torch.manual_seed(0)
    obj = create_objective("swav", create_backbone("resnet18", in_chans=1, width=8), proj_hidden=32, proj_dim=16,
                           num_prototypes=10, freeze_prototypes_steps=0)
    opt = build_optimizer(obj.param_groups(), "sgd", 0.5, 1e-3)
    engine = DeepSpeedEngine(obj, opt, LRSchedule(opt, 0.5, 100, 0), ds_config("", stage, 4, 1, world_size, 0.0))
    w0 = safe_get_full_fp32_param(obj.prototypes.weight).clone()
    for step in range(3):
        out = engine(_multicrop_batch(4, 10 * step + rank))
        engine.backward(out["loss"])
        engine.step()
        obj.on_step_end(step, 100)
    master = safe_get_full_fp32_param(obj.prototypes.weight)
    return {"w0": w0, "master": master}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_projects_the_master_prototypes(stage):
    res = run_distributed(_deepspeed_worker, world_size=2, args=(stage,), timeout_s=300)
    for r in res:
        assert torch.allclose(r["master"].norm(dim=1), torch.ones(10), atol=1e-5)
        assert not torch.allclose(r["master"], r["w0"], atol=1e-3)  # the prototypes did train
    assert torch.equal(res[0]["master"], res[1]["master"])
