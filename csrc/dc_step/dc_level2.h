// The Level-2 MRI DC step: cuFFTDx block FFTs with everything else fused into a row pass and a column pass.
// This header is plain C++ (ctest runs it on the CPU) plus the per-line bodies the kernels of dc_fftdx.cu call:
// the host tests call the very same bodies with a naive DFT in place of cuFFTDx, one "thread" per line.
//
// The step is dc_common.h's, x' = x - gamma (A^H A x - A^H y), on transformed axes of even length only (every
// Level-2 length is even), so the centring shifts are the signs s = (-1)^(h flip_h + w flip_w) and no roll:
//
//   2-D (y given, or a 2-D mask)                         bytes per step, complex64 (8 B an element):
//                                                        P = 8 B C H W, X = 8 B H W
//   pass 1, rows    K[b,c,h,:] = F_W(s S_c x)[h,:]        read x (X, from L2 after the first coil), S (P); write K (P)
//   pass 2, columns K[b,c,:,w] = F_H^-1 M(M F_H K / N      read K (P), y (P, when given), mask; write K (P)
//                               - c s y / sqrt(N))
//   pass 3, rows    x' = x - gamma (s sum_c conj(S_c)     read K (P), S (P), x (X), A^H y (X, when given); write x' (X)
//                        F_W^-1 K[b,c,h,:] - A^H y)
//   1-D (A^H y given, a mask that varies along one axis): one fused pass per line of that axis, coils looped
//   inside the block: read x (X), S (P), A^H y (X), the mask; write x' (X): the floor, nothing else.
//
// At B, C, H, W = 8, 15, 320, 320 (P = 98.3 MB, X = 6.6 MB): 2-D with y: pass 1 203 MB, pass 2 295 MB, pass 3
// 210 MB, 708 MB in all (the floor, x + S + y + x', is 210 MB); 2-D without y: 616 MB; 1-D with A^H y: 118 MB,
// the floor. These are the figures without cache reuse. The workspace K holds `batch_chunk` batch elements at a
// time (level2_plan), sized to 3/10 of the L2 cache, so that passes 2 and 3 can read K from L2 (its write-backs
// still reach DRAM); K then takes batch_chunk C H W * 8 bytes of memory, not B C H W * 8.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dc_common.h"
#include "dc_plan.h"

// Unrolled on the GPU, so that a thread's elements stay in registers; nothing on the host.
#if defined(__CUDACC__)
#define MBDL_UNROLL _Pragma("unroll")
#else
#define MBDL_UNROLL
#endif

namespace mbdl_fast {

// One shipped transform length and its cuFFTDx block configuration: `ept` elements per thread, so n / ept threads
// per FFT, and `ffts_per_block` lines per CUDA block. These numbers are the launch geometry on every architecture:
// dc_fftdx.cu checks at compile time that cuFFTDx's description agrees for each SM it describes (block_dim equal,
// shared memory within kLevel2FftSharedPerLine bytes per line, no Bluestein workspace).
struct Level2Fft {
    int n;
    int ept;
    int ffts_per_block;
};

// Lengths with a native (non-Bluestein) fp32 cuFFTDx record on sm_80..sm_120 in nvidia-mathdx 25.6; 640 has none
// (it would need Bluestein and a global workspace), so 640-long axes stay on Level 1. Eight threads per line for
// every length: a warp then reads 4 adjacent columns (32 B, one sector) per row in the column pass.
inline constexpr Level2Fft kLevel2Ffts[] = {{256, 32, 8}, {320, 40, 8}, {368, 46, 8}};
// Upper bound of cuFFTDx's shared memory per line (sizeof(float2) * n; sm_90 needs all of it at 320 where sm_80
// needs half): the kernels are launched with this, whichever SM's code the device runs.
inline constexpr int64_t kLevel2FftSharedPerLine = 8;  // bytes per element

enum Level2Kernel : int {
    L2_FORWARD_ROWS = 0,      // 2-D pass 1
    L2_RESIDUAL_COLUMNS = 1,  // 2-D pass 2
    L2_ADJOINT_ROWS = 2,      // 2-D pass 3 (coil sum and gradient step)
    L2_FUSED_ROWS = 3,        // 1-D along W, whole step
    L2_FUSED_COLUMNS = 4,     // 1-D along H, whole step
};

const char* level2_kernel_name(int kernel);

// The Level-2 configuration of length n, or nullptr when n is not shipped.
const Level2Fft* level2_fft(int64_t n);
std::vector<int> level2_sizes();
std::string level2_sizes_text();  // "256, 320, 368"

// One kernel launch of a step: which kernel, the transform length, grid, block and dynamic shared memory. `b0` is
// the first batch element it covers (grid.z or grid.y runs over the chunk from there).
struct Level2Launch {
    int kernel = 0;
    int n = 0;
    unsigned grid[3] = {1, 1, 1};
    unsigned block[3] = {1, 1, 1};
    int64_t shared_bytes = 0;
    int64_t b0 = 0;
};

struct Level2Plan {
    bool supported = false;
    std::string why_not;  // when not supported: which sizes, and the Level-2 lengths
    DcGeometry geometry{};
    int64_t batch_chunk = 0;      // batch elements per group of launches
    int64_t workspace_bytes = 0;  // K: batch_chunk * C * H * W * 8 (2-D), 0 (1-D)
    std::vector<Level2Launch> launches;  // in stream order
};

// Whether (B, C, H, W, transformed axes) has a Level-2 path, and if so its launches. Every transformed axis must
// have a shipped length; an untransformed axis may have any. `batch_chunk` <= 0 takes level2_batch_chunk(...,
// l2_bytes); otherwise it is clamped to [1, B]. Throws std::invalid_argument (naming the argument) for sizes
// dc_geometry refuses; unsupported sizes are not an error here (supported = false, why_not says why).
Level2Plan level2_plan(int64_t B, int64_t C, int64_t H, int64_t W, bool transform_h, bool transform_w,
                       int64_t batch_chunk, int64_t l2_bytes = 0);

// Batch elements per chunk for the 2-D passes: K's chunk within about 3/10 of the L2 cache (it shares L2 with S
// and y streaming through), at least 1, at most B (and 65535, the grid's limit); B when l2_bytes <= 0.
int64_t level2_batch_chunk(int64_t B, int64_t C, int64_t H, int64_t W, int64_t l2_bytes);

// The batch chunk a workspace of `workspace_bytes` holds (2-D; 1-D needs none): at least 1 or std::invalid_argument.
int64_t level2_chunk_for_workspace(int64_t B, int64_t C, int64_t H, int64_t W, int64_t workspace_bytes);

// Checks a Level-2 step's arguments (std::invalid_argument "name: expected ..., got ...") and returns its plan for
// the workspace given. a.z and a.v are not used (K is a.workspace). Unsupported sizes are an error here, naming
// the axis and the Level-2 lengths.
Level2Plan check_level2_args(const DcArgs& a);

// ---- the per-line bodies of the kernels (dc_fftdx.cu) and of the host emulation (tests/) -------------------
//
// A line is a row (h fixed, element n = w) or a column (w fixed, element n = h) of one plane. A thread holds
// elements lane + i * stride, i < EPT (cuFFTDx's register layout for c2c, input and output alike); `fwd` and `inv`
// run the unnormalised transform of the whole line across the threads that share it and must be called by every
// thread of the block (they synchronise), so a thread on a line past the edge (valid = false) carries zeros
// through them and neither reads nor writes memory. `acc` is indexed by element (shared memory on the GPU).
namespace dc2 {

MBDL_HD int64_t plane_size(const DcParams& p) { return static_cast<int64_t>(p.H) * p.W; }

// K's element (chunk-local batch bl, coil c, h, w).
MBDL_HD int64_t k_index(const DcParams& p, int64_t bl, int32_t c, int32_t h, int32_t w) {
    return (bl * p.C + c) * plane_size(p) + static_cast<int64_t>(h) * p.W + w;
}

MBDL_HD float2 negate_if(bool neg, float2 v) { return neg ? make_float2(-v.x, -v.y) : v; }

// Forward input at image pixel (h, w): s S[b, c] x[b].
MBDL_HD float2 expand(const DcParams& p, int64_t b, int32_t c, int32_t h, int32_t w) {
    const int64_t hw = plane_size(p);
    const int64_t pix = static_cast<int64_t>(h) * p.W + w;
    float2 z = p.x[b * hw + pix];
    if (p.coil != nullptr) z = dc::cmul(p.coil[b * p.coil_batch_stride + c * hw + pix], z);
    return negate_if(dc::negative(h, w, p.flip_h, p.flip_w), z);
}

// At k-space (kh, kw) of the unnormalised transform z: M (M z / N - c s y / sqrt(N)), or M^2 z / N without y.
// On an untransformed axis the index is the image's, along which the mask is constant.
MBDL_HD float2 residual(const DcParams& p, int64_t b, int32_t c, int32_t kh, int32_t kw, float2 z) {
    const float m = p.mask[b * p.mask_sb + kh * p.mask_sh + kw * p.mask_sw];
    const float mz = m * p.z_scale;
    if (p.y == nullptr) return dc::cscale(z, m * mz);
    const float2 yv = p.y[(b * p.C + c) * plane_size(p) + static_cast<int64_t>(kh) * p.W + kw];
    const float ys = dc::negative(kh, kw, p.flip_h, p.flip_w) ? -p.y_scale : p.y_scale;
    return make_float2(m * (mz * z.x - ys * yv.x), m * (mz * z.y - ys * yv.y));
}

// conj(S[b, c, h, w]) u: one coil's term of the coil sum (the sign s is applied once, to the sum).
MBDL_HD float2 coil_term(const DcParams& p, int64_t b, int32_t c, int32_t h, int32_t w, float2 u) {
    if (p.coil == nullptr) return u;
    const int64_t hw = plane_size(p);
    return dc::cmul_conj(p.coil[b * p.coil_batch_stride + c * hw + static_cast<int64_t>(h) * p.W + w], u);
}

// x'[b, h, w] = x - gamma (s acc - A^H y).
MBDL_HD void finish(const DcParams& p, int64_t b, int32_t h, int32_t w, float2 acc) {
    const int64_t i = b * plane_size(p) + static_cast<int64_t>(h) * p.W + w;
    float2 r = negate_if(dc::negative(h, w, p.flip_h, p.flip_w), acc);
    if (p.ahy != nullptr) {
        const float2 a = p.ahy[i];
        r.x -= a.x;
        r.y -= a.y;
    }
    const float g = p.gamma[b];
    const float2 xv = p.x[i];
    p.out[i] = make_float2(xv.x - g * r.x, xv.y - g * r.y);
}

// 2-D pass 1: one row h of coil c, batch b (chunk starting at b0).
template <int EPT, class Fwd>
MBDL_HD void forward_row(const DcParams& p, float2* k, int64_t b, int64_t b0, int32_t c, int32_t h, bool valid,
                         int32_t lane, int32_t stride, float2* td, Fwd& fwd) {
MBDL_UNROLL
    for (int i = 0; i < EPT; ++i) {
        const int32_t w = lane + i * stride;
        td[i] = valid && w < p.W ? expand(p, b, c, h, w) : make_float2(0.f, 0.f);
    }
    fwd(td);
    if (!valid) return;
MBDL_UNROLL
    for (int i = 0; i < EPT; ++i) {
        const int32_t w = lane + i * stride;
        if (w < p.W) k[k_index(p, b - b0, c, h, w)] = td[i];
    }
}

// 2-D pass 2: one column w of coil c: forward along H, the k-space residual, inverse along H, in place in K.
template <int EPT, class Fwd, class Inv>
MBDL_HD void residual_column(const DcParams& p, float2* k, int64_t b, int64_t b0, int32_t c, int32_t w, bool valid,
                             int32_t lane, int32_t stride, float2* td, Fwd& fwd, Inv& inv) {
MBDL_UNROLL
    for (int i = 0; i < EPT; ++i) {
        const int32_t h = lane + i * stride;
        td[i] = valid && h < p.H ? k[k_index(p, b - b0, c, h, w)] : make_float2(0.f, 0.f);
    }
    fwd(td);
MBDL_UNROLL
    for (int i = 0; i < EPT; ++i) {
        const int32_t h = lane + i * stride;
        if (valid && h < p.H) td[i] = residual(p, b, c, h, w, td[i]);
    }
    inv(td);
    if (!valid) return;
MBDL_UNROLL
    for (int i = 0; i < EPT; ++i) {
        const int32_t h = lane + i * stride;
        if (h < p.H) k[k_index(p, b - b0, c, h, w)] = td[i];
    }
}

// 2-D pass 3: one row h: inverse along W for every coil, conj(S) and the coil sum in `acc`, the gradient step.
template <int EPT, class Inv>
MBDL_HD void adjoint_row(const DcParams& p, const float2* k, int64_t b, int64_t b0, int32_t h, bool valid,
                         int32_t lane, int32_t stride, float2* td, float2* acc, Inv& inv) {
MBDL_UNROLL
    for (int i = 0; i < EPT; ++i) {
        const int32_t w = lane + i * stride;
        if (w < p.W) acc[w] = make_float2(0.f, 0.f);
    }
    for (int32_t c = 0; c < p.C; ++c) {
MBDL_UNROLL
        for (int i = 0; i < EPT; ++i) {
            const int32_t w = lane + i * stride;
            td[i] = valid && w < p.W ? k[k_index(p, b - b0, c, h, w)] : make_float2(0.f, 0.f);
        }
        inv(td);
MBDL_UNROLL
        for (int i = 0; i < EPT; ++i) {
            const int32_t w = lane + i * stride;
            if (valid && w < p.W) {
                const float2 t = coil_term(p, b, c, h, w, td[i]);
                acc[w].x += t.x;
                acc[w].y += t.y;
            }
        }
    }
    if (!valid) return;
MBDL_UNROLL
    for (int i = 0; i < EPT; ++i) {
        const int32_t w = lane + i * stride;
        if (w < p.W) finish(p, b, h, w, acc[w]);
    }
}

// 1-D: the whole step on one line (a row when !Columns, transformed along W; a column when Columns, along H).
template <int EPT, bool Columns, class Fwd, class Inv>
MBDL_HD void fused_line(const DcParams& p, int64_t b, int32_t line, bool valid, int32_t lane, int32_t stride,
                        float2* td, float2* acc, Fwd& fwd, Inv& inv) {
    const int32_t len = Columns ? p.H : p.W;
MBDL_UNROLL
    for (int i = 0; i < EPT; ++i) {
        const int32_t n = lane + i * stride;
        if (n < len) acc[n] = make_float2(0.f, 0.f);
    }
    for (int32_t c = 0; c < p.C; ++c) {
MBDL_UNROLL
        for (int i = 0; i < EPT; ++i) {
            const int32_t n = lane + i * stride;
            const int32_t h = Columns ? n : line, w = Columns ? line : n;
            td[i] = valid && n < len ? expand(p, b, c, h, w) : make_float2(0.f, 0.f);
        }
        fwd(td);
MBDL_UNROLL
        for (int i = 0; i < EPT; ++i) {
            const int32_t n = lane + i * stride;
            const int32_t h = Columns ? n : line, w = Columns ? line : n;
            if (valid && n < len) td[i] = residual(p, b, c, h, w, td[i]);
        }
        inv(td);
MBDL_UNROLL
        for (int i = 0; i < EPT; ++i) {
            const int32_t n = lane + i * stride;
            const int32_t h = Columns ? n : line, w = Columns ? line : n;
            if (valid && n < len) {
                const float2 t = coil_term(p, b, c, h, w, td[i]);
                acc[n].x += t.x;
                acc[n].y += t.y;
            }
        }
    }
    if (!valid) return;
MBDL_UNROLL
    for (int i = 0; i < EPT; ++i) {
        const int32_t n = lane + i * stride;
        if (n < len) finish(p, b, Columns ? n : line, Columns ? line : n, acc[n]);
    }
}

}  // namespace dc2
}  // namespace mbdl_fast
