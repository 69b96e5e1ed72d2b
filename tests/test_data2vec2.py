"""data2vec 2.0 (pretrain/objectives/data2vec2.py): targets, hooks, loss, clones, decoder, EMA, and
real runs (one process; 2 DeepSpeed ranks under ZeRO-2 and ZeRO-3)."""
import json
import math
import subprocess

import pytest
import torch
import torch.nn.functional as F

from models import create_backbone
from pretrain.config import ConfigError
from pretrain.objectives import create_objective
from pretrain.objectives import data2vec2 as d2v
from dist_helpers import find_free_port
from test_deepspeed import DEEPSPEED, ROOT, _env, losses, plain

D, DEPTH = 32, 3


def _vit(depth=DEPTH):
    return create_backbone("vit_tiny", in_chans=1, image_size=16, patch_size=4, depth=depth, embed_dim=D, num_heads=2)


def _obj(**kw):
    kw = {"clones": 3, "decoder_depth": 2, "decoder_groups": 4, "mask_fill": "zeros", **kw}
    return create_objective("data2vec2", _vit(), **kw)


# ------------------------------------------------------------------------------------------- targets


def test_ffn_hook_captures_the_mlp_output_before_the_residual():
    vit = _vit().eval()
    x = torch.randn(2, 1, 16, 16)
    got = d2v.ffn_outputs(vit, x, list(range(DEPTH)))
    with torch.no_grad():
        h = vit.prepare_tokens(x)
        for blk, out in zip(vit.blocks, got):
            a = h + blk.attn(blk.norm1(h))
            assert torch.allclose(out, blk.mlp(blk.norm2(a)), atol=1e-6)
            h = blk(h)
    assert all(not b.mlp._forward_hooks for b in vit.blocks)  # the hooks are removed again


def test_targets_are_top_k_instance_normed_ffn_outputs_averaged_then_layer_normed():
    obj = _obj(top_k=2)
    assert obj.target_layers == [1, 2]
    x = torch.randn(3, 1, 16, 16)
    outs = d2v.ffn_outputs(obj.target_backbone, x, [1, 2])
    ref = 0
    for o in outs:
        p = o[:, 1:]  # patch tokens [B, N, C]; statistics per sample and channel over the tokens
        ref = ref + (p - p.mean(1, keepdim=True)) / torch.sqrt(p.var(1, unbiased=False, keepdim=True) + 1e-5)
    ref = ref / 2
    ref = (ref - ref.mean(-1, keepdim=True)) / torch.sqrt(ref.var(-1, unbiased=False, keepdim=True) + 1e-5)
    got = obj.teacher_targets(x)
    assert got.shape == (3, 16, D) and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-5)
    assert obj.target_layers == _obj(top_k=0).target_layers[-2:] and len(_obj(top_k=0).target_layers) == DEPTH


# ---------------------------------------------------------------------------------------------- loss


def test_loss_is_scaled_by_one_over_sqrt_c_and_counts_masked_tokens_only():
    torch.manual_seed(0)
    p, t = torch.randn(5, 7, 12), torch.randn(5, 7, 12)
    mask = torch.rand(5, 7) < 0.6
    got = d2v.regression_loss(p[mask], t[mask])
    ref = sum(((p[i, j] - t[i, j]) ** 2).sum() for i in range(5) for j in range(7) if mask[i, j])
    assert got.item() == pytest.approx(ref.item() / int(mask.sum()) / math.sqrt(12), rel=1e-5)
    p2 = torch.where(mask.unsqueeze(-1), p, p + 100)  # visible positions do not count
    assert d2v.regression_loss(p2[mask], t[mask]).item() == pytest.approx(got.item())
    sl1 = d2v.regression_loss(p[mask], t[mask], "smooth_l1", beta=0.5)
    ref = F.smooth_l1_loss(p[mask], t[mask], reduction="none", beta=0.5).sum(-1).mean() / math.sqrt(12)
    assert sl1.item() == pytest.approx(ref.item(), rel=1e-6)
    assert d2v.regression_loss(p[mask], t[mask], scale=0.1).item() == pytest.approx(got.item() * math.sqrt(12) * 0.1)


def test_forward_matches_the_formula_with_masked_tokens_only():
    """The whole forward from its parts: the masked rows of the student's decoded grid against the
    clone-repeated targets, plus cls_weight x the class-token loss against the targets' mean."""
    obj = _obj(cls_weight=0.5)
    x = torch.randn(2, 1, 16, 16)
    out = obj({"views": [x], "step": 4})
    with torch.no_grad():
        y = obj.teacher_targets(x)
        mask = obj.batch_masks(2, 4, "cpu")
        tok = obj.backbone.forward_features(x.repeat_interleave(3, 0), mask, drop_masked=True)
        grid = torch.zeros(6, 16, D)
        grid[~mask] = tok[:, 1:].reshape(-1, D)
        pred = obj.decoder(grid)
        yr = y.repeat_interleave(3, 0)
        reg = ((pred - yr) ** 2).sum(-1)[mask].mean() / math.sqrt(D)
        cls = ((tok[:, 0] - yr.mean(1)) ** 2).sum(-1).mean() / math.sqrt(D)
    assert out["reg_loss"].item() == pytest.approx(reg.item(), rel=1e-5)
    assert out["cls_loss"].item() == pytest.approx(cls.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(reg.item() + 0.5 * cls.item(), rel=1e-5)


# -------------------------------------------------------------------------------------------- clones


def test_teacher_runs_once_per_image_and_targets_repeat_per_clone_sample_major(monkeypatch):
    obj = _obj(clones=4)
    teacher_calls, student_in, seen = [], [], {}
    obj.target_backbone.blocks[0].register_forward_pre_hook(lambda m, a: teacher_calls.append(a[0].shape))
    obj.backbone.blocks[0].register_forward_pre_hook(lambda m, a: student_in.append(a[0].shape))
    real = d2v.regression_loss

    def spy(pred, target, *a, **k):
        seen.setdefault("targets", []).append(target)
        return real(pred, target, *a, **k)

    monkeypatch.setattr(d2v, "regression_loss", spy)
    x = torch.randn(5, 1, 16, 16)
    obj({"views": [x], "step": 0})
    assert teacher_calls == [torch.Size([5, 17, D])]  # one pass, whole images (class token + 16 patches)
    # the student: 5 x 4 clones, each the class token and its round(16 * 0.2) = 3 visible patches only
    assert student_in == [torch.Size([20, 1 + 3, D])]
    y = obj.teacher_targets(x)
    mask = obj.batch_masks(5, 0, "cpu")
    assert mask.shape == (20, 16) and (mask.sum(1) == 13).all()
    expected = y.repeat_interleave(4, 0)[mask]  # row b * 4 + m is clone m of sample b
    assert torch.equal(seen["targets"][0], expected)
    # and the class-token targets: each clone of sample b gets the mean of b's targets
    assert torch.allclose(seen["targets"][1], y.mean(1).repeat_interleave(4, 0))
    assert torch.equal(seen["targets"][1][4:8], y.mean(1)[1].expand(4, D))
    # the clones of one sample are masked differently
    assert len({tuple(r.tolist()) for r in mask[:4]}) == 4


def test_masks_follow_the_sample_global_index_and_step():
    obj = _obj(clones=2)
    a = obj.masks(4, 7, rank=0, clones=2)
    b = obj.masks(2, 7, rank=1, clones=2)  # rank 1 of 2 with batch 2 holds samples 2 and 3
    assert torch.equal(a[4:], b)
    assert not torch.equal(obj.masks(4, 8, 0, 2), a)


# ------------------------------------------------------------------------------------------- decoder


@pytest.mark.parametrize("dec_dim,fill", [(0, "zeros"), (16, "learned"), (32, "noise")])
def test_decoder_output_shape_and_fill(dec_dim, fill):
    obj = _obj(decoder_dim=dec_dim, mask_fill=fill, decoder_depth=3)
    assert obj.decoder.proj.out_features == D and obj.decoder.proj.in_features == (dec_dim or D)
    assert all(c.groups == 4 and c.kernel_size == (3, 3) for c in obj.decoder.convs)
    out = obj.decoder(torch.randn(6, 16, D))
    assert out.shape == (6, 16, D)
    mask = obj.batch_masks(2, 0, "cpu")
    vis = torch.randn(6, 3, D)
    inp = obj.decoder_input(vis, mask)
    assert inp.shape == (6, 16, D) and torch.equal(inp[~mask], vis.reshape(-1, D))
    masked = inp[mask]
    if fill == "zeros":
        assert torch.equal(masked, torch.zeros_like(masked))
    elif fill == "learned":
        assert torch.equal(masked, obj.backbone.mask_token.reshape(1, D).expand_as(masked))
    else:
        assert 0.005 < masked.std().item() < 0.02


# ----------------------------------------------------------------------------------------------- EMA


def test_ema_momentum_schedule():
    f = d2v.ema_momentum
    assert f(0, 100, 0.9998, 0.99999) == pytest.approx(0.9998)
    assert f(100, 100, 0.9998, 0.99999) == pytest.approx(0.99999)
    assert f(500, 100, 0.9998, 0.99999) == pytest.approx(0.99999)
    assert f(25, 100, 0.9, 0.99) == pytest.approx(0.99 - 0.09 * 0.75)  # linear, as the reference
    assert f(50, 100, 0.9, 0.99, "cosine") == pytest.approx(0.945)
    assert f(25, 100, 0.9, 0.99, "cosine") == pytest.approx(0.99 - 0.09 * (math.cos(math.pi / 4) + 1) / 2)
    assert f(3, 0, 0.9, 0.99) == 0.99


def test_on_step_end_moves_the_teacher_by_the_schedule():
    obj = _obj(ema_start=0.5, ema_end=0.9, ema_anneal_steps=0)
    assert not any(p.requires_grad for p in obj.target_backbone.parameters())
    t0 = [p.clone() for p in obj.target_backbone.parameters()]
    with torch.no_grad():
        for p in obj.backbone.parameters():
            p.add_(1.0)
    s = [p.clone() for p in obj.backbone.parameters()]
    obj.on_step_end(1, 4)  # after 2 of 4 steps: 0.5 + 0.4 * 2 / 4
    m = 0.7
    assert obj.momentum == pytest.approx(m)
    for a, b, t in zip(t0, s, obj.target_backbone.parameters()):
        assert torch.allclose(t, m * a + (1 - m) * b, atol=1e-6)
    obj.train()
    assert obj.backbone.training and not obj.target_backbone.training


def test_config_errors_name_the_key():
    for kw, key in [({"loss": "l1"}, "data2vec2.loss"), ({"mask_fill": "token"}, "data2vec2.mask_fill"),
                    ({"ema_schedule": "step"}, "data2vec2.ema_schedule"), ({"top_k": 4}, "data2vec2.top_k"),
                    ({"decoder_groups": 5}, "data2vec2.decoder_groups"),
                    ({"decoder_kernel": 4}, "data2vec2.decoder_kernel"),
                    ({"clones": 0}, "data2vec2.clones"), ({"mask_ratio": 1.0}, "data2vec2.mask_ratio")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _obj(**kw)
    with pytest.raises(ConfigError, match="model.image.backbone"):
        create_objective("data2vec2", create_backbone("resnet18", in_chans=1, width=8))


# ---------------------------------------------------------------------------------------------- runs

TINY = ["--recipe", "launch/recipes/data2vec2_mnist5k.yaml", "data=digits", "image_size=16", "model.image.depth=2",
        "model.image.embed_dim=32", "model.image.num_heads=2", "data2vec2.clones=2", "data2vec2.top_k=2",
        "data2vec2.decoder_depth=2", "data2vec2.mask_fill=zeros", "data2vec2.ema_start=0.9", "data2vec2.ema_end=0.99",
        "precision=fp32", "log_every=1", "progress=false", "optim.lr=0.02", "optim.warmup_steps=2",
        "max_steps=20"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run = tmp_path_factory.mktemp("d2v") / "plain"
    plain(*TINY, "batch_size=32", f"run_dir={run}")
    return run


def test_fit_learns(one_process):
    got = losses(one_process)
    assert len(got) == 20 and all(math.isfinite(v) for v in got)
    assert sum(got[-5:]) / 5 < 0.9 * sum(got[:5]) / 5
    rows = [json.loads(ln) for ln in (one_process / "metrics.jsonl").read_text().splitlines()]
    reg = [r["reg_loss"] for r in rows if "reg_loss" in r]
    assert reg[-1] < 0.85 * reg[0]  # the masked-token regression itself learns
    cfg = (one_process / "config.yaml").read_text()
    assert "objective: data2vec2" in cfg


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Two ranks of batch 16 (the same global batch of 32): a ZeRO-2 run stopped after 6 steps, then a
    ZeRO-3 run stopped after 3 with a checkpoint after each step, both in one deepspeed launch
    (tests/ds_fits_worker.py), which pays for the launcher and imports once."""
    root = tmp_path_factory.mktemp("d2v_ds")
    z2, z3 = root / "z2", root / "z3"
    common = [*TINY, "batch_size=16", "engine=deepspeed"]
    runs = [[*common, "deepspeed.zero_stage=2", "stop_at=6", f"run_dir={z2}"],
            [*common, "deepspeed.zero_stage=3", "stop_at=3", "checkpoint_every=1", "keep_last=3", f"run_dir={z3}"]]
    (root / "runs.json").write_text(json.dumps(runs))
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(find_free_port()), "tests/ds_fits_worker.py",
           str(root / "runs.json")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return z2, z3


def test_two_ranks_zero2_match_one_process(two_ranks, one_process):
    got, ref = losses(two_ranks[0]), losses(one_process)[:6]
    assert len(got) == 6
    for a, b in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-4)


def test_zero3_runs_and_the_teacher_follows_the_ema(two_ranks, one_process):
    from pretrain.engines import consolidate_deepspeed_checkpoint

    run = two_ranks[1]
    got, ref = losses(run), losses(one_process)[:3]
    assert len(got) == 3
    for a, b in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-4)
    # the partitioned checkpoints, consolidated: teacher_n = m_n teacher_{n-1} + (1 - m_n) student_n
    states = {n: consolidate_deepspeed_checkpoint(run / "checkpoints" / f"step_{n}") for n in (1, 2, 3)}
    names = [k for k in states[1] if k.startswith("target_backbone.")]
    assert len(names) == len([k for k in states[1] if k.startswith("backbone.")]) > 0
    for n in (2, 3):
        m = d2v.ema_momentum(n, 20, 0.9, 0.99)  # after n of max_steps=20 steps
        moved = 0.0
        for k in names:
            t_prev, t, s = states[n - 1][k], states[n][k], states[n]["backbone." + k[len("target_backbone."):]]
            assert torch.allclose(t, m * t_prev + (1 - m) * s, atol=1e-6), k
            moved = max(moved, float((t - t_prev).abs().max()))
        assert moved > 1e-5
