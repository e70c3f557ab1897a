"""A clean first screen: silence dependency noise that is not the user's concern.

Imported first by the CLI. torch's C++-extension helper prints "No CUDA runtime is found, using
CUDA_HOME=..." on machines with a CUDA toolkit but no GPU (brevitas imports it), and torch warns
that "Named tensors ... are an experimental feature" when Brevitas builds its quantizers; pkg_resources,
which Brevitas imports, warns that "Module molcloak was already imported" when run from the project's root.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", message=r".*Named tensors.*")
# pkg_resources (imported by brevitas) when run from the project's root, where `molcloak` maps to "."
warnings.filterwarnings("ignore", message=r"Module \w+ was already imported from")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
    import torch.utils.cpp_extension  # noqa: F401  (prints the CUDA_HOME notice once, here, into the void)
