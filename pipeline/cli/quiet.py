"""A clean first screen: silence dependency noise that is not the user's concern.

Imported first by the CLI. torch's C++-extension helper prints "No CUDA runtime is found, using
CUDA_HOME=..." on machines with a CUDA toolkit but no GPU (brevitas imports it), and torch warns
that "Named tensors ... are an experimental feature" when Brevitas builds its quantizers.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", message=r".*Named tensors.*")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
    import torch.utils.cpp_extension  # noqa: F401  (prints the CUDA_HOME notice once, here, into the void)
