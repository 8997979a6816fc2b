// The cuFFT LTO callbacks of the Level-1 DC step. This file is compiled to LTO-IR only (nvcc -dc -fatbin
// with code=lto_XX, see CMakeLists.txt), embedded in mbdl_fast._C as a byte array, and linked into cuFFT's
// own kernels by cuFFT (through nvJitLink) when a plan is made: the maths then runs where cuFFT reads its
// input and writes its output, with no pass of its own. The maths is in dc_common.h.
//
// cuFFT finds the callbacks by the names given to cufftXtSetJITCallback (dc_step.cu); the signatures are
// cuFFT's LTO callback signatures (cufftJITCallbackLoadC / cufftJITCallbackStoreC, CUDA >= 12.6).
#include "dc_common.h"

using mbdl_fast::DcParams;

// Forward transform, load: the coil image s * S_c * x, read through the roll on odd axes.
__device__ float2 mbdl_fast_dc_load_expand(void* data_in, unsigned long long offset, void* caller_info,
                                           void* shared) {
    return mbdl_fast::dc::load_expand(*static_cast<const DcParams*>(caller_info), offset);
}

// Forward transform, store: the masked k-space residual, written in place for the inverse transform.
__device__ void mbdl_fast_dc_store_residual(void* data_out, unsigned long long offset, float2 element,
                                            void* caller_info, void* shared) {
    static_cast<float2*>(data_out)[offset] =
        mbdl_fast::dc::kspace_residual(*static_cast<const DcParams*>(caller_info), offset, element);
}

// Inverse transform, store: s * conj(S_c) * U, at its unrolled image position, for the coil sum.
__device__ void mbdl_fast_dc_store_image(void* data_out, unsigned long long offset, float2 element,
                                         void* caller_info, void* shared) {
    mbdl_fast::dc::store_coil_image(*static_cast<const DcParams*>(caller_info), offset, element);
}
