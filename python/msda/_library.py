"""Loads the compiled op library that sits beside this file and registers its fake kernels."""
import os

import torch

from . import _build_info

library_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libmsda_torch.so")
if not os.path.exists(library_path):
    raise ImportError(
        f"msda: the compiled op library {library_path} is missing: build the project "
        "(scripts/build.sh) and use build/python, or install it (pip install .)")


def _release(version: str) -> str:
    return version.split("+")[0]


# The op library uses torch's C++ API, which changes between releases: loading it into another
# torch fails with an undefined symbol at best. Say what to do instead.
if _release(torch.__version__) != _release(_build_info.torch_version):
    raise ImportError(
        f"msda: this msda was built against torch {_build_info.torch_version}, but this environment has torch "
        f"{torch.__version__}: rebuild msda in this environment (pip install --force-reinstall --no-deps .)")
torch.ops.load_library(library_path)

from . import _fake  # noqa: E402,F401  (fake kernels: torch.compile, torch.export, FakeTensor)
