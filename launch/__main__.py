"""``python -m launch ...``: the ``pretrain`` command."""
import sys

from launch.cli import main

sys.exit(main())
