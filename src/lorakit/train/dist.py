"""Everything that differs between one process and many, in one place.

The loop asks this object how to wrap the model, which examples this process sees in an epoch,
and whether it is the process that writes files. Today it is one process; torchrun/DDP/FSDP
(issue 7) plugs in here: `from_env` reads RANK/WORLD_SIZE and initialises the process group,
`wrap` returns DDP(model) or FSDP(model), `reduce_mean` all-reduces, `barrier` waits; the loop
does not change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LoraError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != 1:
            raise LoraError(f"WORLD_SIZE={world}: multi-process training is not supported yet; run one process")
        return cls()

    @property
    def is_main(self) -> bool:
        """Only this process writes checkpoints, adapters, metrics and plots, and shows progress."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls forward on (DDP/FSDP wrapping goes here)."""
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def epoch_order(self, n: int, epoch: int, seed: int) -> list[int]:
        """This process's example indices for `epoch`: a shuffle that depends only on (seed, epoch),
        never on the global RNG, so a resumed run sees the same order; rank r takes every
        world_size-th index (DistributedSampler's rule)."""
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        return order[self.rank::self.world_size]

    def reduce_mean(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        return None
