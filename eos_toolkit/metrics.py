"""The names of the metrics a run record holds: the vocabulary its writers and its readers share.

Writers (the tracker, the training loop, the tasks) and readers (the
analysis, the comparison, the CLI) name a metric through this module, never
by a string of their own, so a name has one home.  Standard library only:
the analysis imports it without torch.

===============================  =================================================
per step
``TRAIN_LOSS``                   loss of the batch the step was computed on
``LR``                           the scheduled (maximal) rate of param group 0
``ETA``                          the effective rate used (VRAdam's eta_t; = lr
                                 for other optimizers)
``VR_SQ_NORM``                   VRAdam's gate input s_t (squared velocity norm)
``VR_CLAMPED``                   1.0 when beta3 * s_t >= alpha1, else 0.0
``UPDATE_NORM``                  |theta_{t+1} - theta_t|
``UPDATE_COS``                   cosine between this update and the previous one
``UPDATE_PROJ_TOP``              projection of the update on the latest top Hessian
                                 eigenvector (its sign flips = oscillation)
``GRAD_NORM``                    the gradient's global norm before clipping (with
                                 ``clip_norm``)
every ``track_every`` steps
``split_metric(split, q)``       ``track_loss``, ``val_acc``, ``test_ppl``, ...: quantity
                                 ``q`` of a split (``TRACK``, ``VAL``, ``TEST``)
``SHARPNESS``                    top Hessian eigenvalue lambda_1(H)
``eigenvalue(HESSIAN, i)``       i-th largest Hessian eigenvalue (i = 1..k), and
``residual(HESSIAN, i)``         its residual norm |H u - lambda u|
``matvecs(HESSIAN)``             Hessian-vector products this measurement used (a
                                 method choice's and a determinism probe's included)
``seconds(HESSIAN)``             wall time of this measurement
``converged(HESSIAN)``           1.0 when every residual met the tolerance
``THRESHOLD``                    the stability threshold lambda_1(H) is compared
                                 with, for optimizers without a preconditioner
``PRECOND_SHARPNESS``            lambda_1(P^-1/2 H P^-1/2) for optimizers with a
                                 diagonal preconditioner P (Adam, AdamW, RAdam,
                                 RMSprop, VRAdam); NaN when P was missing
``eigenvalue(PRECOND, i)`` etc.  as for the Hessian
``PRECOND_THRESHOLD``            the threshold the preconditioned sharpness is
                                 compared with
``at_eta(name)``                 a threshold at VRAdam's effective rate eta_t
                                 (``threshold_eta``, ``precond_threshold_eta``)
``DENSITY_SECONDS``              wall time of a spectral density (SLQ)
``per_second(unit)``             throughput over the steps since the last tracking
                                 step, tracking time excluded (``tokens_per_second``)
task-specific
``L1_EXACT``, ``L1_EMPIRICAL``   a GFlowNet's distance to its target distribution
the central flow (``eos flow``, every step; :mod:`eos_toolkit.central_flow`)
``FLOW_LOSS``                    L at the flow's point w(t)
``FLOW_PREDICTED_LOSS``          L(w) + 1/2 tr(H Sigma): the predicted time average of
                                 the iterates' loss
``FLOW_SHARPNESS``               lambda_1(D^-1 H) at w(t), the quantity the flow holds
                                 at its threshold (D = 1: lambda_1(H))
``FLOW_THRESHOLD``, ``FLOW_RATE``   tau / rho and the flow's rate rho (VRAdam: eta_t)
``FLOW_EDGE_COUNT``              eigenvalues at the edge (0: plain gradient flow)
``FLOW_VARIANCE``                tr Sigma, the predicted squared oscillation
``FLOW_VARIANCE_TOP``            the top eigenvalue of Sigma
``FLOW_DISPLACEMENT_TOP``        the measured (v_1 . (w_real - w))^2 along Sigma's top
                                 eigenvector v_1, and ``FLOW_DISPLACEMENT`` summed
                                 over the edge directions
``FLOW_DISTANCE``                |w_real - w|
``FLOW_MATVECS``, ``FLOW_THIRD_DERIVATIVES``, ``FLOW_SECONDS``   the cost of one unit
                                 of flow time; ``FLOW_REPLAY_SECONDS`` the real step's
===============================  =================================================

Metrics that measure wall-clock time (:func:`is_timing_metric`) are the
only ones a resumed run may not reproduce exactly.

Example::

    >>> eigenvalue(HESSIAN, 1), at_eta(PRECOND_THRESHOLD), split_metric(VAL, "acc")
    ('hessian_eig_1', 'precond_threshold_eta', 'val_acc')
    >>> eigenvalue_index(PRECOND, "precond_eig_12"), eigenvalue_index(HESSIAN, "precond_eig_12")
    (12, None)
    >>> is_timing_metric(seconds(HESSIAN)), is_timing_metric(per_second("tokens")), is_timing_metric(SHARPNESS)
    (True, True, False)
"""

from __future__ import annotations

# -- per step
TRAIN_LOSS = "train_loss"
LR = "lr"
ETA = "eta"
VR_SQ_NORM = "vr_sq_norm"
VR_CLAMPED = "vr_clamped"
UPDATE_NORM = "update_norm"
UPDATE_COS = "update_cos"
UPDATE_PROJ_TOP = "update_proj_top"
GRAD_NORM = "grad_norm"

# -- at tracking steps
TRACK, VAL, TEST = "track", "val", "test"  # the splits a task evaluates
SHARPNESS = "sharpness"
PRECOND_SHARPNESS = "precond_sharpness"
THRESHOLD = "threshold"
PRECOND_THRESHOLD = "precond_threshold"
HESSIAN, PRECOND = "hessian", "precond"  # the two solves of a tracking step
DENSITY_SECONDS = "density_seconds"

# -- task-specific names the analysis reads
L1_EXACT = "l1_exact"
L1_EMPIRICAL = "l1_empirical"

# -- the central flow, every step
FLOW_PREFIX = "flow_"
FLOW_LOSS = "flow_loss"
FLOW_PREDICTED_LOSS = "flow_predicted_loss"
FLOW_SHARPNESS = "flow_sharpness"
FLOW_THRESHOLD = "flow_threshold"
FLOW_RATE = "flow_rate"
FLOW_EDGE_COUNT = "flow_edge_count"
FLOW_VARIANCE = "flow_variance"
FLOW_VARIANCE_TOP = "flow_variance_top"
FLOW_DISPLACEMENT = "flow_displacement"
FLOW_DISPLACEMENT_TOP = "flow_displacement_top"
FLOW_DISTANCE = "flow_distance"
FLOW_MATVECS = "flow_matvecs"
FLOW_THIRD_DERIVATIVES = "flow_third_derivatives"
FLOW_SECONDS = "flow_seconds"
FLOW_REPLAY_SECONDS = "flow_replay_seconds"

TIMING_SUFFIXES = ("_seconds", "_per_second")


def split_metric(split: str, quantity: str) -> str:
    """Quantity ``quantity`` (``loss``, ``acc``, ``ppl``, ...) of a split: ``val_loss``."""
    return f"{split}_{quantity}"


def eigenvalue(solve: str, i: int) -> str:
    """The ``i``-th largest eigenvalue (1-based) of a solve: ``hessian_eig_1``, ``precond_eig_2``."""
    return f"{solve}_eig_{i}"


def eigenvalue_index(solve: str, name: str) -> int | None:
    """``i`` when ``name`` is ``eigenvalue(solve, i)``, else None."""
    prefix = eigenvalue(solve, "")
    rest = name[len(prefix):] if name.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None


def residual(solve: str, i: int) -> str:
    return f"{solve}_residual_{i}"


def matvecs(solve: str) -> str:
    return f"{solve}_matvecs"


def seconds(solve: str) -> str:
    return f"{solve}_seconds"


def converged(solve: str) -> str:
    return f"{solve}_converged"


def at_eta(threshold: str) -> str:
    """A threshold at VRAdam's effective rate eta_t instead of the scheduled lr."""
    return f"{threshold}_eta"


def per_second(unit: str) -> str:
    """Throughput: ``unit`` per second of training (``tokens_per_second``)."""
    return f"{unit}_per_second"


def is_flow_metric(name: str) -> bool:
    """Whether ``name`` was written by ``eos flow`` (the central flow beside a run)."""
    return name.startswith(FLOW_PREFIX)


def is_timing_metric(name: str) -> bool:
    """Whether ``name`` measures wall-clock time (``hessian_seconds``, ``tokens_per_second``, ...)."""
    return name.endswith(TIMING_SUFFIXES)
