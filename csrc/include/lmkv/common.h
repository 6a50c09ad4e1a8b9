// Definitions shared by every torch-free lmkv header (compiled by g++, nvcc and hipcc alike).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LMKV_HD __host__ __device__ __forceinline__
#else
#define LMKV_HD inline
#endif
