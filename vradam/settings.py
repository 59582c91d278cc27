"""The names of VRAdam's optimizer-wide options, importable without torch (command lines list them).

Example::

    >>> GATES, NORM_SCOPES
    (('velocity', 'gradient'), ('global', 'group'))
"""

GATES = ("velocity", "gradient")  # the gate's source: the first moment (the paper) or the raw gradient
NORM_SCOPES = ("global", "group")  # one s_t over all param groups (the paper) or one per group
