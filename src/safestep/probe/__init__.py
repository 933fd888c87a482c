"""Probes: directional logit derivatives a = J_z(θ0)·v of a model along a proposed update (docs/geometry.md).

``inputs`` replays the batch (capture, call forms, row subsets), ``dense`` probes a model functionally (JVP or
finite differences), ``sharded`` probes FSDP2 parameters in place; both follow the ``Probe`` protocol of ``base``.
"""
from .base import (METHODS, Displacement, Probe, Slopes, central_difference, fd_step, forward_difference,
                   is_missing_forward_ad, probe_dtype)
from .dense import LogitProbe, check_logits, logits_of, require_forward
from .inputs import (CallArgs, InputCapture, Inputs, LogitsFn, as_batch, batch_size, call_model, default_logits_fn,
                     describe, extract_logits, map_tensors, shared_leaves, take_rows)
from .selection import (DEFAULT_PROBE_SIZE, SELECTIONS, ProbeSize, check_probe_size, choose_rows, eligible_rows,
                        probe_count, row_scores)

__all__ = [
    "METHODS", "Displacement", "Probe", "Slopes", "central_difference", "forward_difference", "fd_step",
    "is_missing_forward_ad", "probe_dtype", "LogitProbe", "check_logits", "logits_of", "require_forward",
    "CallArgs", "InputCapture", "as_batch", "Inputs", "LogitsFn", "batch_size", "call_model", "default_logits_fn",
    "describe", "extract_logits", "map_tensors", "shared_leaves", "take_rows",
    "DEFAULT_PROBE_SIZE", "SELECTIONS", "ProbeSize", "check_probe_size", "choose_rows", "eligible_rows",
    "probe_count", "row_scores",
]
