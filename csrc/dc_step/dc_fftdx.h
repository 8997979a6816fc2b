// The Level-2 MRI DC step on the GPU: cuFFTDx block FFTs, one row pass and one column pass with everything else
// fused (dc_fftdx.cu; the passes, their bytes and the host logic: dc_level2.h). Built only with cuFFTDx headers
// (MBDL_FAST_HAVE_CUFFTDX).
#pragma once

#include <cstdint>

#include "dc_level2.h"

namespace mbdl_fast {

// The workspace (K) a step of these sizes needs on `device`, in bytes: the 2-D passes' batch chunk is sized from
// the device's L2 cache; 0 for a one-axis transform. std::invalid_argument for sizes without a Level-2 path,
// std::runtime_error naming the failing CUDA call.
int64_t dc_level2_workspace_bytes(int device, int64_t B, int64_t C, int64_t H, int64_t W, bool transform_h,
                                  bool transform_w);

// One step, asynchronous on `stream`: checks the arguments (std::invalid_argument naming the argument; K is
// a.workspace, a.z and a.v are unused), then launches the plan's kernels, each checked (std::runtime_error naming
// the launch and the CUDA error).
void dc_level2_run(int device, std::uintptr_t stream, const DcArgs& a);

}  // namespace mbdl_fast
