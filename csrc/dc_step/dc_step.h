// The Level-1 MRI DC step on the GPU: cuFFT with LTO callbacks (dc_callbacks.cu) and a coil-sum kernel.
// Built only with cuFFT headers (MBDL_FAST_HAVE_CUFFT); the maths is in dc_common.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "dc_plan.h"

namespace mbdl_fast {

// Makes (once per device, stream, shape and `callbacks`; cached) the forward and inverse plans of a step and
// returns the workspace they need in bytes. With callbacks = true the plans carry the LTO callbacks, unless cuFFT
// cannot make them (then plain plans, and the reason in dc_step_plans()). cuFFT must be loaded (cufft_load).
// Throws std::runtime_error naming the failing CUDA or cuFFT call, std::invalid_argument for bad sizes.
int64_t dc_step_prepare(int device, std::uintptr_t stream, int64_t B, int64_t C, int64_t H, int64_t W,
                        bool transform_h, bool transform_w, bool callbacks);

// One step, asynchronous on `stream`: checks the arguments (std::invalid_argument naming the argument), then
// runs the transforms with their callbacks (or the kernels that stand in for them) and the coil sum.
void dc_step_run(int device, std::uintptr_t stream, const DcArgs& args, bool callbacks);

// Number of cached plan pairs, and what each is.
std::size_t dc_step_cache_size();

struct DcPlanInfo {
    int device = 0;
    std::uintptr_t stream = 0;
    int layout = 0;
    int64_t planes = 0, H = 0, W = 0;
    bool callbacks_requested = true, fused = false;
    int64_t work_bytes = 0;
    std::string note;
};
std::vector<DcPlanInfo> dc_step_plans();

// The LTO-IR fatbin of the callbacks, embedded at build time, and the architectures it holds.
std::size_t dc_callbacks_fatbin_size();

}  // namespace mbdl_fast
