"""Multi-process training under torchrun: process group, device, and each rank's share of a global batch.

Every rank draws the same seeded global batch and keeps its own contiguous slice, so the data order (and with it
the result) matches a single-process run of the same --batch-size; DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from craft_deploy import CraftError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch."""
        if self.world == 1:
            return x
        if len(x) % self.world:
            raise CraftError(f"--batch-size {len(x)} must be a multiple of the {self.world} processes")
        per = len(x) // self.world
        return x[self.rank * per : (self.rank + 1) * per]


def setup(device: str | None = None) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1), gloo on CPU and nccl on CUDA; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        if local >= torch.cuda.device_count():
            raise CraftError(
                f"process {local} of torchrun has no GPU: {torch.cuda.device_count()} visible; start at most that many "
                "(--nproc_per_node) or train on the CPU with --device cpu (gloo)"
            )
        torch.cuda.set_device(dev)
    if world == 1:
        return Dist(device=dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=dev)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
