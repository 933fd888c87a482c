"""Bounds: rules mapping (logits, slopes, labels) at θ0 to a safe step length ρ along the update direction.

Logits and slopes are (..., K), every leading dimension a row; a bound's ``row_radii`` gives one float64 radius per
row and ``bound_radius`` aggregates them ("max": the worst row; a quantile q: looser, not a certificate for every
row). Ignored rows, masked classes, non-finite rows and the protocol: docs/step.md, "Bounds"."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

from .geometry.radius import exact_radius, min_exact_radius, row_spread
from .geometry.simplex import RULES, belief_radius
from .geometry.weighted import min_weighted_radius, weighted_radius

__all__ = ["IGNORE_INDEX", "Aggregate", "Bound", "Ghost", "Exact", "Weighted", "Belief", "Min", "BOUND_NAMES",
           "BoundSpec", "aggregate_radii", "bound_radius", "check_aggregate", "leaves", "make_bound", "live_slopes"]

IGNORE_INDEX = -100
Aggregate = Union[str, float]
BOUND_NAMES = ("ghost", "weighted", "exact", "belief")


def check_aggregate(aggregate: Aggregate) -> Aggregate:
    """Return ``aggregate`` if it is "max" or a float quantile in (0, 1]; raise ValueError otherwise."""
    if aggregate == "max":
        return aggregate
    if isinstance(aggregate, bool) or not isinstance(aggregate, (int, float)) or not 0.0 < aggregate <= 1.0:
        raise ValueError(f"aggregate must be 'max' or a quantile q with 0 < q <= 1, got {aggregate!r}")
    return float(aggregate)


def aggregate_radii(radii: Tensor, aggregate: Aggregate = "max", active: Tensor | None = None) -> Tensor:
    """ρ = min_n ρ_n ("max"), or the ⌊(1 − q)(N − 1)⌋-th smallest of the N ``active`` ρ_n (0-based; default: all
    rows) for a quantile q, on the device."""
    flat = radii.reshape(-1)
    if flat.numel() == 0:
        raise ValueError("cannot aggregate the radii of an empty probe (no rows)")
    if check_aggregate(aggregate) == "max":
        return flat.amin()
    ordered = flat.sort().values  # inactive rows carry +inf and sort last
    count = flat.new_tensor(flat.numel()) if active is None else active.reshape(-1).sum().to(flat.dtype)
    index = torch.floor((1.0 - float(aggregate)) * (count - 1).clamp(min=0)).long()
    return ordered.gather(0, index.reshape(1)).squeeze(0)


def _flat_rows(logits: Tensor, slopes: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(N, K) logits and slopes and (N,) labels (shapes checked, no host reads); ignored rows become flat (logits and
    slopes 0: radius +inf), so whatever they hold (all −inf action masks, NaN padding) never reaches a bound."""
    if logits.shape != slopes.shape or logits.ndim < 2:
        raise ValueError(f"logits {tuple(logits.shape)} and slopes {tuple(slopes.shape)} must share a (..., K) shape")
    k = logits.shape[-1]
    if labels is None:
        return logits.reshape(-1, k), slopes.reshape(-1, k), None
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels {tuple(labels.shape)} must hold one label per logits row {tuple(logits.shape[:-1])}")
    rows = labels.reshape(-1).to(logits.device)
    ignored = (rows == IGNORE_INDEX).unsqueeze(1)
    z, a = logits.reshape(-1, k), slopes.reshape(-1, k)
    return z.masked_fill(ignored, 0.0), a.masked_fill(ignored, 0.0), rows


def live_slopes(logits: Tensor, slopes: Tensor, masked: bool | None = None) -> Tensor:
    """The slopes with every masked class (logit −inf) given the slope of its row's live top class: the spread over
    live classes, so every bound sees the live problem (``masked=False``: untouched; None looks for −inf)."""
    if masked is False or (masked is None and not bool(torch.isneginf(logits).any())):
        return slopes
    top = slopes.gather(-1, logits.argmax(dim=-1, keepdim=True))
    return torch.where(torch.isneginf(logits), top, slopes)


def _drop_ignored(radii: Tensor, labels: Tensor | None) -> Tensor:
    """+inf for the rows whose label is IGNORE_INDEX."""
    return radii if labels is None else radii.masked_fill(labels == IGNORE_INDEX, math.inf)


@runtime_checkable
class Bound(Protocol):
    """A radius rule: ``row_radii`` gives ρ_n per row; ``name`` labels reports, ``aggregate`` says how rows combine,
    ``accepts_nonfinite`` whether non-finite rows give NaN radii instead of raising (docs/step.md, "Bounds")."""

    name: str
    aggregate: Aggregate
    accepts_nonfinite: bool

    def row_radii(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None, *,
                  masked: bool | None = None) -> Tensor:
        """ρ_n for every row n, flat float64; +inf for ignored rows."""
        ...


def bound_radius(bound: Bound, logits: Tensor, slopes: Tensor, labels: Tensor | None = None, *,
                 masked: bool | None = None) -> Tensor:
    """ρ of one bound over the rows: its ``min_radius`` fast path for "max", else ``aggregate_radii`` of ``row_radii``
    over the active (not ignored) rows (0-dim float64)."""
    fast = getattr(type(bound), "min_radius", None)
    if bound.aggregate == "max" and fast is not None:
        return fast(bound, logits, slopes, labels, masked=masked)
    radii = bound.row_radii(logits, slopes, labels, masked=masked)
    return aggregate_radii(radii, bound.aggregate, None if labels is None else labels.reshape(-1) != IGNORE_INDEX)


class _RowBound:
    """``bound(logits, slopes, labels)``: the aggregated radius (``bound_radius``), for bounds used on their own."""

    aggregate: Aggregate

    def __post_init__(self) -> None:
        check_aggregate(self.aggregate)

    def __call__(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None, *,
                 masked: bool | None = None) -> Tensor:
        """The per-row radii aggregated over the active (not ignored) rows."""
        return bound_radius(self, logits, slopes, labels, masked=masked)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Ghost(_RowBound):
    """ρ_n = π/Δ_a(n), Δ_a the spread of the live slopes: a lower bound on the nearest complex zero; the cheapest."""

    aggregate: Aggregate = "max"
    name: str = "ghost"
    accepts_nonfinite: ClassVar[bool] = True  # non-finite rows give NaN radii instead of raising

    def min_radius(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None, *,
                   masked: bool | None = None) -> Tensor:
        """π / max over active rows of Δ_a (a handful of ops: the guard's hot path); NaN propagates."""
        z, a, _ = _flat_rows(logits, slopes, labels)
        largest = row_spread(live_slopes(z, a, masked)).amax()  # ignored rows are flat; all flat gives ρ = inf
        return torch.where(torch.isinf(largest), math.nan, math.pi / largest)

    def row_radii(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None, *,
                  masked: bool | None = None) -> Tensor:
        """π/Δ_a per row (inf where Δ_a = 0, NaN where it is not finite), by max/min reductions in the slopes' dtype."""
        z, a, y = _flat_rows(logits, slopes, labels)
        spread = row_spread(live_slopes(z, a, masked))
        radii = torch.where(spread > 0, math.pi / spread, math.inf)
        return _drop_ignored(torch.where(torch.isfinite(spread), radii, math.nan), y)


@dataclass(frozen=True)
class Exact(_RowBound):
    """ρ*_n, the exact convergence radius (modulus of the nearest zero of Σ_k softmax(z)_k e^{a_k t}); "max" by
    branch and bound over rows (only rows whose lower bound is below the incumbent are solved), a quantile by one
    exact solve per row."""

    aggregate: Aggregate = "max"
    rtol: float = 1e-8
    name: str = "exact"
    accepts_nonfinite: ClassVar[bool] = False  # the solver validates its rows

    def min_radius(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None, *,
                   masked: bool | None = None) -> Tensor:
        """min_n ρ*_n over the active rows by branch and bound (ignored rows are flat: ρ = inf, never solved)."""
        z, a, _ = _flat_rows(logits, slopes, labels)
        return min_exact_radius(z, live_slopes(z, a, masked), self.rtol)[0]

    def row_radii(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None, *,
                  masked: bool | None = None) -> Tensor:
        """ρ*_n for every row n, flat (one exact solve per row)."""
        z, a, y = _flat_rows(logits, slopes, labels)
        return _drop_ignored(exact_radius(z, live_slopes(z, a, masked), self.rtol), y)


@dataclass(frozen=True)
class Weighted(_RowBound):
    """ρ_n = R_w(n), the certified lower bound on ρ*_n weighing classes by probability (``geometry.weighted_radius``):
    π/Δ_a <= R_w <= ρ*, exact for two live classes; a class of tiny probability counts only once e^{|a_k − d|R} makes
    it matter. "max" takes the whole-batch minimum by bracketing every row and refining only those that can bind."""

    aggregate: Aggregate = "max"
    name: str = "weighted"
    accepts_nonfinite: ClassVar[bool] = True  # invalid rows give NaN radii instead of raising

    def min_radius(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None, *,
                   masked: bool | None = None) -> Tensor:
        """min_n R_w(n) over the active rows (ignored rows are flat: R_w = inf)."""
        z, a, _ = _flat_rows(logits, slopes, labels)
        return min_weighted_radius(z, a, masked=masked)[0]

    def row_radii(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None, *,
                  masked: bool | None = None) -> Tensor:
        """R_w per row, flat; +inf for ignored rows, NaN for rows with non-finite live logits or slopes."""
        z, a, y = _flat_rows(logits, slopes, labels)
        return _drop_ignored(weighted_radius(z, a, masked=masked), y)


@dataclass(frozen=True)
class Belief(_RowBound):
    """ρ_n = min(τ_max,n, R_n) (``geometry.belief_radius``): τ_max,n the belief step of ``rule`` (with the entropy
    ``backoff``) pulled back to *first order* — not a bound on its own — and R_n a *certified* lower bound on ρ*_n
    (R_w by default, else the row radii of ``certified``), so ρ_n <= ρ*_n for every rule (docs/step.md, "Bounds")."""

    rule: str = "support"
    backoff: bool = True
    eps: float = 1e-10
    aggregate: Aggregate = "max"
    name: str = "belief"
    certified: Bound | None = None
    accepts_nonfinite: ClassVar[bool] = False  # the pull-back validates its rows

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown belief rule {self.rule!r}; valid rules are {RULES}")
        super().__post_init__()
        if self.certified is not None and (isinstance(self.certified, Belief)
                                           or not callable(getattr(self.certified, "row_radii", None))):
            raise ValueError(f"certified must be None (R_w) or a bound with certified row radii (Ghost(), Exact()), "
                             f"got {self.certified!r}")

    def row_radii(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None, *,
                  masked: bool | None = None) -> Tensor:
        """min(τ_max,n, R_n) for every row n, flat (not aggregated); ignored rows get +inf."""
        z, a, y = _flat_rows(logits, slopes, labels)
        label_rows = None if y is None else torch.where(y == IGNORE_INDEX, z.argmax(dim=-1), y)  # a live class, unread
        bound = self.certified
        certified = {} if bound is None else {"certified": lambda zz, aa: bound.row_radii(zz, aa, y, masked=masked)}
        radii = belief_radius(z, live_slopes(z, a, masked), label_rows, self.rule, self.backoff, self.eps, **certified)
        return _drop_ignored(radii, y)


class Min:
    """ρ = min over several bounds (each aggregates on its own)."""

    def __init__(self, *bounds: Bound) -> None:
        if not bounds:
            raise ValueError("Min needs at least one bound")
        self.bounds = tuple(bounds)
        self.name = "min(" + ",".join(b.name for b in self.bounds) + ")"

    def __call__(self, logits: Tensor, slopes: Tensor, labels: Tensor | None = None, *,
                 masked: bool | None = None) -> Tensor:
        """The smallest of the member radii."""
        return torch.stack([bound_radius(b, logits, slopes, labels, masked=masked) for b in leaves(self)]).amin()

    def __repr__(self) -> str:
        return f"Min{self.bounds!r}"


def leaves(bound: Bound | Min) -> Iterator[Bound]:
    """The non-Min bounds inside ``bound`` (itself when it is not a Min), depth first."""
    if isinstance(bound, Min):
        for member in bound.bounds:
            yield from leaves(member)
    else:
        yield bound


BoundSpec = Union[str, Bound, Min, Sequence[Union[str, Bound, Min]]]


def make_bound(spec: BoundSpec, aggregate: Aggregate | None = None) -> Bound | Min:
    """A bound from a name (``BOUND_NAMES``), a Bound, or a list of these (their Min); ``aggregate`` applies to
    bounds given by name (ValueError with a Bound object, which carries its own: ``Ghost(aggregate=0.9)``)."""
    if isinstance(spec, str):
        chosen = "max" if aggregate is None else check_aggregate(aggregate)
        if spec not in BOUND_NAMES:
            raise ValueError(f"unknown bound {spec!r}; use one of {BOUND_NAMES}, a Bound, or a list of them")
        return {"ghost": Ghost, "weighted": Weighted, "exact": Exact, "belief": Belief}[spec](aggregate=chosen)
    if isinstance(spec, (Min, Bound)):
        if aggregate is not None:
            raise ValueError(f"aggregate={aggregate!r} conflicts with the bound object {spec!r}, which carries its own "
                             "aggregate; set it on the bound, e.g. Ghost(aggregate=0.9)")
        return spec
    if isinstance(spec, Sequence):
        parts = [make_bound(s, aggregate) for s in spec]
        if not parts:
            raise ValueError("bound list is empty; give at least one bound")
        return parts[0] if len(parts) == 1 else Min(*parts)
    raise ValueError(f"bound must be a name, a Bound or a list of them, got {type(spec).__name__}; a Bound has "
                     "name, aggregate, accepts_nonfinite and row_radii(logits, slopes, labels, *, masked)")
