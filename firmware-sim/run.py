#!/usr/bin/env python3
"""Run the simulated fleet straight from a checkout: python firmware-sim/run.py --devices 3."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the millrace package, for its error types

from fieldsim.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
