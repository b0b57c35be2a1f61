"""``python -m fastvit``: the ``fastvit`` command line (see ``fastvit.cli``)."""

import sys

from fastvit.cli import main

if __name__ == "__main__":
    sys.exit(main())
