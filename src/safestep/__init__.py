"""safestep: provably bounded training steps for cross-entropy models.

What users type: the optimizer wrapper ``SafeStep`` and its ``StepReport``, the bounds it takes (``Ghost``,
``Weighted``, ``Exact``, ``Belief``, ``Min``), the report sinks, and the safe learning-rate finder ``find_lr``. The math lives in
``safestep.geometry`` (radii, belief-space steps, curvature); the one guarded step in ``safestep.step``.
"""
from . import geometry
from .bounds import Belief, Bound, Exact, Ghost, Min, Weighted
from .guard import SafeStep
from .lr_finder import LRFinderResult, find_lr
from .telemetry import CallbackSink, CSVSink, JSONLSink, StepReport, TensorBoardSink, read_reports

__version__ = "0.1.0"

__all__ = ["SafeStep", "StepReport", "Bound", "Ghost", "Weighted", "Exact", "Belief", "Min", "CSVSink", "JSONLSink",
           "TensorBoardSink", "CallbackSink", "read_reports", "find_lr", "LRFinderResult", "geometry", "__version__"]
