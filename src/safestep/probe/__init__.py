"""Probes: directional logit derivatives a = J_z(θ0)·v of a model along a proposed update (docs/geometry.md).

``inputs`` replays the batch (capture, call forms, row subsets), ``dense`` probes a model functionally (JVP or
finite differences), ``sharded`` probes FSDP2 parameters in place; both follow the ``Probe`` protocol of ``base``.
"""
from .base import METHODS, Displacement, Probe, Slopes, central_difference
from .dense import LogitProbe
from .inputs import (CallArgs, InputCapture, Inputs, LogitsFn, as_batch, batch_size, call_model, default_logits_fn,
                     extract_logits, shared_leaves, take_rows)
from .selection import (DEFAULT_PROBE_SIZE, SELECTIONS, ProbeSize, check_probe_size, choose_rows, eligible_rows,
                        probe_count, row_scores)

__all__ = [
    "METHODS", "Displacement", "Probe", "Slopes", "central_difference", "LogitProbe", "CallArgs", "InputCapture",
    "Inputs", "LogitsFn", "as_batch", "batch_size", "call_model", "default_logits_fn", "extract_logits",
    "shared_leaves", "take_rows", "DEFAULT_PROBE_SIZE", "SELECTIONS", "ProbeSize", "check_probe_size", "choose_rows",
    "eligible_rows", "probe_count", "row_scores",
]
