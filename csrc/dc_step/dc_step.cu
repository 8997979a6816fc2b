// The Level-1 MRI DC step: two cuFFT plans per (device, stream, shape) with the LTO callbacks of
// dc_callbacks.cu, a one-thread kernel that writes the step's parameter block, and the coil-sum kernel.
//
// Per step, in stream order: write the parameter block (a kernel taking it by value, so the write is ordered
// with the transforms around it and a CUDA graph captures it by value); forward C2C in place on Z with the
// expand load and the residual store; inverse C2C in place with the coil-image store; the coil sum.
//
// Where cuFFT cannot make the callback plans (a size it does not support callbacks for, such as a large prime
// factor, or no nvJitLink), or when asked to (callbacks = false), the same maths (dc_common.h) runs as three
// kernels of its own around plain plans: correct at any size, three more passes over B * C * H * W.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "cufft_loader.h"
#include "dc_callbacks_fatbin.h"  // generated at build time: dc_callbacks_fatbin[] (bin2c)
#include "dc_common.h"
#include "dc_step.h"

namespace mbdl_fast {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kMaxGridY = 65535;

void check_cuda(cudaError_t err, const std::string& what) {
    if (err != cudaSuccess) {
        throw std::runtime_error(what + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
    }
}

void check_cufft(cufftResult r, const std::string& what) {
    if (r != CUFFT_SUCCESS) throw std::runtime_error(what + " failed: " + cufft_error_name(r));
}

__global__ void write_params_kernel(DcParams* dst, const DcParams src) { *dst = src; }

// The callbacks' maths as kernels of their own, for plans without callbacks: one thread per FFT-buffer element.
constexpr unsigned kMaxBlocks = 1u << 20;

__global__ void __launch_bounds__(kThreads) expand_kernel(const DcParams p, float2* z, unsigned long long total) {
    for (unsigned long long off = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x; off < total;
         off += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
        z[off] = dc::load_expand(p, off);
    }
}

__global__ void __launch_bounds__(kThreads) residual_kernel(const DcParams p, float2* z, unsigned long long total) {
    for (unsigned long long off = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x; off < total;
         off += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
        z[off] = dc::kspace_residual(p, off, z[off]);
    }
}

// V over Z only where V's position is Z's (dc_common.h): each thread then reads and writes its own element.
__global__ void __launch_bounds__(kThreads) image_kernel(const DcParams p, const float2* z, unsigned long long total) {
    for (unsigned long long off = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x; off < total;
         off += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
        dc::store_coil_image(p, off, z[off]);
    }
}

__global__ void __launch_bounds__(kThreads) coil_sum_kernel(const DcParams p) {
    const int64_t hw = static_cast<int64_t>(p.H) * p.W;
    const int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (pix >= hw) return;
    for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) dc::coil_sum_step(p, b, pix);
}

// The callbacks by name: as written (cuFFT's documented use) and, should this cuFFT look the name up as it
// appears in the LTO-IR, the C++ mangled name (signatures of dc_callbacks.cu).
struct CallbackNames {
    std::string load, store_residual, store_image;
};

CallbackNames plain_names() {
    return {"mbdl_fast_dc_load_expand", "mbdl_fast_dc_store_residual", "mbdl_fast_dc_store_image"};
}

std::string mangled(const std::string& name, const char* params) {
    return "_Z" + std::to_string(name.size()) + name + params;
}

CallbackNames mangled_names() {
    const CallbackNames p = plain_names();
    return {mangled(p.load, "PvyS_S_"), mangled(p.store_residual, "Pvy6float2S_S_"),
            mangled(p.store_image, "Pvy6float2S_S_")};
}

struct DcPlans {
    int device = 0;
    bool fused = false;  // plans with the LTO callbacks
    std::string note;    // how the plans were made (and why without callbacks)
    cufftHandle forward = 0, inverse = 0;
    bool have_forward = false, have_inverse = false;
    DcParams* params = nullptr;  // device memory, the callbacks' caller_info
    int64_t work_bytes = 0;
    std::mutex mutex;  // one step's launches at a time on this entry

    DcPlans() = default;
    DcPlans(const DcPlans&) = delete;
    DcPlans& operator=(const DcPlans&) = delete;
    ~DcPlans() { release(); }

    void release() noexcept {
        try {
            const CufftApi& api = cufft_api();  // loaded: an entry is only made after cufft_load
            if (have_forward) api.Destroy(forward);
            if (have_inverse) api.Destroy(inverse);
        } catch (...) {
        }
        have_forward = have_inverse = false;
        if (params != nullptr) {
            cudaSetDevice(device);
            cudaFree(params);
            params = nullptr;
        }
    }
};

PlanCache<DcPlans>& plan_cache() {
    static auto* cache = new PlanCache<DcPlans>();  // never destroyed: no cuFFT calls during process teardown
    return *cache;
}

const char* layout_name(int layout) {
    return layout == DC_LAYOUT_HW ? "2-D" : (layout == DC_LAYOUT_W ? "1-D along W" : "1-D along H");
}

// One plan with its callbacks; returns its workspace size.
int64_t make_plan(const CufftApi& api, cufftHandle* handle, bool* made, const DcGeometry& g, cudaStream_t stream,
                  void* params, const char* load, const char* store, const std::string& what) {
    check_cufft(api.Create(handle), "cufftCreate(" + what + ")");
    *made = true;
    check_cufft(api.SetAutoAllocation(*handle, 0), "cufftSetAutoAllocation(" + what + ")");
    void* caller_info[1] = {params};
    if (load != nullptr) {
        check_cufft(api.XtSetJITCallback(*handle, load, dc_callbacks_fatbin, sizeof(dc_callbacks_fatbin),
                                         CUFFT_CB_LD_COMPLEX, caller_info),
                    std::string("cufftXtSetJITCallback(") + load + ", " + what + ")");
    }
    if (store != nullptr) {
        check_cufft(api.XtSetJITCallback(*handle, store, dc_callbacks_fatbin, sizeof(dc_callbacks_fatbin),
                                         CUFFT_CB_ST_COMPLEX, caller_info),
                    std::string("cufftXtSetJITCallback(") + store + ", " + what + ")");
    }
    long long n[2] = {g.n[0], g.n[1]};
    std::size_t work = 0;
    check_cufft(api.MakePlanMany64(*handle, g.rank, n, nullptr, 1, 0, nullptr, 1, 0, CUFFT_C2C, g.batch, &work),
                "cufftMakePlanMany64(" + what + ")");
    check_cufft(api.SetStream(*handle, stream), "cufftSetStream(" + what + ")");
    return static_cast<int64_t>(work);
}

std::unique_ptr<DcPlans> create_plans(const PlanKey& key, const DcGeometry& g) {
    const CufftApi& api = cufft_api();
    auto e = std::make_unique<DcPlans>();
    e->device = key.device;
    check_cuda(cudaMalloc(reinterpret_cast<void**>(&e->params), sizeof(DcParams)), "cudaMalloc(DcParams)");
    const auto stream = reinterpret_cast<cudaStream_t>(key.stream);
    const std::string shape = std::string(layout_name(g.layout)) + ", " + std::to_string(g.batch) + " transforms of " +
                              std::to_string(g.n[0]) + (g.rank == 2 ? "x" + std::to_string(g.n[1]) : "");
    auto drop_plans = [&] {
        if (e->have_forward) api.Destroy(e->forward);
        if (e->have_inverse) api.Destroy(e->inverse);
        e->have_forward = e->have_inverse = false;
    };
    std::string errors;
    if (key.callbacks) {
        for (const CallbackNames& names : {plain_names(), mangled_names()}) {
            try {
                const int64_t wf = make_plan(api, &e->forward, &e->have_forward, g, stream, e->params,
                                             names.load.c_str(), names.store_residual.c_str(), "forward, " + shape);
                const int64_t wi = make_plan(api, &e->inverse, &e->have_inverse, g, stream, e->params, nullptr,
                                             names.store_image.c_str(), "inverse, " + shape);
                e->work_bytes = wf > wi ? wf : wi;
                e->fused = true;
                e->note = "cuFFT LTO callbacks (" + names.load + ")";
                return e;
            } catch (const std::runtime_error& err) {
                errors += std::string(errors.empty() ? "" : "; then, by mangled names: ") + err.what();
                drop_plans();
            }
        }
    }
    // Plain plans; the callbacks' maths runs as kernels of its own (dc_step_run).
    const int64_t wf = make_plan(api, &e->forward, &e->have_forward, g, stream, nullptr, nullptr, nullptr,
                                 "forward without callbacks, " + shape);
    const int64_t wi = make_plan(api, &e->inverse, &e->have_inverse, g, stream, nullptr, nullptr, nullptr,
                                 "inverse without callbacks, " + shape);
    e->work_bytes = wf > wi ? wf : wi;
    e->fused = false;
    e->note = key.callbacks ? "cuFFT without callbacks, as the callback plans failed: " + errors
                            : "cuFFT without callbacks (asked for)";
    return e;
}

DcPlans& plans_for(int device, std::uintptr_t stream, const DcGeometry& g, int64_t B, int64_t C, int64_t H,
                   int64_t W, bool callbacks) {
    int current = -1;
    // Only when needed: a step may run inside a CUDA-graph capture, which refuses calls it cannot record.
    if (cudaGetDevice(&current) != cudaSuccess || current != device) {
        cudaGetLastError();
        check_cuda(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
    }
    const PlanKey key = make_plan_key(device, stream, g, B, C, H, W, callbacks);
    return plan_cache().get_or_create(key, [&] { return create_plans(key, g); });
}

}  // namespace

int64_t dc_step_prepare(int device, std::uintptr_t stream, int64_t B, int64_t C, int64_t H, int64_t W,
                        bool transform_h, bool transform_w, bool callbacks) {
    const DcGeometry g = dc_geometry(B, C, H, W, transform_h, transform_w);
    cufft_api();  // throws when cuFFT is not loaded
    return plans_for(device, stream, g, B, C, H, W, callbacks).work_bytes;
}

void dc_step_run(int device, std::uintptr_t stream_handle, const DcArgs& a, bool callbacks) {
    check_dc_args(a, -1);
    const CufftApi& api = cufft_api();
    const DcGeometry geometry = dc_geometry(a.B, a.C, a.H, a.W, a.transform_h, a.transform_w);
    DcPlans& e = plans_for(device, stream_handle, geometry, a.B, a.C, a.H, a.W, callbacks);
    const DcGeometry g = check_dc_args(a, e.work_bytes);
    const DcParams params = make_dc_params(a, g);
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    auto* z = reinterpret_cast<cufftComplex*>(a.z);
    const unsigned long long total = static_cast<unsigned long long>(a.B * a.C) * static_cast<unsigned long long>(a.H * a.W);
    const unsigned blocks = static_cast<unsigned>(std::min<unsigned long long>((total + kThreads - 1) / kThreads, kMaxBlocks));

    std::lock_guard<std::mutex> lock(e.mutex);
    if (e.work_bytes > 0) {
        void* work = reinterpret_cast<void*>(a.workspace);
        check_cufft(api.SetWorkArea(e.forward, work), "cufftSetWorkArea(forward)");
        check_cufft(api.SetWorkArea(e.inverse, work), "cufftSetWorkArea(inverse)");
    }
    if (e.fused) {
        write_params_kernel<<<1, 1, 0, stream>>>(e.params, params);
        check_cuda(cudaGetLastError(), "cudaLaunchKernel(write_params)");
        check_cufft(api.ExecC2C(e.forward, z, z, CUFFT_FORWARD), "cufftExecC2C(forward)");
        check_cufft(api.ExecC2C(e.inverse, z, z, CUFFT_INVERSE), "cufftExecC2C(inverse)");
    } else {
        expand_kernel<<<blocks, kThreads, 0, stream>>>(params, z, total);
        check_cuda(cudaGetLastError(), "cudaLaunchKernel(expand)");
        check_cufft(api.ExecC2C(e.forward, z, z, CUFFT_FORWARD), "cufftExecC2C(forward)");
        residual_kernel<<<blocks, kThreads, 0, stream>>>(params, z, total);
        check_cuda(cudaGetLastError(), "cudaLaunchKernel(residual)");
        check_cufft(api.ExecC2C(e.inverse, z, z, CUFFT_INVERSE), "cufftExecC2C(inverse)");
        image_kernel<<<blocks, kThreads, 0, stream>>>(params, z, total);
        check_cuda(cudaGetLastError(), "cudaLaunchKernel(image)");
    }
    const int64_t hw = a.H * a.W;
    const dim3 grid(static_cast<unsigned>((hw + kThreads - 1) / kThreads),
                    static_cast<unsigned>(a.B < kMaxGridY ? a.B : kMaxGridY));
    coil_sum_kernel<<<grid, kThreads, 0, stream>>>(params);
    check_cuda(cudaGetLastError(), "cudaLaunchKernel(coil_sum)");
}

std::size_t dc_step_cache_size() { return plan_cache().size(); }

std::vector<DcPlanInfo> dc_step_plans() {
    std::vector<DcPlanInfo> out;
    plan_cache().for_each([&out](const PlanKey& k, const DcPlans& e) {
        DcPlanInfo i;
        i.device = k.device;
        i.stream = k.stream;
        i.layout = k.layout;
        i.planes = k.planes;
        i.H = k.H;
        i.W = k.W;
        i.callbacks_requested = k.callbacks;
        i.fused = e.fused;
        i.work_bytes = e.work_bytes;
        i.note = e.note;
        out.push_back(i);
    });
    return out;
}

std::size_t dc_callbacks_fatbin_size() { return sizeof(dc_callbacks_fatbin); }

}  // namespace mbdl_fast
