"""eos_toolkit: curvature and stability measurement for edge-of-stability research.

Modules:
  record          the run-record format (standard library only; no torch)
  thresholds      stability thresholds: 2/eta, heavy ball, Nesterov, 2(1+beta1)/((1-beta1) eta)
  operators       the operator interface; the preconditioned P^-1/2 A P^-1/2, dense and scipy adapters
  hvp             the Hessian operator of a model's loss and its four product rules
  method_choice   "auto": the cheapest accurate product rule, timed once per run
  modes           module modes during products, and the plain-kernel fallback
  loss_reduction  the check that a loss is a mean over examples (chunk weighting needs it)
  collectives     products summed over data-parallel ranks, and decisions made together
  solvers         Lanczos, block Lanczos, power iteration, Hutchinson, SLQ density (on any operator)
  tracker         sharpness tracking during training
  adapters        what P, the rate and the threshold are for each optimizer family
  monitor         what a tracking step measures and records, in any training loop
  integrations    the monitor in Lightning, Hugging Face Trainer and TensorBoard (optional extra)
  curvature_gradient  the gradient of the sharpness, D^3 L[u, u, .], from third derivatives
  flow_rules      gradient descent, RMSProp, Adam and VRAdam in continuous time
  complementarity the small semidefinite complementarity problem of a central flow
  central_flow    the central flow: the time-averaged trajectory at the edge of stability

The names below are imported on first use, so ``import eos_toolkit.record``
(what the analysis uses) does not import torch.

Example:
    >>> import eos_toolkit
    >>> eos_toolkit.gd_threshold(0.05)
    40.0
"""

import importlib

_EXPORTS = {
    "thresholds": ("gd_threshold", "momentum_threshold", "adam_threshold", "heavy_ball_threshold",
                   "nesterov_threshold"),
    "hvp": ("HessianOperator", "hessian_operator", "select_parameters", "NondeterministicOperatorError"),
    "modes": ("module_mode", "MissingSecondDerivativeError", "KernelFallbackWarning"),
    "method_choice": ("choose_method", "MethodChoice"),
    "operators": ("LinearOperator", "PreconditionedOperator", "preconditioned_operator", "MatrixOperator",
                  "as_scipy_linear_operator"),
    "solvers": ("EigResult", "KrylovWorkspace", "lanczos", "block_lanczos", "power_iteration", "hutchinson_trace", "slq_density",
                "SpectralDensity", "gaussian_density", "eigenvalue_error_bound"),
    "tracker": ("SharpnessTracker",),
    "adapters": ("adapter_for", "register_adapter", "GatedAdam", "OptimizerAdapter"),
    "monitor": ("EoSMonitor",),
    "record": ("RunWriter", "read_run", "find_runs"),
    "curvature_gradient": ("sharpness_gradient", "preconditioned_sharpness_gradient",
                           "wrong_third_derivative_modules"),
    "flow_rules": ("flow_rule_for", "FlowRule", "GradientDescentFlow", "RMSPropFlow", "AdamFlow", "VRAdamFlow"),
    "complementarity": ("solve_sdcp", "ComplementarityError"),
    "central_flow": ("CentralFlow", "FlowStep"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name):
    if name in _EXPORTS:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_EXPORTS, *_HOME]
