"""Pure math on tensors: convergence radii of softmax (radius), belief-space steps (simplex), curvature."""
from .radius import binary_radius, exact_radius, min_exact_radius, nearest_ghost, radius_lower_bound, spread
from .curvature import (
    directional_curvature,
    top_hessian_eigenvalue,
    hessian_step,
)
from .simplex import (
    normalized_entropy,
    barrier,
    backoff,
    max_step,
    ads_step,
    mse_step,
    project_to_simplex,
    projected_step,
    mirror_step,
    contraction_factor,
    anchor,
    belief_step_cap,
)

__all__ = ["spread", "radius_lower_bound", "binary_radius", "exact_radius", "nearest_ghost", "min_exact_radius", "normalized_entropy", "barrier", "backoff", "max_step", "ads_step", "mse_step", "project_to_simplex", "projected_step", "mirror_step", "contraction_factor", "anchor", "belief_step_cap", "directional_curvature", "top_hessian_eigenvalue", "hessian_step"]
