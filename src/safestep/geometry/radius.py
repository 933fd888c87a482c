"""Convergence radius of the softmax cross-entropy along a step (Ghosts of Softmax; docs/geometry.md).

F(t) = Σ_k w_k e^{a_k t} with w = softmax(logits), a = slopes; the line loss is analytic for |t| < ρ*, the modulus of
F's nearest complex zero. All functions take (..., K) tensors and work in float64. A logit of −inf masks its class:
its weight is 0 and its slope is ignored whatever its value (NaN and ±inf included). The exact radius is proposed by
Newton from the ghosts of the Newton-polygon edges in normalized slopes b ∈ [−½, ½] and certified by the argument
principle, F always evaluated with its largest term factored out (docs/geometry.md, "How exact_radius certifies").
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .checks import as_float64, class_vectors, finite_spread, live_mask, live_values, softmax_line
from .weighted import weighted_radius

__all__ = ["spread", "row_spread", "radius_lower_bound", "binary_radius", "exact_radius", "nearest_ghost",
           "min_exact_radius"]


def row_spread(slopes: Tensor, live: Tensor | None = None) -> Tensor:
    """Δ_a = max_k a_k − min_k a_k per row over the live classes, float64 (...): the unvalidated hot path.

    Two reductions in the slopes' own dtype and device (a bool ``live`` mask adds two masked copies), no host read;
    only the reduced values are cast to float64. Invalid rows come back non-finite instead of raising: NaN or ±inf
    at a live class gives NaN or inf, a row with no live class −inf (docs/geometry.md, "The hot path").
    """
    if live is None:
        top, bottom = slopes.amax(dim=-1), slopes.amin(dim=-1)
    else:
        top = torch.where(live, slopes, -math.inf).amax(dim=-1)
        bottom = torch.where(live, slopes, math.inf).amin(dim=-1)
    return top.to(torch.float64) - bottom.to(torch.float64)


def spread(slopes: Tensor, *, live: Tensor | None = None) -> Tensor:
    """Δ_a = max_k a_k − min_k a_k over the last dimension, over the classes where ``live`` is True (all if None).

    Raises ValueError on empty input, K < 2, NaN/inf live slopes, a row without a live class, a ``live`` that is not
    a bool mask broadcastable to ``slopes``, or a spread that overflows float64."""
    if live is None:
        a = class_vectors(slopes, "slopes")
    else:
        a = class_vectors(slopes, "slopes", finite=False)
        a = live_values(a, live_mask(live, a.shape), "slopes")
    return finite_spread(row_spread(a))


def radius_lower_bound(slopes: Tensor, *, live: Tensor | None = None) -> Tensor:
    """ρ_a = π/Δ_a, a lower bound on ρ* for any K (inf where Δ_a = 0); ``live`` as in ``spread``."""
    d = spread(slopes, live=live)
    return torch.where(d > 0, math.pi / d, torch.full_like(d, math.inf))


def binary_radius(margin: Tensor | float, spread: Tensor | float) -> Tensor:
    """Exact K = 2 radius √(δ² + π²)/|Δ| (inf where Δ = 0)."""
    delta = as_float64(margin, "margin")
    d = as_float64(spread, "spread").abs()
    delta, d = torch.broadcast_tensors(delta, d)
    return torch.where(d > 0, torch.sqrt(delta**2 + math.pi**2) / d, torch.full_like(d, math.inf))


def exact_radius(logits: Tensor, slopes: Tensor, rtol: float = 1e-8) -> Tensor:
    """ρ* = min{|t| : Σ_k softmax(z)_k e^{a_k t} = 0}, certified to relative tolerance rtol (inf where Δ_a = 0).

    The returned r satisfies (1 − rtol)·r ≤ ρ* ≤ r: the argument principle shows no zero of F in |t| < (1 − rtol)·r,
    and a zero has modulus r (a Newton zero confirmed by a zero count on |t| = (1 + rtol)·r, or the top of a
    bisection bracket of relative width ≤ rtol). Inputs (..., K) of any real dtype; float64 (...) on their device.
    −inf logits mask their class (its slope ignored; one live class gives inf). Raises ValueError on NaN or +inf
    logits, rows without a live class, NaN/inf live slopes, overflowing spreads, empty input, K < 2 or mismatched
    shapes.
    """
    return _exact(logits, slopes, rtol)[0]


def nearest_ghost(logits: Tensor, slopes: Tensor) -> Tensor:
    """The zero t of F(t) = Σ_k softmax(z)_k e^{a_k t} with |t| = ρ* and Im t > 0 (zeros come in conjugate pairs).

    complex128 (...); NaN + NaN·j where there is no zero (Δ_a = 0) or the radius was certified by bisection alone.
    Ties in modulus return one of them. Masked classes and invalid input as in ``exact_radius``.
    """
    return _exact(logits, slopes, _DEFAULT_RTOL)[1]


def min_exact_radius(logits: Tensor, slopes: Tensor, rtol: float = 1e-8) -> tuple[Tensor, int]:
    """min over rows of ρ*, with the flat row index, by branch and bound on the certified lower bounds R_w ≤ ρ*.

    Rows are taken in ascending R_w (``weighted_radius``): the first sets the incumbent U; the next, _BRANCH at a
    time, are solved only if they have a zero in |t| < U (argument principle); the search stops at the first row
    with R_w ≥ U. Returns (inf, 0) when every Δ_a = 0; masked classes and invalid input as in ``exact_radius``.
    Peak extra memory O(2^20 + _BRANCH·K) entries, whatever the rows (docs/certified_radius.md).
    """
    _check_rtol(rtol)
    z, a = _checked_rows(logits, slopes)
    lower = weighted_radius(z, a, rtol=_SCREEN_RTOL).cpu()
    order = torch.argsort(lower)
    order = order[torch.isfinite(lower[order])]
    best, best_row = math.inf, 0
    start, width = 0, 1  # the first row alone, to set the incumbent before screening
    while start < order.numel():
        rows = order[start:start + width]
        start, width = start + width, _BRANCH
        rows = rows[lower[rows] < best]
        if rows.numel() == 0:
            break  # ascending order: no later row has R_w below the incumbent either
        problem = _prepare(z[rows.to(z.device)], a[rows.to(z.device)], rtol)
        logw, b, gap = problem.logw, problem.b, problem.spread
        if math.isfinite(best):
            count, resolved = _upper_zero_count(logw, b, best * gap)
            hit = (count > 0) | ~resolved
            rows, logw, b, gap = rows[hit], logw[hit], b[hit], gap[hit]
            if rows.numel() == 0:
                continue
        radius = _solve_normalized(logw, b, rtol)[0] / gap
        i = int(radius.argmin())
        if float(radius[i]) < best:
            best, best_row = float(radius[i]), int(rows[i])
    return torch.tensor(best, dtype=torch.float64, device=logits.device), best_row


def _checked_rows(logits: Tensor, slopes: Tensor) -> tuple[Tensor, Tensor]:
    """(n, K) views of logits and slopes, validated as ``softmax_line`` would, chunk by chunk of rows.

    A chunk is screened in its own dtype; only one that fails the screen goes through ``softmax_line``, which raises
    on invalid input. Unusual input (shapes, dtypes, empty) goes to it whole.
    """
    plain = (isinstance(logits, Tensor) and isinstance(slopes, Tensor) and logits.shape == slopes.shape
             and logits.ndim >= 1 and logits.numel() > 0 and logits.shape[-1] >= 2
             and logits.is_floating_point() and slopes.is_floating_point())
    if not plain:
        z, a, _ = softmax_line(logits, slopes)
        return z.reshape(-1, z.shape[-1]), a.reshape(-1, a.shape[-1])
    k = logits.shape[-1]
    z, a = logits.detach().reshape(-1, k), slopes.detach().reshape(-1, k)
    step = max(1, _CHUNK_ELEMENTS // k)
    for i in range(0, len(z), step):
        zc, ac = z[i:i + step], a[i:i + step]
        fine = bool(torch.isfinite(zc.amax(dim=-1)).all()) and bool(torch.isfinite(ac).all())
        if fine:
            low, high = torch.aminmax(ac, dim=-1)
            fine = bool(torch.isfinite(high.to(torch.float64) - low.to(torch.float64)).all())
        if not fine:
            softmax_line(zc, ac)
    return z, a


# ----------------------------------------------------------------------------------------------------------
# Internals. Normalized rows: logw = log softmax(z) and b ∈ [−½, ½] (spread 1), zeros t_norm = Δ_a · t.

_DEFAULT_RTOL = 1e-8
_MIN_RTOL = 1e-12
_MAX_RTOL = 1e-2
_EPS = torch.finfo(torch.float64).eps
_ROUNDING_FLOOR = 64.0  # |F| below this many K·eps of Σ|terms| is treated as possibly zero
_GRID_PER_UNIT = 3.0  # initial samples per unit radius on the semicircle (normalized units)
_GRID_MIN = 8
_MIN_ARC = math.pi * 2.0**-46  # a segment still failing at this angular width passes through a zero
_MAX_PIECES = 64  # a failing segment is cut into ⌈2·bound/max|F(ends)|⌉ pieces, 4 to this many
_NEWTON_STEPS = 30
_NEWTON_MAX_STEP = 1.0
_NEWTON_RESIDUAL = 1e-10  # accept a Newton limit when |F| ≤ this · Σ|terms|
_HULL_EDGES = 3
_FIXED_STARTS = (1.3 * math.pi * complex(math.cos(math.pi / 4), math.sin(math.pi / 4)), 1.3j * math.pi,
                 1.3 * math.pi * complex(-math.cos(math.pi / 4), math.sin(math.pi / 4)), 2j * math.pi)
_FIRST_WIDTH = 1e-2  # relative bracket width of the first bisection fallback; shrinks ×1e-2 per round
_LOCATE_STARTS = 3
_BRANCH = 8  # rows screened and solved together by min_exact_radius
_SCREEN_RTOL = 1e-2  # relative precision of the R_w that orders and prunes min_exact_radius's rows
_NAN_C = complex(math.nan, math.nan)
_CHUNK_ELEMENTS = 1 << 20  # (point × class) entries per evaluation chunk: each float64 temporary ≤ 8 MiB


class _Problem(NamedTuple):
    logw: Tensor  # (n, K) log softmax(logits)
    b: Tensor  # (n, K) normalized slopes (rows with Δ_a = 0 hold zeros)
    spread: Tensor  # (n,) Δ_a
    lead: torch.Size  # leading shape of the input
    device: torch.device


# Samples of F are rows of a (P, 6) tensor; all but SCALE are scaled by e^{−scale}, where
# scale = max_k log|w_k e^{b_k t}|: Re F, Im F, scale, Σ_{b>0} w b e^{b Re t}, Σ_{b<0} w |b| e^{b Re t}, Σ w e^{b Re t}.
_RE, _IM, _SCALE, _RISING, _FALLING, _SIZE = range(6)


def _check_rtol(rtol: float) -> None:
    if not isinstance(rtol, (int, float)) or isinstance(rtol, bool) or not _MIN_RTOL <= rtol <= _MAX_RTOL:
        raise ValueError(f"rtol must be a float in [{_MIN_RTOL:g}, {_MAX_RTOL:g}] (float64 cannot certify less), "
                         f"got {rtol!r}")


def _prepare(logits: Tensor, slopes: Tensor, rtol: float) -> _Problem:
    """Validated rows in normalized form; masked classes get log w = −inf and b = −½ (they add nothing to F)."""
    _check_rtol(rtol)
    z, a, _ = softmax_line(logits, slopes)
    device, lead, k = z.device, z.shape[:-1], z.shape[-1]
    z, a = z.reshape(-1, k).cpu(), a.reshape(-1, k).cpu()
    top, bottom = a.amax(-1, keepdim=True), a.amin(-1, keepdim=True)
    gap = top - bottom
    b = torch.where(gap > 0, (a - 0.5 * (top + bottom)) / gap.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return _Problem(torch.log_softmax(z, dim=-1), b, gap.squeeze(-1), lead, device)


def _exact(logits: Tensor, slopes: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    problem = _prepare(logits, slopes, rtol)
    n = problem.spread.numel()
    radius = torch.full((n,), math.inf, dtype=torch.float64)
    ghost = torch.full((n,), _NAN_C, dtype=torch.complex128)
    rows = torch.nonzero(problem.spread > 0).squeeze(-1)
    if rows.numel():
        r, g = _solve_normalized(problem.logw[rows], problem.b[rows], rtol)
        radius[rows], ghost[rows] = r / problem.spread[rows], g / problem.spread[rows]
    return radius.reshape(problem.lead).to(problem.device), ghost.reshape(problem.lead).to(problem.device)


def _term_parts(logw: Tensor, b: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scaled term magnitudes, cos and sin of the term phases, and the scale, at points t (P,)."""
    expo = logw + b * t.real[:, None]
    scale = expo.amax(dim=-1)
    mag = torch.exp(expo - scale[:, None])
    phase = b * t.imag[:, None]
    return mag, torch.cos(phase), torch.sin(phase), scale


def _by_points(fn: Callable[[Tensor, Tensor, Tensor], Tensor | tuple[Tensor, Tensor]], logw: Tensor, b: Tensor,
               rows: Tensor, t: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    """fn(logw[rows], b[rows], t) in chunks of ≤ _CHUNK_ELEMENTS (point × class) entries, whatever the points P."""
    step = max(1, _CHUNK_ELEMENTS // max(1, logw.shape[-1]))
    if rows.numel() <= step:
        return fn(logw[rows], b[rows], t)
    parts = [fn(logw[rows[i:i + step]], b[rows[i:i + step]], t[i:i + step]) for i in range(0, rows.numel(), step)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[return-value]
    return torch.cat(parts)  # type: ignore[arg-type]


def _sample(logw: Tensor, b: Tensor, rows: Tensor, t: Tensor) -> Tensor:
    """Scaled samples of F of rows ``rows`` (P,) at points t (P,), as a (P, 6) tensor (columns _RE … _SIZE)."""
    return _by_points(_sample_gathered, logw, b, rows, t)  # type: ignore[return-value]


def _sample_gathered(logw: Tensor, b: Tensor, t: Tensor) -> Tensor:
    mag, cos, sin, scale = _term_parts(logw, b, t)
    slope_mag = mag * b
    return torch.stack([(mag * cos).sum(-1), (mag * sin).sum(-1), scale, slope_mag.clamp(min=0).sum(-1),
                        (-slope_mag).clamp(min=0).sum(-1), mag.sum(-1)], dim=1)


def _newton_step(logw: Tensor, b: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Newton step F/F' and the relative residual |F|/Σ|terms| at points t."""
    mag, cos, sin, _ = _term_parts(logw, b, t)
    re, im = mag * cos, mag * sin
    value = torch.complex(re.sum(-1), im.sum(-1))
    deriv = torch.complex((re * b).sum(-1), (im * b).sum(-1))
    return value / deriv, value.abs() / mag.sum(-1)


def _trusted_abs(s: Tensor, k: int) -> Tensor:
    """|F|/e^{scale} minus its worst-case rounding error (never negative)."""
    return (torch.hypot(s[:, _RE], s[:, _IM]) - _ROUNDING_FLOOR * k * _EPS * s[:, _SIZE]).clamp(min=0)


def _upper_zero_count(logw: Tensor, b: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """Zeros of F in the open upper half-disk |t| < R by the argument principle; returns (count, resolved).

    F > 0 on the real axis, so the winding along the upper semicircle from R to −R is 2π·count. Segments are split
    until h·max|F'| < max(|F(ends)|): F then stays in a disk around that end value that excludes 0, and the phase
    change is the principal angle of the ratio of the end values. max|F'| ≤ Σ_{b>0} w b e^{b·x_left} +
    Σ_{b<0} w|b| e^{b·x_right} (Re t decreases along the arc). A segment still failing when shorter than _MIN_ARC
    passes (numerically) through a zero: that row is unresolved.
    """
    n, k = logw.shape
    segments = (radius * _GRID_PER_UNIT).ceil().long() + _GRID_MIN
    rows = torch.repeat_interleave(torch.arange(n), segments + 1)
    first = torch.cumsum(segments + 1, 0) - (segments + 1)
    j = torch.arange(rows.numel()) - first[rows]
    phi = math.pi * j.double() / segments[rows].double()
    samples = _sample(logw, b, rows, torch.polar(radius[rows], phi))
    left = torch.nonzero(j < segments[rows]).squeeze(-1)
    seg_row, phi_l, phi_r = rows[left], phi[left], phi[left + 1]
    s_l, s_r = samples[left], samples[left + 1]
    winding = torch.zeros(n, dtype=torch.float64)
    resolved = torch.ones(n, dtype=torch.bool)
    while True:
        ref = torch.maximum(s_l[:, _SCALE], s_r[:, _SCALE])
        up_l, up_r = torch.exp(s_l[:, _SCALE] - ref), torch.exp(s_r[:, _SCALE] - ref)
        bound = radius[seg_row] * (phi_r - phi_l) * (up_l * s_l[:, _RISING] + up_r * s_r[:, _FALLING])
        end_l, end_r = up_l * _trusted_abs(s_l, k), up_r * _trusted_abs(s_r, k)
        ok = bound < torch.maximum(end_l, end_r)
        winding.index_add_(0, seg_row[ok], _turn(s_l[ok], s_r[ok]))
        stuck = ~ok & (phi_r - phi_l <= _MIN_ARC)
        resolved[seg_row[stuck]] = False
        bad = torch.nonzero(~ok & ~stuck).squeeze(-1)
        if bad.numel() == 0:
            break
        pieces = 2 * bound[bad] / torch.maximum(end_l[bad], end_r[bad])
        pieces = pieces.nan_to_num(posinf=_MAX_PIECES).ceil().clamp(4, _MAX_PIECES).long()
        seg_row, phi_l, phi_r, s_l, s_r = _split(logw, b, radius, seg_row[bad], phi_l[bad], phi_r[bad],
                                                 s_l[bad], s_r[bad], pieces)
    turns = winding / (2 * math.pi)
    count = turns.round()
    return count.long(), resolved & ((turns - count).abs() < 0.25)


def _turn(s_l: Tensor, s_r: Tensor) -> Tensor:
    """Principal angle of F(right)/F(left) for paired samples."""
    re_l, im_l, re_r, im_r = s_l[:, _RE], s_l[:, _IM], s_r[:, _RE], s_r[:, _IM]
    return torch.atan2(im_r * re_l - re_r * im_l, re_r * re_l + im_r * im_l)


def _split(logw: Tensor, b: Tensor, radius: Tensor, seg_row: Tensor, phi_l: Tensor, phi_r: Tensor,
           s_l: Tensor, s_r: Tensor, pieces: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Cut each arc segment into its number of equal pieces, sampling F at the new interior points."""
    m = len(seg_row)
    owner = torch.repeat_interleave(torch.arange(m), pieces - 1)
    first_new = torch.cumsum(pieces - 1, 0) - (pieces - 1)
    offset = (torch.arange(owner.numel()) - first_new[owner] + 1).double()
    phi_new = phi_l[owner] + (phi_r - phi_l)[owner] * offset / pieces[owner].double()
    s_new = _sample(logw, b, seg_row[owner], torch.polar(radius[seg_row[owner]], phi_new))
    pool, phi_pool = torch.cat([s_l, s_r, s_new]), torch.cat([phi_l, phi_r, phi_new])

    def node(o: Tensor, q: Tensor) -> Tensor:  # pool index of node q (0..pieces) of segment o
        inner = 2 * m + first_new[o] + q - 1
        return torch.where(q == 0, o, torch.where(q == pieces[o], m + o, inner))

    seg_owner = torch.repeat_interleave(torch.arange(m), pieces)
    q = torch.arange(seg_owner.numel()) - (torch.cumsum(pieces, 0) - pieces)[seg_owner]
    lo_idx, hi_idx = node(seg_owner, q), node(seg_owner, q + 1)
    return seg_row[seg_owner], phi_pool[lo_idx], phi_pool[hi_idx], pool[lo_idx], pool[hi_idx]


def _newton(logw: Tensor, b: Tensor, owner: Tensor, t: Tensor) -> Tensor:
    """Damped Newton on F of rows ``owner`` (P,) from starts t (P,), folded into Im t > 0; NaN where it failed."""
    t = t.clone()
    residual = torch.full(t.shape, math.inf, dtype=torch.float64)
    active = torch.arange(t.numel())
    for _ in range(_NEWTON_STEPS):
        step, residual[active] = _by_points(_newton_step, logw, b, owner[active], t[active])
        length = step.abs()
        step = torch.where(length > _NEWTON_MAX_STEP, step * (_NEWTON_MAX_STEP / length), step)
        moved = t[active] - step
        t[active] = torch.where(moved.imag < 0, moved.conj(), moved)
        active = active[length > 1e-14 * (1 + moved.abs())]
        if active.numel() == 0:
            break
    ok = (residual < _NEWTON_RESIDUAL) & (t.imag > 0) & torch.isfinite(t.real) & torch.isfinite(t.imag)
    return torch.where(ok, t, torch.full_like(t, _NAN_C))


def _newton_from(logw: Tensor, b: Tensor, starts: Tensor) -> Tensor:
    """Nearest zero per row found by Newton from starts (n, S): NaN results ignored, NaN if all are."""
    s = starts.shape[1]
    z = _newton(logw, b, torch.arange(len(logw)).repeat_interleave(s), starts.reshape(-1)).reshape(-1, s)
    modulus = torch.where(torch.isnan(z.real), math.inf, z.abs())
    return z.gather(1, modulus.argmin(dim=1, keepdim=True)).squeeze(1)


def _hull_ghosts(logw: Tensor, b: Tensor) -> Tensor:
    """Two-term ghosts x_e + iπ/g_e of the upper-hull edges of the points (b_k, log w_k): (n, edges), NaN-padded.

    On an edge the two terms tie at Re t = x_e and dominate the rest; the pair alone vanishes at
    x_e + iπ(2m+1)/g_e (g_e = slope gap). Edges are found by gift wrapping, vectorized over rows.
    """
    lowest = b.amin(-1, keepdim=True)
    current = torch.where(b == lowest, logw, -math.inf).argmax(-1, keepdim=True)
    ghosts = []
    while True:
        b_cur, lw_cur = b.gather(-1, current), logw.gather(-1, current)
        right = b > b_cur
        slope = torch.where(right, (logw - lw_cur) / (b - b_cur), -math.inf)
        steepest = slope.amax(-1, keepdim=True)
        alive = torch.isfinite(steepest)
        if not alive.any():
            return torch.stack(ghosts, dim=1)
        on_edge = right & (slope >= steepest - 1e-12 * steepest.abs())
        following = torch.where(on_edge, b, -math.inf).argmax(-1, keepdim=True)
        gap = b.gather(-1, following) - b_cur
        ghost = torch.complex(-steepest, math.pi / gap).squeeze(-1)
        ghosts.append(torch.where(alive.squeeze(-1), ghost, _NAN_C))
        current = torch.where(alive, following, current)


def _newton_candidates(logw: Tensor, b: Tensor) -> Tensor:
    """A zero of F per row (NaN if none found), from the nearest hull-edge ghosts and fixed starts."""
    hull = _hull_ghosts(logw, b)
    estimate = torch.where(torch.isnan(hull.real), math.inf, hull.abs())
    nearest = estimate.topk(min(_HULL_EDGES, hull.shape[1]), dim=1, largest=False).indices
    hull = hull.gather(1, nearest)
    hull = torch.where(torch.isnan(hull.real), _FIXED_STARTS[1], hull)
    fixed = torch.tensor(_FIXED_STARTS, dtype=torch.complex128).expand(len(logw), -1)
    return _newton_from(logw, b, torch.cat([hull, fixed], dim=1))


def _locate(logw: Tensor, b: Tensor, radius: Tensor) -> Tensor:
    """A zero near the circle |t| = R per row: Newton from the deepest local minima of |F|/Σ|terms| on it."""
    n = len(logw)
    m = int(math.ceil(8 * float(radius.max()))) + 64
    phi = torch.linspace(0, math.pi, m + 2, dtype=torch.float64)[1:-1]
    t = torch.polar(radius[:, None].expand(n, m), phi.expand(n, m))
    samples = _sample(logw, b, torch.arange(n).repeat_interleave(m), t.reshape(-1))
    rel = (torch.hypot(samples[:, _RE], samples[:, _IM]) / samples[:, _SIZE]).reshape(n, m)
    padded = torch.nn.functional.pad(rel, (1, 1), value=math.inf)
    is_min = (rel <= padded[:, :-2]) & (rel <= padded[:, 2:])
    deepest = torch.where(is_min, rel, math.inf).topk(_LOCATE_STARTS, dim=1, largest=False).indices
    return _newton_from(logw, b, t.gather(1, deepest))


def _refine_bracket(logw: Tensor, b: Tensor, lo: Tensor, hi: Tensor, width: float) -> tuple[Tensor, Tensor]:
    """Shrink [lo, hi] (no zero in |t| < lo; one in |t| ≤ hi, or hi = inf) until hi ≤ lo(1 + width).

    An infinite hi is first found by doubling R; then geometric bisection on the zero count."""
    lo, hi = lo.clone(), hi.clone()
    while True:
        todo = torch.nonzero(hi > lo * (1 + width)).squeeze(-1)
        if todo.numel() == 0:
            return lo, hi
        probe = torch.where(torch.isinf(hi[todo]), 2 * lo[todo], torch.sqrt(lo[todo] * hi[todo]))
        count, resolved = _upper_zero_count(logw[todo], b[todo], probe)
        hit = (count > 0) | ~resolved
        hi[todo[hit]], lo[todo[~hit]] = probe[hit], probe[~hit]


def _solve_normalized(logw: Tensor, b: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    """Certified nearest zero of normalized rows: (radius, ghost with Im > 0 or NaN if only bracketed)."""
    n = len(logw)
    ghost = _newton_candidates(logw, b)
    lo = torch.full((n,), math.pi, dtype=torch.float64)  # zero-free strip |Im t| < π
    hi = torch.full((n,), math.inf, dtype=torch.float64)
    radius = torch.full((n,), math.nan, dtype=torch.float64)
    todo = torch.arange(n)
    width = _FIRST_WIDTH
    while todo.numel():
        found = todo[~torch.isnan(ghost[todo].real)]
        modulus = ghost[found].abs()
        both = torch.cat([found, found])
        circles = torch.cat([modulus * (1 - rtol), modulus * (1 + rtol)])
        count, count_ok = _upper_zero_count(logw[both], b[both], circles)
        (inner, outer), (inner_ok, outer_ok) = count.chunk(2), count_ok.chunk(2)
        clean = (inner == 0) & inner_ok
        certified = clean & (outer > 0) & outer_ok
        radius[found[certified]] = modulus[certified]
        lo[found[clean]] = torch.maximum(lo[found[clean]], modulus[clean] * (1 - rtol))
        hi[found[~clean]] = torch.minimum(hi[found[~clean]], modulus[~clean] * (1 - rtol))
        todo = todo[torch.isnan(radius[todo])]
        if todo.numel() == 0:
            break
        lo[todo], hi[todo] = _refine_bracket(logw[todo], b[todo], lo[todo], hi[todo], max(width, rtol))
        ghost[todo] = _locate(logw[todo], b[todo], hi[todo])
        tight = hi[todo] <= lo[todo] * (1 + rtol)
        done = todo[tight]
        radius[done] = hi[done]
        stray = done[ghost[done].abs() > hi[done] * (1 + rtol)]
        ghost[stray] = _NAN_C
        todo = todo[~tight]
        width *= 1e-2
    return radius, ghost
