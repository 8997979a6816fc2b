// Python bindings of mbdl_fast._C. No torch: tensors arrive as raw device pointers (Python ints from
// tensor.data_ptr()) with their sizes, and the stream as torch.cuda.current_stream().cuda_stream.
// The wrapper with the tensor checks is mbdl_fast/_extension.py.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "kspace_dc.h"

#ifndef MBDL_FAST_CUDA_ARCHS
#define MBDL_FAST_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;

namespace {

std::string describe_error(cudaError_t err) {
    return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string(what) + " failed: " + describe_error(err));
    }
}

std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

void require_positive(const char* name, int64_t value) {
    if (value <= 0) {
        throw py::value_error(std::string(name) + ": expected a positive int, got " + std::to_string(value));
    }
}

void require_flag(const char* name, int64_t value) {
    if (value != 0 && value != 1) {
        throw py::value_error(std::string(name) + ": expected 0 or 1, got " + std::to_string(value));
    }
}

void require_pointer(const char* name, std::uintptr_t value) {
    if (value == 0) throw py::value_error(std::string(name) + ": expected a CUDA device pointer, got 0 (null)");
}

void kspace_dc_update(std::uintptr_t z_ptr, std::uintptr_t mask_ptr, std::uintptr_t y_ptr, int64_t B, int64_t C,
                      int64_t H, int64_t W, int64_t mask_stride_h, int64_t mask_stride_w, int64_t flip_h,
                      int64_t flip_w, double c, std::uintptr_t stream) {
    require_pointer("z_ptr", z_ptr);
    require_pointer("mask_ptr", mask_ptr);
    require_positive("B", B);
    require_positive("C", C);
    require_positive("H", H);
    require_positive("W", W);
    // The kernel indexes a plane with 32-bit ints.
    if (H > std::numeric_limits<int32_t>::max() / W) {
        throw py::value_error("H, W: expected H * W < 2**31, got " + std::to_string(H) + " * " + std::to_string(W));
    }
    require_flag("flip_h", flip_h);
    require_flag("flip_w", flip_w);
    check_cuda(mbdl_fast::launch_kspace_dc_update(
                   reinterpret_cast<void*>(z_ptr), reinterpret_cast<const float*>(mask_ptr),
                   reinterpret_cast<const void*>(y_ptr), B * C, H, W, mask_stride_h, mask_stride_w,
                   static_cast<int>(flip_h), static_cast<int>(flip_w), static_cast<float>(c),
                   reinterpret_cast<cudaStream_t>(stream)),
               "cudaLaunchKernel(kspace_dc_update)");
}

int cuda_device_count() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();  // clear it: "no device" is an answer here, not an error
        return 0;
    }
    return count;
}

std::string cuda_status() {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    int driver = 0;
    cudaDriverGetVersion(&driver);  // 0 when no driver is installed
    cudaGetLastError();
    const std::string runtime = version_string(CUDART_VERSION);
    if (err == cudaErrorInsufficientDriver) {
        if (driver == 0) return "no CUDA driver found (" + describe_error(err) + ")";
        return "CUDA driver " + version_string(driver) + " is older than the CUDA runtime " + runtime +
               " this module was built with (" + describe_error(err) + ")";
    }
    if (err == cudaErrorNoDevice) return "no CUDA device (" + describe_error(err) + ")";
    if (err != cudaSuccess) return "cudaGetDeviceCount failed (" + describe_error(err) + ")";
    if (count == 0) return "no CUDA device (cudaGetDeviceCount returned 0)";
    std::string out = std::to_string(count) + " CUDA device(s):";
    for (int i = 0; i < count; ++i) {
        cudaDeviceProp prop{};
        check_cuda(cudaGetDeviceProperties(&prop, i), "cudaGetDeviceProperties");
        out += " [" + std::to_string(i) + "] " + prop.name + " (sm_" + std::to_string(prop.major) +
               std::to_string(prop.minor) + ")";
    }
    return out + "; driver " + version_string(driver) + ", runtime " + runtime;
}

py::dict built_with() {
    py::dict d;
    d["cuda_runtime_version"] = CUDART_VERSION;
    d["cuda_runtime"] = version_string(CUDART_VERSION);
    d["cuda_archs"] = MBDL_FAST_CUDA_ARCHS;
    d["cudart"] = "static";
    return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "mbdl_fast CUDA kernels (raw device pointers; use mbdl_fast._extension, not this module directly)";
    m.def("kspace_dc_update", &kspace_dc_update,
          "In place on Z (B, C, H, W) complex64: Z <- m * (m * c * Z - s * y), or Z <- m * m * c * Z when y_ptr is 0;\n"
          "m = mask[h * mask_stride_h + w * mask_stride_w] (float32), s = (-1)^(h * flip_h + w * flip_w).\n"
          "Asynchronous on `stream` (a cudaStream_t as an int; 0 is the default stream).",
          py::arg("z_ptr"), py::arg("mask_ptr"), py::arg("y_ptr"), py::arg("B"), py::arg("C"), py::arg("H"),
          py::arg("W"), py::arg("mask_stride_h"), py::arg("mask_stride_w"), py::arg("flip_h"), py::arg("flip_w"),
          py::arg("c"), py::arg("stream"));
    m.def("cuda_device_count", &cuda_device_count,
          "Number of CUDA devices the runtime sees; 0 when no driver or device.");
    m.def("cuda_status", &cuda_status, "The devices, driver and runtime versions, or why there is no CUDA device.");
    m.def("built_with", &built_with, "The CUDA runtime version and the architectures this module was compiled for.");
}
