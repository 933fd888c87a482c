"""A certified lower bound on ρ* that weighs classes by probability (docs/certified_radius.md, MATH_RADIUS §A8).

F(t) e^{−dt} = Σ_k w_k e^{(a_k − d) t} for any centre d, with w_k = e^{z_k − max z} ∝ softmax(z)_k. On the closed
disk |t| ≤ R the term of class k has real part at least w_k·m(|a_k − d|·R), where

    m(s) = min_{|ζ| ≤ s} Re e^ζ  (= 1 at 0, > 0 below π/2, = 0 at π/2, ≈ −e^{√(s² − π²)} for large s)

is non-increasing. So G_d(R) = Σ_k w_k m(|a_k − d| R) > 0 proves Re F > 0, hence no zero of F, on |t| ≤ R, and
ρ* > R. Replacing |a_k − d| by an upper bound keeps the proof (m is non-increasing), so one pass over K puts the
weights into ``buckets`` equal slope intervals and every later evaluation costs O(buckets). The returned radius is
the largest R (found by bisection to relative ``rtol``, from below) that some centre certifies — the midpoint of
the slopes, the heaviest bucket and the weighted mean — and never less than π/Δ_a (which the midpoint would give
without bucketing); rows with exactly two live classes get the exact √(δ² + π²)/Δ_a. See ``weighted_radius`` for
what the rounding analysis covers.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["weighted_radius", "weighted_excludes"]

_TABLE_STEP = 1.0 / 32  # s spacing of the tabulated lower bound on m(s)
_TABLE_END = 64.0  # beyond it m(s) ≥ −exp(√(s² − π²/4))
_THETA_CELLS = 4096  # angular cells per half circle when tabulating m
_WIDEN = 1e-3  # bucket intervals are widened by this many bucket widths: covers rounding of the bucket index
_MAX_DOUBLINGS = 64
_EXP_ULPS = 8  # allowance (in units of the work dtype's unit roundoff) for exp and the logit subtraction
_DEFAULT_BUCKETS = 128
_DEFAULT_RTOL = 1e-3
_DEFAULT_CHUNK = 1 << 18  # elements of (rows × K) per chunk of the histogram pass


@lru_cache(maxsize=8)
def _kernel_table(device: torch.device) -> Tensor:
    """Certified lower bounds of m(s) = min_θ e^{s cos θ} cos(s sin θ) at s = i·_TABLE_STEP, non-increasing in i.

    Each angular cell [θ_i, θ_{i+1}] contributes min(f(θ_i), f(θ_{i+1})) − L_i·h/2 with L_i = s·e^{s cos θ_i} ≥
    max |f'| on the cell (cos θ is decreasing on [0, π]); the minimum over cells is ≤ m(s). A cumulative minimum
    over s then makes the table non-increasing (m itself is, so this only lowers entries).
    """
    s = torch.arange(0, int(_TABLE_END / _TABLE_STEP) + 1, dtype=torch.float64) * _TABLE_STEP
    theta = torch.linspace(0.0, math.pi, _THETA_CELLS + 1, dtype=torch.float64)
    h = math.pi / _THETA_CELLS
    rows = []
    for part in s.split(256):
        x, y = part[:, None] * torch.cos(theta), part[:, None] * torch.sin(theta)
        f = torch.exp(x) * torch.cos(y)
        cell = torch.minimum(f[:, :-1], f[:, 1:]) - part[:, None] * torch.exp(x[:, :-1]) * (h / 2)
        rows.append(cell.amin(dim=1))
    table = torch.cummin(torch.cat(rows).clamp(max=1.0), dim=0).values
    return table.to(device)


def _kernel_lower(s: Tensor) -> Tensor:
    """A lower bound on m(s) = min_{|ζ| ≤ s} Re e^ζ for s ≥ 0, non-increasing in s (float64, same shape)."""
    table = _kernel_table(s.device)
    index = torch.ceil(s * ((1.0 + 1e-12) / _TABLE_STEP)).clamp_(max=table.numel() - 1).long()
    value = table[index]
    far = s > _TABLE_END
    if bool(far.any()):  # m(s) ≥ −e^{s·cos θ} where cos(s sin θ) < 0 needs s·sin θ > π/2
        value = torch.where(far, -torch.exp(torch.sqrt((s * s - math.pi**2 / 4).clamp(min=0.0))), value)
    return value


class _Rows(NamedTuple):
    """One chunk of rows reduced to slope buckets: everything the certificate needs, O(buckets) per row."""

    weights: Tensor  # (r, nb) float64: Σ of e^{z_k − max z} over the classes in each bucket (as computed)
    reach: Tensor  # (r, C, nb) float64: per centre, an upper bound on |a_k − d|/Δ_a over each bucket's classes
    spread: Tensor  # (r,) float64 Δ_a over live classes (NaN where the row is invalid)
    floor: Tensor  # (r,) float64 normalized radius known by theorem: π, or the exact binary radius
    eps: float  # relative error bound of the bucket sums
    slack: float  # absolute error bound from exp underflow, per unit of max |m|


def _reduce(z: Tensor, a: Tensor, buckets: int, masked: bool | None) -> _Rows:
    """The histogram pass over a chunk (r, K) of logits and slopes in their work dtype (float32 or float64)."""
    r, k = z.shape
    work = z.dtype
    binary = None
    dead = torch.isneginf(z) if masked is not False else None
    if dead is not None and (masked is True or bool(dead.any())):
        top = z.argmax(dim=-1, keepdim=True)
        a = torch.where(dead, a.gather(-1, top), a)  # masked classes take the top class's slope: Δ_a over live
        live = k - dead.sum(dim=-1)
        if bool((live == 2).any()) or k == 2:
            binary = live == 2
    elif k == 2:
        binary = torch.ones(r, dtype=torch.bool, device=z.device)
    lo, hi = torch.aminmax(a, dim=-1)
    zmax = z.amax(dim=-1)
    spread = hi.to(torch.float64) - lo.to(torch.float64)
    valid = torch.isfinite(spread) & torch.isfinite(zmax)
    if not bool(valid.all()):
        z = torch.where(valid[:, None], z, 0.0)
        a = torch.where(valid[:, None], a, 0.0)
        lo, zmax = torch.where(valid, lo, 0.0), torch.where(valid, zmax, 0.0)
    w = torch.sub(z, zmax[:, None]).exp_()
    scale = torch.where(spread > 0, buckets / spread, 0.0).to(work)[:, None]
    position = torch.addcmul(-lo[:, None] * scale, a, scale).clamp_(max=buckets - 1)
    weights = torch.zeros(r, buckets, dtype=work, device=z.device).scatter_add_(1, position.long(), w)
    weights = weights.to(torch.float64)

    edges = torch.arange(buckets + 1, dtype=torch.float64, device=z.device) / buckets - 0.5  # normalized slopes
    middle = 0.5 * (edges[:-1] + edges[1:])
    total = weights.sum(dim=-1, keepdim=True)
    heaviest = middle[weights.argmax(dim=-1)]
    mean = (weights * middle).sum(dim=-1) / total.squeeze(-1)
    centres = torch.stack([torch.zeros_like(mean), heaviest, mean], dim=1)[:, :, None]  # (r, C, 1)
    reach = torch.maximum((edges[:-1] - centres).abs(), (edges[1:] - centres).abs()) + _WIDEN / buckets
    reach = torch.where(weights[:, None, :] > 0, reach, 0.0)

    floor = torch.full((r,), math.pi, dtype=torch.float64, device=z.device)
    if binary is not None and bool(binary.any()):
        pair = torch.topk(z, 2, dim=-1).values.to(torch.float64)
        delta = pair[:, 0] - pair[:, 1]
        floor = torch.where(binary, torch.sqrt(delta * delta + math.pi**2), floor)
    unit = torch.finfo(work).eps / 2
    eps = (k + _EXP_ULPS + 88) * unit + 1e-12  # summation of ≤ K terms, exp, and |z − max z| ≤ 88 before underflow
    slack = k * torch.finfo(work).tiny
    nan = torch.full_like(spread, math.nan)
    return _Rows(weights, reach, torch.where(valid, spread, nan), floor, eps, slack)


def _certifies(rows: _Rows, x: Tensor) -> Tensor:
    """(r,) bool: some centre proves G > 0, i.e. no zero of F in the closed disk |t| ≤ x/Δ_a (x normalized)."""
    value = _kernel_lower(rows.reach * (x * (1 + 1e-12))[:, None, None])  # covers rounding of x/Δ_a and Δ_a
    weighted = rows.weights[:, None, :] * value
    positive = weighted.clamp(min=0).sum(dim=-1)
    negative = (-weighted).clamp(min=0).sum(dim=-1)
    worst = value.abs().amax(dim=-1)
    proof = positive * (1 - rows.eps) > negative * (1 + 2 * rows.eps) + rows.slack * (1 + worst)
    return proof.any(dim=-1)


def _bisect(rows: _Rows, rtol: float) -> Tensor:
    """The largest certified normalized radius x (to relative rtol, from below), never below ``rows.floor``."""
    lo = rows.floor.clone()
    hi = 2 * lo
    todo = torch.arange(lo.numel(), device=lo.device)
    for _ in range(_MAX_DOUBLINGS):
        ok = _certifies(_take(rows, todo), hi[todo])
        if not bool(ok.any()):
            break
        grow = todo[ok]
        lo[grow], hi[grow] = hi[grow], 2 * hi[grow]
        todo = grow
    todo = torch.arange(lo.numel(), device=lo.device)
    while todo.numel():
        mid = torch.sqrt(lo[todo] * hi[todo])
        ok = _certifies(_take(rows, todo), mid)
        lo[todo[ok]] = torch.maximum(lo[todo[ok]], mid[ok])
        hi[todo[~ok]] = mid[~ok]
        todo = todo[hi[todo] > lo[todo] * (1 + rtol)]
    return lo


def _take(rows: _Rows, index: Tensor) -> _Rows:
    return _Rows(rows.weights[index], rows.reach[index], rows.spread[index], rows.floor[index], rows.eps, rows.slack)


def _flat(logits: Tensor, slopes: Tensor) -> tuple[Tensor, Tensor]:
    if logits.shape != slopes.shape or logits.ndim < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logits {tuple(logits.shape)} and slopes {tuple(slopes.shape)} must share a (..., K) shape "
                         "with K >= 2")
    k = logits.shape[-1]
    return logits.reshape(-1, k), slopes.reshape(-1, k)


def _work(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def _chunks(n: int, k: int, chunk: int) -> range:
    return range(0, n, max(1, chunk // k))


def _finish(x: Tensor, spread: Tensor) -> Tensor:
    """Radius x/Δ_a: inf where Δ_a = 0, NaN where the row is invalid (spread NaN)."""
    return torch.where(spread > 0, x / spread.clamp(min=torch.finfo(torch.float64).tiny),
                       torch.where(spread == 0, math.inf, math.nan))


def weighted_radius(logits: Tensor, slopes: Tensor, *, masked: bool | None = None, buckets: int = _DEFAULT_BUCKETS,
                    rtol: float = _DEFAULT_RTOL, chunk: int = _DEFAULT_CHUNK) -> Tensor:
    """R_w ≤ ρ*: the largest R with Σ_k softmax(z)_k·m(|a_k − d|R) > 0 for some centre d, m(s) = min_{|ζ|≤s} Re e^ζ.

    Inputs (..., K) logits and slopes of any real dtype and device; returns float64 of shape (...) on that device.
    Per row: π/Δ_a ≤ R_w ≤ ρ* (R_w = ρ* exactly for rows with two live classes), inf where Δ_a = 0 over the live
    classes, NaN where a logit is NaN or +inf, a live slope is not finite, or no class is live. A logit of −inf
    masks its class; ``masked`` as in ``safestep.bounds.live_slopes`` (False promises there is none: no search).

    Certified for the inputs as given (float values taken exactly): the pass over K runs in float32 (float64 for
    float64 input) and its rounding is bounded — relative (K + 96)·u on each bucket sum (summation, exp, the
    logit subtraction) and K·tiny absolute for exp underflow — and charged against the certificate; bucket
    intervals are widened to cover the rounding of the bucket index; the certificate itself is evaluated in
    float64 against a tabulated lower bound of m with its own error term. R_w is approached from below by
    bisection to relative ``rtol``: every returned R_w > π/Δ_a passed the certificate at that R.
    Cost: about eight passes over the logits (chunks of ``chunk`` elements, peak extra memory ≈ 16·chunk bytes plus
    O(rows × buckets)) and O(buckets) per row per bisection step; no per-row Python.
    """
    z_all, a_all = _flat(logits, slopes)
    n, k = z_all.shape
    result = torch.empty(n, dtype=torch.float64, device=logits.device)
    for start in _chunks(n, k, chunk):
        stop = min(n, start + max(1, chunk // k))
        rows = _reduce(_work(z_all[start:stop]), _work(a_all[start:stop]), buckets, masked)
        result[start:stop] = _finish(_bisect(rows, rtol), rows.spread)
    return result.reshape(logits.shape[:-1])


def weighted_excludes(logits: Tensor, slopes: Tensor, radius: float, *, masked: bool | None = None,
                      buckets: int = _DEFAULT_BUCKETS, chunk: int = _DEFAULT_CHUNK) -> Tensor:
    """Bool (...): True where the certificate proves ρ* > ``radius`` (no zero of F in |t| ≤ radius); one test per row.

    The screen of the whole-batch minimum: a row it excludes cannot have ρ* ≤ radius. Rows with Δ_a = 0 are
    excluded (ρ* = inf); invalid rows (NaN radius in ``weighted_radius``) are not.
    """
    z_all, a_all = _flat(logits, slopes)
    n, k = z_all.shape
    result = torch.empty(n, dtype=torch.bool, device=logits.device)
    for start in _chunks(n, k, chunk):
        stop = min(n, start + max(1, chunk // k))
        rows = _reduce(_work(z_all[start:stop]), _work(a_all[start:stop]), buckets, masked)
        x = rows.spread * radius
        known = (x < rows.floor) | (rows.spread == 0)
        result[start:stop] = torch.where(torch.isnan(x), False, known | _certifies(rows, x.nan_to_num(0.0)))
    return result.reshape(logits.shape[:-1])
