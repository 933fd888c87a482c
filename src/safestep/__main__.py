"""``python -m safestep``: the same command line as the ``safestep`` script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
