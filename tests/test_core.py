"""The core holds objectives it was not written for: a two-tower objective on image-text pairs
(no ``views`` in its batch) trains through ``fit()`` with both engines' interface, exact resume
and the run directory every objective gets, without any change to the loop."""
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import data as data_lib
from data.datasets import DATASETS, DatasetInfo, TensorImageDataset
from losses import clip_loss
from pretrain.config import load_config
from pretrain.engines import PlainEngine
from pretrain.loop import RunError, fit
from pretrain.objectives import Objective, register_objective
from pretrain.objectives.base import OBJECTIVES
from pretrain.schedules import LRSchedule

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class CaptionedDigits(TensorImageDataset):
    """sklearn digits with a caption per image ("a handwritten seven")."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        item["text"] = f"a handwritten {WORDS[item['label']]}"
        return item


def _captioned_digits(split, image_size=None, seed=0):
    base = data_lib.build_dataset("digits", split)
    info = DatasetInfo("digit_pairs", base.info.channels, base.info.image_size, 10, base.info.mean, base.info.std,
                       flip=False, color=False, class_names=WORDS)
    return CaptionedDigits(base.images, base.labels, info)


@dataclass
class TwoTowerConfig:
    dim: int = 16
    temperature: float = 0.1


class TwoTower(Objective):
    """A minimal CLIP-like objective: image and text towers, linear heads, symmetric InfoNCE."""

    towers = ("image", "text")
    batch = "pairs"

    def __init__(self, towers, cfg: TwoTowerConfig):
        super().__init__(towers)
        self.cfg = cfg
        self.image_head = nn.Linear(self.tower("image").embed_dim, cfg.dim)
        self.text_head = nn.Linear(self.tower("text").embed_dim, cfg.dim)

    def forward(self, batch):
        img = F.normalize(self.image_head(self.tower("image").forward_pooled(batch["image"])).float(), dim=1)
        txt = F.normalize(self.text_head(self.tower("text").forward_pooled(batch["text"])).float(), dim=1)
        return {"loss": clip_loss(img, txt, 1.0 / self.cfg.temperature),
                "match": (img * txt).sum(1).mean().detach()}


@pytest.fixture
def two_tower():
    DATASETS.register("digit_pairs", _captioned_digits)
    register_objective("two_tower_test", TwoTowerConfig)(TwoTower)
    yield
    DATASETS.unregister("digit_pairs")
    OBJECTIVES.unregister("two_tower_test")


TINY = ["objective=two_tower_test", "data=digit_pairs", "model.image.backbone=resnet18", "model.image.width=8",
        "model.text.backbone=text_tiny", "model.text.width=32", "model.text.depth=1", "model.text.heads=2",
        "tokenizer.context_length=24", "batch_size=32", "precision=fp32", "optim.name=adamw", "optim.lr=0.005",
        "optim.scale_lr=false", "optim.warmup_steps=0", "log_every=1", "progress=false", "threads=2"]


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def zero_shot_accuracy(model, cfg) -> float:
    """Held-out digits classified by their nearest caption among the 10 class captions."""
    test = _captioned_digits("test")
    collate = data_lib.PairCollate(8, test.info.mean, test.info.std,
                                   data_lib.create_tokenizer("bytes", cfg.tokenizer.context_length))
    batch = collate([test[i] for i in range(len(test))])
    classes = collate([{**test[0], "text": f"a handwritten {w}"} for w in WORDS])["text"]
    model.eval()
    img = F.normalize(model.image_head(model.tower("image").forward_pooled(batch["image"])), dim=1)
    txt = F.normalize(model.text_head(model.tower("text").forward_pooled(classes)), dim=1)
    return float(((img @ txt.T).argmax(1) == batch["label"]).float().mean())


def test_two_tower_objective_trains_through_fit_and_resumes_exactly(two_tower, tmp_path):
    from pretrain.probe import load_run

    run = fit(load_config(None, [*TINY, "max_steps=60", f"run_dir={tmp_path / 'a'}"]))
    losses = _losses(run)
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    cfg, model = load_run(run)  # rebuilt from config.yaml + weights.safetensors, both towers
    acc = zero_shot_accuracy(model, cfg)
    assert acc > 0.3, acc  # chance is 0.1: images and captions were aligned
    from safetensors.torch import load_file

    keys = load_file(str(run / "weights.safetensors"))
    assert any(k.startswith("backbone.") for k in keys) and any(k.startswith("text_tower.") for k in keys)
    cfg_text = (run / "config.yaml").read_text()
    assert "text_tiny" in cfg_text and "tokenizer" in cfg_text
    # stop after 4 steps, resume to 8: the same curve as 8 straight steps
    straight = _losses(fit(load_config(None, [*TINY, "max_steps=8", f"run_dir={tmp_path / 's'}"])))
    b = tmp_path / "b"
    fit(load_config(None, [*TINY, "max_steps=8", "stop_at=4", f"run_dir={b}"]))
    fit(load_config(b / "config.yaml", ["stop_at=0", f"run_dir={b}"]), resume=True)
    assert _losses(b) == pytest.approx(straight, abs=1e-6)


def test_two_tower_on_data_without_captions_names_the_problem(two_tower, tmp_path):
    with pytest.raises(data_lib.DataError, match="has no caption"):
        fit(load_config(None, [*TINY, "data=digits", "max_steps=1", f"run_dir={tmp_path}"]))


def test_objective_missing_its_tower_config_is_a_config_error(two_tower, tmp_path):
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match="model.text.backbone is not set"):
        fit(load_config(None, [*TINY, "model.text.backbone=", "max_steps=1", f"run_dir={tmp_path}"]))


def test_model_shorthand_is_the_image_tower():
    cfg = load_config(None, ["model.backbone=vit_tiny", "model.patch_size=2", "model.width=8"])
    assert cfg.model.image.backbone == "vit_tiny" and cfg.model.image.patch_size == 2 and cfg.model.image.width == 8
    assert cfg.model.text.backbone == ""


def test_non_finite_loss_stops_the_run_before_the_update(tmp_path, monkeypatch):
    """A NaN loss raises before backward: no optimizer step is applied, and the run says what to do."""
    w = nn.Parameter(torch.ones(2))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = w

        def forward(self, batch):
            return {"loss": (self.w * batch["x"]).sum()}

    opt = torch.optim.SGD([w], lr=0.1)
    eng = PlainEngine(Model(), opt, LRSchedule(opt, 0.1, 5, 0, 0.0), grad_accum=2)
    good = {"x": torch.ones(2)}
    eng.train_step([good, good])
    assert eng.steps == 1
    before = w.detach().clone()
    from pretrain.engines import NonFiniteLossError

    with pytest.raises(NonFiniteLossError):
        eng.train_step([good, {"x": torch.tensor([float("nan"), 1.0])}])
    assert torch.equal(w.detach(), before) and eng.steps == 1
    with pytest.raises(ValueError, match="accumulates 2"):
        eng.train_step([good])


def test_diverging_fit_is_a_run_error(tmp_path):
    with pytest.raises(RunError, match="loss became"):
        fit(load_config(None, ["objective=simclr", "data=digits", "image_size=8", "model.width=4", "batch_size=16",
                               "precision=fp32", "max_steps=3", "optim.name=sgd", "optim.lr=1e30",
                               "optim.warmup_steps=0", "progress=false", f"run_dir={tmp_path}"]))


def test_align_settings_go_through_the_one_config_mechanism():
    from data.common.config import ConfigError as GroundConfigError
    from eval_probes.search.align import AlignConfig, config_from_overrides
    from pretrain.config import ConfigError

    assert ConfigError is GroundConfigError
    cfg = config_from_overrides(["temperature=0.05", "learn_temperature=false"], base=AlignConfig(epochs=3))
    assert (cfg.temperature, cfg.learn_temperature, cfg.epochs) == (0.05, False, 3)
    with pytest.raises(ConfigError, match="unknown config key 'align.temprature' \\(did you mean 'temperature'"):
        config_from_overrides(["temprature=0.05"])
    with pytest.raises(ConfigError, match="'align.epochs': expected int"):
        config_from_overrides({"epochs": "many"})
