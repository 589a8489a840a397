"""Data ranks: the data order of a run, independent of how many processes train it.

A run fixes its number of *data ranks* D when it starts (its world size then). Data rank l has
its own loader (`build_loader(rank=l, world_size=D)`); one optimizer step consumes `grad_accum`
micro-batches j of every data rank, and micro-batch (l, j) draws its timesteps and noise from
its own generator (j = 0: the rank generator of l, as a run of D processes has always had), so
the global batch, the sample order and the noise depend on D alone. P processes train it:

- P = D: process p is data rank p (the ordinary run, unchanged).
- P < D (D = kP): process p hosts data ranks p*k .. p*k+k-1 and runs k x grad_accum micro-batches
  per step, data rank by data rank inside each accumulation index.
- P > D (P = kD, grad_accum divisible by k): the k processes p = l*k + i share data rank l;
  each reads l's loader (so every one knows its position, at the cost of decoding the others'
  batches too) and keeps the micro-batches j with j mod k = i.

The gradient of a step is the mean over the same D x grad_accum micro-batches, with the same
noise, in every layout; only the order of the floating-point sums differs.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A world size the run's data ranks cannot be spread over."""


@dataclass(frozen=True, kw_only=True)
class DataLayout:
    data_ranks: int
    """D: data ranks of the run (its world size when it started)."""
    world_size: int
    """P: processes training it now."""
    rank: int
    """This process."""
    grad_accum: int
    """Micro-batches per step of each data rank (`train.grad_accum`)."""

    def __post_init__(self) -> None:
        d, p, g = self.data_ranks, self.world_size, self.grad_accum
        if d % p and p % d:
            raise LayoutError(
                f"the run has {d} data ranks; {p} ranks cannot share them evenly "
                f"(resume on a divisor or a multiple of {d})"
            )
        if p > d and g % (p // d):
            raise LayoutError(
                f"the run has {d} data ranks x train.grad_accum={g} micro-batches per step; {p} ranks would need "
                f"grad_accum divisible by {p // d} (resume on at most {d * g} ranks that divide it)"
            )

    @property
    def share(self) -> int:
        """Processes per data rank (1 unless P > D)."""
        return max(1, self.world_size // self.data_ranks)

    @property
    def accum(self) -> int:
        """Micro-batches this process runs per step (DeepSpeed's gradient_accumulation_steps)."""
        return self.grad_accum * self.data_ranks // self.world_size

    def owner(self, data_rank: int, micro: int) -> int:
        """The process that trains micro-batch `micro` of data rank `data_rank`."""
        if self.world_size <= self.data_ranks:
            return data_rank // (self.data_ranks // self.world_size)
        return data_rank * self.share + micro % self.share

    def hosted(self) -> list[int]:
        """Data ranks whose loader this process reads."""
        return [rank for rank in range(self.data_ranks) if any(self.owner(rank, j) == self.rank for j in range(self.grad_accum))]

    def carried(self) -> list[int]:
        """Data ranks whose loader state this process saves (one process per data rank)."""
        return [rank for rank in self.hosted() if self.owner(rank, 0) == self.rank]

    def schedule(self) -> list[tuple[int, int, bool]]:
        """(data rank, micro index, kept) of every batch this process reads in one step, in order."""
        return [
            (rank, micro, self.owner(rank, micro) == self.rank)
            for micro in range(self.grad_accum)
            for rank in self.hosted()
        ]

    def streams(self) -> list[tuple[int, int]]:
        """(data rank, micro index) of the micro-batches this process trains, in order."""
        return [(rank, micro) for rank, micro, kept in self.schedule() if kept]


def stream_key(data_rank: int, micro: int) -> str:
    """The name of micro-batch (data rank, micro index)'s generator in the rank state: 'l' for
    the first micro-batch, 'l.j' for the others."""
    return str(data_rank) if micro == 0 else f"{data_rank}.{micro}"
