"""Commands the app tests run in other processes: this checkout's caffast, alone or under torchrun."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def checkout_env() -> dict:
    """Subprocesses import this checkout's caffast and compute on one thread, as the in-process
    reference runs do (thread counts may change the last bit of a convolution)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def torchrun(*arguments: str, processes: int = 2) -> list[str]:
    """`arguments` (a script and its arguments, or "-m", "caffast", ...) on `processes` ranks of one machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            *arguments]  # fmt: skip
