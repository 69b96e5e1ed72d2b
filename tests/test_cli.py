"""End-to-end runs of the ``pretrain`` command on real (tiny) data."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data=digits", "image_size=16", "model.width=8", "batch_size=32", "precision=fp32", "log_every=1",
        "progress=false", "byol.proj_hidden=64", "byol.pred_hidden=64", "simclr.proj_dim=32"]


def pretrain(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "launch", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"pretrain {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def metrics(run):
    return [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_fit_leaves_a_complete_run_directory_and_probes(tmp_path):
    run = tmp_path / "run"
    pretrain("fit", "--recipe", "launch/recipes/byol_mnist5k.yaml", *TINY, "max_steps=4", f"run_dir={run}")
    for name in ("config.yaml", "metrics.jsonl", "weights.safetensors", "loss_curve.png", "train_summary.json"):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("step_4/state.pt"))
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert list((run / "tb").iterdir()), "no TensorBoard event files"
    r = pretrain("probe", "--run", run, "--probe", "knn", "--quiet")
    assert "raw pixels" in r.stdout and "random init" in r.stdout and "byol (resnet18, trained)" in r.stdout
    res = json.loads((run / "probes.json").read_text())
    assert set(res["rows"]) == {"byol (resnet18, trained)", "resnet18, random init", "raw pixels"}
    assert all(0.0 <= v["knn"]["test_acc"] <= 1.0 for v in res["rows"].values())
    assert res["rows"]["raw pixels"]["knn"]["test_acc"] > 0.9  # real digits: pixels k-NN is strong
    assert (run / "probes.md").read_text().startswith("| features |")


def test_resume_continues_the_same_loss_curve(tmp_path):
    common = ["--recipe", "launch/recipes/byol_mnist5k.yaml", *TINY, "max_steps=20", "optim.warmup_steps=3"]
    pretrain("fit", *common, f"run_dir={tmp_path / 'straight'}")
    pretrain("fit", *common, f"run_dir={tmp_path / 'stopped'}", "stop_at=10")
    assert [r["step"] for r in metrics(tmp_path / "stopped")][-1] == 10
    pretrain("fit", "--resume", tmp_path / "stopped")
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "stopped")
    assert [r["step"] for r in b] == list(range(1, 21))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-7), ra["step"]
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-9)


@pytest.mark.parametrize("args,needles", [
    (["objective=byl"], ["unknown objective 'byl'", "valid objectives: beit_v2, byol, clip, data2vec2, simclr"]),
    (["model.backbone=resnet19"], ["unknown backbone 'resnet19'", "resnet18, resnet34, resnet50"]),
    (["data=mnist"], ["unknown dataset 'mnist'", "mnist5k"]),
    (["max_stepz=3"], ["unknown config key 'max_stepz'", "max_steps"]),
    (["data=folder:/no/such/dir"], ["data path '/no/such/dir' does not exist"]),
])
def test_bad_input_is_one_clear_line(tmp_path, args, needles):
    r = pretrain("fit", *TINY, "max_steps=1", f"run_dir={tmp_path / 'x'}", *args, check=False)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0]
    assert "Traceback" not in r.stderr


def test_folder_with_corrupt_image_trains_and_counts_the_skip(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG truncated garbage")
    run = tmp_path / "run"
    r = pretrain("fit", "--recipe", "launch/recipes/simclr_folder.yaml", f"data=folder:{root}", "image_size=16",
                 "model.width=8", "batch_size=8", "max_steps=5", "precision=fp32", "progress=false", f"run_dir={run}",
                 "simclr.proj_dim=16")
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["skipped_files"] == 1 and summary["skipped"][0].endswith("broken.png")
    assert "skipped 1 unreadable or unusable file" in r.stdout
    assert "broken.png" in r.stderr  # the warning names the file


def test_list_and_help():
    out = pretrain("list").stdout
    assert "byol" in out and "simclr" in out and "resnet18" in out and "mnist5k" in out and "folder:PATH" in out
    assert "tuxpaint" in out and "pairs:FILE" in out and "clip_bpe" in out
    h = pretrain("--help").stdout
    for sub in ("fit", "probe", "demo", "list"):
        assert sub in h


def test_batch_of_only_corrupt_files_is_skipped_not_fatal(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
        for i in range(8):
            (root / c / f"bad{i}.png").write_bytes(b"broken")
    run = tmp_path / "run"
    pretrain("fit", "--recipe", "launch/recipes/simclr_folder.yaml", f"data=folder:{root}", "image_size=16",
             "model.width=8", "batch_size=2", "max_steps=6", "precision=fp32", "progress=false", f"run_dir={run}",
             "simclr.proj_dim=16")
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["skipped_files"] >= 4
