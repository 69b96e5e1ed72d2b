"""A run's image tower as a timm model: ``config.json`` and ``model.safetensors`` in one folder,
in the layout of timm's Hugging Face Hub exports, to fine-tune with timm.

Supported: any run whose objective has an image tower (``clip`` included: its image tower) that is

* a ViT (``vit_tiny/small/base``, any image and patch size, width, depth, heads, class-token or
  mean pooling, any number of input channels) -> timm's ``VisionTransformer``
  (``vit_{tiny,small,base}_patch16_224`` with ``model_args`` overriding every size). The tensors keep
  their names (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.i.{norm1,attn.qkv,
  attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``); the masked-image-modelling ``mask_token`` is left
  out. Mean pooling is ``global_pool='avg'`` with ``fc_norm=False``: timm's default for ``avg``
  (``fc_norm=None``) would move the final LayerNorm after the pooling, ours normalises every token
  first. LayerNorm eps 1e-6 is timm's default for ViTs, as ours.
* a ResNet (``resnet18/34/50/101/152``) with BatchNorm and base ``width=64`` -> timm's
  ``resnet18`` ... ``resnet152``; the names are torchvision's, which timm's ResNet shares. timm's
  ResNet fixes the stem width at 64 (``stem_width`` only sizes the 'deep' stems), so other widths
  are refused, as is ``norm=gn_ws`` (weight-standardised convolutions). The ``imagenet`` stem is
  timm's own; timm has no ``cifar`` stem (3x3 convolution, stride 1, no max-pool), so such an export
  records the change under ``config.json``'s ``stem_adaptation`` key and
  :func:`timm_model_from_export` applies it (two module replacements) before loading the weights;
  ``timm.create_model("local-dir:DIR")`` then fails with a shape mismatch on ``conv1.weight``.

``pretrained_cfg`` carries the run's preprocessing: ``input_size`` (channels, side), ``mean`` and
``std`` of the run's data normalisation, bilinear resizing without a crop (``crop_pct=1``), as
``pretrain probe`` feeds the tower; so ``timm.data.resolve_data_config`` gives the right transform.
The ViT keeps timm's fixed input size (set ``img_size=...`` to let timm resample the position
embeddings, or ``dynamic_img_size=True``; neither is ours to the last bit: timm resamples with
antialiasing).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from data.common import PathNotFoundError, atomic_dir

from .export_open_clip import ExportFormatError
from .probe import read_run_config

__all__ = ["export_timm", "timm_model_from_export", "ExportFormatError", "VIT_ARCHITECTURES", "RESNET_BACKBONES"]

#: our ViT presets -> the timm architecture whose entry point builds them (``model_args`` set every size)
VIT_ARCHITECTURES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
                     "vit_base": "vit_base_patch16_224"}
#: our ResNets, with timm's architecture of the same name (same block type and stage depths)
RESNET_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
STEM_KEY = "stem_adaptation"
_BAD_NORM = ("--format timm supports BatchNorm ResNets; '{run}' has model.image.norm={norm} (weight-standardised "
             "convolutions with GroupNorm have no timm ResNet equivalent; export it as safetensors)")
_BAD_WIDTH = ("--format timm supports ResNets of base width 64 (timm's ResNet fixes its stem at 64 channels); "
              "'{run}' has model.image.width={width} (export it as safetensors)")


def _supported() -> str:
    return ", ".join([*VIT_ARCHITECTURES, *RESNET_BACKBONES])


def _check_run(run_dir: Path, cfg) -> str:
    """The image tower's backbone name, after the checks that need only the config."""
    from .objectives import objective_class

    if "image" not in objective_class(cfg.objective).towers:
        raise ExportFormatError(f"--format timm exports a run's image tower; '{run_dir}' trained objective "
                                f"'{cfg.objective}', which has none (export it as safetensors)")
    image = cfg.model.image
    if image.backbone not in VIT_ARCHITECTURES and image.backbone not in RESNET_BACKBONES:
        raise ExportFormatError(f"--format timm supports ViT and ResNet image towers ({_supported()}); "
                                f"'{run_dir}' has model.image.backbone={image.backbone} (export it as safetensors)")
    if image.backbone in RESNET_BACKBONES:  # the module is checked again once built (the factory's defaults)
        if image.norm not in ("", "bn"):
            raise ExportFormatError(_BAD_NORM.format(run=run_dir, norm=image.norm))
        if image.width not in (0, 64):
            raise ExportFormatError(_BAD_WIDTH.format(run=run_dir, width=image.width))
    return image.backbone


def _vit_export(vit, run_dir: Path) -> tuple[dict, dict, dict]:
    from models.vit import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise ExportFormatError(f"--format timm: the image tower of '{run_dir}' is a {type(vit).__name__}, "
                                f"not this project's VisionTransformer")
    d = vit.embed_dim
    hidden = vit.blocks[0].mlp.fc1.out_features
    mlp_ratio = hidden / d
    if int(d * mlp_ratio) != hidden:
        raise ExportFormatError(f"--format timm: MLP width {hidden} of '{run_dir}' is no timm mlp_ratio of "
                                f"embed_dim {d}")
    for i, b in enumerate(vit.blocks):
        if b.attn.causal or b.attn.qkv.bias is None or b.mlp.fc1.out_features != hidden:
            raise ExportFormatError(f"--format timm: block {i} of the ViT in '{run_dir}' differs from the "
                                    f"others or from timm's (causal attention, no qkv bias or another MLP width)")
    in_chans = vit.patch_embed.proj.weight.shape[1]
    pool = "avg" if vit.pool == "mean" else "token"
    model_args = {"img_size": vit.image_size, "patch_size": vit.patch_size, "in_chans": int(in_chans),
                  "embed_dim": d, "depth": vit.depth, "num_heads": vit.num_heads, "mlp_ratio": mlp_ratio,
                  "qkv_bias": True, "class_token": True, "global_pool": pool, "fc_norm": False}
    state = {k: v for k, v in vit.state_dict().items() if k != "mask_token"}
    pretrained = {"fixed_input_size": True, "first_conv": "patch_embed.proj", "classifier": "head"}
    return model_args, state, pretrained


def _resnet_export(net, run_dir: Path) -> tuple[dict, dict, dict, dict | None]:
    from models.resnet import ResNet

    if not isinstance(net, ResNet):
        raise ExportFormatError(f"--format timm: the image tower of '{run_dir}' is a {type(net).__name__}, "
                                f"not this project's ResNet")
    if net.norm_type != "bn":
        raise ExportFormatError(_BAD_NORM.format(run=run_dir, norm=net.norm_type))
    if net.width != 64:
        raise ExportFormatError(_BAD_WIDTH.format(run=run_dir, width=net.width))
    model_args = {"in_chans": int(net.in_chans), "global_pool": "avg"}
    adaptation = None
    if net.stem_type == "cifar":
        adaptation = {"stem": "cifar",
                      "conv1": {"type": "Conv2d", "in_channels": int(net.in_chans), "out_channels": net.width,
                                "kernel_size": 3, "stride": 1, "padding": 1, "bias": False},
                      "maxpool": {"type": "Identity"},
                      "how": "timm has no CIFAR stem: build the model with timm.create_model(architecture, "
                             "num_classes=0, **model_args), replace model.conv1 by nn.Conv2d(in_chans, 64, 3, "
                             "stride=1, padding=1, bias=False) and model.maxpool by nn.Identity(), then load "
                             "model.safetensors (pretrain.export_timm.timm_model_from_export does this)"}
    pretrained = {"fixed_input_size": False, "first_conv": "conv1", "classifier": "fc"}
    return model_args, dict(net.state_dict()), pretrained, adaptation


def export_timm(run_dir: str | Path, out_dir: str | Path | None = None, step: int | None = None) -> Path:
    """Write the image tower of ``run_dir`` as a timm model into ``out_dir`` (default
    ``RUN_DIR/timm``), replacing it atomically: ``model.safetensors`` (timm's tensor names, fp32) and
    ``config.json`` (``architecture``, ``num_classes: 0``, ``num_features``, ``global_pool``,
    ``model_args``, ``pretrained_cfg`` with ``input_size``/``mean``/``std``, ``stem_adaptation``
    for a cifar-stem ResNet, and ``ssl_pretrain``: where it came from). ``step``: a checkpoint
    instead of the run's ``weights.safetensors``.

    Load it with ``timm.create_model("local-dir:DIR", pretrained=True)`` or, for every export
    (cifar stems included), :func:`timm_model_from_export`.

    Raises:
        RunDirError: If ``run_dir`` is no run directory (no ``config.yaml``).
        ExportFormatError: For an objective without an image tower, an image tower other than the
            ViTs and ResNets above, or a ResNet timm cannot build (``norm``, ``width``); the
            message names the config key and its value.
    """
    from .batches import image_sizes, schema_of
    from .objectives import objective_class
    from .probe import load_run

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    backbone = _check_run(run_dir, cfg)
    info = schema_of(objective_class(cfg.objective)).dataset(cfg, "test").info
    sizes = image_sizes(cfg, info)
    weights = None
    if step is not None:
        from .export import export_weights

        weights = export_weights(run_dir, step, run_dir / f".timm_step_{step}.safetensors")
    try:
        _, model = load_run(run_dir, cfg, info=info, weights_path=weights)
    finally:
        if weights is not None:
            weights.unlink(missing_ok=True)
    tower = model.tower("image")
    adaptation = None
    if backbone in VIT_ARCHITECTURES:
        arch = VIT_ARCHITECTURES[backbone]
        model_args, state, pretrained = _vit_export(tower, run_dir)
        side = tower.image_size
    else:
        arch = backbone
        model_args, state, pretrained, adaptation = _resnet_export(tower, run_dir)
        side = sizes["image_size"]
    in_chans = model_args["in_chans"]
    mean, std = [float(m) for m in sizes["data_mean"]], [float(s) for s in sizes["data_std"]]
    if len(mean) == 1 and in_chans > 1:
        mean, std = mean * in_chans, std * in_chans
    pretrained_cfg = {"tag": "ssl_pretrain", "custom_load": False, "input_size": [in_chans, side, side],
                      "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center", "mean": mean, "std": std,
                      "num_classes": 0, "pool_size": None, **pretrained}
    config = {"architecture": arch, "num_classes": 0, "num_features": int(tower.embed_dim),
              "global_pool": model_args["global_pool"], "model_args": model_args, "pretrained_cfg": pretrained_cfg}
    if adaptation is not None:
        config[STEM_KEY] = adaptation
    config["ssl_pretrain"] = {"run": str(run_dir), "objective": cfg.objective, "backbone": backbone, "tower": "image",
                              "step": step}
    tensors = {k: (v.float() if v.is_floating_point() else v).detach().contiguous().clone() for k, v in state.items()}
    final = Path(out_dir) if out_dir else run_dir / "timm"
    with atomic_dir(final) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / "model.safetensors"))
    return final


def timm_model_from_export(export_dir: str | Path, num_classes: int = 0, **kwargs) -> nn.Module:
    """The timm model of an :func:`export_timm` folder, its weights loaded strictly.

    Builds ``timm.create_model(architecture, num_classes=0, **model_args, **kwargs)`` (``kwargs``:
    e.g. ``drop_path_rate=0.1``; nothing that changes a tensor's shape), applies the
    ``stem_adaptation`` of a cifar-stem ResNet (``conv1`` -> 3x3 stride-1 convolution, ``maxpool`` ->
    identity), loads ``model.safetensors`` with ``strict=True``, then gives it a new
    ``num_classes``-way classifier when ``num_classes > 0``. ``model.pretrained_cfg`` holds the
    export's preprocessing (``timm.data.resolve_data_config(model=model)``).
    """
    import timm
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    if not (export_dir / "config.json").is_file() or not (export_dir / "model.safetensors").is_file():
        raise PathNotFoundError(f"'{export_dir}' is not a timm export (expected config.json and model.safetensors; "
                                f"write one with: pretrain export --run RUN_DIR --format timm)")
    config = json.loads((export_dir / "config.json").read_text())
    overlay = {**config.get("pretrained_cfg", {}), "hf_hub_id": None, "url": None}  # no weights but these
    model = timm.create_model(config["architecture"], pretrained=False, num_classes=0, pretrained_cfg_overlay=overlay,
                              **{**config["model_args"], **kwargs})
    adaptation = config.get(STEM_KEY)
    if adaptation is not None:
        conv = adaptation["conv1"]
        if adaptation.get("stem") != "cifar" or conv.get("type") != "Conv2d":
            raise ExportFormatError(f"'{export_dir / 'config.json'}': unknown {STEM_KEY} {adaptation}")
        model.conv1 = nn.Conv2d(conv["in_channels"], conv["out_channels"], conv["kernel_size"], stride=conv["stride"],
                                padding=conv["padding"], bias=conv["bias"])
        model.maxpool = nn.Identity()
    model.load_state_dict(load_file(str(export_dir / "model.safetensors")), strict=True)
    if num_classes:
        model.reset_classifier(num_classes)
    return model
