"""safestep: provably bounded training steps for cross-entropy models."""
from .geometry import binary_radius, exact_radius, min_exact_radius, nearest_ghost, radius_lower_bound, spread
from .geometry import (
    directional_curvature,
    top_hessian_eigenvalue,
    hessian_step,
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

from .guard import SafeStep
from .lr_finder import LRFinderResult, find_lr
from .telemetry import StepReport

__version__ = "0.1.0"

__all__ = ["spread", "radius_lower_bound", "binary_radius", "exact_radius", "nearest_ghost", "min_exact_radius", "normalized_entropy", "barrier", "backoff", "max_step", "ads_step", "mse_step", "project_to_simplex", "projected_step", "mirror_step", "contraction_factor", "anchor", "belief_step_cap", "directional_curvature", "top_hessian_eigenvalue", "hessian_step", "SafeStep", "StepReport", "find_lr", "LRFinderResult", "__version__"]
