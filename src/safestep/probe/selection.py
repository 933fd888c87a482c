"""Which batch rows a probe measures: a fixed share of the batch, spent on the rows most likely to set the radius.

A budget (``probe_size``) is a share of the batch rows, a row count, or None for the whole batch; ``probe_select``
spends it on the rows a score from the training forward's logits ranks highest ("score"), on a stride rotating
with the step count ("stride"), or half of each ("mixed"). The choice is a deterministic function of the batch, the
model and the step count. What each choice costs and certifies: docs/probe_budget.md.
"""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

from ..bounds import IGNORE_INDEX

__all__ = ["ProbeSize", "DEFAULT_PROBE_SIZE", "SELECTIONS", "check_probe_size", "probe_count", "row_scores",
           "eligible_rows", "choose_rows"]

DEFAULT_PROBE_SIZE = 0.125  # an eighth of the batch rows (docs/probe_budget.md)

SELECTIONS = {"mixed": 0.5, "score": 1.0, "stride": 0.0}
"""The row choices and the share of the budget each spends on the highest scores (the rest: a rotated stride)."""

ProbeSize = Union[int, float, None]
SMALL_VOCABULARY = 4096  # above, scores use one max pass over the logits instead of an exponential of each


def check_probe_size(probe_size: object) -> int | float | None:
    """``probe_size`` if it is None, a positive int (rows) or a float share in (0, 1]; ValueError otherwise."""
    rows = isinstance(probe_size, int) and not isinstance(probe_size, bool) and probe_size >= 1
    if probe_size is None or rows or (isinstance(probe_size, float) and 0.0 < probe_size <= 1.0):
        return probe_size  # type: ignore[return-value]
    raise ValueError(f"probe_size must be a positive int (rows), a share of the batch in (0, 1], or None (the whole "
                     f"batch), got {probe_size!r}")


def probe_count(batch: int, probe_size: int | float | None) -> int:
    """Rows to probe in a batch of ``batch``: all for None, min(n, batch) for an int n, ⌈share·batch⌉ for a float."""
    if probe_size is None:
        return batch
    if isinstance(probe_size, float):
        return min(batch, max(1, math.ceil(probe_size * batch - 1e-9)))
    return min(batch, probe_size)


@torch.no_grad()
def row_scores(logits: Tensor, labels: Tensor | None = None) -> Tensor | None:
    """One score per batch row (leading dimension), higher = more likely to set the radius: with labels the row's
    cross-entropy log Σ e^z − z_y (above SMALL_VOCABULARY classes its lower bound z_max − z_y, one max pass), without
    them the negative top-2 margin −(z_(1) − z_(2)), or None above SMALL_VOCABULARY classes. A (B, T, V) row scores
    its largest position, ignored positions excluded."""
    z = logits.detach()
    small = z.shape[-1] <= SMALL_VOCABULARY
    if labels is None:
        if not small:
            return None
        top = z.topk(2, dim=-1).values
        score = (top[..., 1] - top[..., 0]).float()
    else:
        labels = labels.to(z.device)
        ignored = labels == IGNORE_INDEX
        picked = z.gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1).float()
        log_total = torch.logsumexp(z.float(), dim=-1) if small else z.amax(dim=-1).float()
        score = (log_total - picked).masked_fill(ignored, -math.inf)
    score = torch.nan_to_num(score, nan=math.inf)  # a non-finite row must be probed: it makes the step skip
    return score.reshape(score.shape[0], -1).amax(dim=1)


def _stride(batch: int, count: int, step: int) -> Tensor:
    """``count`` evenly spaced rows, the offset rotating with the step so every row of a fixed layout is visited."""
    stride = batch / count
    offset = (step % max(1, math.floor(stride))) if stride >= 2 else 0
    return (torch.arange(count, dtype=torch.float64) * stride + offset).floor().long().clamp(max=batch - 1)


def eligible_rows(labels: Tensor) -> Tensor:
    """True for the batch rows with at least one label in the loss (not IGNORE_INDEX): padding rows are never probed
    while a row in the loss is left."""
    return (labels != IGNORE_INDEX).reshape(labels.shape[0], -1).any(dim=1)


def choose_rows(batch: int, count: int, scores: Tensor | None, step: int, scored_share: float = 1.0,
                eligible: Tensor | None = None) -> Tensor | None:
    """``count`` row indices (ascending), None when every row is probed.

    ⌈scored_share·count⌉ of them are the highest scores (ties to the lower index), the rest come from a stride
    rotated by the step (skipping rows already chosen); without scores all come from the stride. Rows not
    ``eligible`` (bool per row: no label in the loss) come last: they are taken only when fewer than ``count``
    rows are eligible, and eligible rows off the stride fill the stride's ineligible places. Fixed-size tensor
    operations only: no host read, whatever the device.
    """
    if count >= batch:
        return None
    scored = 0 if scores is None or scores.shape != (batch,) else math.ceil(scored_share * count - 1e-9)
    if scored == 0 and eligible is None:
        return _stride(batch, count, step)
    device = scores.device if scored else eligible.device  # type: ignore[union-attr]
    # priority: 3 for the scored rows, 2 − j/(2·count) for stride candidate j, 1 − n/(2·batch) for any other row n,
    # and 3 less for rows outside the loss
    priority = 1.0 - torch.arange(batch, device=device, dtype=torch.float32) / (2.0 * batch)
    priority[_stride(batch, count, step).to(device)] = 2.0 - torch.arange(count, device=device) / (2.0 * count)
    if scored:
        ranked = scores if eligible is None else scores.masked_fill(~eligible.to(device), -math.inf)
        priority[torch.sort(ranked, descending=True, stable=True).indices[:scored]] = 3.0
    if eligible is not None:
        priority = priority - 3.0 * (~eligible.to(device)).float()
    return torch.topk(priority, count).indices.sort().values
