# Finds the PyTorch of a Python environment and defines the imported target msda::torch_cpu
# (headers, libtorch_cpu, libtorch and libc10, and the C++ ABI that torch was built with).
#
# Why not find_package(Torch): TorchConfig.cmake of PyPI's CUDA builds fails unless a CUDA toolkit
# is installed, though a CPU op needs none of it; and inside pip's isolated build environment
# torch is not importable from the build's own sys.path. So this asks the environment's Python
# where torch lives (its site-packages, which pip's isolation hides but does not remove) and
# builds against the files, as torch.utils.cpp_extension does.
#
# In:  Python_EXECUTABLE (the environment's interpreter; scikit-build-core sets it), or
#      MSDA_TORCH_DIR (the torch package folder) to skip the lookup.
# Out: MSDA_TORCH_FOUND, MSDA_TORCH_VERSION, MSDA_TORCH_DIR, target msda::torch_cpu.
set(MSDA_TORCH_FOUND FALSE)
if(NOT Python_EXECUTABLE)
  find_package(Python 3.9 COMPONENTS Interpreter)
endif()
if(NOT Python_EXECUTABLE)
  message(STATUS "msda: no Python interpreter found, so no PyTorch")
  return()
endif()

set(_msda_probe [=[
import sys, sysconfig
# pip's build isolation takes the environment's site-packages off sys.path: put it back last,
# so that torch is the environment's and everything else the build's.
for key in ("purelib", "platlib"):
    path = sysconfig.get_paths()[key]
    if path not in sys.path:
        sys.path.append(path)
import os, torch
print(os.path.dirname(torch.__file__))
print(torch.__version__)
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
]=])
execute_process(COMMAND "${Python_EXECUTABLE}" -c "${_msda_probe}"
                OUTPUT_VARIABLE _msda_out ERROR_VARIABLE _msda_err RESULT_VARIABLE _msda_rc
                OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _msda_rc EQUAL 0)
  string(REGEX REPLACE ".*\n([^\n]+)\n?$" "\\1" _msda_err "${_msda_err}")
  message(STATUS "msda: ${Python_EXECUTABLE} cannot import torch (${_msda_err})")
  return()
endif()
string(REPLACE "\n" ";" _msda_out "${_msda_out}")
list(GET _msda_out 0 MSDA_TORCH_DIR)
list(GET _msda_out 1 MSDA_TORCH_VERSION)
list(GET _msda_out 2 _msda_abi)

if(MSDA_TORCH_VERSION VERSION_LESS 2.4)
  message(FATAL_ERROR "msda: the torch of ${Python_EXECUTABLE} is ${MSDA_TORCH_VERSION}; msda needs torch >= 2.4 "
                      "(torch.library.register_fake, opcheck)")
endif()

set(_msda_libs)
foreach(lib torch torch_cpu c10)
  find_library(MSDA_TORCH_LIB_${lib} NAMES ${lib} PATHS "${MSDA_TORCH_DIR}/lib" NO_DEFAULT_PATH NO_CACHE)
  if(NOT MSDA_TORCH_LIB_${lib})
    message(FATAL_ERROR "msda: lib${lib}.so not found in ${MSDA_TORCH_DIR}/lib")
  endif()
  list(APPEND _msda_libs "${MSDA_TORCH_LIB_${lib}}")
endforeach()

add_library(msda::torch_cpu INTERFACE IMPORTED)
target_include_directories(msda::torch_cpu SYSTEM INTERFACE
  "${MSDA_TORCH_DIR}/include" "${MSDA_TORCH_DIR}/include/torch/csrc/api/include")
target_compile_definitions(msda::torch_cpu INTERFACE _GLIBCXX_USE_CXX11_ABI=${_msda_abi})
target_link_libraries(msda::torch_cpu INTERFACE ${_msda_libs})
set(MSDA_TORCH_FOUND TRUE)
message(STATUS "msda: torch ${MSDA_TORCH_VERSION} at ${MSDA_TORCH_DIR} (from ${Python_EXECUTABLE})")
