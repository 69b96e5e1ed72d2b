"""Gradient accumulation and clipping in both engines, and a two-node DeepSpeed launch (two
launchers joined through a hostfile, ``--no_ssh``) on this one machine.

The model is a linear regression whose loss is a per-sample mean, so accumulating micro-batches
must give exactly the update of one large batch (unlike batch-norm nets or contrastive losses,
whose loss depends on how the batch is split).
"""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_helpers import find_free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ds_engine_worker import MICRO, Regression, global_batches  # noqa: E402

from pretrain.engines import PlainEngine  # noqa: E402
from pretrain.schedules import LRSchedule, warmup_cosine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
WORKER = "tests/ds_engine_worker.py"
STEPS = 5


def run_plain(global_batch: int, accum: int, clip: float, steps: int = STEPS):
    """Weights, LRs and boundary flags after ``steps`` optimizer steps, each over ``global_batch``
    samples split into ``accum`` micro-batches."""
    model = Regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = PlainEngine(model, opt, LRSchedule(opt, 0.05, steps, 2, 0.1), grad_accum=accum, grad_clip=clip)
    lrs, boundaries, norms = [], [], []
    micro = global_batch // accum
    for x, y in global_batches(steps, global_batch):
        engine.train_step([{"x": x[a * micro:(a + 1) * micro], "y": y[a * micro:(a + 1) * micro]}
                           for a in range(accum)])
        boundaries.append(engine.steps)
        lrs.append(engine.lr)
        norms.append(engine.last_grad_norm)
    return {"weight": model.lin.weight.detach().flatten().tolist(), "bias": model.lin.bias.detach().tolist(),
            "lrs": lrs, "boundaries": boundaries, "norms": norms}


def close(a, b, tol):
    for key in ("weight", "bias", "lrs"):
        assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), key


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_plain_accumulation_equals_one_large_batch(clip):
    big = run_plain(16, 1, clip)
    acc = run_plain(16, 4, clip)
    close(acc, big, 1e-6)
    assert acc["boundaries"] == list(range(1, STEPS + 1))  # one optimizer step per train_step
    # the schedule counts optimizer steps, not micro-batches
    assert acc["lrs"] == pytest.approx([0.05 * warmup_cosine(i + 1, STEPS, 2, 0.1) for i in range(STEPS)])


def test_plain_clipping_bounds_the_update():
    free = run_plain(16, 2, 0.0, steps=1)
    clipped = run_plain(16, 2, 0.5, steps=1)
    norm = clipped["norms"][0]
    assert norm > 0.5  # the test data has large gradients, so clipping is active
    w0 = Regression()
    p0 = torch.cat([w0.lin.weight.detach().flatten(), w0.lin.bias.detach()])
    step_free = torch.tensor(free["weight"] + free["bias"]) - p0
    step_clip = torch.tensor(clipped["weight"] + clipped["bias"]) - p0
    lr = 0.05 * 0.5  # warmup step 1 of 2
    assert float(step_free.norm()) == pytest.approx(lr * norm, rel=1e-5)  # SGD: update = lr * grad
    assert float(step_clip.norm()) == pytest.approx(lr * 0.5, rel=1e-5)  # clipped to max norm 0.5
    assert torch.allclose(step_clip / step_clip.norm(), step_free / step_free.norm(), atol=1e-6)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _result(path):
    return json.loads(Path(path).read_text())


@pytest.mark.parametrize("stage,clip", [(0, 0.5), (2, 0.5), (1, 0.0)])
def test_deepspeed_accumulation_and_clipping_match_one_process(tmp_path, stage, clip):
    out = tmp_path / "ds.json"
    port = str(find_free_port())
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", port, WORKER,
           str(out), str(stage), "2", str(clip), str(STEPS)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the CPU backend's shared-memory buffers (66 MB per rank) are removed at shutdown
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    got = _result(out)
    assert got["world"] == 2
    assert got["boundaries"] == [STEPS]
    close(got, run_plain(MICRO * 2 * 2, 1, clip), 1e-5)  # 2 ranks x 2 micro-batches x MICRO


def test_two_node_hostfile_launch_without_ssh(tmp_path):
    """Two launchers, one per 'node' of a hostfile, joined over TCP as DeepSpeed does across machines
    (``--no_ssh``: each machine starts its own launcher with its ``--node_rank``)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out = tmp_path / "ds.json"
    port = str(find_free_port())
    procs = []
    for node in (0, 1):
        cmd = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", port, WORKER, str(out), "1", "2", "0", str(STEPS)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=_env()))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    got = _result(out)
    assert got["world"] == 2
    close(got, run_plain(MICRO * 2 * 2, 1, 0.0), 1e-5)
