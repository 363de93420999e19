"""`cm3eval` with the echo predictor injected, as a script (torchrun needs a file to run):
`python tests/echo_cli.py run ...` == `cm3eval run ...` with fixtures.make_echo as the predictor."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evals.cli import main  # noqa: E402
from fixtures import make_echo  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], predictor_factory=make_echo))
