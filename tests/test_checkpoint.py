"""Checkpoints survive a process killed mid-save; retention; export of every engine's checkpoints."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from pretrain.checkpoint import latest_checkpoint, list_checkpoints, read_meta, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _write(value):
    def write(d):
        torch.save({"w": torch.full((3,), float(value))}, d / "state.pt")
    return write


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "writing"
    script = tmp_path / "saver.py"
    script.write_text(f"""
import sys, time, torch
sys.path.insert(0, {str(ROOT)!r})
from pretrain.checkpoint import save_checkpoint

def ok(d):
    torch.save({{"w": torch.ones(3)}}, d / "state.pt")

def slow(d):  # a large state being written when the job is killed
    with open(d / "state.pt", "wb") as f:
        f.write(b"half a checkpoint")
        f.flush()
        open({str(marker)!r}, "w").close()
        time.sleep(120)

save_checkpoint({str(run)!r}, 1, ok, {{"config": {{}}}})
save_checkpoint({str(run)!r}, 2, slow, {{"config": {{}}}})
""")
    proc = subprocess.Popen([sys.executable, str(script)])
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, "saver exited early"
        assert time.time() - t0 < 120, "saver never reached the second save"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = latest_checkpoint(run)
    assert ckpt == run / "checkpoints" / "step_1"
    assert torch.equal(torch.load(ckpt / "state.pt")["w"], torch.ones(3))
    assert read_meta(ckpt)["step"] == 1
    assert not (run / "checkpoints" / "step_2").exists()
    # the next save clears what the killed one left behind
    save_checkpoint(run, 3, _write(3), {})
    assert [s for s, _ in list_checkpoints(run)] == [1, 3]
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_keep_last(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, _write(step), {}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    save_checkpoint(tmp_path, 5, _write(50), {}, keep_last=2)  # same step again replaces it
    assert torch.load(latest_checkpoint(tmp_path) / "state.pt")["w"][0] == 50


def test_export_plain_checkpoint(tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "launch", "fit", "--recipe", "launch/recipes/simclr_mnist5k.yaml",
                        "data=digits", "image_size=16", "model.width=8", "batch_size=32", "max_steps=2",
                        "precision=fp32", "progress=false", "checkpoint_every=1", "keep_last=3", f"run_dir={run}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "launch", "export", "--run", str(run), "--step", "1", "--out",
                        str(tmp_path / "s1.safetensors")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    w1, w2 = load_file(str(tmp_path / "s1.safetensors")), load_file(str(run / "weights.safetensors"))
    assert set(w1) == set(w2)
    assert not torch.equal(w1["backbone.conv1.weight"], w2["backbone.conv1.weight"])  # step 1 != step 2
    r = subprocess.run([sys.executable, "-m", "launch", "export", "--run", str(run), "--step", "7"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no checkpoint for step 7" in r.stderr and "available steps: [1, 2]" in r.stderr
