"""safestep: provably bounded training steps for cross-entropy models."""
from .geometry import binary_radius, radius_lower_bound, spread

__version__ = "0.1.0"

__all__ = ["spread", "radius_lower_bound", "binary_radius", "__version__"]
