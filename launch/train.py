"""Entry point for the deepspeed launcher.

    deepspeed --num_gpus 2 launch/train.py --recipe launch/recipes/simclr_mnist5k.yaml engine=deepspeed
    deepspeed --hostfile launch/hostfile.example launch/train.py --recipe ... engine=deepspeed deepspeed.zero_stage=2

Takes the same arguments as ``pretrain fit`` (``--recipe``, ``--resume RUN_DIR``, ``key=value``).
The project must be installed (``pip install -e .``) so that its packages import from anywhere.
"""
import sys

from launch.cli import main
from pretrain.engines import shutdown_distributed

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    code = 1
    try:
        code = main(["fit", *args])
    finally:
        # after a failure the launcher stops the other ranks: no barrier then, only the buffer is removed
        shutdown_distributed(wait=code == 0)
    sys.exit(code)
