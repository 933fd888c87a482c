"""Pure math on tensors: convergence radii of softmax (radius, weighted) and admissible belief-space steps (simplex)."""
from .radius import binary_radius, exact_radius, min_exact_radius, nearest_ghost, radius_lower_bound, spread
from .weighted import min_weighted_radius, weighted_excludes, weighted_radius
from .simplex import (ads_step, backoff, barrier, belief_radius, belief_step_cap, max_step, mse_step,
                      normalized_entropy, spread_radius)

__all__ = [
    # radius.py: the convergence radius of softmax cross-entropy along a step
    "spread", "radius_lower_bound", "binary_radius", "exact_radius", "nearest_ghost", "min_exact_radius",
    # weighted.py: a certified lower bound on the radius that weighs classes by probability
    "weighted_radius", "min_weighted_radius", "weighted_excludes",
    # simplex.py: admissible steps in belief space (the dynamics they bound live in the lab: safestep_lab)
    "normalized_entropy", "barrier", "backoff", "max_step", "ads_step", "mse_step", "belief_step_cap",
    "belief_radius", "spread_radius",
]
