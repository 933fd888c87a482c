"""A certified lower bound on ρ* that weighs classes by probability (docs/certified_radius.md, MATH_RADIUS §A8).

With w_k ∝ softmax(z)_k, any centre d and m(s) = min_{|ζ| ≤ s} Re e^ζ (non-increasing), G_d(R) = Σ_k w_k m(|a_k − d|R)
> 0 proves Re(F(t)e^{−dt}) > 0, hence no zero of F, on |t| ≤ R: ρ* > R. One pass over K puts the weights into slope
buckets (|a_k − d| replaced by an upper bound), so every later test costs O(buckets); m is tabulated once as
certified lower bounds. Rounding is bounded and charged against the certificate (``weighted_radius``).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["min_weighted_radius", "weighted_excludes", "weighted_radius"]

_TABLE_STEP = 1.0 / 32  # s spacing of the tabulated lower bound on m(s)
_TABLE_END = 64.0  # beyond it m(s) ≥ −exp(√(s² − π²/4))
_THETA_CELLS = 4096  # angular cells per half circle when tabulating m
_WIDEN = 1e-3  # bucket intervals are widened by this many bucket widths: covers rounding of the bucket index
_MAX_DOUBLINGS = 64
_EXP_ULPS = 8  # allowance (in units of the work dtype's unit roundoff) for exp and the logit subtraction
_MAX_BUCKETS = 128  # default bucket count: min(_MAX_BUCKETS, max(16, K // 4))
_DEFAULT_RTOL = 1e-3
_DEFAULT_CHUNK = 1 << 18  # elements of (rows × K) per chunk of the histogram pass
_ROW_BLOCK = 4096  # rows bisected together (the per-row state is O(buckets))
_TOWARD_MIDPOINT = (0.2, 0.4)  # extra centres: the weighted mean moved these fractions toward the midpoint
_COARSEN = 8  # buckets merged for the first test of each row in min_weighted_radius
_HEAD = 64  # rows of smallest π/Δ_a whose brackets set min_weighted_radius's first upper bound
_COARSE_RTOL = 0.25  # bracket width of the first pass of min_weighted_radius


@lru_cache(maxsize=8)
def _kernel_table(device: torch.device) -> Tensor:
    """Certified lower bounds of m(s) = min_θ e^{s cos θ} cos(s sin θ) at s = i·_TABLE_STEP, non-increasing in i.

    Each angular cell [θ_i, θ_{i+1}] contributes min(f(θ_i), f(θ_{i+1})) − L_i·h/2 with L_i = s·e^{s cos θ_i} ≥
    max |f'| on the cell (cos θ decreases on [0, π]), so the minimum over cells is ≤ m(s); a cumulative minimum
    over s only lowers entries (m is non-increasing)."""
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


def _kernel_lower(steps: Tensor) -> Tensor:
    """A lower bound on m(s) = min_{|ζ| ≤ s} Re e^ζ at s = steps·_TABLE_STEP ≥ 0, non-increasing in s (float64)."""
    table = _kernel_table(steps.device)
    last = table.numel() - 1
    value = torch.take(table, torch.ceil(steps).clamp_(max=last).long())
    far = steps > last
    if bool(far.any()):  # m(s) ≥ −e^{s·cos θ} where cos(s sin θ) < 0 needs s·sin θ > π/2
        s = steps * _TABLE_STEP
        value = torch.where(far, -torch.exp(torch.sqrt((s * s - math.pi**2 / 4).clamp(min=0.0))), value)
    return value


class _Rows(NamedTuple):
    """A block of rows reduced to slope buckets: everything the certificate needs, O(buckets) per row."""

    weights: Tensor  # (r, nb) float64: Σ of e^{z_k − max z} over the classes in each bucket (as computed)
    reach: Tensor  # (r, C, nb) float64: per centre, an upper bound on |a_k − d|/Δ_a over each bucket's classes,
    # in units of _TABLE_STEP and enlarged by a relative 1e-12 (covers the rounding of x/Δ_a, Δ_a and the product)
    spread: Tensor  # (r,) float64 Δ_a over live classes (NaN where the row is invalid)
    floor: Tensor  # (r,) float64 normalized radius known by theorem: π, or the exact binary radius
    eps: float  # relative error bound of the bucket sums
    slack: float  # absolute error bound of each class weight from exp underflow, times K


def _histogram(z: Tensor, a: Tensor, buckets: int, masked: bool | None) -> tuple[Tensor, Tensor, Tensor]:
    """The pass over a chunk (r, K) of logits and slopes in their work dtype: (bucket weights, Δ_a, floor)."""
    r, k = z.shape
    work = z.dtype
    binary = None
    if masked is True or (masked is None and bool((z.amin(dim=-1) == -math.inf).any())):
        dead = torch.isneginf(z)
        top = z.argmax(dim=-1, keepdim=True)
        a = torch.where(dead, a.gather(-1, top), a)  # masked classes take the top class's slope: Δ_a over live
        live = k - dead.sum(dim=-1)
        if bool((live == 2).any()) or k == 2:
            binary = live == 2
    elif k == 2:
        binary = torch.ones(r, dtype=torch.bool, device=z.device)
    lo, hi = a.amin(dim=-1), a.amax(dim=-1)  # (two reductions are much faster than aminmax on CPU)
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
    floor = torch.full((r,), math.pi, dtype=torch.float64, device=z.device)
    if binary is not None and bool(binary.any()):
        pair = torch.topk(z, 2, dim=-1).values.to(torch.float64)
        delta = pair[:, 0] - pair[:, 1]
        floor = torch.where(binary, torch.sqrt(delta * delta + math.pi**2), floor)
    return weights.to(torch.float64), torch.where(valid, spread, math.nan), floor


def _block(z: Tensor, a: Tensor, index: Tensor, buckets: int | None, masked: bool | None, chunk: int) -> _Rows:
    """Rows ``index`` of z, a (n, K) reduced to buckets, chunk by chunk (≤ ``chunk`` elements gathered at a time)."""
    k = z.shape[1]
    buckets = min(_MAX_BUCKETS, max(16, k // 4)) if buckets is None else int(buckets)
    if buckets < 1:
        raise ValueError(f"buckets must be a positive int, got {buckets}")
    work = torch.float64 if torch.float64 in (z.dtype, a.dtype) else torch.float32
    step = max(1, chunk // k)
    if index.numel() and int(index[-1]) - int(index[0]) + 1 == index.numel() and bool((index.diff() == 1).all()):
        first = int(index[0])  # a contiguous run of rows: slices, no copies
        parts = [_histogram(z[i:i + step].to(work), a[i:i + step].to(work), buckets, masked)
                 for i in range(first, first + index.numel(), step)]
    else:
        parts = [_histogram(z.index_select(0, part).to(work), a.index_select(0, part).to(work), buckets, masked)
                 for part in index.split(step)]
    weights, spread, floor = (torch.cat(column) for column in zip(*parts))
    edges = torch.arange(buckets + 1, dtype=torch.float64, device=weights.device) / buckets - 0.5  # normalized slopes
    middle = 0.5 * (edges[:-1] + edges[1:])
    total = weights.sum(dim=-1, keepdim=True)
    heaviest = middle[weights.argmax(dim=-1)]
    mean = (weights * middle).sum(dim=-1) / total.squeeze(-1)
    # (r, C, 1): the heaviest bucket, the weighted mean, and two points between the mean and the midpoint (0), where
    # the best centre of real LM rows lies (about a fifth of the way); the midpoint's own π/Δ_a is the floor
    centres = torch.stack([heaviest, mean] + [mean * (1 - f) for f in _TOWARD_MIDPOINT], dim=1)[:, :, None]
    reach = torch.maximum((edges[:-1] - centres).abs(), (edges[1:] - centres).abs()) + _WIDEN / buckets
    reach = torch.where(weights[:, None, :] > 0, reach * ((1 + 1e-12) / _TABLE_STEP), 0.0)
    info = torch.finfo(work)
    # summation of ≤ K terms, exp, and the rounding of z − max z (|z − max z| ≤ −log tiny + 1 before underflow)
    eps = (k + _EXP_ULPS - math.log(info.tiny) + 1) * info.eps / 2 + 1e-12
    return _Rows(weights, reach, spread, floor, eps, k * info.tiny)


def _certifies(rows: _Rows, x: Tensor) -> Tensor:
    """(r,) bool: some centre proves G > 0, i.e. no zero of F in the closed disk |t| ≤ x/Δ_a (x normalized).

    With W̃_j the computed bucket sums (|W̃_j − W_j| ≤ ε·W_j plus underflow) and v_j ≤ m(s_j): the proof is
    Σ⁺ W̃_j v_j·(1 − ε) > Σ⁻ W̃_j |v_j|·(1 + 2ε) + K·tiny·(1 + e^{1.01·x}), where |m(s)| ≤ e^s and every
    class's reach is ≤ 1.01 (normalized), so the last term bounds what underflowed weights could subtract.
    """
    terms = rows.weights[:, None, :] * _kernel_lower(rows.reach * x[:, None, None])
    positive = terms.clamp(min=0).sum(dim=-1)
    negative = positive - terms.sum(dim=-1)
    slack = rows.slack * (1 + torch.exp(1.01 * x))[:, None]
    proof = positive * (1 - rows.eps) > negative * (1 + 2 * rows.eps) + slack
    return proof.any(dim=-1)


def _per_octave(rtol: float) -> int:
    """Grid points per doubling of R: radii are searched on the absolute grid g_j = 2^{j/N}, N ≥ ln 2/ln(1 + rtol)."""
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must lie in (0, 1), got {rtol!r}")
    return math.ceil(math.log(2.0) / math.log1p(rtol))


def _grid(j: Tensor, per_octave: int) -> Tensor:
    return torch.exp2(j.to(torch.float64) / per_octave)


def _accepts(rows: _Rows, known: Tensor, j: Tensor, per_octave: int) -> Tensor:
    """Row n accepts grid point j when g_j ≤ its theorem radius or the certificate proves no zero in |t| ≤ g_j.

    Both are down-sets in j (the certificate is monotone), so each row accepts exactly the points j ≤ J_n."""
    g = _grid(j, per_octave)
    return (g <= known) | _certifies(rows, rows.spread.nan_to_num(0.0) * g)  # invalid rows: NaN elsewhere


def _search(rows: _Rows, rtol: float) -> Tensor:
    """R_w per row: max(theorem radius, g_{J_n}), J_n the last grid point the row accepts (integer bisection).

    The grid is absolute, so ``min_weighted_radius`` finds exactly the minimum of these values."""
    per_octave = _per_octave(rtol)
    known = _finish(rows.floor, rows.spread)
    usable = torch.isfinite(known)
    lo = torch.where(usable, torch.floor(torch.log2(known.where(usable, 1.0)) * per_octave), 0.0).long()
    hi = lo + per_octave
    for _ in range(_MAX_DOUBLINGS):
        ok = usable & _accepts(rows, known, hi, per_octave)
        if not bool(ok.any()):
            break
        lo, hi = torch.where(ok, hi, lo), torch.where(ok, hi + per_octave, hi)
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        ok = _accepts(rows, known, mid, per_octave)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return torch.where(usable, torch.maximum(known, _grid(lo, per_octave)), known)


def _bisect(rows: _Rows, rtol: float) -> tuple[Tensor, Tensor]:
    """(lo, hi) normalized: lo certified (or the floor), hi rejected, hi ≤ lo·(1 + rtol) or hi = 2·lo·2^m."""
    lo = rows.floor.clone()
    hi = 2 * lo
    for _ in range(_MAX_DOUBLINGS):
        ok = _certifies(rows, hi)
        if not bool(ok.any()):
            break
        lo, hi = torch.where(ok, hi, lo), torch.where(ok, 2 * hi, hi)
    for _ in range(math.ceil(math.log2(math.log(2.0) / math.log1p(rtol)))):
        mid = torch.sqrt(lo * hi)
        ok = _certifies(rows, mid)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo, hi


def _coarsen(rows: _Rows) -> _Rows:
    """The same rows with _COARSEN adjacent buckets merged (weights summed, reach maximized): a weaker certificate
    (every class keeps an upper bound on its reach) that costs _COARSEN times less to evaluate."""
    r, c, nb = rows.reach.shape
    if nb % _COARSEN:
        return rows
    weights = rows.weights.reshape(r, nb // _COARSEN, _COARSEN).sum(dim=-1)
    reach = rows.reach.reshape(r, c, nb // _COARSEN, _COARSEN).amax(dim=-1)
    return _Rows(weights, reach, rows.spread, rows.floor, rows.eps + 1e-12, rows.slack)


def _take(rows: _Rows, index: Tensor) -> _Rows:
    return _Rows(rows.weights[index], rows.reach[index], rows.spread[index], rows.floor[index], rows.eps, rows.slack)


def _flat(logits: Tensor, slopes: Tensor) -> tuple[Tensor, Tensor]:
    if logits.shape != slopes.shape or logits.ndim < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logits {tuple(logits.shape)} and slopes {tuple(slopes.shape)} must share a (..., K) shape "
                         "with K >= 2")
    k = logits.shape[-1]
    return logits.reshape(-1, k), slopes.reshape(-1, k)


def _span(start: int, n: int, device: torch.device) -> Tensor:
    return torch.arange(start, min(n, start + _ROW_BLOCK), device=device)


def _finish(x: Tensor, spread: Tensor) -> Tensor:
    """Radius x/Δ_a: inf where Δ_a = 0, NaN where the row is invalid (spread NaN)."""
    return torch.where(spread > 0, x / spread.clamp(min=torch.finfo(torch.float64).tiny),
                       torch.where(spread == 0, math.inf, math.nan))


def weighted_radius(logits: Tensor, slopes: Tensor, *, masked: bool | None = None, buckets: int | None = None,
                    rtol: float = _DEFAULT_RTOL, chunk: int = _DEFAULT_CHUNK) -> Tensor:
    """R_w ≤ ρ*: the largest R with Σ_k softmax(z)_k·m(|a_k − d|R) > 0 for some centre d, m(s) = min_{|ζ|≤s} Re e^ζ.

    Inputs (..., K) of any real dtype and device; float64 (...) on that device. Per row π/Δ_a ≤ R_w ≤ ρ* (= ρ* for two
    live classes), inf where Δ_a = 0 over the live classes, NaN where a logit is NaN or +inf, a live slope is not
    finite, or no class is live. −inf logits mask their class; ``masked`` as in ``safestep.bounds.live_slopes``
    (False promises there is none). Certified for the inputs as given: the rounding of the float32 (float64 if an
    input is) pass over K, of the bucket index and of R·Δ_a is bounded and charged against the certificate, which
    is evaluated in float64 against certified lower bounds of m (docs/certified_radius.md, "What is certified").
    R_w = max(theorem radius, last point of the grid 2^{j/N}, N = ⌈ln 2/ln(1 + rtol)⌉, that the certificate proves);
    ``buckets`` defaults to min(128, max(16, K // 4)).
    """
    z_all, a_all = _flat(logits, slopes)
    result = torch.empty(len(z_all), dtype=torch.float64, device=logits.device)
    for start in range(0, len(z_all), _ROW_BLOCK):
        rows = _block(z_all, a_all, _span(start, len(z_all), z_all.device), buckets, masked, chunk)
        result[start:start + _ROW_BLOCK] = _search(rows, rtol)
    return result.reshape(logits.shape[:-1])


def min_weighted_radius(logits: Tensor, slopes: Tensor, *, masked: bool | None = None,
                        buckets: int | None = None, rtol: float = _DEFAULT_RTOL,
                        chunk: int = _DEFAULT_CHUNK) -> tuple[Tensor, int]:
    """(R, n): R = min_n ``weighted_radius`` (same buckets and rtol, exactly), so R ≤ min_n ρ*_n; n a row attaining it.

    Branch and bound: rows are pruned by π/Δ_a against an upper bound from the _HEAD rows of smallest π/Δ_a, then
    one integer bisection over the shared grid runs for all rows left, coarse buckets first (docs/certified_radius.md,
    "Batch minimum"). NaN (and that row) if some row is invalid; (inf, 0) when every Δ_a = 0.
    """
    z_all, a_all = _flat(logits, slopes)
    n, k = z_all.shape
    step = max(1, chunk // k)
    strip = torch.cat([_strip_bound(z_all[i:i + step], a_all[i:i + step]) for i in range(0, n, step)]).cpu()
    order = torch.argsort(strip)
    head = _block(z_all, a_all, order[:_HEAD].to(z_all.device), buckets, masked, chunk)
    upper = _finish(_bisect(head, _COARSE_RTOL)[1], head.spread)
    ceiling = float(upper.min())
    rest = order[_HEAD:][strip[order[_HEAD:]] < ceiling]
    if 2 * rest.numel() > n:  # most rows go on: reduce all of them in place (head rows again) rather than gather
        index, parts = torch.arange(n), []
    else:  # the head, then the other rows in index order (runs of neighbouring rows gather faster)
        index, parts = torch.cat([order[:_HEAD], rest.sort().values]), [head]
    tail = index[_HEAD:] if parts else index
    parts += [_block(z_all, a_all, tail[i:i + _ROW_BLOCK].to(z_all.device), buckets, masked, chunk)
              for i in range(0, tail.numel(), _ROW_BLOCK)]
    rows = parts[0] if len(parts) == 1 else _Rows(*(torch.cat(column) for column in zip(*(p[:4] for p in parts))),
                                                 head.eps, head.slack)
    index = index.to(z_all.device)
    invalid = torch.isnan(rows.spread)
    if bool(invalid.any()):
        return torch.tensor(math.nan, dtype=torch.float64, device=logits.device), int(index[invalid][0])
    known = _finish(rows.floor, rows.spread)  # certified by theorem (inf where Δ_a = 0)
    if not math.isfinite(ceiling):  # every head row is flat: bracket all the rows instead
        ceiling = float(_finish(_bisect(rows, _COARSE_RTOL)[1], rows.spread).min())
        if not math.isfinite(ceiling):
            return torch.tensor(math.inf, dtype=torch.float64, device=logits.device), 0
    per_octave = _per_octave(rtol)
    lo = math.floor(math.log2(float(known.min())) * per_octave)  # every row accepts it (g ≤ its theorem radius)
    hi = max(lo + 1, math.ceil(math.log2(ceiling) * per_octave))  # the head's binding row rejects it
    coarse = _coarsen(rows)
    live = torch.nonzero(known < _grid(torch.tensor(hi), per_octave)).squeeze(-1)
    live = live[~_accepts_fast(rows, coarse, known, live, hi, per_octave)]
    if live.numel() == 0:  # not expected (a head row rejects hi); fall back to every row's own search
        values = _search(rows, rtol)
        i = int(values.argmin())
        return values[i].to(logits.device), int(index[i])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = _accepts_fast(rows, coarse, known, live, mid, per_octave)
        if bool(ok.all()):
            lo = mid
        else:  # rows that accept mid accept every point below it: they leave
            hi, live = mid, live[~ok]
    # the rows left are those whose last accepted point is lo; min_n max(theorem_n, g_{J_n}) is reached among them
    value = torch.maximum(known[live], _grid(torch.tensor(lo), per_octave))
    i = int(value.argmin())
    return value[i].to(logits.device), int(index[live[i]])


def _accepts_fast(rows: _Rows, coarse: _Rows, known: Tensor, live: Tensor, j: int, per_octave: int) -> Tensor:
    """``_accepts`` for rows ``live`` at grid point j, trying the coarse buckets first (coarse proof ⇒ fine proof)."""
    point = torch.full((live.numel(),), j, dtype=torch.long, device=live.device)
    ok = _accepts(_take(coarse, live), known[live], point, per_octave)
    if not bool(ok.all()):
        again = ~ok
        ok[again] = _accepts(_take(rows, live[again]), known[live[again]], point[again], per_octave)
    return ok


def _strip_bound(z: Tensor, a: Tensor) -> Tensor:
    """π/Δ_a per row (a lower bound on R_w), float64; 0 (never pruned) where a logit is ±inf or NaN or a slope is not
    finite."""
    spread = a.amax(dim=-1).to(torch.float64) - a.amin(dim=-1).to(torch.float64)
    plain = torch.isfinite(spread) & torch.isfinite(z.amax(dim=-1)) & (z.amin(dim=-1) > -math.inf)
    return torch.where(plain & (spread > 0), math.pi / spread, torch.where(plain, math.inf, 0.0))


def weighted_excludes(logits: Tensor, slopes: Tensor, radius: float, *, masked: bool | None = None,
                      buckets: int | None = None, chunk: int = _DEFAULT_CHUNK) -> Tensor:
    """Bool (...): True where the certificate proves ρ* > ``radius`` (no zero of F in |t| ≤ radius); one test per row.

    Rows with Δ_a = 0 are excluded (ρ* = inf); invalid rows (NaN radius in ``weighted_radius``) are not.
    """
    z_all, a_all = _flat(logits, slopes)
    result = torch.empty(len(z_all), dtype=torch.bool, device=logits.device)
    for start in range(0, len(z_all), _ROW_BLOCK):
        rows = _block(z_all, a_all, _span(start, len(z_all), z_all.device), buckets, masked, chunk)
        x = rows.spread * float(radius)
        proved = (x < rows.floor) | (rows.spread == 0) | _certifies(rows, x.nan_to_num(0.0))
        result[start:start + _ROW_BLOCK] = torch.where(torch.isnan(x), False, proved)
    return result.reshape(logits.shape[:-1])
