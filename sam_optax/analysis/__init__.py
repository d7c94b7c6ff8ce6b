"""Sharpness analysis in pure JAX: Hessian spectra and filter-normalized loss landscapes.

``loss_fn(params, batch) -> scalar mean loss``; ``batches`` is a sequence of
batches whose loss is their batch-size-weighted mean. Plots live in
:mod:`sam_optax.analysis.plotting` (needs matplotlib, imported lazily).
"""

from sam_optax.analysis.hessian import (
    EigenResult,
    Extremes,
    SharpnessSummary,
    SpectralDensity,
    TraceEstimate,
    hessian_eigenvalues,
    hessian_extremes,
    HessianOperator,
    LanczosResult,
    hessian_operator,
    hessian_trace,
    hvp,
    lanczos,
    sharpness_summary,
    spectral_density,
)
from sam_optax.analysis.landscape import filter_normalized_direction, loss_surface_1d, loss_surface_2d

__all__ = [
    "EigenResult",
    "Extremes",
    "SharpnessSummary",
    "SpectralDensity",
    "TraceEstimate",
    "filter_normalized_direction",
    "hessian_eigenvalues",
    "hessian_extremes",
    "HessianOperator",
    "LanczosResult",
    "hessian_operator",
    "hessian_trace",
    "hvp",
    "lanczos",
    "loss_surface_1d",
    "loss_surface_2d",
    "sharpness_summary",
    "spectral_density",
]
