"""BEiT v2: the VQ-KD tokenizer (objective ``vqkd``) and masked image modelling of its codes
(objective ``beit_v2``), on tiny ViTs; then both trained end to end by ``pretrain fit`` and by
2 DeepSpeed ranks (ZeRO-2) against one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_helpers import find_free_port
from models import NormEMAQuantizer, create_backbone
from pretrain.config import ConfigError
from pretrain.objectives.beit_v2 import BeitV2, BeitV2Config
from pretrain.objectives.vqkd import (PixelAdapter, TeacherFeatures, Vqkd, VqkdConfig, VqkdTokenizer,
                                      make_task_layer, reconstruction_loss, resize_features)

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def _vit(depth=2, dim=32, heads=2):
    return create_backbone("vit_tiny", in_chans=1, image_size=16, patch_size=4, depth=depth, embed_dim=dim,
                           num_heads=heads)


def tiny_vqkd(**over) -> Vqkd:
    """vqkd on a 16 px, patch-4 ViT (a 4x4 grid), 16 codes of size 8, an in-memory ViT teacher."""
    teacher = TeacherFeatures(_vit(depth=1, dim=24), name="tiny")
    return Vqkd(_vit(), VqkdConfig(**{"num_codes": 16, "code_dim": 8, **over}), teacher=teacher)


def tiny_tokenizer() -> VqkdTokenizer:
    return VqkdTokenizer(_vit(), make_task_layer("mlp", 32, 8), NormEMAQuantizer(16, 8, kmeans_init=False))


def tiny_beit_v2(**over) -> BeitV2:
    return BeitV2(_vit(), BeitV2Config(**over), tokenizer=tiny_tokenizer())


def tiny_objective(name):
    """The small instance tests/test_objectives.py trains one step."""
    return tiny_vqkd() if name == "vqkd" else tiny_beit_v2()


def _views(n=4, step=0):
    return {"views": [torch.randn(n, 1, 16, 16)], "step": step}


# ---------------------------------------------------------------------------------------------- vqkd


def test_code_lookup_is_the_argmax_cosine_code():
    obj = tiny_vqkd().train()
    obj(_views(8))  # k-means initialisation on the first training batch
    x = torch.randn(3, 1, 16, 16)
    codebook = obj.quantizer.codebook.clone()
    with torch.no_grad():
        z = obj.encode(x)  # [3, 16, 8]
        cos = F.normalize(z, dim=-1) @ F.normalize(codebook, dim=-1).T
    want = cos.argmax(-1)
    assert torch.equal(obj.codes(x), want)
    # the decoder is fed exactly those codes (straight-through: their values, the encoder's gradient)
    seen = {}
    hook = obj.decoder.register_forward_pre_hook(lambda m, a: seen.setdefault("q", a[0].detach().clone()))
    obj({"views": [x], "step": 1})
    hook.remove()
    assert torch.allclose(seen["q"], codebook[want], atol=1e-6)


def test_straight_through_gradient_reaches_the_encoder():
    """With the commitment loss off, the encoder is reached only through the quantizer's
    straight-through estimator: its gradient is finite and not zero."""
    obj = tiny_vqkd(commit_weight=0.0).train()
    out = obj(_views(8))
    assert float(out["commit_loss"]) > 0 and out["loss"].item() == pytest.approx(out["rec_loss"].item())
    out["loss"].backward()
    for p in (obj.backbone.patch_embed.proj.weight, obj.backbone.blocks[0].attn.qkv.weight, obj.encode_task[0].weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert obj.backbone.mask_token.grad is None and not obj.backbone.mask_token.requires_grad
    assert not any(p.requires_grad for p in obj.teacher.parameters())
    assert not any(k.startswith("teacher") or "_fixed" in k for k in obj.state_dict())  # kept out of checkpoints


def test_reconstruction_loss_against_a_hand_computation():
    pred = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[3.0, 4.0], [0.0, -2.0]]])
    target = torch.tensor([[[0.0, 1.0], [2.0, 2.0]], [[3.0, 4.0], [0.0, 5.0]]])
    # 1 - cos per patch: 1 (orthogonal), 0 (parallel), 0 (equal), 2 (opposite)
    assert reconstruction_loss(pred, target).item() == pytest.approx((1 + 0 + 0 + 2) / 4)
    # through the objective (eval mode: the codebook does not move): rec + commit_weight * commit
    obj = tiny_vqkd(commit_weight=0.5).eval()
    x = torch.randn(2, 1, 16, 16)
    out = obj({"views": [x]})
    with torch.no_grad():
        zn = F.normalize(obj.encode(x), dim=-1, eps=1e-5)
        q = obj.quantizer.codebook[(zn @ obj.quantizer.codebook.T).argmax(-1)]
        pred = obj.decoder(q)
        t = obj.teacher.tower.forward_features(x)[:, 1:]  # the ViT teacher's patch tokens: already on the grid
    rec = sum(1 - float((pred[b, i] @ t[b, i]) / (pred[b, i].norm() * t[b, i].norm()))
              for b in range(2) for i in range(16)) / 32
    commit = float(((q - zn) ** 2).mean())
    assert out["rec_loss"].item() == pytest.approx(rec, rel=1e-5)
    assert out["commit_loss"].item() == pytest.approx(commit, rel=1e-5)
    assert out["loss"].item() == pytest.approx(rec + 0.5 * commit, rel=1e-5)
    for key in ("codebook_usage", "codebook_perplexity", "codebook_running_usage", "dead_codes", "codebook_restarts"):
        assert key in out


def test_teacher_features_are_pooled_to_the_student_grid():
    fmap = torch.arange(16.0).view(1, 1, 4, 4)
    down = resize_features(fmap, (2, 2))  # [1, 4, 1]: means of the 2x2 blocks
    assert down.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    up = resize_features(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), (4, 4))  # replicated
    assert up.flatten().view(4, 4).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    # a ViT teacher at its automatic side gives its patch tokens on the student's grid
    vit = _vit(depth=1, dim=24).eval()
    teacher = TeacherFeatures(vit)
    assert teacher.tokens and teacher.stride == 4 and teacher.dim == 24 and teacher.side((4, 4)) == (16, 16)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        tokens = vit.forward_features(x)[:, 1:]
    assert torch.allclose(teacher(x, (4, 4)), tokens, atol=1e-6)
    assert teacher(x, (2, 2)).shape == (2, 4, 24) and teacher.side((2, 2)) == (8, 8)
    # EfficientNet-Lite0: stride 32 measured, 1280 channels; at 64 px its 2x2 map covers a 4x4 grid
    from pretrain.objectives.vqkd import load_teacher

    eff = load_teacher("efficientnet_lite0", (0.3,), (0.38,), image_size=64)
    assert eff.stride == 32 and eff.dim == 1280 and not eff.tokens
    feats = eff(x, (4, 4)).view(2, 4, 4, 1280)
    assert torch.equal(feats[:, 0, 0], feats[:, 1, 1]) and not torch.equal(feats[:, 0, 0], feats[:, 3, 3])
    assert load_teacher("efficientnet_lite0", (0.3,), (0.38,)).side((7, 7)) == (224, 224)
    # conversion from the run's normalisation to a teacher's, grey repeated to RGB
    adapter = PixelAdapter((0.3,), (0.38,), (0.5, 0.4, 0.3), (0.2, 0.2, 0.1), dst_chans=3)
    pix = x * 0.38 + 0.3
    want = (pix.expand(-1, 3, -1, -1) - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.2, 0.1]).view(1, 3, 1, 1)
    assert torch.allclose(adapter(x), want, atol=1e-6)


def test_vqkd_evaluate_counts_the_codes_of_held_out_patches():
    torch.manual_seed(0)
    model = tiny_vqkd()
    model.train()
    model(_views(8))  # k-means initialises the codebook
    images = [torch.randn(5, 1, 16, 16), torch.randn(3, 1, 16, 16)]
    before = model.quantizer.codebook.clone()
    res = model.evaluate([{"image": x} for x in images])
    assert torch.equal(model.quantizer.codebook, before) and model.training  # no state changed, mode restored
    model.eval()
    idx = torch.cat([model.codes(x).reshape(-1) for x in images])
    p = torch.bincount(idx, minlength=16).double() / idx.numel()
    nz = p[p > 0]
    assert res["codes_used"] == len(nz) and res["codebook_usage"] == pytest.approx(len(nz) / 16)
    assert res["codebook_perplexity"] == pytest.approx(float(torch.exp(-(nz * nz.log()).sum())), rel=1e-6)
    assert 1.0 <= res["codebook_perplexity"] <= res["codes_used"] + 1e-9
    with torch.no_grad():
        x = torch.cat(images)
        pred = model.decoder(model.quantizer.get_codes(model.codes(x)))
        ref = reconstruction_loss(pred, model.teacher(x, (4, 4)))
    assert res["rec_loss"] == pytest.approx(float(ref), rel=1e-5)


def test_vqkd_options_are_checked():
    with pytest.raises(ConfigError, match="vqkd.task_layer"):
        tiny_vqkd(task_layer="conv")
    with pytest.raises(ConfigError, match="vqkd.decay"):
        tiny_vqkd(decay=1.0)
    with pytest.raises(ConfigError, match="needs a ViT image tower"):
        Vqkd(create_backbone("resnet18", in_chans=1, width=8), VqkdConfig(), teacher=TeacherFeatures(_vit()))
    with pytest.raises(ConfigError, match="vqkd.teacher.*'/nowhere/run'"):
        from pretrain.objectives.vqkd import load_teacher

        load_teacher("/nowhere/run")


# ---------------------------------------------------------------------------------------------- beit_v2


def test_beit_v2_cross_entropy_only_at_masked_positions():
    obj = tiny_beit_v2(num_masked=5, head_depth=1)
    batch = _views(3, step=7)
    x = batch["views"][0]
    mask = obj.mask_for(batch, x)
    assert mask.shape == (3, 16) and (mask.sum(1) == 5).all()
    codes = obj.tokenizer.tokens(x, (4, 4))
    out = obj(batch)
    with torch.no_grad():
        final, agg = obj.features(x, mask)
        assert torch.allclose(final, obj.backbone.forward_features(x, mask), atol=1e-6)  # the tower's own forward
        logits = obj.lm_head(final[:, 1:])  # every position [3, 16, K]
        head_logits = obj.lm_head(agg[:, 1:])
    want = head_want = 0.0
    for b in range(3):
        for i in range(16):
            if mask[b, i]:
                want += float(torch.logsumexp(logits[b, i], 0) - logits[b, i, codes[b, i]])
                head_want += float(torch.logsumexp(head_logits[b, i], 0) - head_logits[b, i, codes[b, i]])
    assert out["mim_loss"].item() == pytest.approx(want / 15, rel=1e-5)
    assert out["head_loss"].item() == pytest.approx(head_want / 15, rel=1e-5)
    assert out["loss"].item() == pytest.approx((want + head_want) / 15, rel=1e-5)
    # codes at unmasked positions play no part; a code at a masked one does
    real = obj.tokenizer.tokens
    other = torch.where(mask, codes, (codes + 1) % 16)
    obj.tokenizer.tokens = lambda *a, **k: other
    assert obj(batch)["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)
    obj.tokenizer.tokens = lambda *a, **k: torch.where(mask, (codes + 1) % 16, codes)
    assert obj(batch)["loss"].item() != pytest.approx(out["loss"].item(), rel=1e-3)
    obj.tokenizer.tokens = real


def test_aggregation_head_reads_the_early_layer():
    torch.manual_seed(0)
    obj = tiny_beit_v2(early_layer=1)
    vit = obj.backbone
    grabbed = {}
    hooks = [vit.blocks[0].register_forward_hook(lambda m, a, o: grabbed.setdefault("early", o.detach().clone())),
             vit.blocks[1].register_forward_hook(lambda m, a, o: grabbed.setdefault("last", o.detach().clone())),
             obj.head_blocks[0].register_forward_pre_hook(lambda m, a: grabbed.setdefault("head_in", a[0].detach()))]
    batch = _views(2, step=3)
    out = obj(batch)
    for h in hooks:
        h.remove()
    # the head's input: the final layer's class token, then the early layer's patch tokens
    assert torch.equal(grabbed["head_in"][:, 0], grabbed["last"][:, 0])
    assert torch.equal(grabbed["head_in"][:, 1:], grabbed["early"][:, 1:])
    # the same weights reading another early layer: the head loss changes, the main loss does not
    later = tiny_beit_v2(early_layer=2)
    later.load_state_dict(obj.state_dict())
    later._fixed["tokenizer"] = obj.tokenizer
    out2 = later(batch)
    assert out2["mim_loss"].item() == pytest.approx(out["mim_loss"].item(), rel=1e-6)
    assert out2["head_loss"].item() != pytest.approx(out["head_loss"].item(), rel=1e-4)
    assert obj.early_layer == 1 and tiny_beit_v2().early_layer == 1  # default max(1, 3 * depth // 4) of 2 blocks


def test_masks_are_deterministic_in_seed_and_step():
    a, b = tiny_beit_v2(mask_seed=3), tiny_beit_v2(mask_seed=3)
    x = torch.zeros(4, 1, 16, 16)
    m = a.mask_for({"step": 5}, x)
    assert torch.equal(m, b.mask_for({"step": 5}, x))
    assert not torch.equal(m, a.mask_for({"step": 6}, x))
    assert not torch.equal(m, tiny_beit_v2(mask_seed=4).mask_for({"step": 5}, x))
    assert (m.sum(1) == a.num_masked).all() and a.num_masked == 6  # beit_num_masked(16) = round(16 * 75 / 196)
    # a rank's rows are those of the global batch (rank r of 2 holds samples r * B .. r * B + B - 1)
    assert torch.equal(a.masks(2, 5, rank=1), a.masks(4, 5, rank=0)[2:])


def test_beit_v2_tokenizer_errors_name_the_key_and_path(tmp_path):
    from pretrain.objectives.vqkd import load_tokenizer

    with pytest.raises(ConfigError, match="beit_v2.tokenizer.*no tokenizer"):
        load_tokenizer("")
    with pytest.raises(ConfigError, match=f"beit_v2.tokenizer.*'{tmp_path / 'none'}' does not exist"):
        load_tokenizer(str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="beit_v2.tokenizer.*has no weights.safetensors"):
        load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------------------------------------- end to end

TINY = ["data=digits", "image_size=16", "model.image.backbone=vit_tiny", "model.image.patch_size=4",
        "model.image.depth=2", "model.image.embed_dim=32", "model.image.num_heads=2", "precision=fp32", "log_every=1",
        "progress=false", "optim.name=adamw", "optim.lr=0.003", "optim.scale_lr=false", "optim.warmup_steps=0",
        "max_steps=20"]
VQKD = ["objective=vqkd", "vqkd.num_codes=64", "vqkd.code_dim=8", "vqkd.dead_code_steps=3"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _fit(*args):
    r = subprocess.run([sys.executable, "-m", "launch", "fit", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _records(run):
    """The training records of a run's metrics.jsonl (not the held-out evaluation's)."""
    recs = [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in recs if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-step SimCLR ViT run (the teacher), then ``pretrain fit`` of vqkd from it and of beit_v2
    from that tokenizer: 20 steps each, one process, batch 32."""
    from pretrain.config import load_config
    from pretrain.loop import fit

    root = tmp_path_factory.mktemp("beit_v2")
    teacher = root / "teacher"
    fit(load_config(overrides=["objective=simclr", *TINY, "simclr.proj_dim=16", "max_steps=1", "batch_size=32",
                               f"run_dir={teacher}"]))
    _fit(*VQKD, *TINY, "batch_size=32", f"vqkd.teacher={teacher}", f"run_dir={root / 'vqkd'}")
    _fit("objective=beit_v2", *TINY, "batch_size=32", f"beit_v2.tokenizer={root / 'vqkd'}", f"run_dir={root / 'beit'}")
    return {"root": root, "teacher": teacher, "vqkd": root / "vqkd", "beit": root / "beit"}


def _decreasing(losses):
    assert len(losses) == 20 and all(map(lambda v: v == v and abs(v) < float("inf"), losses))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_fit_vqkd_then_beit_v2(runs):
    from safetensors import safe_open

    vq = _records(runs["vqkd"])
    _decreasing([r["loss"] for r in vq])
    assert {"rec_loss", "commit_loss", "codebook_usage", "codebook_perplexity", "dead_codes",
            "codebook_restarts"} <= set(vq[-1])
    assert vq[-1]["codebook_restarts"] > 0  # codes unused for 3 steps were restarted
    held_out = json.loads((runs["vqkd"] / "train_summary.json").read_text())
    assert 1 <= held_out["test_codes_used"] <= 64 and 0 < held_out["test_rec_loss"] < 2
    with safe_open(str(runs["vqkd"] / "weights.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "quantizer.codebook" in keys and any(k.startswith("encode_task.") for k in keys)
    assert json.loads(meta["vqkd"])["num_codes"] == 64 and meta["objective"] == "vqkd"
    bv = _records(runs["beit"])
    _decreasing([r["loss"] for r in bv])
    _decreasing([r["mim_loss"] for r in bv])
    assert all(r["loss"] == pytest.approx(r["mim_loss"] + r["head_loss"], rel=1e-5) for r in bv)
    # the run rebuilds from its directory (what pretrain probe does): tokenizer reloaded, every weight exported
    from pretrain.probe import load_run

    cfg, model = load_run(runs["beit"])
    assert cfg.objective_config.tokenizer == str(runs["vqkd"])
    assert model.embed({"image": torch.randn(3, 1, 16, 16)}).shape == (3, 32)
    # a run of another objective is refused as a tokenizer, naming the key and the path
    from pretrain.objectives.vqkd import load_tokenizer

    with pytest.raises(ConfigError, match=f"beit_v2.tokenizer.*'{runs['teacher']}' is a run of objective 'simclr'"):
        load_tokenizer(str(runs["teacher"]))


def test_two_ranks_match_one_process_zero2(runs, tmp_path):
    """vqkd (k-means initialisation, EMA codebook, dead-code restarts over the global batch) and
    beit_v2 (masks by global sample index) on 2 DeepSpeed ranks x 16 images under ZeRO-2, in one
    launch, against the one-process runs above (batch 32): the first 6 of the same 20-step schedule."""
    common = [*TINY, "batch_size=16", "stop_at=6", "engine=deepspeed", "deepspeed.zero_stage=2"]
    spec = [[*VQKD, *common, f"vqkd.teacher={runs['teacher']}", f"run_dir={tmp_path / 'vqkd'}"],
            ["objective=beit_v2", *common, f"beit_v2.tokenizer={runs['vqkd']}", f"run_dir={tmp_path / 'beit'}"]]
    (tmp_path / "runs.json").write_text(json.dumps(spec))
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(find_free_port()), "tests/ds_fits_worker.py",
           str(tmp_path / "runs.json")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("vqkd", "beit"):
        got = [x["loss"] for x in _records(tmp_path / name)]
        ref = [x["loss"] for x in _records(runs[name])][:6]
        assert len(got) == 6
        for a, b in zip(got, ref):
            assert a == pytest.approx(b, rel=1e-4)
