"""Shared by the benchmark scripts: per-round means of variants timed in interleaved rounds,
their medians, their ratios to a baseline variant, and the table that prints them.

Interleaving (the order of the variants rotates every round) and the *paired* ratio (the median of
the per-round ratios) keep a noisy machine's drift out of the comparison.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Results:
    """Per variant, the mean µs per transaction of each round."""

    variants: tuple[str, ...]
    baseline: str
    per_round: dict[str, list[float]] = field(init=False)

    def __post_init__(self) -> None:
        self.per_round = {v: [] for v in self.variants}

    def median(self, variant: str) -> float:
        return statistics.median(self.per_round[variant])

    def ratio(self, variant: str) -> float:
        return self.median(variant) / self.median(self.baseline)

    def paired(self, variant: str) -> float:
        pairs = zip(self.per_round[variant], self.per_round[self.baseline], strict=True)
        return statistics.median(v / base for v, base in pairs)

    def order(self, round_no: int) -> list[str]:
        """The variants in this round's order (rotated every round)."""
        shift = round_no % len(self.variants)
        return list(self.variants[shift:] + self.variants[:shift])

    def print_rows(self) -> None:
        print(f"  {'variant':<9} {'µs/tx':>9} {'ratio':>7} {'paired':>7} {'min µs':>9} {'max µs':>9}")
        for variant in self.variants:
            values = self.per_round[variant]
            print(
                f"  {variant:<9} {self.median(variant):9.1f} {self.ratio(variant):7.3f} "
                f"{self.paired(variant):7.3f} {min(values):9.1f} {max(values):9.1f}"
            )

    def print_table(self, title: str, rounds: int, per_round: int) -> None:
        print(f"\n{title}: {rounds} rounds x {per_round} transactions, median of per-round means")
        self.print_rows()
