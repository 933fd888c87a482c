"""safestep: provably bounded training steps for cross-entropy models: ``SafeStep``, its ``StepReport``, the bounds,
the report sinks and ``find_lr``; the math is ``safestep.geometry``, the one guarded step ``safestep.step``."""
from . import geometry
from .bounds import Belief, Bound, Exact, Ghost, Min, Weighted
from .guard import SafeStep
from .lr_finder import LRFinderResult, find_lr
from .telemetry import CallbackSink, CSVSink, JSONLSink, StepReport, TensorBoardSink, read_reports

__version__ = "0.1.0"

__all__ = ["SafeStep", "StepReport", "Bound", "Ghost", "Weighted", "Exact", "Belief", "Min", "CSVSink", "JSONLSink",
           "TensorBoardSink", "CallbackSink", "read_reports", "find_lr", "LRFinderResult", "geometry", "__version__"]
