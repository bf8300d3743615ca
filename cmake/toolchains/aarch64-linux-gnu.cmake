# Cross-compiling msda for 64-bit Arm Linux with Debian's cross toolchain (g++-aarch64-linux-gnu),
# and running what it builds under qemu-user (qemu-aarch64): the tests' discovery at build time,
# ctest and scripts/arm64-check.sh all go through CMAKE_CROSSCOMPILING_EMULATOR.
#
#   cmake -S . -B build-arm64 -DCMAKE_TOOLCHAIN_FILE=cmake/toolchains/aarch64-linux-gnu.cmake \
#         -DMSDA_BUILD_TORCH=OFF -DMSDA_BUILD_BENCHMARKS=OFF -DGTest_DIR=<an AArch64 GoogleTest>/lib/cmake/GTest
#
# Libraries come from the cross toolchain's tree (/usr/aarch64-linux-gnu: libc, libstdc++,
# libgomp); GoogleTest is not there: point GTest_DIR at an AArch64 build of it (the script builds
# one from Debian's googletest sources) or configure with -DMSDA_BUILD_TESTS=OFF.
# MSDA_CROSS_PREFIX selects another triple's tools (default aarch64-linux-gnu).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(MSDA_CROSS_PREFIX aarch64-linux-gnu CACHE STRING "Triple of the cross tools (<triple>-g++)")
set(CMAKE_C_COMPILER ${MSDA_CROSS_PREFIX}-gcc)
set(CMAKE_CXX_COMPILER ${MSDA_CROSS_PREFIX}-g++)

set(CMAKE_FIND_ROOT_PATH /usr/${MSDA_CROSS_PREFIX})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)   # build tools run on the host
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)    # never link a host library
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# -L: where qemu finds the target's dynamic loader and shared libraries. The emulated CPU comes
# from the environment (QEMU_CPU, e.g. max,sve256=on), so one build runs at any vector length.
find_program(MSDA_QEMU_AARCH64 NAMES qemu-aarch64 qemu-aarch64-static)
if(MSDA_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${MSDA_QEMU_AARCH64} -L /usr/${MSDA_CROSS_PREFIX})
endif()
