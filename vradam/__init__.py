"""VRAdam: Velocity-Regularized Adam (arXiv 2505.13196), a drop-in for AdamW.

``eta_t = lr / (1 + min(beta3 * |v_t|^2, alpha1))`` gates AdamW's rate by the
squared norm of the velocity (first moment) over all parameters. See
:mod:`vradam.functional` for the full update and the contract of every
implementation, :mod:`vradam.reference` for the plainly written twin.

The names below are imported on first use, so ``import vradam.settings``
(what a command line reads to list the options) does not import torch.

    >>> import torch
    >>> from vradam import VRAdam
    >>> opt = VRAdam(torch.nn.Linear(2, 1).parameters(), lr=1e-3)
"""

import importlib

_HOME = {
    "VRAdam": "optimizer",
    "VRAdamReference": "optimizer",
    "GroupTensors": "group",
    "Telemetry": "group",
    "vradam_step": "functional",
    "reference_step": "reference",
}


def __getattr__(name):
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_HOME)
