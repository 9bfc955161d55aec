"""The planner: probe inputs, per-layer analysis, sensitivity, the choice for T and the fidelity contract.

probe.py     probe inputs: input-convention inference and natural-image-like probes
analyse.py   per-layer candidates: ranks -> output error, parameters, MACs; the global rank choice
contract.py  output kinds, their fidelity metrics and the targets that T implies
inputs.py    planning and validation inputs (images or probes; never the same)
search.py    activations, per-layer analysis and gains, the ladder of budgets
"""
from .analyse import (  # noqa: F401
    CONV_FORMS, FORMS, METHOD_CP, METHOD_KEEP, METHOD_POINTWISE, METHOD_SPATIAL, METHOD_SVD, METHOD_TUCKER,
    MIN_RANK_DIVISOR, Candidate, LayerPlan, Plan, Workspace, analyse_convolution, analyse_inner_product, approximate_weight, build_plan, check_tradeoff,
    cheaper_steps, choose_ranks, describe_layer, error_budget, fitting_moves, halfway, layer_forms, max_rank, sample_patches, predicted_error,
)

__all__ = [
    "CONV_FORMS", "FORMS", "METHOD_SPATIAL", "METHOD_TUCKER", "layer_forms",
    "METHOD_CP", "METHOD_KEEP", "METHOD_POINTWISE", "METHOD_SVD", "MIN_RANK_DIVISOR", "Candidate", "LayerPlan",
    "Plan", "Workspace", "analyse_convolution", "analyse_inner_product", "approximate_weight", "build_plan",
    "check_tradeoff", "cheaper_steps", "choose_ranks", "describe_layer", "error_budget", "fitting_moves", "halfway", "max_rank", "sample_patches", "predicted_error",
]
