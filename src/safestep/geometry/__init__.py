"""Pure math on tensors: convergence radii of softmax (radius), belief-space steps (simplex), curvature."""
from .curvature import directional_curvature, hessian_step, top_hessian_eigenvalue
from .radius import binary_radius, exact_radius, min_exact_radius, nearest_ghost, radius_lower_bound, spread
from .weighted import min_weighted_radius, weighted_excludes, weighted_radius
from .simplex import (
    ads_step,
    anchor,
    backoff,
    barrier,
    belief_radius,
    belief_step_cap,
    contraction_factor,
    max_step,
    mirror_step,
    mse_step,
    normalized_entropy,
    project_to_simplex,
    projected_step,
    spread_radius,
)

__all__ = [
    # radius.py: the convergence radius of softmax cross-entropy along a step
    "spread", "radius_lower_bound", "binary_radius", "exact_radius", "nearest_ghost", "min_exact_radius",
    # weighted.py: a certified lower bound on the radius that weighs classes by probability
    "weighted_radius", "min_weighted_radius", "weighted_excludes",
    # simplex.py: admissible steps in belief space
    "normalized_entropy", "barrier", "backoff", "max_step", "ads_step", "mse_step", "project_to_simplex",
    "projected_step", "mirror_step", "contraction_factor", "anchor", "belief_step_cap",
    "belief_radius", "spread_radius",
    # curvature.py: Hessian comparators
    "directional_curvature", "top_hessian_eigenvalue", "hessian_step",
]
