// k-space data-consistency update, the pointwise step of an MRI DC step between the FFTs.
//
//   Z <- m * (m * c * Z - s * y)        (y given)
//   Z <- m * m * c * Z                  (y == nullptr, i.e. y = 0)
//
// Z, y: (B, C, H, W) complex64, interleaved float2, contiguous. m = mask[h, w] (float32, any strides,
// 0 for a broadcast axis). s = (-1)^(h * flip_h + w * flip_w). c = +-1.
// Memory bound: 16 B (Z) + 8 B (y) per element; the mask row is re-read by every plane from L2.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kspace_dc.h"

namespace mbdl_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// One thread per (h, w); blockIdx.y walks the B * C planes, so the index maths and the mask load
// are 32-bit and done once per thread, not once per element.
template <bool HAS_Y>
__global__ void __launch_bounds__(kThreads)
    kspace_dc_update_kernel(float2* __restrict__ z, const float* __restrict__ mask, const float2* __restrict__ y,
                            int64_t planes, uint32_t H, uint32_t W, int64_t mask_stride_h, int64_t mask_stride_w,
                            uint32_t flip_h, uint32_t flip_w, float c) {
    const uint32_t plane_size = H * W;
    const uint32_t hw = blockIdx.x * blockDim.x + threadIdx.x;
    if (hw >= plane_size) return;
    const uint32_t h = hw / W;
    const uint32_t w = hw - h * W;
    const float m = __ldg(mask + static_cast<int64_t>(h) * mask_stride_h + static_cast<int64_t>(w) * mask_stride_w);
    const float mc = m * c;
    const bool negate = ((h & flip_h) ^ (w & flip_w)) & 1u;
    for (int64_t p = blockIdx.y; p < planes; p += gridDim.y) {
        const int64_t i = p * plane_size + hw;
        float2 v = z[i];
        if constexpr (HAS_Y) {
            float2 t = __ldg(y + i);
            if (negate) {
                t.x = -t.x;
                t.y = -t.y;
            }
            v.x = m * (mc * v.x - t.x);
            v.y = m * (mc * v.y - t.y);
        } else {
            v.x = m * (mc * v.x);
            v.y = m * (mc * v.y);
        }
        z[i] = v;
    }
}

}  // namespace

cudaError_t launch_kspace_dc_update(void* z, const float* mask, const void* y, int64_t planes, int64_t H, int64_t W,
                                    int64_t mask_stride_h, int64_t mask_stride_w, int flip_h, int flip_w, float c,
                                    cudaStream_t stream) {
    const int64_t plane_size = H * W;
    const dim3 block(kThreads);
    const dim3 grid(static_cast<unsigned>((plane_size + kThreads - 1) / kThreads),
                    static_cast<unsigned>(std::min(planes, kMaxGridY)));
    const auto* yc = static_cast<const float2*>(y);
    const auto kernel = yc != nullptr ? kspace_dc_update_kernel<true> : kspace_dc_update_kernel<false>;
    kernel<<<grid, block, 0, stream>>>(static_cast<float2*>(z), mask, yc, planes, static_cast<uint32_t>(H),
                                       static_cast<uint32_t>(W), mask_stride_h, mask_stride_w, flip_h, flip_w, c);
    return cudaGetLastError();
}

}  // namespace mbdl_fast
