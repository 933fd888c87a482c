"""safestep: provably bounded training steps for cross-entropy models.

Re-exports the geometry layer (``safestep.geometry``), the optimizer wrapper ``SafeStep`` with its
``StepReport``, and the safe learning-rate finder ``find_lr``.
"""
from . import geometry
from .geometry import *  # noqa: F403 -- the geometry layer's public names, listed in geometry.__all__
from .guard import SafeStep
from .lr_finder import LRFinderResult, find_lr
from .telemetry import StepReport

__version__ = "0.1.0"

__all__ = [*geometry.__all__, "SafeStep", "StepReport", "find_lr", "LRFinderResult", "__version__"]
