"""The Pareto front of what a search tried: no other candidate is at least as good on every axis and better
on one. Axes are given as values to minimise (a metric where higher is better enters negated)."""
from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` on every axis and better on at least one (all axes minimised)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: dict[str, Sequence[float]]) -> list[str]:
    """The keys of the points no other point dominates, in the order given; equal points all stay."""
    return [k for k, p in points.items() if not any(dominates(q, p) for j, q in points.items() if j != k)]
