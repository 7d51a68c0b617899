"""``python -m crmt_plugin.benchmark``: the same as the ``crmt-benchmark`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
