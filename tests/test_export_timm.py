"""``pretrain export --format timm``: a run's image tower as a timm model, the same features to 1e-5."""
import json
from pathlib import Path

import pytest
import torch

from pretrain.batches import schema_of
from pretrain.checkpoint import CheckpointNotFoundError, RunDirError, save_weights
from pretrain.config import load_config, save_config, to_dict
from pretrain.export_timm import ExportFormatError, export_timm, timm_model_from_export
from pretrain.loop import build_model, fit
from pretrain.objectives import objective_class

timm = pytest.importorskip("timm")

FAST = ["precision=fp32", "progress=false", "log_every=1", "threads=2", "simclr.proj_dim=8", "simclr.proj_hidden=16"]
VIT = ["model.image.backbone=vit_tiny", "model.image.patch_size=4", "model.image.embed_dim=32", "model.image.depth=2",
       "model.image.num_heads=2"]
RESNET = ["objective=simclr", "data=digits", "image_size=16", "model.image.backbone=resnet18", "model.image.width=64"]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """A real 1-step SimCLR run of a tiny ViT on 28 px, 1-channel mnist5k."""
    return fit(load_config(None, ["objective=simclr", "data=mnist5k", *VIT, *FAST, "batch_size=8", "max_steps=1",
                                  f"run_dir={tmp_path_factory.mktemp('vit') / 'run'}"]))


def _make_run(path: Path, overrides: list[str]) -> Path:
    """A run directory as ``fit`` leaves it (config.yaml, weights.safetensors) without training: the
    model of the config with random weights and BatchNorm statistics, saved by the same functions."""
    cfg = load_config(None, [*overrides, *FAST, f"run_dir={path}"])
    info = schema_of(objective_class(cfg.objective)).dataset(cfg, "test").info
    model = build_model(cfg, info)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # eval mode must use real running statistics
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    path.mkdir(parents=True)
    save_config(cfg, path / "config.yaml")
    save_weights(path / "weights.safetensors", model.state_dict(),
                 {"objective": cfg.objective, "format": "ssl-pretrain/1", "config": json.dumps(to_dict(cfg))})
    return path


def _ours(run):
    from pretrain.probe import load_run

    _, model = load_run(run)
    return model.tower("image").eval()


def _assert_same_features(ours, theirs, x):
    """Eval mode: timm's features (tokens / last feature map) and its pooled output (``model(x)`` with
    ``num_classes=0``, i.e. ``forward_head(..., pre_logits=True)``) are ours to 1e-5."""
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(x), ours.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), ours.forward_pooled(x), rtol=1e-5, atol=1e-5)


def test_vit_export_loads_in_timm_with_the_same_features(tmp_path, vit_run):
    out = export_timm(vit_run, tmp_path / "t")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["num_classes"] == 0 and cfg["num_features"] == 32
    assert cfg["model_args"] == {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2,
                                 "num_heads": 2, "mlp_ratio": 4.0, "qkv_bias": True, "class_token": True,
                                 "global_pool": "token", "fc_norm": False}
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [1, 28, 28] and pc["mean"] == [0.1307] and pc["std"] == [0.3081]
    ours = _ours(vit_run)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    # the documented ways: build from config.json and load the file strictly, or timm's local-dir: source
    from safetensors.torch import load_file

    built = timm.create_model(cfg["architecture"], pretrained=False, num_classes=0, **cfg["model_args"])
    built.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    assert all(m.eps == 1e-6 for m in built.modules() if isinstance(m, torch.nn.LayerNorm))
    _assert_same_features(ours, built, x)
    local = timm.create_model(f"local-dir:{out}", pretrained=True)
    _assert_same_features(ours, local, x)
    data = timm.data.resolve_data_config(model=local)
    assert data["input_size"] == (1, 28, 28) and tuple(data["mean"]) == (0.1307,) and data["crop_pct"] == 1.0
    _assert_same_features(ours, timm_model_from_export(out), x)
    assert timm_model_from_export(out, num_classes=10)(x).shape == (3, 10)


def test_mean_pooled_vit_is_timm_avg_pool_after_the_final_norm(tmp_path, vit_run, monkeypatch):
    import pretrain.probe as probe

    load_run = probe.load_run

    def mean_pooled(*a, **kw):
        cfg, model = load_run(*a, **kw)
        model.backbone.pool = "mean"
        return cfg, model

    monkeypatch.setattr(probe, "load_run", mean_pooled)
    out = export_timm(vit_run, tmp_path / "t")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["global_pool"] == "avg" and cfg["model_args"]["fc_norm"] is False
    ours = mean_pooled(vit_run)[1].backbone.eval()
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    _assert_same_features(ours, timm.create_model(f"local-dir:{out}", pretrained=True), x)


def test_export_of_a_checkpoint_step_and_through_the_cli(tmp_path, vit_run, capsys):
    from launch.cli import main

    assert main(["export", "--run", str(vit_run), "--format", "timm", "--step", "1", "--out", str(tmp_path / "t")]) == 0
    assert "timm" in capsys.readouterr().out
    assert not list(Path(vit_run).glob(".timm_step_*"))
    x = torch.randn(2, 1, 28, 28)
    _assert_same_features(_ours(vit_run), timm_model_from_export(tmp_path / "t"), x)
    assert main(["export", "--run", str(vit_run), "--format", "timm"]) == 0  # default: RUN_DIR/timm
    assert (Path(vit_run) / "timm" / "model.safetensors").is_file()
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint for step 99"):
        export_timm(vit_run, tmp_path / "u", step=99)


def test_clip_image_tower_with_rgb_input(tmp_path):
    run = _make_run(tmp_path / "clip", ["objective=clip", "data=mnist5k_captions", "image_size=16", *VIT,
                                        "model.text.backbone=text_tiny", "model.text.width=32", "model.text.depth=1",
                                        "model.text.heads=2", "tokenizer.name=bytes", "tokenizer.context_length=8",
                                        "clip.embed_dim=8"])
    out = export_timm(run)
    assert out == run / "timm"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_args"]["in_chans"] == 3 and cfg["pretrained_cfg"]["input_size"] == [3, 16, 16]
    assert len(cfg["pretrained_cfg"]["mean"]) == 3 and cfg["ssl_pretrain"]["objective"] == "clip"
    x = torch.randn(2, 3, 16, 16)
    _assert_same_features(_ours(run), timm.create_model(f"local-dir:{out}", pretrained=True), x)


def test_resnet18_imagenet_stem_is_timm_resnet18(tmp_path):
    run = _make_run(tmp_path / "rn", [*RESNET, "model.image.stem=imagenet"])
    out = export_timm(run, tmp_path / "t")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "resnet18" and cfg["model_args"] == {"in_chans": 1, "global_pool": "avg"}
    assert "stem_adaptation" not in cfg and cfg["num_features"] == 512
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = _ours(run)
    _assert_same_features(ours, timm.create_model(f"local-dir:{out}", pretrained=True), x)
    _assert_same_features(ours, timm_model_from_export(out), x)


def test_resnet18_cifar_stem_needs_the_recorded_adaptation(tmp_path):
    run = _make_run(tmp_path / "rn", [*RESNET, "model.image.stem=cifar"])
    out = export_timm(run, tmp_path / "t")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["stem_adaptation"]["conv1"]["kernel_size"] == 3 and cfg["stem_adaptation"]["conv1"]["stride"] == 1
    assert cfg["stem_adaptation"]["maxpool"] == {"type": "Identity"}
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    model = timm_model_from_export(out)
    assert isinstance(model.maxpool, torch.nn.Identity) and model.conv1.stride == (1, 1)
    _assert_same_features(_ours(run), model, x)
    with pytest.raises(RuntimeError, match="conv1.weight"):  # timm alone has no such stem (documented)
        timm.create_model(f"local-dir:{out}", pretrained=True)


def test_runs_timm_cannot_express_are_refused_by_name(tmp_path):
    with pytest.raises(RunDirError, match="'/no/such/run' is not a run directory"):
        export_timm("/no/such/run")
    run = tmp_path / "r"
    run.mkdir()
    for overrides, msg in (
            (["model.image.backbone=efficientnet_lite0"], "model.image.backbone=efficientnet_lite0"),
            ([*RESNET, "model.image.width=16"], "model.image.width=16"),
            ([*RESNET, "model.image.norm=gn_ws"], "model.image.norm=gn_ws")):
        save_config(load_config(None, ["objective=simclr", *overrides]), run / "config.yaml")
        with pytest.raises(ExportFormatError, match=msg):
            export_timm(run)
    assert not (run / "timm").exists()


def test_cli_reports_a_missing_run_on_one_line(capsys):
    from launch.cli import main

    assert main(["export", "--run", "/no/such/run", "--format", "timm"]) == 2
    err = capsys.readouterr().err
    assert "pretrain export: error:" in err and "/no/such/run" in err
