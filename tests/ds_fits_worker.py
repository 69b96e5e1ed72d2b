"""A deepspeed-launched worker that trains several runs in one launch (one process group, started once).

    deepspeed --num_gpus 2 tests/ds_fits_worker.py RUNS.json

``RUNS.json`` holds a list of argument lists, each what ``pretrain fit`` takes (``--recipe``,
``key=value``); they are trained one after another by every rank, as ``launch/train.py`` trains one.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.cli import main  # noqa: E402
from pretrain.engines import shutdown_distributed  # noqa: E402

if __name__ == "__main__":
    path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
    with open(path) as f:
        runs = json.load(f)
    code = 1
    try:
        for args in runs:
            code = main(["fit", *args])
            if code != 0:
                break
    finally:
        shutdown_distributed(wait=code == 0)
    sys.exit(code)
