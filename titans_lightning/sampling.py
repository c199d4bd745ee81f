"""Which sequences each rank trains on. Imports nothing of the memory or the model, so that a
datamodule can use it without loading them."""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler


def world_size() -> int:
    """Processes in the default group; 1 when torch.distributed is not running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class RankMajorSampler(DistributedSampler):
    """This rank's part of each global batch: rank r gets sequences ``r*B .. (r+1)*B - 1`` of
    every block of W * B consecutive indices of one permutation (``seed + epoch``, identical on
    all ranks; Lightning calls ``set_epoch``).

    So W ranks with batch size B see, step by step, the sequences a single process with batch
    size W * B sees with the same sampler at ``num_replicas=1``. As for ``DistributedSampler``,
    the permutation is padded with its first indices to a multiple of W, and the last, short
    global batch is split evenly.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int | None = None,
                 rank: int | None = None, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        order = (order * math.ceil(self.total_size / n))[:self.total_size]
        W, step = self.num_replicas, self.batch_size * self.num_replicas
        mine: list[int] = []
        for start in range(0, self.total_size, step):
            block = order[start:start + step]
            share = len(block) // W  # B, or less in the last block
            mine += block[self.rank * share:(self.rank + 1) * share]
        return iter(mine)
