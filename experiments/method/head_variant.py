"""``crmt-benchmark`` with the CRMT recipes' head changed where the CLI has no flag for it.

    python experiments/method/head_variant.py --no-shared-scale --data runs/benchmark-data/fou-zer.npz \
        --methods crmt-jt --integration-init 0.1 --seeds 0 1 2 --out runs/sweep/fou-zer/h-s0-i0.1 --threads 1

``--no-shared-scale`` gives every CRMT recipe but ``paper-crmt-jt`` (which never has it) the paper's head,
a = softplus(alpha) without the shared scale; every other flag goes to ``crmt-benchmark`` unchanged (the
initial a has its own flag there, ``--integration-init``). Used for docs/method.md, "The initial a".
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from crmt_plugin.benchmark import cli, recipes  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--no-shared-scale" in argv:
        argv.remove("--no-shared-scale")
        recipes.SHARED_SCALE = ()  # the recipes then build CRMTWrapper(..., shared_scale=False)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
