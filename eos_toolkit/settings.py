"""The names of the curvature engine's settings, importable without torch (command lines list them).

========================  =================================================================
``METHODS``               the Hessian-vector product rules (:mod:`eos_toolkit.hvp`)
``AUTO``                  a tracker's choice among them, timed once per run
                          (:mod:`eos_toolkit.method_choice`)
``BN_MODES``              BatchNorm during products: running or batch statistics
                          (:mod:`eos_toolkit.modes`)
``DROPOUT_MODES``         dropout during products: off, or as the caller left it
``SOLVERS``               a tracker's eigensolvers (:mod:`eos_toolkit.tracker`)
========================  =================================================================

Example::

    >>> AUTO in METHODS, "batch_stats" in BN_MODES
    (False, True)
"""

METHODS = ("forward_over_reverse", "double_backward", "reuse_graph", "finite_difference")
AUTO = "auto"
BN_MODES = ("eval", "batch_stats")
DROPOUT_MODES = ("off", "as_is")
SOLVERS = ("lanczos", "block_lanczos", "power")
