// The Level-1 MRI data-consistency step, the per-element maths shared by the cuFFT LTO callbacks
// (dc_callbacks.cu, device), the coil-sum kernel (dc_step.cu, device) and the host tests (tests/, host):
// one definition, so the host tests check exactly what the GPU runs.
//
// One step x' = x - gamma (A^H A x - A^H y), A = M F_c S, on the uncentred FFT F (cuFFT, unnormalised):
//
//   forward load  : z[p, i]  = s(i) * S[b, c, r(i)] * x[b, r(i)]                    p = b * C + c
//   forward FFT   : Z = F z                                                          (cuFFT)
//   forward store : W[p, k]  = m(r(k)) * (m(r(k)) * Z[p, k] / N - c s(k) y[p, r(k)] / sqrt(N))
//                   W[p, k]  = m(r(k))^2 * Z[p, k] / N                              (no y: A^H y given or 0)
//   inverse FFT   : U = F^-1 W                                                       (cuFFT, unnormalised)
//   inverse store : V[p, r(q)] = s(r(q)) * conj(S[b, c, r(q)]) * U[p, q]
//   coil sum      : x'[b, o] = x[b, o] - gamma[b] * (sum_c V[b * C + c, o] - AHy[b, o])
//
// as kernels/mri_dc.py (the Triton version) does it: on a transformed axis of even length n the centring
// shifts are the signs s = (-1)^i and c = (-1)^(n/2) (mbdl_fast/fft.py); on a transformed axis of odd length
// they are the roll r(i) = (i + n/2) mod n, the same one for ifftshift on the input, for the mask and y, and
// (as the inverse of fftshift's read) for the output. An axis that is not transformed is neither signed nor
// rolled. N is the product of the transformed lengths.
//
// Layouts of the FFT buffer Z (B * C planes):
//   DC_LAYOUT_HW: 2-D transform, Z[p, h, w] (natural);
//   DC_LAYOUT_W : 1-D along W (a mask that varies along W only), Z[p, h, w], batch B * C * H;
//   DC_LAYOUT_H : 1-D along H (a mask that varies along H only), Z[p, w, h] (transposed, so that each
//                 transform is contiguous), batch B * C * W.
// V is written in the natural layout; where that is Z's own position (no roll, layout HW or W), V is Z.
#pragma once

#include <vector_functions.h>
#include <vector_types.h>

#include <cstdint>

#if defined(__CUDACC__)
#define MBDL_HD __host__ __device__ __forceinline__
#else
#define MBDL_HD inline
#endif

namespace mbdl_fast {

enum DcLayout : int { DC_LAYOUT_HW = 0, DC_LAYOUT_W = 1, DC_LAYOUT_H = 2 };

// Everything the callbacks and the coil-sum kernel read: written to the device before each step by a
// one-thread kernel that takes it by value (stream-ordered, and captured by value in a CUDA graph).
struct DcParams {
    const float2* x;      // (B, H, W)
    const float2* coil;   // (B | 1, C, H, W), or null: one coil, S = 1
    const float* mask;    // element strides mask_sb, mask_sh, mask_sw (0 on a broadcast axis)
    const float2* y;      // (B, C, H, W), or null
    const float2* ahy;    // (B, H, W), or null
    const float* gamma;   // (B,)
    float2* v;            // (B, C, H, W), natural layout; may be the FFT buffer itself (see above)
    float2* out;          // (B, H, W)
    int64_t coil_batch_stride;  // 0 (maps shared by the batch) or C * H * W
    int64_t mask_sb, mask_sh, mask_sw;
    int32_t B, C, H, W;
    int32_t layout;        // DcLayout
    int32_t shift_h, shift_w;  // the roll: H / 2 (W / 2) on a transformed odd axis, else 0
    int32_t flip_h, flip_w;    // 1 on a transformed even axis (sign (-1)^i), else 0
    int32_t wide;              // 1 when B * C * H * W >= 2^31: 64-bit index maths
    float z_scale;             // 1 / N
    float y_scale;             // c / sqrt(N)
};

namespace dc {

MBDL_HD float2 cmul(float2 a, float2 b) { return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x); }
// conj(a) * b
MBDL_HD float2 cmul_conj(float2 a, float2 b) { return make_float2(a.x * b.x + a.y * b.y, a.x * b.y - a.y * b.x); }
MBDL_HD float2 cscale(float2 a, float s) { return make_float2(a.x * s, a.y * s); }

// (i + shift) mod n for 0 <= i < n, 0 <= shift < n.
MBDL_HD int32_t roll(int32_t i, int32_t shift, int32_t n) {
    const int32_t t = i + shift;
    return t >= n ? t - n : t;
}

// -1 when (-1)^(h * flip_h + w * flip_w) is negative.
MBDL_HD bool negative(int32_t h, int32_t w, int32_t flip_h, int32_t flip_w) {
    return ((h & flip_h) ^ (w & flip_w)) & 1;
}

// The plane p and position (h, w) of element `off` of the FFT buffer.
struct Coords {
    int64_t plane;
    int32_t h, w;
};

MBDL_HD Coords coords(const DcParams& p, unsigned long long off) {
    Coords c;
    const int32_t fast = p.layout == DC_LAYOUT_H ? p.H : p.W;
    int32_t r;
    if (p.wide) {
        const unsigned long long hw = static_cast<unsigned long long>(p.H) * static_cast<unsigned long long>(p.W);
        const unsigned long long plane = off / hw;
        c.plane = static_cast<int64_t>(plane);
        r = static_cast<int32_t>(off - plane * hw);
    } else {
        const uint32_t hw = static_cast<uint32_t>(p.H) * static_cast<uint32_t>(p.W);
        const uint32_t o = static_cast<uint32_t>(off);
        const uint32_t plane = o / hw;
        c.plane = plane;
        r = static_cast<int32_t>(o - plane * hw);
    }
    const int32_t slow = r / fast;
    const int32_t inner = r - slow * fast;
    if (p.layout == DC_LAYOUT_H) {
        c.w = slow;
        c.h = inner;
    } else {
        c.h = slow;
        c.w = inner;
    }
    return c;
}

// Forward transform, load: s(i) S[b, c, r(i)] x[b, r(i)].
MBDL_HD float2 load_expand(const DcParams& p, unsigned long long off) {
    const Coords q = coords(p, off);
    const int64_t hw = static_cast<int64_t>(p.H) * p.W;
    const int64_t pix = static_cast<int64_t>(roll(q.h, p.shift_h, p.H)) * p.W + roll(q.w, p.shift_w, p.W);
    const int64_t b = q.plane / p.C;
    float2 z = p.x[b * hw + pix];
    if (p.coil != nullptr) {
        const int64_t c = q.plane - b * p.C;
        z = cmul(p.coil[b * p.coil_batch_stride + c * hw + pix], z);
    }
    return negative(q.h, q.w, p.flip_h, p.flip_w) ? make_float2(-z.x, -z.y) : z;
}

// Forward transform, store: the k-space residual M (M Z / N - c s y / sqrt(N)), or M^2 Z / N without y.
MBDL_HD float2 kspace_residual(const DcParams& p, unsigned long long off, float2 z) {
    const Coords q = coords(p, off);
    const int32_t mi = roll(q.h, p.shift_h, p.H);
    const int32_t mj = roll(q.w, p.shift_w, p.W);
    const int64_t b = q.plane / p.C;
    const float m = p.mask[b * p.mask_sb + mi * p.mask_sh + mj * p.mask_sw];
    const float mz = m * p.z_scale;
    if (p.y == nullptr) return cscale(z, m * mz);
    const int64_t hw = static_cast<int64_t>(p.H) * p.W;
    const float2 yv = p.y[q.plane * hw + static_cast<int64_t>(mi) * p.W + mj];
    const float ys = negative(q.h, q.w, p.flip_h, p.flip_w) ? -p.y_scale : p.y_scale;
    return make_float2(m * (mz * z.x - ys * yv.x), m * (mz * z.y - ys * yv.y));
}

// Inverse transform, store: V[p, r(q)] = s conj(S[b, c, r(q)]) U[p, q]. Returns V's element index.
MBDL_HD int64_t image_index(const DcParams& p, const Coords& q, int32_t* oh, int32_t* ow) {
    *oh = roll(q.h, p.shift_h, p.H);
    *ow = roll(q.w, p.shift_w, p.W);
    return q.plane * (static_cast<int64_t>(p.H) * p.W) + static_cast<int64_t>(*oh) * p.W + *ow;
}

MBDL_HD void store_coil_image(const DcParams& p, unsigned long long off, float2 u) {
    const Coords q = coords(p, off);
    int32_t oh, ow;
    const int64_t dst = image_index(p, q, &oh, &ow);
    float2 v = u;
    if (p.coil != nullptr) {
        const int64_t hw = static_cast<int64_t>(p.H) * p.W;
        const int64_t b = q.plane / p.C;
        const int64_t c = q.plane - b * p.C;
        v = cmul_conj(p.coil[b * p.coil_batch_stride + c * hw + static_cast<int64_t>(oh) * p.W + ow], u);
    }
    if (negative(oh, ow, p.flip_h, p.flip_w)) v = make_float2(-v.x, -v.y);
    p.v[dst] = v;
}

// Coil sum and gradient step at image pixel `pix` of sample b.
MBDL_HD void coil_sum_step(const DcParams& p, int64_t b, int64_t pix) {
    const int64_t hw = static_cast<int64_t>(p.H) * p.W;
    float2 acc = make_float2(0.f, 0.f);
    const float2* v = p.v + b * p.C * hw + pix;
    for (int32_t c = 0; c < p.C; ++c) {
        const float2 t = v[c * hw];
        acc.x += t.x;
        acc.y += t.y;
    }
    if (p.ahy != nullptr) {
        const float2 a = p.ahy[b * hw + pix];
        acc.x -= a.x;
        acc.y -= a.y;
    }
    const float g = p.gamma[b];
    const float2 xv = p.x[b * hw + pix];
    p.out[b * hw + pix] = make_float2(xv.x - g * acc.x, xv.y - g * acc.y);
}

}  // namespace dc
}  // namespace mbdl_fast
