"""Loads the compiled op library that sits beside this file (built by CMake)."""
import os

import torch

library_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libmsda_torch.so")
if not os.path.exists(library_path):
    raise ImportError(
        f"msda: the compiled op library {library_path} is missing: build the project "
        "(scripts/build.sh) and use build/python, or install it (scripts/setup.sh)")
torch.ops.load_library(library_path)
