"""VRAdam: Velocity-Regularized Adam (arXiv 2505.13196), a drop-in for AdamW.

``eta_t = lr / (1 + min(beta3 * |v_t|^2, alpha1))`` gates AdamW's rate by the
squared norm of the velocity (first moment) over all parameters. See
:mod:`vradam.functional` for the full update and the contract of every
implementation, :mod:`vradam.reference` for the plainly written twin.

    >>> import torch
    >>> from vradam import VRAdam
    >>> opt = VRAdam(torch.nn.Linear(2, 1).parameters(), lr=1e-3)
"""

from vradam.functional import GroupTensors, Telemetry, register_impl, vradam_step
from vradam.optimizer import VRAdam
from vradam.reference import VRAdamReference, reference_step

__all__ = [
    "GroupTensors",
    "Telemetry",
    "VRAdam",
    "VRAdamReference",
    "reference_step",
    "register_impl",
    "vradam_step",
]
