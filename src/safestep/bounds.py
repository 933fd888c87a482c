"""Bounds: strategies mapping (logits, slopes, labels) at θ0 to a safe step length ρ along the direction.

Every bound sees logits and slopes of shape (..., K) (all leading dimensions are samples: (B, K) or (B, T, V)
rows) and returns a 0-dim float64 radius. Per-sample radii are aggregated over the rows:

* ``aggregate="max"`` — the worst sample decides: ρ = min_n ρ_n (a step safe for every probed row);
* ``aggregate=q`` with 0 < q <= 1 — the quantile of the per-sample step *demand* 1/ρ_n: ρ is the
  ⌊(1 − q)(N − 1)⌋-th smallest ρ_n (0-based), so at most a fraction 1 − q of rows may have a smaller radius.
  ``q = 1.0`` equals "max". Looser than "max": not a certificate for every row.

Bounds compose: ``Min(a, b)`` is the smaller of the two radii.
``Ghost``, ``Exact`` and ``Belief`` also give ``row_radii`` (the per-row ρ_n before aggregation), which the
distributed reduction gathers across ranks for quantile aggregates.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

import torch
from torch import Tensor

from .geometry import belief_step_cap, radius_lower_bound
from .geometry.radius import exact_radius, min_exact_radius
from .geometry.simplex import RULES

__all__ = ["Aggregate", "Bound", "Ghost", "Exact", "Belief", "Min", "BOUND_NAMES", "aggregate_radii", "make_bound"]

Aggregate = Union[str, float]
BOUND_NAMES = ("ghost", "exact", "belief")


def check_aggregate(aggregate: Aggregate) -> Aggregate:
    """Return ``aggregate`` if it is "max" or a float quantile in (0, 1]; raise ValueError otherwise."""
    if aggregate == "max":
        return aggregate
    if isinstance(aggregate, bool) or not isinstance(aggregate, (int, float)) or not 0.0 < aggregate <= 1.0:
        raise ValueError(f"aggregate must be 'max' or a quantile q with 0 < q <= 1, got {aggregate!r}")
    return float(aggregate)


def aggregate_radii(radii: Tensor, aggregate: Aggregate = "max") -> Tensor:
    """ρ = min_n ρ_n ("max" of the demand 1/ρ_n), or the ⌊(1 − q)(N − 1)⌋-th smallest ρ_n (0-based) for q."""
    flat = radii.reshape(-1)
    if flat.numel() == 0:
        raise ValueError("cannot aggregate the radii of an empty probe (no rows)")
    if check_aggregate(aggregate) == "max":
        return flat.amin()
    k = math.floor((1.0 - float(aggregate)) * (flat.numel() - 1)) + 1
    return flat.kthvalue(k).values


def _rows(logits: Tensor, slopes: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    if logits.shape != slopes.shape or logits.ndim < 2:
        raise ValueError(f"logits {tuple(logits.shape)} and slopes {tuple(slopes.shape)} must share a (..., K) shape")
    k = logits.shape[-1]
    rows = None if labels is None else labels.reshape(-1)
    if rows is not None and rows.numel() * k != logits.numel():
        raise ValueError(f"labels {tuple(labels.shape)} must hold one label per logits row {tuple(logits.shape[:-1])}")
    return logits.reshape(-1, k), slopes.reshape(-1, k), rows


@runtime_checkable
class Bound(Protocol):
    """A radius rule: ``bound(logits, slopes, labels) -> ρ`` (0-dim float64); ``name`` labels reports."""

    name: str

    def __call__(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None) -> Tensor: ...


@dataclass(frozen=True)
class Ghost:
    """ρ_n = π/Δ_a(n) (Δ_a the slope spread), the lower bound on the nearest complex zero; cheapest bound."""

    aggregate: Aggregate = "max"
    name: str = "ghost"

    def __post_init__(self) -> None:
        check_aggregate(self.aggregate)

    def __call__(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None) -> Tensor:
        """π/Δ_a per row, aggregated."""
        return aggregate_radii(self.row_radii(logits, slopes, labels), self.aggregate)

    def row_radii(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None) -> Tensor:
        """ρ_n = π/Δ_a(n) for every row n, flat (not aggregated)."""
        _, a, _ = _rows(logits, slopes, labels)
        return radius_lower_bound(a)


@dataclass(frozen=True)
class Exact:
    """ρ*_n, the exact convergence radius (modulus of the nearest zero of Σ_k softmax(z)_k e^{a_k t}).

    "max" uses branch and bound over rows (only rows whose π/Δ_a lies below the incumbent are solved);
    a quantile needs every row's ρ* and costs one exact solve per row.
    """

    aggregate: Aggregate = "max"
    rtol: float = 1e-8
    name: str = "exact"

    def __post_init__(self) -> None:
        check_aggregate(self.aggregate)

    def __call__(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None) -> Tensor:
        """min_n ρ*_n by branch and bound, or the quantile of all ρ*_n."""
        if self.aggregate == "max":
            z, a, _ = _rows(logits, slopes, labels)
            return min_exact_radius(z, a, self.rtol)[0]
        return aggregate_radii(self.row_radii(logits, slopes, labels), self.aggregate)

    def row_radii(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None) -> Tensor:
        """ρ*_n for every row n, flat (one exact solve per row)."""
        z, a, _ = _rows(logits, slopes, labels)
        return exact_radius(z, a, self.rtol)


@dataclass(frozen=True)
class Belief:
    """τ_max,n = η_adm(p_n)·‖P_T g_n‖/‖J_s(p_n) a_n‖: the belief-space admissible step pulled back per row.

    ``rule`` ("paper" | "sharp" | "tangent") and ``backoff`` (entropy backoff 1/(1 + α(B))) select η_adm;
    without labels the predicted class is used (the worst case over one-hot labels).
    """

    rule: str = "paper"
    backoff: bool = True
    eps: float = 1e-10
    aggregate: Aggregate = "max"
    name: str = "belief"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown belief rule {self.rule!r}; valid rules are {RULES}")
        check_aggregate(self.aggregate)

    def __call__(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None) -> Tensor:
        """Per-row belief caps, aggregated."""
        return aggregate_radii(self.row_radii(logits, slopes, labels), self.aggregate)

    def row_radii(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None) -> Tensor:
        """τ_max,n for every row n, flat (not aggregated)."""
        z, a, y = _rows(logits, slopes, labels)
        return belief_step_cap(z, a, y, rule=self.rule, backoff=self.backoff, eps=self.eps)


class Min:
    """ρ = min over several bounds (each aggregates on its own)."""

    def __init__(self, *bounds: Bound) -> None:
        if not bounds:
            raise ValueError("Min needs at least one bound")
        self.bounds = tuple(bounds)
        self.name = "min(" + ",".join(b.name for b in self.bounds) + ")"

    def __call__(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None) -> Tensor:
        """The smallest of the member radii."""
        return torch.stack([b(logits, slopes, labels) for b in self.bounds]).amin()

    def __repr__(self) -> str:
        return f"Min{self.bounds!r}"


BoundSpec = Union[str, Bound, Sequence[Union[str, Bound]]]


def make_bound(spec: BoundSpec, aggregate: Aggregate = "max", *, belief_rule: str = "paper",
               belief_backoff: bool = True) -> Bound:
    """A Bound from a name ("ghost" | "exact" | "belief"), a Bound, or a list of these (their Min)."""
    if isinstance(spec, str):
        if spec == "ghost":
            return Ghost(aggregate)
        if spec == "exact":
            return Exact(aggregate)
        if spec == "belief":
            return Belief(belief_rule, belief_backoff, aggregate=aggregate)
        raise ValueError(f"unknown bound {spec!r}; use one of {BOUND_NAMES}, a Bound, or a list of them")
    if isinstance(spec, Bound):
        return spec
    if isinstance(spec, Sequence):
        parts = [make_bound(s, aggregate, belief_rule=belief_rule, belief_backoff=belief_backoff) for s in spec]
        if not parts:
            raise ValueError("bound list is empty; give at least one bound")
        return parts[0] if len(parts) == 1 else Min(*parts)
    raise ValueError(f"bound must be a name, a Bound or a list of them, got {type(spec).__name__}")
