// Single-coil MRI prox, the k-space step between the two FFTs: the CUDA launcher, callable from host C++.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mbdl_fast {

// In place on Z (B, H, W), complex64 as interleaved float2, Z = F(z) the unnormalised, uncentred FFT of the image:
//   Z[b, h, w] <- (z_scale * Z[b, h, w] + g m y_scale * phi[h, w] * y[b, h', w']) / (1 + g m^2)
// with h' = (h + H/2) mod H, w' = (w + W/2) mod W (integer halves), m = mask[b * mask_stride_b + h' * mask_stride_h
// + w' * mask_stride_w] (float32, 0 strides on broadcast axes), g = gamma[b] (float32), and
// phi[h, w] = exp(-2 pi i (h (H/2) / H + w (W/2) / W)): (-1)^h (-1)^w on even axes, a twiddle on odd ones.
// y == nullptr means y = 0. With z_scale = 1 / (H W) and y_scale = 1 / sqrt(H W), the unnormalised inverse FFT of the
// result is the prox x = F_c^H [(F_c z + g M y) / (1 + g M^2)] of fastMRI's centred orthonormal F_c.
// The caller validates the sizes (all > 0, H * W < 2^31) and the strides (>= 0).
// Returns the launch status (cudaGetLastError right after the launch); the kernel runs on `stream`.
cudaError_t launch_kspace_prox_update(void* z, const float* mask, const void* y, const float* gamma, int64_t B,
                                      int64_t H, int64_t W, int64_t mask_stride_b, int64_t mask_stride_h,
                                      int64_t mask_stride_w, float z_scale, float y_scale, cudaStream_t stream);

}  // namespace mbdl_fast
