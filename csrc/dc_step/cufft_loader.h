// cuFFT, opened at run time (dlopen) instead of linked: mbdl_fast._C imports, and says why, on a machine without
// libcufft, and it uses the libcufft that torch already loaded when there is one (one cuFFT per process).
// Built only with cuFFT headers (MBDL_FAST_HAVE_CUFFT).
#pragma once

#include <cufftXt.h>

#include <string>
#include <vector>

namespace mbdl_fast {

struct CufftApi {
    std::string path;  // where it was loaded from
    int version = 0;   // cufftGetVersion, e.g. 12000 for 12.0.0
    decltype(&cufftGetVersion) GetVersion = nullptr;
    decltype(&cufftCreate) Create = nullptr;
    decltype(&cufftDestroy) Destroy = nullptr;
    decltype(&cufftSetAutoAllocation) SetAutoAllocation = nullptr;
    decltype(&cufftMakePlanMany64) MakePlanMany64 = nullptr;
    decltype(&cufftSetStream) SetStream = nullptr;
    decltype(&cufftSetWorkArea) SetWorkArea = nullptr;
    decltype(&cufftExecC2C) ExecC2C = nullptr;
    decltype(&cufftXtSetJITCallback) XtSetJITCallback = nullptr;
};

// Loads cuFFT once (later calls return the same answer): first a libcufft.so.<major> the process has already
// loaded, then each of `candidates` (full paths, e.g. the nvidia-cufft wheel's), then the path found at build
// time, then the plain soname through the loader's search path. The library's major version must be the one of
// the headers this module was built with (the LTO callback API and the LTO-IR version depend on it).
// Returns a description ("cuFFT 12.0.0 from /path"); throws std::runtime_error saying what was tried.
std::string cufft_load(const std::vector<std::string>& candidates);

// The loaded API; throws std::runtime_error when cufft_load has not succeeded.
const CufftApi& cufft_api();

// "CUFFT_INVALID_VALUE (4)".
std::string cufft_error_name(int code);

}  // namespace mbdl_fast
