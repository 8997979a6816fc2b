// Single-coil MRI prox, the one pointwise step between the two FFTs.
//
//   prox(z, y, g) = argmin_x g/2 ||M F_c x - y||^2 + 1/2 ||x - z||^2 = F_c^H [(F_c z + g M y) / (1 + g M^2)]
//
// with fastMRI's centred orthonormal F_c = fftshift o F o ifftshift. Let a = N // 2 per axis. Then
// F o ifftshift = diag(e^{+2 pi i k a / N}) F and fftshift o F^{-1} = F^{-1} diag(e^{-2 pi i k a / N}), and the two
// phases cancel on the z term: with Z = F(z) unnormalised and K the centred k-space read at k' = (k + a) mod N,
//
//   x = F^{-1}_unnormalised [ (Z / N + g m(k') phi(k) y(k') / sqrt(N)) / (1 + g m(k')^2) ],  phi(k) = e^{-2 pi i k a / N}
//
// So z goes straight into the forward FFT and the inverse FFT writes x: no pre- or post-pass on the image. Here
// only y and the mask are read rolled (by a), and y is turned by phi: (-1)^k on an even axis, a twiddle on an odd one.
// Memory: 8 B read + 8 B written of Z, 8 B of y per pixel; the mask (4 B, usually one row) and gamma from L2.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kspace_prox.h"

namespace mbdl_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// e^{-2 pi i k (n/2) / n}: exactly (-1)^k for even n; for odd n the angle is reduced to (-pi, pi) in integers first.
__device__ __forceinline__ float2 axis_phase(uint32_t k, uint32_t n) {
    if ((n & 1u) == 0u) return make_float2((k & 1u) ? -1.0f : 1.0f, 0.0f);
    int64_t r = static_cast<int64_t>((static_cast<uint64_t>(k) * (n / 2u)) % n);
    if (2 * r > static_cast<int64_t>(n)) r -= n;
    float s, c;
    sincospif(-2.0f * static_cast<float>(r) / static_cast<float>(n), &s, &c);
    return make_float2(c, s);
}

// One thread per (h, w); blockIdx.y walks the batch, so the rolls, the phase and the index maths are done once per
// thread and 32-bit, not once per element.
template <bool HAS_Y>
__global__ void __launch_bounds__(kThreads)
    kspace_prox_kernel(float2* __restrict__ z, const float* __restrict__ mask, const float2* __restrict__ y,
                       const float* __restrict__ gamma, int64_t B, uint32_t H, uint32_t W, int64_t mask_stride_b,
                       int64_t mask_stride_h, int64_t mask_stride_w, float z_scale, float y_scale) {
    const uint32_t plane_size = H * W;
    const uint32_t hw = blockIdx.x * blockDim.x + threadIdx.x;
    if (hw >= plane_size) return;
    const uint32_t h = hw / W;
    const uint32_t w = hw - h * W;
    uint32_t hr = h + H / 2u;
    if (hr >= H) hr -= H;
    uint32_t wr = w + W / 2u;
    if (wr >= W) wr -= W;
    const int64_t mask_offset = static_cast<int64_t>(hr) * mask_stride_h + static_cast<int64_t>(wr) * mask_stride_w;
    const uint32_t rolled = hr * W + wr;
    float2 phi = make_float2(1.0f, 0.0f);
    if constexpr (HAS_Y) {
        const float2 ph = axis_phase(h, H);
        const float2 pw = axis_phase(w, W);
        phi = make_float2(ph.x * pw.x - ph.y * pw.y, ph.x * pw.y + ph.y * pw.x);
    }
    for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
        const float m = __ldg(mask + b * mask_stride_b + mask_offset);
        const float gm = __ldg(gamma + b) * m;
        const float d = 1.0f / fmaf(gm, m, 1.0f);
        const int64_t plane = b * plane_size;
        float2 v = z[plane + hw];
        v.x *= z_scale;
        v.y *= z_scale;
        if constexpr (HAS_Y) {
            const float2 t = __ldg(y + plane + rolled);
            const float f = gm * y_scale;
            v.x = fmaf(f, phi.x * t.x - phi.y * t.y, v.x);
            v.y = fmaf(f, phi.x * t.y + phi.y * t.x, v.y);
        }
        v.x *= d;
        v.y *= d;
        z[plane + hw] = v;
    }
}

}  // namespace

cudaError_t launch_kspace_prox_update(void* z, const float* mask, const void* y, const float* gamma, int64_t B,
                                      int64_t H, int64_t W, int64_t mask_stride_b, int64_t mask_stride_h,
                                      int64_t mask_stride_w, float z_scale, float y_scale, cudaStream_t stream) {
    const int64_t plane_size = H * W;
    const dim3 block(kThreads);
    const dim3 grid(static_cast<unsigned>((plane_size + kThreads - 1) / kThreads),
                    static_cast<unsigned>(std::min(B, kMaxGridY)));
    const auto* yc = static_cast<const float2*>(y);
    const auto kernel = yc != nullptr ? kspace_prox_kernel<true> : kspace_prox_kernel<false>;
    kernel<<<grid, block, 0, stream>>>(static_cast<float2*>(z), mask, yc, gamma, B, static_cast<uint32_t>(H),
                                       static_cast<uint32_t>(W), mask_stride_b, mask_stride_h, mask_stride_w, z_scale,
                                       y_scale);
    return cudaGetLastError();
}

}  // namespace mbdl_fast
