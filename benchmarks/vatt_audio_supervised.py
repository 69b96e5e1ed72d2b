"""Can VATT's audio tower learn the spoken digits at all? A supervised check of its two front ends.

    python -m benchmarks.vatt_audio_supervised [--steps 800] [--out FILE.md]

The moving-digits clips' sounds (0.5 s at 8 kHz, the recipe's), each front end of
:class:`models.vatt.AudioTokenizer` (raw-waveform patches, log-mel frames) in the recipe's VATT
backbone (2 blocks 64 wide; its audio path: tokens, aggregation token, transformer, pooled
output) with a linear head, trained with labels
(cross-entropy, AdamW, batch 64) on the train clips; accuracy on the test clips, whose sounds
are spoken by voices never heard in training. This is the ceiling the contrastive objective
works towards without labels: it says whether a front end can represent the digits, apart from
how fast the video-audio loss finds them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SAMPLE_RATE, SAMPLES, PATCH, DIM = 8000, 4000, 128, 64


def clip_audio(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every clip's audio ``[N, SAMPLES]`` and digit ``[N]`` of a moving-digits split."""
    from data.clips import build_clips

    ds = build_clips("moving_digits", split, image_size=16, frames=2, sample_rate=SAMPLE_RATE, audio_samples=SAMPLES)
    items = [ds[i] for i in range(len(ds))]
    items = [it for it in items if "skip" not in it]
    return torch.stack([it["audio"] for it in items]).float(), torch.tensor([it["label"] for it in items])


class AudioClassifier(nn.Module):
    """The recipe's VATT backbone (``vatt_tiny``, 2 blocks 64 wide) on audio alone, and a linear head."""

    def __init__(self, frontend: str):
        super().__init__()
        from models import create_backbone

        self.vatt = create_backbone("vatt_tiny", frames=4, image_size=16, patch_size=4, tubelet=1,
                                    audio_samples=SAMPLES, audio_patch=PATCH, vocab_size=256, context_length=8,
                                    depth=2, embed_dim=DIM, num_heads=2, audio_frontend=frontend,
                                    sample_rate=SAMPLE_RATE)
        self.head = nn.Linear(DIM, 10)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.head(self.vatt.forward_pooled(audio, "audio"))


def train_and_test(frontend: str, train, test, steps: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = AudioClassifier(frontend)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(train[0]), (64,), generator=g)
        loss = F.cross_entropy(model(train[0][idx]), train[1][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = lambda x, y: float((model(x).argmax(1) == y).float().mean())  # noqa: E731
        return {"frontend": frontend, "train": acc(train[0][:1000], train[1][:1000]), "test": acc(*test),
                "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    train, test = clip_audio("train"), clip_audio("test")
    rows = [train_and_test(f, train, test, args.steps) for f in ("waveform", "logmel")]
    lines = ["| audio front end | train accuracy | held-out voices accuracy | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['frontend']} | {100 * r['train']:.1f} | {100 * r['test']:.1f} | {r['seconds']:.0f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
