// Host-side logic of the Level-1 DC step (see dc_plan.h).
#include "dc_plan.h"

#include <cmath>
#include <limits>

namespace mbdl_fast {
namespace {

[[noreturn]] void fail(const std::string& name, const std::string& expected, const std::string& got) {
    throw std::invalid_argument(name + ": expected " + expected + ", got " + got);
}

void require_positive(const char* name, int64_t v) {
    if (v <= 0) fail(name, "a positive int", std::to_string(v));
}

void require_pointer(const char* name, std::uintptr_t v) {
    if (v == 0) fail(name, "a CUDA device pointer", "0 (null)");
}

}  // namespace

DcGeometry dc_geometry(int64_t B, int64_t C, int64_t H, int64_t W, bool transform_h, bool transform_w) {
    require_positive("B", B);
    require_positive("C", C);
    require_positive("H", H);
    require_positive("W", W);
    constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
    if (H > kInt32Max / W) fail("H, W", "H * W < 2**31", std::to_string(H) + " * " + std::to_string(W));
    if (B > kInt32Max || C > kInt32Max / B) {
        fail("B, C", "B * C < 2**31", std::to_string(B) + " * " + std::to_string(C));
    }
    const int64_t planes = B * C;
    const int64_t plane = H * W;
    // cuFFT offsets are unsigned 64-bit; the index maths needs planes * plane to fit in int64.
    if (planes > std::numeric_limits<int64_t>::max() / plane) fail("B, C, H, W", "fewer than 2**63 elements", "more");
    if (!transform_h && !transform_w) fail("transform_h, transform_w", "at least one transformed axis", "neither");

    DcGeometry g{};
    g.layout = transform_h && transform_w ? DC_LAYOUT_HW : (transform_w ? DC_LAYOUT_W : DC_LAYOUT_H);
    const bool odd_h = transform_h && H % 2 == 1;
    const bool odd_w = transform_w && W % 2 == 1;
    g.shift_h = odd_h ? static_cast<int32_t>(H / 2) : 0;
    g.shift_w = odd_w ? static_cast<int32_t>(W / 2) : 0;
    g.flip_h = transform_h && H % 2 == 0 ? 1 : 0;
    g.flip_w = transform_w && W % 2 == 0 ? 1 : 0;
    g.wide = planes * plane >= (int64_t{1} << 31);
    // V overwrites Z in place only where V's position is Z's: natural layout and no roll.
    g.separate_v = g.layout == DC_LAYOUT_H || odd_h || odd_w;

    int64_t n = 1;
    double c = 1.0;
    if (g.layout == DC_LAYOUT_HW) {
        g.rank = 2;
        g.n[0] = H;
        g.n[1] = W;
        g.batch = planes;
    } else {
        g.rank = 1;
        g.n[0] = g.layout == DC_LAYOUT_W ? W : H;
        g.n[1] = 1;
        g.batch = planes * (g.layout == DC_LAYOUT_W ? H : W);
    }
    for (int i = 0; i < g.rank; ++i) n *= g.n[i];
    if (g.flip_h && (H / 2) % 2 == 1) c = -c;
    if (g.flip_w && (W / 2) % 2 == 1) c = -c;
    g.z_scale = static_cast<float>(1.0 / static_cast<double>(n));
    g.y_scale = static_cast<float>(c / std::sqrt(static_cast<double>(n)));
    return g;
}

void check_dc_inputs(const DcArgs& a) {
    const int64_t plane = a.C * a.H * a.W;
    if (a.coil == 0 && a.C != 1) {
        fail("coil_maps", "a (B, C, H, W) pointer for C = " + std::to_string(a.C), "none (one coil)");
    }
    if (a.coil != 0 && a.coil_batch_stride != 0 && a.coil_batch_stride != plane) {
        fail("coil_batch_stride", "0 (maps shared by the batch) or C * H * W = " + std::to_string(plane),
             std::to_string(a.coil_batch_stride));
    }
    if (a.y != 0 && !(a.transform_h && a.transform_w)) {
        fail("y", "none with a one-axis transform (A^H y cancels the other axis only when given as AHy)", "a pointer");
    }
    if (a.y != 0 && a.ahy != 0) fail("y, ahy", "at most one of them", "both");
    const int64_t strides[3] = {a.mask_sb, a.mask_sh, a.mask_sw};
    const char* stride_names[3] = {"mask_sb", "mask_sh", "mask_sw"};
    for (int i = 0; i < 3; ++i) {
        if (strides[i] < 0) fail(stride_names[i], "a stride >= 0 (0 on a broadcast axis)", std::to_string(strides[i]));
    }
}

DcGeometry check_dc_args(const DcArgs& a, int64_t workspace_needed) {
    const DcGeometry g = dc_geometry(a.B, a.C, a.H, a.W, a.transform_h, a.transform_w);
    require_pointer("x", a.x);
    require_pointer("mask", a.mask);
    require_pointer("gamma", a.gamma);
    require_pointer("out", a.out);
    require_pointer("z", a.z);
    require_pointer("v", a.v);
    check_dc_inputs(a);
    // The mask must be constant along an untransformed axis (F^H M^2 F is then diagonal there); the caller
    // (mbdl_fast.physics, transform_dims) decides that from the values, which this function does not see.
    if (g.separate_v && a.v == a.z) {
        fail("v", "a (B, C, H, W) buffer apart from z (rolled or transposed layout)", "v == z");
    }
    if (a.workspace_bytes < 0) fail("workspace_bytes", "a size >= 0", std::to_string(a.workspace_bytes));
    if (workspace_needed >= 0 && a.workspace_bytes < workspace_needed) {
        fail("workspace_bytes", "at least " + std::to_string(workspace_needed) + " (what the cuFFT plans need)",
             std::to_string(a.workspace_bytes));
    }
    if (a.workspace_bytes > 0 && a.workspace == 0) fail("workspace", "a CUDA device pointer", "0 (null)");
    return g;
}

DcParams make_dc_params(const DcArgs& a, const DcGeometry& g) {
    DcParams p{};
    p.x = reinterpret_cast<const float2*>(a.x);
    p.coil = reinterpret_cast<const float2*>(a.coil);
    p.mask = reinterpret_cast<const float*>(a.mask);
    p.y = reinterpret_cast<const float2*>(a.y);
    p.ahy = reinterpret_cast<const float2*>(a.ahy);
    p.gamma = reinterpret_cast<const float*>(a.gamma);
    p.v = reinterpret_cast<float2*>(a.v);
    p.out = reinterpret_cast<float2*>(a.out);
    p.coil_batch_stride = a.coil == 0 ? 0 : a.coil_batch_stride;
    p.mask_sb = a.mask_sb;
    p.mask_sh = a.mask_sh;
    p.mask_sw = a.mask_sw;
    p.B = static_cast<int32_t>(a.B);
    p.C = static_cast<int32_t>(a.C);
    p.H = static_cast<int32_t>(a.H);
    p.W = static_cast<int32_t>(a.W);
    p.layout = g.layout;
    p.shift_h = g.shift_h;
    p.shift_w = g.shift_w;
    p.flip_h = g.flip_h;
    p.flip_w = g.flip_w;
    p.wide = g.wide ? 1 : 0;
    p.z_scale = g.z_scale;
    p.y_scale = g.y_scale;
    return p;
}

PlanKey make_plan_key(int device, std::uintptr_t stream, const DcGeometry& g, int64_t B, int64_t C, int64_t H,
                      int64_t W, bool callbacks) {
    PlanKey k;
    k.device = device;
    k.stream = stream;
    k.layout = g.layout;
    k.planes = B * C;
    k.H = H;
    k.W = W;
    k.callbacks = callbacks;
    return k;
}

}  // namespace mbdl_fast
