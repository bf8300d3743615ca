"""msda's OpenVINO extension: runs the msda nodes of an ONNX model (msda.onnx.export) in OpenVINO
with msda's CPU kernels.

    import openvino as ov
    import msda.openvino

    core = ov.Core()
    core.add_extension(msda.openvino.extension_path())
    compiled = core.compile_model(core.read_model("model.onnx"), "CPU")

or ``ov.convert_model("model.onnx", extension=msda.openvino.extension_path())``. The extension
maps the ONNX nodes MultiScaleDeformableAttention and MultiScaleDeformableAttentionFused (domain
"msda") to OpenVINO operations of the same names; a model saved with ov.save_model keeps them, and
reading it back needs the extension too.

This module does not import openvino: it only locates the library, which msda's build makes
where it finds the `openvino` package in the environment it builds in.
"""
import os
import sys

__all__ = ["extension_path"]

# A CMake MODULE library: .so on Linux and macOS alike.
_LIBRARY = "msda_openvino.dll" if sys.platform == "win32" else "libmsda_openvino.so"


def _library_file() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), _LIBRARY)


def extension_path() -> str:
    """The absolute path of msda's OpenVINO extension library, for ``openvino.Core().add_extension``
    (or ``openvino.convert_model(..., extension=...)``).

    Raises FileNotFoundError where this msda was built without it (no ``openvino`` package in the
    build's environment)."""
    path = _library_file()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"msda's OpenVINO extension is not installed ({path} does not exist): this msda was built "
            "without OpenVINO. Install OpenVINO into the environment msda is built in "
            "(`pip install openvino`) and rebuild msda: scripts/build.sh in a source checkout, or "
            "`pip install .`; the build picks up the environment's OpenVINO by itself (CMake option "
            "MSDA_BUILD_OPENVINO=AUTO; ON makes a build without it fail).")
    return path
