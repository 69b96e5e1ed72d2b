"""A deepspeed-launched worker that walks cells of the parallelism support matrix in one launch.

    deepspeed --num_gpus 2 tests/ds_matrix_worker.py CELLS.json OUT.json

``CELLS.json`` is a list of ``{"name": ..., "args": [key=value, ...], "recipe": optional path}``;
every rank trains each cell in turn (as ``pretrain fit`` would) and rank 0 writes ``OUT.json``:
``{name: "ok"}`` for a cell that trained, ``{name: "refused: <message>"}`` for one that stopped with
a user error (a refusal is raised on every rank alike, before any rank starts work).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.common import UserError  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.engines import shutdown_distributed  # noqa: E402
from pretrain.loop import fit, process_rank  # noqa: E402

if __name__ == "__main__":
    cells_path, out_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][:2]
    with open(cells_path) as f:
        cells = json.load(f)
    results = {}
    for cell in cells:
        try:
            fit(load_config(cell.get("recipe"), cell["args"]))
            results[cell["name"]] = "ok"
        except UserError as exc:
            results[cell["name"]] = f"refused: {exc}"
        if process_rank() == 0:
            with open(out_path, "w") as f:
                json.dump(results, f, indent=1)
    shutdown_distributed()
