// Function qualifiers shared by the headers that both the C++ and the CUDA kernels include.
#pragma once

#if defined(__CUDACC__)
#define AUTOSELECT_HD __host__ __device__ __forceinline__
#else
#define AUTOSELECT_HD inline
#endif
