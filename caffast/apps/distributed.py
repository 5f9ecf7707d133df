"""The processes of one run under torchrun: who is who, and the few collectives a run needs.

Started by torchrun (WORLD_SIZE > 1), the process group is set up from the env:// variables it sets:
gloo for CPU runs, nccl for CUDA runs (each process on the GPU of its LOCAL_RANK).  Started alone, the
run is one process and every collective here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Ranks wait for each other only at the start and at the end; a rank whose share was mostly done
# already may wait for hours at the end, and torchrun stops every rank when one of them fails.
WAIT_LIMIT = timedelta(days=7)


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: rank in [0, world_size), and the GPU index on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def first(self) -> bool:
        """Rank 0: the one that checks the output folder and writes the index."""
        return self.rank == 0

    @property
    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def device(self, requested: str) -> str:
        """The device this process computes on: a bare 'cuda' becomes the GPU of its LOCAL_RANK."""
        return f"cuda:{self.local_rank}" if requested == "cuda" and self.world_size > 1 else requested

    def share(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object), on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._collective_device)
        return box[0]

    def total(self, counts: list[int]) -> list[int]:
        """The element-wise sum of `counts` over all ranks."""
        if self.world_size == 1:
            return list(counts)
        summed = torch.tensor(counts, dtype=torch.int64, device=self._collective_device)
        dist.all_reduce(summed)
        return [int(value) for value in summed.tolist()]

    def stop(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def start_processes(device: str) -> Processes:
    """Join the torchrun process group when there is one (WORLD_SIZE > 1 in the environment)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", timeout=WAIT_LIMIT)
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank, backend)
