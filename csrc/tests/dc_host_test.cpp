// Host-side tests of the Level-1 DC step, run by ctest (CMakeLists.txt, MBDL_FAST_TESTS=ON): no GPU needed.
//
// 1. The whole step as cuFFT runs it, emulated on the CPU: the callbacks of dc_common.h (the very functions
//    the LTO callbacks and the coil-sum kernel call) around naive unnormalised DFTs laid out as the plans lay
//    them out, against an independent reference x - gamma A^H (A x - y) built from fastMRI's definition of the
//    centered FFT (ifftshift, orthonormal DFT, fftshift) in double precision. Even and odd sizes, every layout,
//    y or A^H y or neither, shared or per-sample coil maps, broadcast masks, 32- and 64-bit index paths.
// 2. The geometry (size dispatch: layout, rolls, signs, scales, FFT shape), the argument checks (the error
//    names the argument), the plan-cache key and the thread-safe plan cache.
// 3. Level 2 (cuFFTDx row/column passes): the size dispatch, the launch geometry and batch chunks, the argument
//    checks, and the whole step emulated from its plan: every launch's grid walked block by block, each line run
//    through the very per-line bodies the kernels call (dc_level2.h) with a DFT in place of cuFFTDx, against the
//    same reference, at the shipped lengths, outputs and workspace poisoned with NaN first.
#include <atomic>
#include <cmath>
#include <complex>
#include <cstdio>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dc_step/dc_common.h"
#include "dc_step/dc_level2.h"
#include "dc_step/dc_plan.h"

using mbdl_fast::DcArgs;
using mbdl_fast::DcGeometry;
using mbdl_fast::DcParams;
using cd = std::complex<double>;

namespace {

int g_passed = 0;
int g_failed = 0;

void check(bool ok, const std::string& what) {
    if (ok) {
        ++g_passed;
    } else {
        ++g_failed;
        std::printf("FAILED: %s\n", what.c_str());
    }
}

template <class F>
void expect_invalid(const std::string& name, F&& f, const std::string& what) {
    try {
        f();
        check(false, what + ": no exception (expected one naming '" + name + "')");
    } catch (const std::invalid_argument& e) {
        const std::string msg = e.what();
        check(msg.rfind(name + ": ", 0) == 0, what + ": message '" + msg + "' does not start with '" + name + ": '");
    }
}

// ---- reference: fastMRI's centered orthonormal FFT, literally, in double ------------------------------------
// x: (H, W) row-major. fftc over the axes `axes` (bit 0: H, bit 1: W); inverse when `inv`.
void dft_line(std::vector<cd>& v, bool inv, bool ortho) {
    const std::size_t n = v.size();
    std::vector<cd> out(n);
    const double sign = inv ? 1.0 : -1.0;
    std::vector<cd> twiddle(n);  // e^{sign 2 pi i m / n}: n trig calls per line, not n^2 (Level 2's lengths are 368)
    for (std::size_t m = 0; m < n; ++m) {
        const double ang = sign * 2.0 * M_PI * static_cast<double>(m) / static_cast<double>(n);
        twiddle[m] = cd(std::cos(ang), std::sin(ang));
    }
    for (std::size_t k = 0; k < n; ++k) {
        cd acc = 0;
        for (std::size_t j = 0; j < n; ++j) acc += v[j] * twiddle[(k * j) % n];
        out[k] = ortho ? acc / std::sqrt(static_cast<double>(n)) : acc;
    }
    v = out;
}

std::vector<cd> fftc(const std::vector<cd>& x, int H, int W, bool do_h, bool do_w, bool inv) {
    std::vector<cd> a = x;
    auto shift_line = [](std::vector<cd>& v, bool forward_shift) {
        // numpy: fftshift(v)[i] = v[(i - n/2) mod n]; ifftshift(v)[i] = v[(i + n/2) mod n]
        const int n = static_cast<int>(v.size());
        std::vector<cd> o(n);
        for (int i = 0; i < n; ++i) {
            const int src = forward_shift ? ((i - n / 2) % n + n) % n : (i + n / 2) % n;
            o[i] = v[src];
        }
        v = o;
    };
    if (do_w) {
        for (int h = 0; h < H; ++h) {
            std::vector<cd> line(a.begin() + h * W, a.begin() + (h + 1) * W);
            shift_line(line, false);
            dft_line(line, inv, true);
            shift_line(line, true);
            std::copy(line.begin(), line.end(), a.begin() + h * W);
        }
    }
    if (do_h) {
        for (int w = 0; w < W; ++w) {
            std::vector<cd> line(H);
            for (int h = 0; h < H; ++h) line[h] = a[h * W + w];
            shift_line(line, false);
            dft_line(line, inv, true);
            shift_line(line, true);
            for (int h = 0; h < H; ++h) a[h * W + w] = line[h];
        }
    }
    return a;
}

struct Problem {
    int B, C, H, W;
    bool transform_h, transform_w;
    bool coils, shared_coils;
    int y_mode;  // 0: y given, 1: A^H y given, 2: neither
    int mask_kind;  // 0: per-sample (B, H, W); 1: (1, W) broadcast; 2: (H, 1) broadcast; 3: shared (H, W)
    bool force_wide;
    int level = 1;           // 1: the Level-1 step as cuFFT runs it; 2: the Level-2 plan's launches
    int64_t batch_chunk = 0;  // Level 2, 2-D: batch elements per chunk (0: the whole batch)
};

std::string describe(const Problem& p) {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "level=%d B=%d C=%d H=%d W=%d th=%d tw=%d coils=%d shared=%d y_mode=%d mask=%d wide=%d chunk=%lld",
                  p.level, p.B, p.C, p.H, p.W, p.transform_h, p.transform_w, p.coils, p.shared_coils, p.y_mode,
                  p.mask_kind, p.force_wide, static_cast<long long>(p.batch_chunk));
    return buf;
}

float2 f2(cd v) { return make_float2(static_cast<float>(v.real()), static_cast<float>(v.imag())); }
cd c2(float2 v) { return cd(v.x, v.y); }

// The unnormalised DFT cuFFT computes, in place on `z` laid out as the plan of geometry `g` lays it out.
void plan_dft(std::vector<float2>& z, const DcGeometry& g, bool inv) {
    auto lines = [&](int64_t count, int64_t n, int64_t stride, int64_t dist, int64_t inner_count, int64_t inner_dist) {
        for (int64_t i = 0; i < count; ++i) {
            for (int64_t k = 0; k < inner_count; ++k) {
                const int64_t base = i * dist + k * inner_dist;
                std::vector<cd> line(n);
                for (int64_t j = 0; j < n; ++j) line[j] = c2(z[base + j * stride]);
                dft_line(line, inv, false);
                for (int64_t j = 0; j < n; ++j) z[base + j * stride] = f2(line[j]);
            }
        }
    };
    if (g.rank == 1) {
        lines(g.batch, g.n[0], 1, g.n[0], 1, 0);
    } else {  // 2-D: rows (W, contiguous), then columns (H, stride W), per plane
        const int64_t H = g.n[0], W = g.n[1];
        lines(g.batch * H, W, 1, W, 1, 0);
        lines(g.batch, H, W, H * W, W, 1);
    }
}

// ---- Level 2 on the CPU: the plan's launches, each line through dc_level2.h's bodies ---------------------------
constexpr int kHostEpt = 512;  // one "thread" holds a whole line (lane 0, stride 1): at least the longest length

// The unnormalised transform of the first `len` elements (cuFFTDx's job on the GPU), in double.
struct HostFft {
    int len;
    bool inverse;
    void operator()(float2* td) const {
        std::vector<cd> line(len);
        for (int i = 0; i < len; ++i) line[i] = c2(td[i]);
        dft_line(line, inverse, false);
        for (int i = 0; i < len; ++i) td[i] = f2(line[i]);
    }
};

void emulate_level2(const mbdl_fast::Level2Plan& plan, const DcParams& p, float2* k) {
    using namespace mbdl_fast;
    std::vector<float2> td(kHostEpt), acc(kHostEpt);
    for (const Level2Launch& l : plan.launches) {
        const int per_block = static_cast<int>(l.block[1]);
        const bool columns = l.kernel == L2_RESIDUAL_COLUMNS || l.kernel == L2_FUSED_COLUMNS;
        HostFft fwd{columns ? p.H : p.W, false}, inv{columns ? p.H : p.W, true};
        for (unsigned gz = 0; gz < l.grid[2]; ++gz) {
            for (unsigned gy = 0; gy < l.grid[1]; ++gy) {
                for (unsigned gx = 0; gx < l.grid[0]; ++gx) {
                    for (int ty = 0; ty < per_block; ++ty) {
                        const int32_t line = static_cast<int32_t>(gx * per_block + ty);
                        const int32_t c = static_cast<int32_t>(gy);
                        switch (l.kernel) {
                            case L2_FORWARD_ROWS:
                                dc2::forward_row<kHostEpt>(p, k, l.b0 + gz, l.b0, c, line, line < p.H, 0, 1,
                                                           td.data(), fwd);
                                break;
                            case L2_RESIDUAL_COLUMNS:
                                dc2::residual_column<kHostEpt>(p, k, l.b0 + gz, l.b0, c, line, line < p.W, 0, 1,
                                                               td.data(), fwd, inv);
                                break;
                            case L2_ADJOINT_ROWS:
                                dc2::adjoint_row<kHostEpt>(p, k, l.b0 + gy, l.b0, line, line < p.H, 0, 1, td.data(),
                                                           acc.data(), inv);
                                break;
                            case L2_FUSED_ROWS:
                                dc2::fused_line<kHostEpt, false>(p, l.b0 + gy, line, line < p.H, 0, 1, td.data(),
                                                                 acc.data(), fwd, inv);
                                break;
                            case L2_FUSED_COLUMNS:
                                dc2::fused_line<kHostEpt, true>(p, l.b0 + gy, line, line < p.W, 0, 1, td.data(),
                                                                acc.data(), fwd, inv);
                                break;
                            default:
                                throw std::runtime_error("unknown Level-2 kernel " + std::to_string(l.kernel));
                        }
                    }
                }
            }
        }
    }
}

double run_problem(const Problem& pr, std::mt19937& rng) {
    const int B = pr.B, C = pr.C, H = pr.H, W = pr.W;
    const int64_t hw = static_cast<int64_t>(H) * W;
    std::normal_distribution<float> normal(0.f, 1.f);
    std::uniform_real_distribution<float> uniform(0.f, 1.f);
    auto randc = [&](int64_t n) {
        std::vector<float2> v(n);
        for (auto& e : v) e = make_float2(normal(rng), normal(rng));
        return v;
    };
    std::vector<float2> x = randc(B * hw);
    std::vector<float2> coil = pr.coils ? randc((pr.shared_coils ? 1 : B) * C * hw) : std::vector<float2>();
    // Mask values in [0, 1) (not binary, so M and M^2 differ), constant along untransformed axes.
    std::vector<float> mask;
    int64_t sb = 0, sh = 0, sw = 0;
    switch (pr.mask_kind) {
        case 0: mask.resize(B * hw); sb = hw; sh = W; sw = 1; break;
        case 1: mask.resize(W); sw = 1; break;
        case 2: mask.resize(H); sh = 1; break;
        default: mask.resize(hw); sh = W; sw = 1; break;
    }
    for (auto& m : mask) m = uniform(rng);
    const std::vector<float2> y = pr.y_mode == 0 ? randc(B * C * hw) : std::vector<float2>();
    const std::vector<float2> ahy = pr.y_mode == 1 ? randc(B * hw) : std::vector<float2>();
    std::vector<float> gamma(B);
    for (auto& g : gamma) g = 0.25f + uniform(rng);

    // ---- reference, in double ----
    auto S = [&](int b, int c, int64_t pix) -> cd {
        if (!pr.coils) return 1.0;
        return c2(coil[((pr.shared_coils ? 0 : b) * C + c) * hw + pix]);
    };
    auto M = [&](int b, int h, int w) -> double { return mask[b * sb + h * sh + w * sw]; };
    std::vector<cd> want(B * hw);
    for (int b = 0; b < B; ++b) {
        std::vector<cd> acc(hw, 0.0);
        for (int c = 0; c < C; ++c) {
            std::vector<cd> img(hw);
            for (int64_t i = 0; i < hw; ++i) img[i] = S(b, c, i) * c2(x[b * hw + i]);
            std::vector<cd> k = fftc(img, H, W, true, true, false);
            for (int h = 0; h < H; ++h) {
                for (int w = 0; w < W; ++w) {
                    const int64_t i = static_cast<int64_t>(h) * W + w;
                    cd r = M(b, h, w) * k[i];
                    if (pr.y_mode == 0) r -= c2(y[(b * C + c) * hw + i]);
                    k[i] = M(b, h, w) * r;
                }
            }
            std::vector<cd> back = fftc(k, H, W, true, true, true);
            for (int64_t i = 0; i < hw; ++i) acc[i] += std::conj(S(b, c, i)) * back[i];
        }
        for (int64_t i = 0; i < hw; ++i) {
            cd r = acc[i];
            if (pr.y_mode == 1) r -= c2(ahy[b * hw + i]);
            want[b * hw + i] = c2(x[b * hw + i]) - static_cast<double>(gamma[b]) * r;
        }
    }

    // ---- the step under test, on the same inputs, outputs and buffers poisoned ----
    std::vector<float2> out(B * hw, make_float2(NAN, NAN));
    DcArgs a;
    a.x = reinterpret_cast<std::uintptr_t>(x.data());
    a.coil = pr.coils ? reinterpret_cast<std::uintptr_t>(coil.data()) : 0;
    a.coil_batch_stride = pr.shared_coils ? 0 : C * hw;
    a.mask = reinterpret_cast<std::uintptr_t>(mask.data());
    a.mask_sb = sb;
    a.mask_sh = sh;
    a.mask_sw = sw;
    a.y = pr.y_mode == 0 ? reinterpret_cast<std::uintptr_t>(y.data()) : 0;
    a.ahy = pr.y_mode == 1 ? reinterpret_cast<std::uintptr_t>(ahy.data()) : 0;
    a.gamma = reinterpret_cast<std::uintptr_t>(gamma.data());
    a.out = reinterpret_cast<std::uintptr_t>(out.data());
    a.B = B;
    a.C = C;
    a.H = H;
    a.W = W;
    a.transform_h = pr.transform_h;
    a.transform_w = pr.transform_w;
    if (pr.level == 2) {
        // ---- the Level-2 plan's launches ----
        const mbdl_fast::Level2Plan sized =
            mbdl_fast::level2_plan(B, C, H, W, pr.transform_h, pr.transform_w, pr.batch_chunk);
        std::vector<float2> k(static_cast<std::size_t>(sized.workspace_bytes / 8), make_float2(NAN, NAN));
        a.workspace = k.empty() ? 0 : reinterpret_cast<std::uintptr_t>(k.data());
        a.workspace_bytes = sized.workspace_bytes;
        const mbdl_fast::Level2Plan plan = mbdl_fast::check_level2_args(a);  // its chunk comes from the workspace
        if (plan.batch_chunk != sized.batch_chunk || plan.launches.size() != sized.launches.size()) return INFINITY;
        emulate_level2(plan, mbdl_fast::make_dc_params(a, plan.geometry), k.data());
    } else {
        // ---- the Level-1 step as cuFFT runs it ----
        const DcGeometry g = mbdl_fast::dc_geometry(B, C, H, W, pr.transform_h, pr.transform_w);
        std::vector<float2> z(static_cast<std::size_t>(B) * C * hw, make_float2(NAN, NAN));
        std::vector<float2> vbuf =
            g.separate_v ? std::vector<float2>(z.size(), make_float2(NAN, NAN)) : std::vector<float2>();
        a.z = reinterpret_cast<std::uintptr_t>(z.data());
        a.v = g.separate_v ? reinterpret_cast<std::uintptr_t>(vbuf.data()) : a.z;
        const DcGeometry checked = mbdl_fast::check_dc_args(a, 0);
        DcParams p = mbdl_fast::make_dc_params(a, checked);
        if (pr.force_wide) p.wide = 1;

        const unsigned long long total = z.size();
        std::vector<float2> loaded(total);
        for (unsigned long long off = 0; off < total; ++off) loaded[off] = mbdl_fast::dc::load_expand(p, off);
        z = loaded;  // cuFFT reads through the load callback; what was in z before is never read
        if (!g.separate_v) p.v = z.data();  // V over Z, as the kernels do it
        plan_dft(z, g, false);
        for (unsigned long long off = 0; off < total; ++off) z[off] = mbdl_fast::dc::kspace_residual(p, off, z[off]);
        plan_dft(z, g, true);
        const std::vector<float2> u = z;  // the last pass's values, each stored once through the store callback
        for (unsigned long long off = 0; off < total; ++off) mbdl_fast::dc::store_coil_image(p, off, u[off]);
        for (int b = 0; b < B; ++b) {
            for (int64_t pix = 0; pix < hw; ++pix) mbdl_fast::dc::coil_sum_step(p, b, pix);
        }
    }

    double num = 0, den = 0;
    for (int64_t i = 0; i < B * hw; ++i) {
        const cd got = c2(out[i]);
        if (!std::isfinite(got.real()) || !std::isfinite(got.imag())) return INFINITY;
        num += std::norm(got - want[i]);
        den += std::norm(want[i]);
    }
    return std::sqrt(num / den);
}

void test_step_matches_reference() {
    std::mt19937 rng(1234);
    const int sizes[][2] = {{4, 6}, {6, 4}, {5, 7}, {7, 5}, {6, 5}, {5, 6}, {8, 8}, {3, 3}, {2, 2}, {1, 6}, {6, 1}};
    int cases = 0;
    for (const auto& hw : sizes) {
        for (int layout = 0; layout < 3; ++layout) {
            for (int y_mode = 0; y_mode < 3; ++y_mode) {
                if (y_mode == 0 && layout != 0) continue;  // y needs the 2-D transform
                for (int coil_mode = 0; coil_mode < 3; ++coil_mode) {
                    Problem pr{};
                    pr.H = hw[0];
                    pr.W = hw[1];
                    pr.transform_h = layout != 1;
                    pr.transform_w = layout != 2;
                    pr.coils = coil_mode != 0;
                    pr.shared_coils = coil_mode == 2;
                    pr.C = pr.coils ? 3 : 1;
                    pr.B = (cases % 2) + 1;
                    pr.y_mode = y_mode;
                    // A one-axis transform needs a mask constant along the other axis.
                    pr.mask_kind = layout == 1 ? 1 : (layout == 2 ? 2 : cases % 4);
                    pr.force_wide = cases % 3 == 0;
                    const double err = run_problem(pr, rng);
                    check(err < 1e-5, describe(pr) + ": relative error " + std::to_string(err));
                    ++cases;
                }
            }
        }
    }
    std::printf("emulated Level-1 step: %d cases against the reference\n", cases);
}

void test_geometry() {
    using mbdl_fast::dc_geometry;
    DcGeometry g = dc_geometry(8, 15, 320, 320, true, true);
    check(g.layout == mbdl_fast::DC_LAYOUT_HW && g.rank == 2 && g.n[0] == 320 && g.n[1] == 320 && g.batch == 120,
          "320x320 2-D plan shape");
    check(g.flip_h == 1 && g.flip_w == 1 && g.shift_h == 0 && g.shift_w == 0 && !g.separate_v && !g.wide,
          "320x320: signs, no roll, V over Z, 32-bit");
    check(std::fabs(g.z_scale - 1.0f / (320 * 320)) < 1e-12f && std::fabs(g.y_scale - 1.0f / 320) < 1e-9f,
          "320x320: c = +1 (160 even), scales");
    g = dc_geometry(1, 1, 6, 4, true, true);  // c = (-1)^3 (-1)^2 = -1
    check(std::fabs(g.y_scale + 1.0f / std::sqrt(24.0f)) < 1e-7f, "6x4: c = -1");
    g = dc_geometry(1, 1, 6, 6, true, true);  // c = (-1)^3 (-1)^3 = +1
    check(g.y_scale > 0, "6x6: c = +1");
    g = dc_geometry(2, 3, 5, 7, true, true);
    check(g.shift_h == 2 && g.shift_w == 3 && g.flip_h == 0 && g.flip_w == 0 && g.separate_v, "5x7: rolls, own V");
    g = dc_geometry(2, 3, 5, 8, true, true);
    check(g.shift_h == 2 && g.shift_w == 0 && g.flip_h == 0 && g.flip_w == 1 && g.separate_v, "5x8: mixed");
    g = dc_geometry(2, 3, 368, 640, false, true);
    check(g.layout == mbdl_fast::DC_LAYOUT_W && g.rank == 1 && g.n[0] == 640 && g.batch == 2 * 3 * 368, "W-only plan");
    check(g.flip_h == 0 && g.shift_h == 0 && g.flip_w == 1 && !g.separate_v, "W-only: H untouched, V over Z");
    check(std::fabs(g.z_scale - 1.0f / 640) < 1e-12f, "W-only: N = W");
    g = dc_geometry(2, 3, 320, 256, true, false);
    check(g.layout == mbdl_fast::DC_LAYOUT_H && g.n[0] == 320 && g.batch == 2 * 3 * 256 && g.separate_v,
          "H-only: transposed buffer, own V");
    g = dc_geometry(2, 3, 321, 256, false, true);
    check(g.shift_h == 0 && g.flip_h == 0 && !g.separate_v, "W-only with odd H: H neither rolled nor signed");
    g = dc_geometry(2, 3, 320, 255, false, true);
    check(g.shift_w == 127 && g.separate_v, "W-only with odd W: rolled, own V");
    g = dc_geometry(8, 20, 4096, 4096, true, true);
    check(g.wide, "8x20x4096x4096: 64-bit indices");
    g = dc_geometry(1, 1, 46340, 46340, true, true);
    check(!g.wide, "46340^2 < 2^31: 32-bit");
}

DcArgs valid_args() {
    DcArgs a;
    a.x = a.coil = a.mask = a.gamma = a.out = a.z = 16;
    a.v = 32;
    a.y = 48;
    a.coil_batch_stride = 3 * 4 * 6;
    a.mask_sb = 0;
    a.mask_sh = 0;
    a.mask_sw = 1;
    a.B = 2;
    a.C = 3;
    a.H = 4;
    a.W = 6;
    return a;
}

void test_argument_checks() {
    using mbdl_fast::check_dc_args;
    check_dc_args(valid_args(), 0);
    check(true, "valid arguments pass");
    const std::vector<std::pair<std::string, std::function<void(DcArgs&)>>> cases = {
        {"B", [](DcArgs& a) { a.B = 0; }},
        {"C", [](DcArgs& a) { a.C = -1; }},
        {"H", [](DcArgs& a) { a.H = 0; }},
        {"W", [](DcArgs& a) { a.W = -5; }},
        {"H, W", [](DcArgs& a) { a.H = a.W = 1 << 16; }},
        {"B, C", [](DcArgs& a) { a.B = 1 << 20; a.C = 1 << 12; }},
        {"transform_h, transform_w", [](DcArgs& a) { a.transform_h = a.transform_w = false; a.y = 0; }},
        {"x", [](DcArgs& a) { a.x = 0; }},
        {"mask", [](DcArgs& a) { a.mask = 0; }},
        {"gamma", [](DcArgs& a) { a.gamma = 0; }},
        {"out", [](DcArgs& a) { a.out = 0; }},
        {"z", [](DcArgs& a) { a.z = 0; }},
        {"v", [](DcArgs& a) { a.v = 0; }},
        {"coil_maps", [](DcArgs& a) { a.coil = 0; }},
        {"coil_batch_stride", [](DcArgs& a) { a.coil_batch_stride = 7; }},
        {"y", [](DcArgs& a) { a.transform_h = false; }},
        {"y, ahy", [](DcArgs& a) { a.ahy = 64; }},
        {"mask_sb", [](DcArgs& a) { a.mask_sb = -1; }},
        {"mask_sh", [](DcArgs& a) { a.mask_sh = -4; }},
        {"mask_sw", [](DcArgs& a) { a.mask_sw = -1; }},
        {"v", [](DcArgs& a) { a.H = 5; a.coil_batch_stride = 0; a.v = a.z; }},
        {"v", [](DcArgs& a) { a.transform_w = false; a.y = 0; a.v = a.z; }},
        {"workspace_bytes", [](DcArgs& a) { a.workspace_bytes = -1; }},
        {"workspace", [](DcArgs& a) { a.workspace_bytes = 64; }},
    };
    for (const auto& [name, mutate] : cases) {
        DcArgs a = valid_args();
        mutate(a);
        expect_invalid(name, [&] { check_dc_args(a, 0); }, "check_dc_args with bad " + name);
    }
    DcArgs a = valid_args();
    a.workspace = 16;
    a.workspace_bytes = 100;
    expect_invalid("workspace_bytes", [&] { check_dc_args(a, 101); }, "workspace smaller than the plans need");
    check_dc_args(a, 100);
    check(true, "workspace as large as needed passes");
    a = valid_args();
    a.C = 1;
    a.coil = 0;
    a.coil_batch_stride = 0;
    check_dc_args(a, 0);
    check(true, "single coil without maps passes");
    a = valid_args();
    a.coil_batch_stride = 0;
    check_dc_args(a, 0);
    check(true, "coil maps shared by the batch pass");
}

void test_plan_key_and_cache() {
    using mbdl_fast::make_plan_key;
    using mbdl_fast::PlanKey;
    using mbdl_fast::PlanKeyHash;
    const DcGeometry g2 = mbdl_fast::dc_geometry(8, 15, 320, 320, true, true);
    const DcGeometry g1 = mbdl_fast::dc_geometry(8, 15, 320, 320, false, true);
    const PlanKey k = make_plan_key(0, 7, g2, 8, 15, 320, 320);
    check(k == make_plan_key(0, 7, g2, 8, 15, 320, 320), "equal keys");
    check(PlanKeyHash()(k) == PlanKeyHash()(make_plan_key(0, 7, g2, 8, 15, 320, 320)), "equal hashes");
    check(k == make_plan_key(0, 7, g2, 15, 8, 320, 320), "only B * C matters to a plan");
    check(!(k == make_plan_key(1, 7, g2, 8, 15, 320, 320)), "device in the key");
    check(!(k == make_plan_key(0, 8, g2, 8, 15, 320, 320)), "stream in the key");
    check(!(k == make_plan_key(0, 7, g1, 8, 15, 320, 320)), "layout in the key");
    check(!(k == make_plan_key(0, 7, g2, 8, 15, 320, 368)), "W in the key");
    check(!(k == make_plan_key(0, 7, g2, 8, 15, 368, 320)), "H in the key");
    check(!(k == make_plan_key(0, 7, g2, 8, 15, 320, 320, false)), "callbacks or not in the key");
    check(PlanKeyHash()(k) != PlanKeyHash()(make_plan_key(0, 7, g2, 8, 15, 320, 320, false)), "... and in the hash");

    struct Entry {
        int id;
    };
    mbdl_fast::PlanCache<Entry> cache;
    std::atomic<int> made{0};
    auto factory = [&] {
        ++made;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        return std::make_unique<Entry>(Entry{made.load()});
    };
    std::vector<std::thread> threads;
    std::vector<Entry*> got(16, nullptr);
    for (int t = 0; t < 16; ++t) {
        threads.emplace_back([&, t] { got[t] = &cache.get_or_create(make_plan_key(0, t % 2, g2, 8, 15, 320, 320), factory); });
    }
    for (auto& th : threads) th.join();
    check(made.load() == 2 && cache.size() == 2, "16 threads, 2 keys: 2 entries made, once each");
    bool same = true;
    for (int t = 2; t < 16; ++t) same = same && got[t] == got[t % 2];
    check(same && got[0] != got[1], "threads asking for one key share its entry");
    try {
        cache.get_or_create(make_plan_key(3, 0, g2, 1, 1, 8, 8), []() -> std::unique_ptr<Entry> {
            throw std::runtime_error("cufftMakePlanMany64 failed");
        });
        check(false, "a failing factory throws");
    } catch (const std::runtime_error&) {
        check(cache.size() == 2, "a failing factory caches nothing");
    }
    cache.clear();
    check(cache.size() == 0, "clear");
}

// ---- Level 2 -------------------------------------------------------------------------------------------------

void test_level2_dispatch() {
    using mbdl_fast::level2_plan;
    using mbdl_fast::Level2Plan;
    check(mbdl_fast::level2_sizes() == std::vector<int>({256, 320, 368}), "Level-2 lengths: 256, 320, 368");
    check(mbdl_fast::level2_sizes_text() == "256, 320, 368", "Level-2 lengths as text");
    check(mbdl_fast::level2_fft(320) != nullptr && mbdl_fast::level2_fft(640) == nullptr, "640 has no Level-2 path");
    for (const auto& f : mbdl_fast::kLevel2Ffts) {
        check(f.n % f.ept == 0 && f.n / f.ept == 8 && f.ffts_per_block == 8, "n = " + std::to_string(f.n) +
                                                                                ": 8 threads per line, 8 lines");
    }

    // 2-D, the fastMRI brain size: three launches per batch chunk, geometry from the table.
    Level2Plan p = level2_plan(8, 15, 320, 320, true, true, 0, 0);
    check(p.supported && p.batch_chunk == 8 && p.workspace_bytes == 8LL * 15 * 320 * 320 * 8 && p.launches.size() == 3,
          "8x15x320x320 2-D, no L2 given: one chunk of the whole batch");
    const auto& f1 = p.launches[0];
    check(f1.kernel == mbdl_fast::L2_FORWARD_ROWS && f1.n == 320 && f1.grid[0] == 40 && f1.grid[1] == 15 &&
              f1.grid[2] == 8 && f1.block[0] == 8 && f1.block[1] == 8 && f1.block[2] == 1 &&
              f1.shared_bytes == 8 * 320 * 8 && f1.b0 == 0,
          "pass 1: 40 row blocks x 15 coils x 8 samples, 8x8 threads, cuFFTDx's shared memory bound");
    const auto& f2 = p.launches[1];
    check(f2.kernel == mbdl_fast::L2_RESIDUAL_COLUMNS && f2.grid[0] == 40 && f2.grid[1] == 15 && f2.grid[2] == 8 &&
              f2.shared_bytes == 8 * 320 * 8,
          "pass 2: 40 column blocks x 15 coils x 8 samples");
    const auto& f3 = p.launches[2];
    check(f3.kernel == mbdl_fast::L2_ADJOINT_ROWS && f3.grid[0] == 40 && f3.grid[1] == 8 && f3.grid[2] == 1 &&
              f3.shared_bytes == 2 * 8 * 320 * 8,
          "pass 3: 40 row blocks x 8 samples, coils looped inside, coil sums in shared memory");

    // The batch chunk from the L2 size: K's chunk within 3/10 of it.
    const int64_t h100_l2 = 50LL << 20;
    check(mbdl_fast::level2_batch_chunk(8, 15, 320, 320, h100_l2) == 1, "15 coils of 320^2 (12.3 MB): chunk 1 on 50 MB");
    check(mbdl_fast::level2_batch_chunk(8, 4, 320, 320, h100_l2) == 4, "4 coils (3.3 MB): chunk 4 on 50 MB");
    check(mbdl_fast::level2_batch_chunk(2, 1, 256, 256, h100_l2) == 2, "chunk at most B");
    check(mbdl_fast::level2_batch_chunk(8, 20, 368, 368, 1LL << 20) == 1, "chunk at least 1");
    check(mbdl_fast::level2_batch_chunk(100000, 1, 256, 256, 0) == 65535, "chunk at most the grid's 65535");
    p = level2_plan(8, 15, 320, 320, true, true, 0, h100_l2);
    check(p.batch_chunk == 1 && p.workspace_bytes == 15LL * 320 * 320 * 8 && p.launches.size() == 24,
          "chunk 1: 8 groups of 3 launches, workspace of one sample");
    check(p.launches[3].b0 == 1 && p.launches[3].grid[2] == 1 && p.launches[23].b0 == 7, "chunks walk the batch");
    p = level2_plan(7, 3, 256, 368, true, true, 3, 0);
    check(p.batch_chunk == 3 && p.launches.size() == 9 && p.launches[6].b0 == 6 && p.launches[6].grid[2] == 1,
          "7 samples in chunks of 3: the last chunk has 1");
    check(p.launches[0].n == 368 && p.launches[1].n == 256 && p.launches[2].n == 368, "rows of W = 368, columns of H = 256");
    check(mbdl_fast::level2_chunk_for_workspace(8, 15, 320, 320, 3 * 15LL * 320 * 320 * 8 + 7) == 3,
          "chunk from the workspace");
    expect_invalid("workspace_bytes", [] { mbdl_fast::level2_chunk_for_workspace(8, 15, 320, 320, 100); },
                   "workspace below one sample");

    // 1-D: one fused launch, no workspace; the untransformed axis may have any length.
    p = level2_plan(4, 20, 640, 368, false, true, 0, h100_l2);
    check(p.supported && p.workspace_bytes == 0 && p.launches.size() == 1, "W-only 368 (fastMRI knee, H = 640): supported");
    check(p.launches[0].kernel == mbdl_fast::L2_FUSED_ROWS && p.launches[0].n == 368 && p.launches[0].grid[0] == 80 &&
              p.launches[0].grid[1] == 4 && p.launches[0].shared_bytes == 2 * 8 * 368 * 8,
          "W-only: 80 blocks of 8 rows x 4 samples");
    p = level2_plan(2, 3, 320, 7, true, false, 0, 0);
    check(p.supported && p.launches.size() == 1 && p.launches[0].kernel == mbdl_fast::L2_FUSED_COLUMNS &&
              p.launches[0].grid[0] == 1 && p.launches[0].n == 320,
          "H-only 320 with W = 7: one block of 8 columns, one past the edge");

    // Unsupported: which axis, and the lengths there are.
    p = level2_plan(1, 1, 255, 256, true, true, 0, 0);
    check(!p.supported && p.launches.empty() && p.why_not.rfind("H = 255 is not a Level-2 length", 0) == 0 &&
              p.why_not.find("256, 320, 368") != std::string::npos,
          "H = 255: not supported, says why: " + p.why_not);
    p = level2_plan(1, 1, 640, 368, true, true, 0, 0);
    check(!p.supported && p.why_not.rfind("H = 640 is", 0) == 0, "640 x 368 2-D: H = 640 has none");
    p = level2_plan(1, 1, 100, 200, true, true, 0, 0);
    check(!p.supported && p.why_not.rfind("H = 100 and W = 200 are", 0) == 0, "both axes named");
    p = level2_plan(1, 1, 640, 368, false, true, 0, 0);
    check(p.supported, "W-only: H = 640 is not transformed");
    p = level2_plan(1, 1, 368, 640, false, true, 0, 0);
    check(!p.supported && p.why_not.rfind("W = 640", 0) == 0, "W-only 640: none");
    p = level2_plan(1, 70000, 256, 256, true, true, 0, 0);
    check(!p.supported && p.why_not.rfind("C = 70000", 0) == 0, "more coils than the grid holds");
    expect_invalid("transform_h, transform_w", [] { level2_plan(1, 1, 256, 256, false, false, 0, 0); }, "no axis");
}

DcArgs valid_level2_args() {
    DcArgs a = valid_args();
    a.H = 256;
    a.W = 320;
    a.coil_batch_stride = a.C * a.H * a.W;
    a.z = a.v = 0;  // unused by Level 2
    a.workspace = 64;
    a.workspace_bytes = a.C * a.H * a.W * 8;  // one sample at a time
    return a;
}

void test_level2_argument_checks() {
    using mbdl_fast::check_level2_args;
    const mbdl_fast::Level2Plan plan = check_level2_args(valid_level2_args());
    check(plan.supported && plan.batch_chunk == 1 && plan.launches.size() == 6, "valid Level-2 arguments: chunk 1");
    const std::vector<std::pair<std::string, std::function<void(DcArgs&)>>> cases = {
        {"B", [](DcArgs& a) { a.B = 0; }},
        {"x", [](DcArgs& a) { a.x = 0; }},
        {"mask", [](DcArgs& a) { a.mask = 0; }},
        {"gamma", [](DcArgs& a) { a.gamma = 0; }},
        {"out", [](DcArgs& a) { a.out = 0; }},
        {"coil_maps", [](DcArgs& a) { a.coil = 0; }},
        {"coil_batch_stride", [](DcArgs& a) { a.coil_batch_stride = 7; }},
        {"y", [](DcArgs& a) { a.transform_h = false; }},
        {"y, ahy", [](DcArgs& a) { a.ahy = 64; }},
        {"mask_sw", [](DcArgs& a) { a.mask_sw = -1; }},
        {"workspace_bytes", [](DcArgs& a) { a.workspace_bytes = 8; }},
        {"workspace_bytes", [](DcArgs& a) { a.workspace_bytes = -8; }},
        {"workspace", [](DcArgs& a) { a.workspace = 0; }},
        {"H", [](DcArgs& a) { a.H = 255; a.coil_batch_stride = 0; }},
        {"W", [](DcArgs& a) { a.W = 640; a.coil_batch_stride = 0; }},
        {"H, W", [](DcArgs& a) { a.H = 8; a.W = 6; a.coil_batch_stride = 0; a.workspace_bytes = 1 << 20; }},
        {"W", [](DcArgs& a) { a.transform_h = false; a.y = 0; a.H = 5; a.W = 640; a.coil_batch_stride = 0; }},
    };
    for (const auto& [name, mutate] : cases) {
        DcArgs a = valid_level2_args();
        mutate(a);
        expect_invalid(name, [&] { check_level2_args(a); }, "check_level2_args with bad " + name);
    }
    DcArgs a = valid_level2_args();
    a.transform_h = false;
    a.y = 0;
    a.workspace = 0;
    a.workspace_bytes = 0;
    check(check_level2_args(a).workspace_bytes == 0, "1-D: no workspace needed");
}

void test_level2_step_matches_reference() {
    std::mt19937 rng(4321);
    struct Case {
        int B, C, H, W;
        bool th, tw, coils, shared;
        int y_mode, mask_kind;
        int64_t chunk;
    };
    // y_mode 0: y (2-D only); 1: A^H y; 2: neither. mask_kind 0: per sample (B, H, W), 1: (1, W), 2: (H, 1), 3: (H, W).
    const Case cases[] = {
        {2, 2, 256, 256, true, true, true, false, 0, 1, 1},      // chunks of 1 sample
        {3, 3, 320, 256, true, true, true, true, 0, 0, 2},       // shared maps, per-sample mask, chunks 2 + 1
        {1, 1, 368, 320, true, true, false, false, 1, 3, 0},     // one coil, no maps, A^H y, 2-D mask
        {2, 2, 256, 368, true, true, true, false, 2, 3, 0},      // neither y nor A^H y
        {3, 2, 6, 368, false, true, true, false, 1, 1, 0},       // W-only, 6 rows in a block of 8
        {2, 3, 7, 256, false, true, true, true, 2, 1, 0},        // W-only, odd H (not transformed: no roll)
        {2, 3, 320, 5, true, false, true, false, 1, 2, 0},       // H-only, 5 columns
        {1, 4, 256, 9, true, false, true, false, 1, 2, 0},       // H-only, 9 columns: a second, nearly empty block
        {2, 1, 368, 3, true, false, false, false, 2, 2, 0},      // H-only, one coil without maps
    };
    int n = 0;
    for (const Case& c : cases) {
        Problem pr{};
        pr.level = 2;
        pr.B = c.B;
        pr.C = c.C;
        pr.H = c.H;
        pr.W = c.W;
        pr.transform_h = c.th;
        pr.transform_w = c.tw;
        pr.coils = c.coils;
        pr.shared_coils = c.shared;
        pr.y_mode = c.y_mode;
        pr.mask_kind = c.mask_kind;
        pr.batch_chunk = c.chunk;
        const double err = run_problem(pr, rng);
        check(err < 1e-5, describe(pr) + ": relative error " + std::to_string(err));
        ++n;
    }
    std::printf("emulated Level-2 step: %d cases against the reference\n", n);
}

}  // namespace

int main() {
    const std::vector<std::pair<const char*, void (*)()>> tests = {
        {"geometry", test_geometry},
        {"argument checks", test_argument_checks},
        {"plan key and cache", test_plan_key_and_cache},
        {"step matches reference", test_step_matches_reference},
        {"Level-2 dispatch and launch geometry", test_level2_dispatch},
        {"Level-2 argument checks", test_level2_argument_checks},
        {"Level-2 step matches reference", test_level2_step_matches_reference},
    };
    for (const auto& [name, fn] : tests) {
        const int before = g_failed;
        try {
            fn();
        } catch (const std::exception& e) {
            check(false, std::string(name) + " threw: " + e.what());
        }
        std::printf("%s: %s\n", name, g_failed == before ? "ok" : "FAILED");
    }
    std::printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}
