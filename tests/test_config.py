import pytest

from pretrain.config import ConfigError, load_config, to_dict


def test_defaults_and_overrides(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("objective: simclr\ndata: digits\noptim:\n  lr: 0.5\nsimclr:\n  temperature: 0.3\n")
    cfg = load_config(r, ["max_steps=7", "optim.name=adamw", "aug.crop_scale=[0.3, 1.0]", "simclr.proj_dim=32"])
    assert cfg.objective == "simclr" and cfg.max_steps == 7
    assert cfg.optim.lr == 0.5 and cfg.optim.name == "adamw"
    assert cfg.aug.crop_scale == (0.3, 1.0)
    assert cfg.objective_config.temperature == 0.3 and cfg.objective_config.proj_dim == 32
    d = to_dict(cfg)
    assert "simclr" in d and "byol" not in d and d["aug"]["crop_scale"] == [0.3, 1.0]


@pytest.mark.parametrize("override,needle", [
    (["max_step=3"], "unknown config key 'max_step' (did you mean 'max_steps'?)"),
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["byol.proj_dimm=3"], "unknown config key 'byol.proj_dimm'"),
    (["objective=byl"], "unknown objective 'byl' (did you mean 'byol'?); valid objectives: beit_v2, byol, clip, data2vec2, simclr, swav, vatt, vqkd"),
    (["max_steps=abc"], "config key 'max_steps': expected int, got 'abc'"),
    (["precision=fp16"], "config key 'precision': unknown value 'fp16'; valid: 'auto', 'fp32', 'bf16'"),
    (["nokeyvalue"], "not of the form key=value"),
])
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert needle in str(e.value)


def test_missing_recipe_named(tmp_path):
    with pytest.raises(ConfigError, match="recipe file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_roundtrip(tmp_path):
    from pretrain.config import build_config, save_config
    import yaml

    cfg = load_config(None, ["objective=simclr", "simclr.temperature=0.7", "model.width=16"])
    save_config(cfg, tmp_path / "c.yaml")
    cfg2 = build_config(yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert to_dict(cfg2) == to_dict(cfg)


def test_precision_auto_resolves_to_what_runs_fast_here(monkeypatch):
    import torch

    import pretrain.engines.base as base

    assert load_config(None, []).precision == ("bf16" if base.bf16_is_fast() else "fp32")  # the default
    monkeypatch.setattr(base, "bf16_is_fast", lambda device_type=None: False)
    cfg = load_config(None, ["precision=auto"])
    assert cfg.precision == "fp32" and to_dict(cfg)["precision"] == "fp32"  # config.yaml records what ran
    assert load_config(None, ["precision=bf16"]).precision == "bf16"  # asked for explicitly: kept
    monkeypatch.setattr(base, "bf16_is_fast", lambda device_type=None: True)
    assert load_config(None, ["precision=auto"]).precision == "bf16"
    x = torch.randn(4, 4)
    with base.autocast_context("auto"):
        assert (x @ x).dtype == torch.bfloat16
    with base.autocast_context("fp32"):
        assert (x @ x).dtype == torch.float32
    with pytest.raises(ConfigError, match="'auto', 'fp32', 'bf16'"):
        load_config(None, ["precision=fp16"])
