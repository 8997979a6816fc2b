// k-space data-consistency update: the CUDA launcher, callable from host C++ (bindings.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mbdl_fast {

// In place on Z (B, C, H, W), complex64 as interleaved float2:
//   Z <- m * (m * c * Z - s * y)     (Z <- m * m * c * Z when y == nullptr)
// with m = mask[h * mask_stride_h + w * mask_stride_w] (float32), s = (-1)^(h * flip_h + w * flip_w).
// The caller validates the sizes (all > 0, H * W < 2^31) and the flips (0 or 1).
// Returns the launch status (cudaGetLastError right after the launch); the kernel runs on `stream`.
cudaError_t launch_kspace_dc_update(void* z, const float* mask, const void* y, int64_t planes, int64_t H, int64_t W,
                                    int64_t mask_stride_h, int64_t mask_stride_w, int flip_h, int flip_w, float c,
                                    cudaStream_t stream);

}  // namespace mbdl_fast
