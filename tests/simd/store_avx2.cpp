// The avx2 target's vector store() (cpu/simd.h), built with that target's flags
// (tests/CMakeLists.txt), for test_simd_store.cpp.
#define MSDA_VEC_BYTES 32
#define MSDA_STORE_TARGET avx2
#include "simd/store_check.h"
