"""Where each expert's rows sit in the buffer its matmuls run on (:class:`ExpertLayout`).

The layer gathers the routed inputs straight into this buffer and combines straight from
it, so a padded layout costs no extra copies of the activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Group = tuple[tuple[int, ...], int, int]  # (experts, ascending; rows per expert; first row)


@dataclass(frozen=True)
class ExpertLayout:
    """Groups of experts and their rows in the buffer.

    A group of one expert is one matmul on its block of rows. A group of two experts is one
    ``bmm`` over both, each block padded to the larger one's rows: the BLAS spreads the two
    products over its threads, where it splits one product of few rows poorly.
    ``positions`` maps each row sorted by expert to its row in the buffer (None: the buffer
    is the sorted rows themselves, no padding); ``sources`` maps each buffer row to the
    sorted row it reads, a padding row its own expert's last real row (see :meth:`place`).
    """

    groups: list[Group]
    rows: int
    positions: Tensor | None = None
    sources: Tensor | None = None

    @staticmethod
    def contiguous(counts: Sequence[int]) -> ExpertLayout:
        """One expert per group, blocks in expert order: the sorted rows as they are."""
        groups, start = [], 0
        for e, c in enumerate(counts):
            if c:
                groups.append(((e,), c, start))
            start += c
        return ExpertLayout(groups, start)

    @staticmethod
    def paired(counts: Sequence[int], device: torch.device | str = "cpu") -> ExpertLayout:
        """Experts paired with the one nearest in row count (so padding stays small)."""
        by_count = sorted((e for e, c in enumerate(counts) if c), key=lambda e: -counts[e])
        groups, pad_start, row = [], [0] * len(counts), 0
        for i in range(0, len(by_count), 2):
            experts = tuple(sorted(by_count[i : i + 2]))
            rows = max(counts[e] for e in experts)
            for slot, e in enumerate(experts):
                pad_start[e] = row + slot * rows
            groups.append((experts, rows, row))
            row += rows * len(experts)
        counts_t = torch.tensor(counts, device=device)
        starts = torch.cumsum(counts_t, 0) - counts_t
        expert_of_row = torch.repeat_interleave(
            torch.arange(len(counts), device=device), counts_t, output_size=sum(counts)
        )
        shift = torch.tensor(pad_start, device=device) - starts
        positions = torch.arange(sum(counts), device=device) + shift[expert_of_row]
        # each expert's block is its real rows, then its padding: a padding row reads the
        # last real row before it (a running max over the real rows' buffer indices)
        sorted_row = torch.zeros(row, dtype=torch.long, device=device)
        sorted_row[positions] = torch.arange(sum(counts), device=device)
        is_real = torch.zeros(row, dtype=torch.long, device=device)
        is_real[positions] = 1
        last_real = (torch.arange(row, device=device) * is_real).cummax(0).values
        return ExpertLayout(groups, row, positions, sorted_row[last_real])

    def place(self, sorted_values: Tensor) -> Tensor:
        """Values per sorted row at their buffer rows; a padding row repeats its expert's
        last real row, so it computes nothing a real row of that expert does not (no inf or
        NaN of its own), and weighted 0 it adds exactly nothing."""
        if self.sources is None:
            return sorted_values
        return sorted_values.index_select(0, self.sources)  # backward: index_add, not index_put

    def pad(self, sorted_values: Tensor, fill: float = 0) -> Tensor:
        """Values per sorted row placed at their buffer rows; padding rows get ``fill``.
        Differentiable in ``sorted_values``."""
        if self.positions is None:
            return sorted_values
        padded = sorted_values.new_full((self.rows, *sorted_values.shape[1:]), fill)
        return padded.index_copy(0, self.positions, sorted_values)

    def unpad(self, buffer_values: Tensor) -> Tensor:
        """The buffer's rows back in sorted order, padding rows dropped."""
        return (
            buffer_values
            if self.positions is None
            else buffer_values.index_select(0, self.positions)
        )
