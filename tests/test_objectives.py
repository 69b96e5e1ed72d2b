import math

import pytest
import torch

from models import WSLinear, create_backbone
from pretrain.objectives import create_objective, list_objectives, objective_class, objective_config_class
from pretrain.objectives.byol import cosine_momentum


def _tiny_backbone():
    return create_backbone("resnet18", in_chans=1, width=8)


def _batch(n=6, size=16):
    return {"views": [torch.randn(n, 1, size, size), torch.randn(n, 1, size, size)],
            "image": torch.randn(n, 1, size, size), "label": torch.arange(n) % 3}


def _tiny_teacher(num_classes=3):
    from pretrain.objectives.supervised import Classifier

    bb = create_backbone("resnet18", in_chans=1, width=4)
    return Classifier(bb, torch.nn.Sequential(), bb.embed_dim, num_classes)


def _tiny_objective(name):
    """A small instance of any registered objective: pretraining objectives with small heads, the
    classifier objectives with 3 classes (distill with a small in-memory teacher)."""
    cls = objective_class(name)
    if name == "align":  # heads on frozen embeddings: no tower
        return cls({}, objective_config_class(name)(image_dim=12, text_dim=8, out_dim=6, hidden_dim=16))
    if name == "clip":  # two towers and two projections
        from models import create_backbone

        text = create_backbone("text_tiny", vocab_size=50, context_length=6, width=16, depth=1, heads=2, eot_id=2)
        return create_objective(name, {"image": _tiny_backbone(), "text": text}, embed_dim=8)
    if name == "data2vec2":  # masked image modelling on a ViT (the learned mask fill: every parameter gets a gradient)
        from models import create_backbone

        vit = create_backbone("vit_tiny", in_chans=1, image_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)
        return create_objective(name, vit, clones=2, decoder_depth=1, mask_fill="learned")
    if name == "vatt":  # video, audio and text on one backbone
        from test_vatt import tiny_objective

        return tiny_objective()
    if name in ("vqkd", "beit_v2"):  # BEiT v2: ViT towers, an in-memory teacher / tokenizer
        from test_beit_v2 import tiny_objective

        return tiny_objective(name)
    if cls.pretraining:
        return create_objective(name, _tiny_backbone(), proj_hidden=32, proj_dim=16)
    cfg = objective_config_class(name)(num_classes=3)
    if name == "distill":
        return cls(_tiny_backbone(), cfg, teacher=_tiny_teacher())
    return cls(_tiny_backbone(), cfg)


def test_the_classifier_objectives_are_registered():
    assert {"byol", "simclr", "swav", "supervised", "distill"} <= set(list_objectives())
    assert not objective_class("supervised").pretraining and not objective_class("distill").pretraining


IMAGE_OBJECTIVES = [n for n in list_objectives() if objective_class(n).towers == ("image",)]


def test_every_objective_is_covered_here():
    """Image objectives train one step below; the others have their own tests (align here, the
    two-tower test objective in test_core.py, clip in test_clip.py, vatt in test_vatt.py)."""
    assert set(list_objectives()) - set(IMAGE_OBJECTIVES) <= {"align", "two_tower_test", "clip", "vatt"}


@pytest.mark.parametrize("name", IMAGE_OBJECTIVES)
def test_every_objective_trains_one_step(name):
    obj = _tiny_objective(name)
    groups = obj.param_groups()
    params = [p for g in groups for p in g["params"]]
    ids = {id(p) for p in params}
    assert len(ids) == len(params), "a parameter appears in two groups"
    trainable = {id(p) for p in obj.parameters() if p.requires_grad}
    assert ids == trainable
    # no decay: biases and norms, and the towers' own exemptions (a ViT's class token and positions)
    exempt = {id(p) for m in obj.modules() if hasattr(m, "no_weight_decay")
              for n, p in m.named_parameters() if n in m.no_weight_decay()}
    assert all(p.ndim <= 1 or id(p) in exempt for g in groups if g.get("weight_decay") == 0.0 for p in g["params"])
    opt = torch.optim.SGD(groups, lr=0.1)
    before = {k: v.clone() for k, v in obj.state_dict().items()}
    out = obj(_batch())
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in obj.backbone.parameters() if p.requires_grad)  # vqkd never masks
    opt.step()
    obj.on_step_end(0, 10)
    after = obj.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    emb = obj.embed({"image": torch.randn(4, 1, 16, 16)})
    assert emb.shape == (4, obj.backbone.embed_dim) and not emb.requires_grad


def test_byol_target_is_ema_of_online():
    obj = create_objective("byol", _tiny_backbone(), proj_hidden=32, proj_dim=16, base_momentum=0.9)
    assert not any(p.requires_grad for p in obj.target_backbone.parameters())
    online0 = [p.detach().clone() for p in obj.backbone.parameters()]
    target0 = [p.detach().clone() for p in obj.target_backbone.parameters()]
    with torch.no_grad():
        for p in obj.backbone.parameters():
            p.add_(1.0)
    obj.on_step_end(0, 100)
    for t0, o0, t in zip(target0, online0, obj.target_backbone.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * (o0 + 1.0), atol=1e-6)
    assert obj.momentum == pytest.approx(cosine_momentum(1, 100, 0.9))


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 2) + 1) / 2)


def test_byol_loss_value_matches_formula():
    torch.manual_seed(1)
    obj = create_objective("byol", _tiny_backbone(), proj_hidden=32, proj_dim=16).eval()
    b = _batch(4)
    out = obj(b)
    x = torch.cat(b["views"])
    with torch.no_grad():
        p = obj.predictor(obj.projector(obj.backbone(x)))
        z = obj.target_projector(obj.target_backbone(x))
    cos = torch.nn.functional.cosine_similarity
    ref = (2 - 2 * cos(p[:4], z[4:])).mean() + (2 - 2 * cos(p[4:], z[:4])).mean()
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_unknown_objective_and_option():
    with pytest.raises(ValueError, match="unknown objective 'simclrr' .*valid objectives: align, beit_v2, byol, clip, data2vec2, distill, simclr"):
        create_objective("simclrr", _tiny_backbone())
    with pytest.raises(TypeError, match="objective 'simclr' has no option 'bogus'"):
        create_objective("simclr", _tiny_backbone(), bogus=1)


@pytest.mark.parametrize("head_norm,head_ws", [("none", False), ("ln", False), ("bn", False), ("none", True)])
def test_byol_gn_ws_uses_no_batch_statistics(head_norm, head_ws):
    """With gn_ws + head_norm=none|ln no layer looks at other samples: a sample's prediction computed alone
    equals the one computed inside a batch (with BN heads it does not, which shows the check bites)."""
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", in_chans=1, width=8, norm="gn_ws")
    obj = create_objective("byol", backbone, proj_hidden=32, proj_dim=16, pred_hidden=32, head_norm=head_norm,
                           head_ws=head_ws)
    assert any(isinstance(m, WSLinear) for m in obj.projector.modules()) == head_ws
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in obj.modules())
    assert has_bn == (head_norm == "bn")
    obj.train()
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        together = obj.predictor(obj.projector(obj.backbone.forward_pooled(x)))
        alone = torch.cat([obj.predictor(obj.projector(obj.backbone.forward_pooled(x[i:i + 2])))[:1]
                           for i in range(0, 6, 2)])
    same = torch.allclose(together[::2], alone, atol=1e-5)
    assert same == (head_norm != "bn")
    opt = torch.optim.SGD(obj.param_groups(), lr=0.05)
    for step in range(3):
        out = obj(_batch())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        obj.on_step_end(step, 3)
        assert torch.isfinite(out["loss"])


def test_byol_predictor_lr_scale_groups():
    """byol.pred_lr_scale puts the predictor's parameters (and only them) in groups whose LR the
    schedule multiplies; every trainable parameter is in exactly one group."""
    from pretrain.optim import build_optimizer
    from pretrain.schedules import LRSchedule

    backbone = create_backbone("resnet18", in_chans=1, width=8, norm="gn_ws")
    obj = create_objective("byol", backbone, proj_hidden=32, proj_dim=16, pred_hidden=32, head_norm="none",
                           pred_lr_scale=10.0)
    groups = obj.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for m in obj.trainable_modules() for p in m.parameters()]
    assert sorted(ids) == sorted(id(p) for p in trainable)
    pred = {id(p) for p in obj.predictor.parameters()}
    for g in groups:
        in_pred = {id(p) in pred for p in g["params"]}
        assert len(in_pred) == 1
        assert g.get("lr_scale", 1.0) == (10.0 if in_pred.pop() else 1.0)
    opt = build_optimizer(groups, "lars", 0.3, 1e-6)
    LRSchedule(opt, 0.3, 100, 0)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["predictor_decay"] == pytest.approx(3.0) and lrs["decay"] == pytest.approx(0.3)
    # the default keeps the two plain groups
    plain = create_objective("byol", create_backbone("resnet18", in_chans=1, width=8), proj_hidden=32,
                             proj_dim=16, pred_hidden=32).param_groups()
    assert [g["name"] for g in plain] == ["decay", "no_decay"]
    with pytest.raises(ValueError, match="pred_lr_scale"):
        create_objective("byol", create_backbone("resnet18", in_chans=1, width=8), pred_lr_scale=0.0)


def test_byol_projection_spread_tells_collapse():
    from pretrain.objectives.byol import projection_spread

    torch.manual_seed(0)
    spread = projection_spread(torch.randn(512, 64))
    assert 0.9 < float(spread) < 1.1
    same = torch.randn(1, 64).repeat(512, 1) * torch.rand(512, 1)  # one direction, any length
    assert float(projection_spread(same)) < 1e-3
    half = torch.cat([torch.randn(256, 64), torch.randn(1, 64).repeat(256, 1)])
    assert 0.3 < float(projection_spread(half)) < 0.9


def test_fit_warns_once_when_byol_projections_collapse(tmp_path, monkeypatch, capsys):
    """The loop warns (once) when the logged target_std falls below COLLAPSE_STD; a fault is forced by
    making the monitor report a collapsed spread."""
    import pretrain.objectives.byol as byol_mod
    from pretrain.config import load_config
    from pretrain.loop import fit

    tiny = ["objective=byol", "data=digits", "image_size=16", "model.width=8", "batch_size=16", "precision=fp32",
            "log_every=1", "progress=false", "byol.proj_hidden=32", "byol.proj_dim=16", "byol.pred_hidden=32",
            "max_steps=3"]
    fit(load_config(overrides=[*tiny, f"run_dir={tmp_path / 'ok'}"]))
    assert "collapse" not in capsys.readouterr().err
    monkeypatch.setattr(byol_mod, "projection_spread", lambda z: torch.tensor(0.01))
    fit(load_config(overrides=[*tiny, f"run_dir={tmp_path / 'collapsed'}"]))
    err = capsys.readouterr().err
    assert err.count("warning: target_std 0.010 at step 1") == 1 and err.count("collapse") == 1


def test_align_objective_is_clip_infonce_on_its_heads():
    """The align objective's loss is the symmetric InfoNCE of the paper's formula on the heads'
    outputs; weight decay only on weight matrices; the logit scale trains unless fixed."""
    import torch.nn.functional as F

    from pretrain.objectives.align import Align, AlignObjectiveConfig

    torch.manual_seed(0)
    obj = Align({}, AlignObjectiveConfig(image_dim=12, text_dim=8, out_dim=6, hidden_dim=16, dropout=0.0))
    x, t = torch.randn(5, 12), torch.randn(5, 8)
    out = obj({"image_vec": x, "text_vec": t})
    with torch.no_grad():
        i = F.normalize(obj.heads.image_head((x - obj.heads.image_mean) / obj.heads.image_std), dim=1)
        u = F.normalize(obj.heads.text_head(t), dim=1)
        s = math.exp(obj.heads.log_logit_scale.item())
        logits = s * i @ u.T
        want = 0.0
        for k in range(5):  # -log softmax of the matching pair, in each direction
            want += -(logits[k, k] - torch.logsumexp(logits[k], 0)) - (logits[k, k] - torch.logsumexp(logits[:, k], 0))
        want /= 10
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert s == pytest.approx(1 / 0.07, rel=1e-5)
    groups = obj.param_groups()
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and groups[1]["weight_decay"] == 0.0
    assert any(p is obj.heads.log_logit_scale for p in groups[1]["params"])
    out["loss"].backward()
    assert obj.heads.log_logit_scale.grad is not None
    fixed = Align({}, AlignObjectiveConfig(image_dim=12, text_dim=8, learn_temperature=False))
    assert not any(p is fixed.heads.log_logit_scale for g in fixed.param_groups() for p in g["params"])
    with pytest.raises(ValueError, match="image_dim and text_dim come from the data"):
        Align({}, AlignObjectiveConfig())
