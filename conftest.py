"""Collection rules for the default run, which doctests every module of the packages.

``--doctest-modules`` (pyproject.toml) imports each ``.py`` file under the
testpaths, so a module that cannot import here must be left out explicitly.
"""

import importlib.util

# Notebooks are executed by tests/analysis/test_notebooks.py, never collected as doctests
# (a notebook plugin such as nbval would otherwise pick them up).
collect_ignore_glob = ["*.ipynb"]

collect_ignore = []
if importlib.util.find_spec("triton") is None:
    # The Triton kernels import triton at the top; it is the optional extra 'fused'
    # (vradam.fused_triton itself imports without it). The module has no examples.
    collect_ignore.append("vradam/_triton_kernels.py")
