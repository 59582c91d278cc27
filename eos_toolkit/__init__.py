"""eos_toolkit: curvature and stability measurement for edge-of-stability research.

Modules:
  record      the run-record format (standard library only; no torch)
  thresholds  stability thresholds 2/eta and 2(1+beta1)/((1-beta1) eta)
  hvp         Hessian-vector products and the Hessian operator
  operators   optimizer-aware operators (preconditioned Hessian), scipy adapter
  solvers     Lanczos, block solvers, power iteration, Hutchinson, SLQ density
  tracker     sharpness tracking during training

Submodules are imported on first use, so ``import eos_toolkit.record`` (used by
the analysis) does not import torch.
"""

import importlib

_SUBMODULES = ("record", "thresholds", "hvp", "operators", "solvers", "tracker")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES)
