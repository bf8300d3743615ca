// The avx512 target's vector store() (cpu/simd.h), built with that target's flags
// (tests/CMakeLists.txt), for test_simd_store.cpp.
#define MSDA_VEC_BYTES 64
#define MSDA_STORE_TARGET avx512
#include "simd/store_check.h"
