"""Issue 5's fidelity figure: the share of code cells that behave the same under ``%%gpu`` as run locally.

    python benchmarks/notebook_fidelity.py [NOTEBOOK ...] [--json report.json]

runs each notebook (default: every one in tests/notebooks) plainly twice and once with every code
cell under ``%%gpu``, on the embedded default, and prints the per-notebook table and every differing
cell. The harness is tests/differential.py; the pytest form is tests/integration/test_differential.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from differential import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
