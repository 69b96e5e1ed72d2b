"""A CLIP run as an open_clip model: ``open_clip_config.json`` and ``open_clip_model.safetensors``
in one folder, which ``open_clip.create_model("local-dir:FOLDER")`` loads.

Supported: a ``clip`` run whose image tower is a ViT (``vit_tiny/small/base``, any size, patch and
depth, class-token or mean pooling) and whose text tower is the CLIP text transformer over
``clip_bpe`` tokens. The mapping is exact, not approximate:

* blocks: ``norm1/norm2 -> ln_1/ln_2``, the fused ``qkv`` -> ``attn.in_proj_*`` (same q, k, v
  order), ``attn.proj -> attn.out_proj``, ``mlp.fc1/fc2 -> mlp.c_fc/c_proj``; LayerNorm eps 1e-6
  is recorded in ``norm_kwargs``;
* image: open_clip's patch convolution has no bias, so ours is added to the patch positions
  (it is added to every patch token before the blocks either way); no ``ln_pre``; the final norm is
  ``ln_post`` and the projection ``visual.proj`` (transposed);
* text: pooled at the end-of-text token in both (open_clip's ``argmax`` finds it: 49407 is the
  largest id of the vocabulary); ``text_projection`` is our projection transposed;
* ``logit_scale`` (and SigLIP's ``logit_bias``) as they are.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from data.common import UserError, atomic_dir

from .probe import read_run_config

__all__ = ["export_open_clip", "ExportFormatError"]

VIT_BACKBONES = ("vit_tiny", "vit_small", "vit_base")
TEXT_BACKBONES = ("text_tiny", "text_small", "text_base")


class ExportFormatError(UserError, ValueError):
    """The run cannot be written in the format asked for."""


def _blocks(state: dict, src: str, dst: str, depth: int) -> dict:
    out = {}
    names = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
             "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(depth):
        for k, v in state.items():
            prefix = f"{src}.blocks.{i}."
            if not k.startswith(prefix):
                continue
            rest = k[len(prefix):]
            for a, b in names.items():
                if rest == a or rest.startswith(a + "."):
                    out[f"{dst}.resblocks.{i}.{b}{rest[len(a):]}"] = v
                    break
            else:
                raise ExportFormatError(f"open_clip export: no open_clip name for tensor '{k}'")
    return out


def export_open_clip(run_dir: str | Path, out_dir: str | Path | None = None, step: int | None = None) -> Path:
    """Write ``run_dir``'s CLIP model in open_clip's format into ``out_dir`` (default
    ``RUN_DIR/open_clip``), replacing it atomically. ``step``: a checkpoint instead of the run's
    ``weights.safetensors``.

    Raises:
        ExportFormatError: For runs other than ``clip`` with a ViT image tower and the CLIP text
            transformer over ``clip_bpe`` tokens (the message says what the run has).
    """
    from .probe import load_run

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    image, text = cfg.model.image, cfg.model.text
    if cfg.objective != "clip":
        raise ExportFormatError(f"--format open_clip exports clip runs; '{run_dir}' trained objective "
                                f"'{cfg.objective}' (use the default format, safetensors)")
    if image.backbone not in VIT_BACKBONES:
        raise ExportFormatError(f"--format open_clip supports ViT image towers ({', '.join(VIT_BACKBONES)}); "
                                f"'{run_dir}' has model.image.backbone={image.backbone} (export it as safetensors)")
    if text.backbone not in TEXT_BACKBONES or cfg.tokenizer.name != "clip_bpe":
        raise ExportFormatError(f"--format open_clip needs the CLIP text transformer ({', '.join(TEXT_BACKBONES)}) "
                                f"over tokenizer.name=clip_bpe; '{run_dir}' has model.text.backbone={text.backbone}, "
                                f"tokenizer.name={cfg.tokenizer.name}")
    weights = None
    if step is not None:
        from .export import export_weights

        weights = export_weights(run_dir, step, run_dir / f".open_clip_step_{step}.safetensors")
    try:
        _, model = load_run(run_dir, cfg, weights_path=weights)
    finally:
        if weights is not None:
            weights.unlink(missing_ok=True)
    vit, txt = model.tower("image"), model.tower("text")
    if vit.patch_embed.proj.weight.shape[1] != 3:
        raise ExportFormatError(f"--format open_clip needs RGB images; the image tower of '{run_dir}' takes "
                                f"{vit.patch_embed.proj.weight.shape[1]} channels")
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    out = {"visual.class_embedding": sd["backbone.cls_token"].reshape(-1),
           "visual.conv1.weight": sd["backbone.patch_embed.proj.weight"],
           "visual.ln_post.weight": sd["backbone.norm.weight"], "visual.ln_post.bias": sd["backbone.norm.bias"],
           "visual.proj": sd["image_proj.weight"].T.contiguous(),
           "token_embedding.weight": sd["text_tower.token_embed.weight"],
           "positional_embedding": sd["text_tower.pos_embed"][0],
           "ln_final.weight": sd["text_tower.norm.weight"], "ln_final.bias": sd["text_tower.norm.bias"],
           "text_projection": sd["text_proj.weight"].T.contiguous(),
           "logit_scale": sd["logit_scale"].reshape(())}
    pos = sd["backbone.pos_embed"][0].clone()
    pos[1:] += sd["backbone.patch_embed.proj.bias"]  # open_clip's conv1 has no bias: fold it into the patches
    out["visual.positional_embedding"] = pos
    out.update(_blocks(sd, "backbone", "visual.transformer", vit.depth))
    out.update(_blocks(sd, "text_tower", "transformer", len(txt.blocks)))
    siglip = model.cfg.loss == "siglip"
    if siglip:
        out["logit_bias"] = sd["logit_bias"].reshape(())
    width = vit.embed_dim
    vision_cfg = {"image_size": vit.image_size, "patch_size": vit.patch_size, "width": width, "layers": vit.depth,
                  "head_width": width // vit.num_heads, "mlp_ratio": 4.0, "no_ln_pre": True,
                  "pool_type": "avg" if vit.pool == "mean" else "tok", "patch_dropout": vit.patch_dropout,
                  "norm_kwargs": {"eps": 1e-6}}
    text_cfg = {"context_length": txt.context_length, "vocab_size": txt.vocab_size, "width": txt.width,
                "heads": txt.heads, "layers": len(txt.blocks), "norm_kwargs": {"eps": 1e-6}}
    model_cfg = {"embed_dim": model.cfg.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if siglip:
        model_cfg["init_logit_bias"] = float(out["logit_bias"])
    from data.pairs import CLIP_MEAN, CLIP_STD

    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                                 "resize_mode": "shortest"},
              "ssl_pretrain": {"run": str(run_dir), "objective": cfg.objective, "step": step}}
    final = Path(out_dir) if out_dir else run_dir / "open_clip"
    with atomic_dir(final) as tmp:
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in out.items()}, str(tmp / "open_clip_model.safetensors"))
    return final
