// Function qualifiers shared by the headers that both the C++ and the CUDA kernels include.
#pragma once

#if defined(__CUDACC__)
#define AUTOSELECT_HD __host__ __device__ __forceinline__
#else
#define AUTOSELECT_HD inline
#endif

// AUTOSELECT_TARGET_CLONES, before a CPU function's definition: the function is compiled for
// AVX-512 (x86-64-v4), AVX2 and the baseline, and the loader picks one by the CPU it runs on (GCC's
// target_clones). Only GCC 11+ on x86-64 knows these targets; elsewhere (aarch64, whose baseline
// has NEON, other architectures, Clang) it is empty and the function is compiled once. Every
// target_clones of the C++ kernels goes through this one guard; tests/test_build.py compiles them
// with AUTOSELECT_NO_TARGET_CLONES defined, the branch that other architectures take.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && \
    !defined(AUTOSELECT_NO_TARGET_CLONES)
#define AUTOSELECT_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define AUTOSELECT_TARGET_CLONES
#endif
