"""`python -m faceid.train` is `faceid train` (faceid.cli_train), the command the service's job
runner starts. Imported, this module is the training API: `run` and `Trainer` (faceid.trainer),
`RunResult` (faceid.run_state) and `check_before_launch` (faceid.preflight).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # faceid.cli_train sets how idle OpenMP threads wait before torch is imported (faceid/omp.py)
    from faceid.cli_train import train_main

    sys.exit(train_main())

from faceid.preflight import check_before_launch
from faceid.run_state import RunResult
from faceid.trainer import Trainer, run

__all__ = ["RunResult", "Trainer", "check_before_launch", "run"]
