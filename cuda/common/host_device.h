// Functions compiled for the device and also by the host checks in tests/cpp/ (plain C++).
#pragma once

#if defined(__CUDACC__)
#define JAX_FA3_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define JAX_FA3_HOST_DEVICE inline
#endif
