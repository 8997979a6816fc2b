// Host-side logic of the Level-2 DC step (see dc_level2.h): which sizes have a path, the launch geometry, the
// batch chunk that keeps the 2-D workspace in L2, and the argument checks. No CUDA calls: ctest runs it anywhere.
#include "dc_level2.h"

#include <algorithm>
#include <stdexcept>

namespace mbdl_fast {
namespace {

constexpr int64_t kMaxGridYZ = 65535;

[[noreturn]] void fail(const std::string& name, const std::string& expected, const std::string& got) {
    throw std::invalid_argument(name + ": expected " + expected + ", got " + got);
}

unsigned blocks_for(int64_t lines, int per_block) { return static_cast<unsigned>((lines + per_block - 1) / per_block); }

Level2Launch launch(int kernel, const Level2Fft& f, int64_t lines, unsigned gy, unsigned gz, int64_t b0) {
    Level2Launch l;
    l.kernel = kernel;
    l.n = f.n;
    l.grid[0] = blocks_for(lines, f.ffts_per_block);
    l.grid[1] = gy;
    l.grid[2] = gz;
    l.block[0] = static_cast<unsigned>(f.n / f.ept);
    l.block[1] = static_cast<unsigned>(f.ffts_per_block);
    l.block[2] = 1;
    const int64_t line_bytes = kLevel2FftSharedPerLine * f.n;
    const bool with_acc = kernel == L2_ADJOINT_ROWS || kernel == L2_FUSED_ROWS || kernel == L2_FUSED_COLUMNS;
    l.shared_bytes = f.ffts_per_block * line_bytes * (with_acc ? 2 : 1);  // cuFFTDx's, then the coil sums
    l.b0 = b0;
    return l;
}

}  // namespace

const char* level2_kernel_name(int kernel) {
    switch (kernel) {
        case L2_FORWARD_ROWS: return "forward_rows";
        case L2_RESIDUAL_COLUMNS: return "residual_columns";
        case L2_ADJOINT_ROWS: return "adjoint_rows";
        case L2_FUSED_ROWS: return "fused_rows";
        case L2_FUSED_COLUMNS: return "fused_columns";
        default: return "unknown";
    }
}

const Level2Fft* level2_fft(int64_t n) {
    for (const Level2Fft& f : kLevel2Ffts) {
        if (f.n == n) return &f;
    }
    return nullptr;
}

std::vector<int> level2_sizes() {
    std::vector<int> out;
    for (const Level2Fft& f : kLevel2Ffts) out.push_back(f.n);
    return out;
}

std::string level2_sizes_text() {
    std::string out;
    for (const Level2Fft& f : kLevel2Ffts) out += (out.empty() ? "" : ", ") + std::to_string(f.n);
    return out;
}

int64_t level2_batch_chunk(int64_t B, int64_t C, int64_t H, int64_t W, int64_t l2_bytes) {
    const int64_t cap = std::min<int64_t>(B, kMaxGridYZ);
    if (l2_bytes <= 0) return cap;
    const int64_t per_batch = C * H * W * 8;
    const int64_t fits = (l2_bytes * 3 / 10) / per_batch;
    return std::max<int64_t>(1, std::min(cap, fits));
}

int64_t level2_chunk_for_workspace(int64_t B, int64_t C, int64_t H, int64_t W, int64_t workspace_bytes) {
    const int64_t per_batch = C * H * W * 8;
    const int64_t chunk = std::min<int64_t>({B, kMaxGridYZ, workspace_bytes / per_batch});
    if (chunk < 1) {
        fail("workspace_bytes", "at least C * H * W * 8 = " + std::to_string(per_batch) + " (one batch element of K)",
             std::to_string(workspace_bytes));
    }
    return chunk;
}

Level2Plan level2_plan(int64_t B, int64_t C, int64_t H, int64_t W, bool transform_h, bool transform_w,
                       int64_t batch_chunk, int64_t l2_bytes) {
    Level2Plan plan;
    plan.geometry = dc_geometry(B, C, H, W, transform_h, transform_w);
    const Level2Fft* fh = transform_h ? level2_fft(H) : nullptr;
    const Level2Fft* fw = transform_w ? level2_fft(W) : nullptr;
    std::string why;
    if (transform_h && fh == nullptr) why = "H = " + std::to_string(H);
    if (transform_w && fw == nullptr) why += (why.empty() ? "W = " : " and W = ") + std::to_string(W);
    if (!why.empty()) {
        plan.why_not = why + (why.find(" and ") == std::string::npos ? " is" : " are") +
                       " not a Level-2 length (transformed axes must be one of " + level2_sizes_text() + ")";
        return plan;
    }
    if (C > kMaxGridYZ) {
        plan.why_not = "C = " + std::to_string(C) + " coils: the Level-2 grid takes at most 65535";
        return plan;
    }
    plan.supported = true;
    const unsigned coils = static_cast<unsigned>(C);
    if (plan.geometry.layout == DC_LAYOUT_HW) {
        plan.batch_chunk = batch_chunk > 0 ? std::min<int64_t>({batch_chunk, B, kMaxGridYZ})
                                           : level2_batch_chunk(B, C, H, W, l2_bytes);
        plan.workspace_bytes = plan.batch_chunk * C * H * W * 8;
        for (int64_t b0 = 0; b0 < B; b0 += plan.batch_chunk) {
            const unsigned nb = static_cast<unsigned>(std::min(plan.batch_chunk, B - b0));
            plan.launches.push_back(launch(L2_FORWARD_ROWS, *fw, H, coils, nb, b0));
            plan.launches.push_back(launch(L2_RESIDUAL_COLUMNS, *fh, W, coils, nb, b0));
            plan.launches.push_back(launch(L2_ADJOINT_ROWS, *fw, H, nb, 1, b0));
        }
    } else {
        // No workspace: the batch is split only where it exceeds the grid's limit.
        plan.batch_chunk = std::min<int64_t>(B, kMaxGridYZ);
        plan.workspace_bytes = 0;
        const bool rows = plan.geometry.layout == DC_LAYOUT_W;
        for (int64_t b0 = 0; b0 < B; b0 += plan.batch_chunk) {
            const unsigned nb = static_cast<unsigned>(std::min(plan.batch_chunk, B - b0));
            plan.launches.push_back(rows ? launch(L2_FUSED_ROWS, *fw, H, nb, 1, b0)
                                         : launch(L2_FUSED_COLUMNS, *fh, W, nb, 1, b0));
        }
    }
    return plan;
}

Level2Plan check_level2_args(const DcArgs& a) {
    // Sizes first, as check_dc_args does (dc_geometry throws naming them); then the pointers; then whether the
    // sizes have a Level-2 path; the workspace last, as its size depends on them.
    Level2Plan plan = level2_plan(a.B, a.C, a.H, a.W, a.transform_h, a.transform_w, 1);
    if (a.x == 0) fail("x", "a CUDA device pointer", "0 (null)");
    if (a.mask == 0) fail("mask", "a CUDA device pointer", "0 (null)");
    if (a.gamma == 0) fail("gamma", "a CUDA device pointer", "0 (null)");
    if (a.out == 0) fail("out", "a CUDA device pointer", "0 (null)");
    check_dc_inputs(a);
    if (!plan.supported) {
        const bool h_bad = a.transform_h && level2_fft(a.H) == nullptr;
        const bool w_bad = a.transform_w && level2_fft(a.W) == nullptr;
        const std::string name = h_bad && w_bad ? "H, W" : (h_bad ? "H" : (w_bad ? "W" : "C"));
        throw std::invalid_argument(name + ": " + plan.why_not);
    }
    if (plan.workspace_bytes > 0) {  // 2-D: K, in chunks of as many samples as the workspace holds
        if (a.workspace_bytes < 0) fail("workspace_bytes", "a size >= 0", std::to_string(a.workspace_bytes));
        const int64_t chunk = level2_chunk_for_workspace(a.B, a.C, a.H, a.W, a.workspace_bytes);
        if (a.workspace == 0) fail("workspace", "a CUDA device pointer (K, the 2-D passes' buffer)", "0 (null)");
        plan = level2_plan(a.B, a.C, a.H, a.W, a.transform_h, a.transform_w, chunk);
    }
    return plan;
}

}  // namespace mbdl_fast
