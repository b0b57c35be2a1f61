"""``python -m fastvit.train`` (and ``torchrun ... -m fastvit.train``): see ``fastvit.train``."""

import sys

from .loop import main

if __name__ == "__main__":
    sys.exit(main())
