"""``python -m sam_optax``: the ``sam-optax`` command line."""

import sys

from sam_optax.experiments.cli import main

if __name__ == "__main__":
  sys.exit(main())
