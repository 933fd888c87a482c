"""Pure math on tensors: convergence radii of softmax (radius), belief-space steps (simplex), curvature."""
from .radius import binary_radius, radius_lower_bound, spread

__all__ = ["spread", "radius_lower_bound", "binary_radius"]
