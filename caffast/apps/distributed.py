"""The processes of one run under torchrun: who is who, and the few collectives a run needs.

Started by torchrun (WORLD_SIZE > 1), the process group is set up from the env:// variables it sets.
The ranks exchange only a few numbers (the plan at the start, a word after every batch, the totals at
the end), so they always talk over gloo, also when they compute on GPUs (each process on the GPU of
its LOCAL_RANK).  Every wait for another rank is bounded by the rank timeout; a rank that does not
answer in time is named in the error.  Started alone, the run is one process and every collective
here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .common import CliError

# Ranks wait for each other after every batch, so this bounds how far one may fall behind the others
# (one batch) plus the start: rank 0 checks the whole output folder while the others wait.
DEFAULT_RANK_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: rank in [0, world_size), and the GPU index on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout: timedelta = DEFAULT_RANK_TIMEOUT

    @property
    def first(self) -> bool:
        """Rank 0: the one that checks the output folder and writes the index."""
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device this process computes on: a bare 'cuda' becomes the GPU of its LOCAL_RANK."""
        return f"cuda:{self.local_rank}" if requested == "cuda" and self.world_size > 1 else requested

    def share(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object), on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        with self._bounded("the start"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def total(self, counts: list[int]) -> list[int]:
        """The element-wise sum of `counts` over all ranks."""
        if self.world_size == 1:
            return list(counts)
        summed = torch.tensor(counts, dtype=torch.int64)
        with self._bounded("the end"):
            dist.all_reduce(summed)
        return [int(value) for value in summed.tolist()]

    def check_in(self, stopped: bool) -> int:
        """Wait for every rank at the end of a batch; returns how many ranks stopped on a problem.  A
        rank that does not come within the timeout is named (rank 0 knows which one)."""
        if self.world_size == 1:
            return int(stopped)
        with self._bounded("the end of a batch"):
            dist.monitored_barrier(timeout=self.timeout, wait_all_ranks=True)
        return self.total([int(stopped)])[0]

    def stop(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    @contextlib.contextmanager
    def _bounded(self, moment: str) -> Iterator[None]:
        """A collective that failed (a rank gone quiet, or gone) becomes a CliError naming the rank."""
        try:
            yield
        except RuntimeError as error:
            late = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(error))
            if late:
                who = f"rank {late.group(1).strip()} did not answer"
            elif self.first:
                who = "another rank stopped answering"
            else:
                who = "rank 0 did not answer (its message names the rank that stopped, if it is another)"
            raise CliError(
                f"rank {self.rank}: {who} at {moment} within --rank-timeout {self.timeout.total_seconds():g} s "
                f"({' '.join(str(error).split())[:200]}); finished images are kept: run the same command again"
            ) from None


def start_processes(device: str, timeout: timedelta = DEFAULT_RANK_TIMEOUT) -> Processes:
    """Join the torchrun process group when there is one (WORLD_SIZE > 1 in the environment)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes(timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://", timeout=timeout)
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank, timeout)
