"""Expert subsets: upstream distill.py's `--max_files` / `--max_experts` ablation knobs.

Upstream reads at most `max_files` buffer files and the first `max_experts` trajectories of each. A
legacy buffer has real files; a .ctraj is seen as files of `PER_FILE` experts in store order, the way
`trajstore export` and expert training write them. Upstream draws which files at random; here the first
ones are taken, so the subset follows from the run's settings alone.
"""

from __future__ import annotations

PER_FILE = 10  # upstream buffer.py's --save_interval: trajectories per replay_buffer_{n}.pt


def subset_positions(file_counts: list[int], max_experts: int | None, max_files: int | None) -> list[int]:
    """Expert positions of the first `max_files` files, the first `max_experts` of each (None: all)."""
    positions, first = [], 0
    for count in file_counts[:max_files]:
        positions.extend(range(first, first + min(count, max_experts or count)))
        first += count
    return positions


class ExpertSubset:
    """A .ctraj store or legacy buffer seen through a list of its expert positions; everything else
    (layers, num_timesteps, path, ...) is the underlying one's."""

    def __init__(self, held, positions: list[int]):
        self._held = held
        self.positions = list(positions)

    @property
    def num_experts(self) -> int:
        return len(self.positions)

    def expert(self, i: int):
        return self._held.expert(self.positions[i])

    def timestep(self, i: int, t: int):
        return self._held.timestep(self.positions[i], t)

    def __getattr__(self, name):
        return getattr(self._held, name)


def expert_subset(held, max_experts: int | None, max_files: int | None):
    """`held` itself when no limit is set, else its ExpertSubset."""
    if max_experts is None and max_files is None:
        return held
    counts = getattr(held, "file_counts", None)
    if counts is None:
        n = held.num_experts
        counts = [min(PER_FILE, n - first) for first in range(0, n, PER_FILE)]
    return ExpertSubset(held, subset_positions(list(counts), max_experts, max_files))
