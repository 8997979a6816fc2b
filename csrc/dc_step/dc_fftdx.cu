// The Level-2 MRI DC step: cuFFTDx block FFTs of the shipped lengths (kLevel2Ffts: 256, 320, 368), the coil
// expansion, shift signs, mask-residual-mask, conj(S), coil sum and gradient step fused around them. The passes,
// the bytes each moves and the per-line maths are in dc_level2.h; the launch geometry in dc_level2.cpp.
//
// Which SM the FFT descriptions name. The description inside a kernel takes the architecture of the device pass
// compiling it (SM<800> for sm_80..89: CMakeLists.txt builds sm_80 code for those, which is what sm_86/89 run;
// SM<900>, SM<1000>, SM<1200> from sm_90, sm_100, sm_120 on), so every kernel's FFT is the one cuFFTDx tuned for
// the code the GPU runs. The launch geometry must not depend on that choice, since the host cannot know which of
// the fatbin's images (or the PTX, JIT-compiled) the driver picks: it comes from kLevel2Ffts
// (elements per thread and lines per block fixed, so block_dim is fixed, and shared memory at its upper bound of
// 8 B per element per line), and the static_asserts below check, for every described SM and both directions, that
// cuFFTDx's own block_dim equals it, that its shared memory fits in it and that no Bluestein workspace is needed.
// (At 320, cuFFTDx asks for 10 KiB on sm_80 and 20 KiB on sm_90 per block: the bound covers both.)
//
// Blocks are 8 lines x 8 threads, each thread holding 32..46 elements: few warps per SM, many loads in flight per
// thread. ptxas (nvcc 13.0): 155..231 registers at 256 and 320, no spills; 255 at 368 with up to 300 B of spills
// (368 has no configuration with fewer elements per thread). Tuning on a GPU starts from here.
#include <cuda_runtime.h>

#include <cufftdx.hpp>
#include <iterator>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "dc_fftdx.h"
#include "dc_level2.h"

namespace mbdl_fast {
namespace {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1200
constexpr unsigned kFftSm = 1200;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
constexpr unsigned kFftSm = 1000;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr unsigned kFftSm = 900;
#else
constexpr unsigned kFftSm = 800;  // sm_80..89 device passes; in the host pass only a type, never run
#endif

constexpr unsigned kDescribedSms[] = {800, 900, 1000, 1200};  // every kFftSm above

void check_cuda(cudaError_t err, const std::string& what) {
    if (err != cudaSuccess) {
        throw std::runtime_error(what + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
    }
}

constexpr Level2Fft config_of(int n) {
    for (const Level2Fft& f : kLevel2Ffts) {
        if (f.n == n) return f;
    }
    return Level2Fft{0, 1, 1};
}

template <int N>
struct Cfg {
    static constexpr Level2Fft f = config_of(N);
    static_assert(f.n == N, "not a shipped Level-2 length");
    static constexpr int ept = f.ept;
    static constexpr int per_block = f.ffts_per_block;
    static constexpr int threads = N / f.ept;  // per line
    static_assert(threads * f.ept == N, "elements per thread must divide the length");
};

template <int N, cufftdx::fft_direction Dir, unsigned Sm>
using BlockFft = decltype(cufftdx::Size<N>() + cufftdx::Precision<float>() +
                          cufftdx::Type<cufftdx::fft_type::c2c>() + cufftdx::Direction<Dir>() +
                          cufftdx::ElementsPerThread<Cfg<N>::ept>() + cufftdx::FFTsPerBlock<Cfg<N>::per_block>() +
                          cufftdx::SM<Sm>() + cufftdx::Block());

template <int N, cufftdx::fft_direction Dir, unsigned Sm>
constexpr bool agrees_with_table() {
    using F = BlockFft<N, Dir, Sm>;
    return F::block_dim.x == static_cast<unsigned>(Cfg<N>::threads) &&
           F::block_dim.y == static_cast<unsigned>(Cfg<N>::per_block) && F::block_dim.z == 1 &&
           F::stride == static_cast<unsigned>(Cfg<N>::threads) && F::storage_size == static_cast<unsigned>(Cfg<N>::ept) &&
           F::input_ept == static_cast<unsigned>(Cfg<N>::ept) && F::output_ept == static_cast<unsigned>(Cfg<N>::ept) &&
           !F::requires_workspace &&
           F::shared_memory_size <= static_cast<unsigned>(Cfg<N>::per_block * N * kLevel2FftSharedPerLine);
}

template <int N, std::size_t... I>
constexpr bool agrees_on_every_sm(std::index_sequence<I...>) {
    return ((agrees_with_table<N, cufftdx::fft_direction::forward, kDescribedSms[I]>() &&
             agrees_with_table<N, cufftdx::fft_direction::inverse, kDescribedSms[I]>()) &&
            ...);
}

template <std::size_t... I>
constexpr bool table_agrees(std::index_sequence<I...>) {
    return (agrees_on_every_sm<kLevel2Ffts[I].n>(std::make_index_sequence<std::size(kDescribedSms)>()) && ...);
}
static_assert(table_agrees(std::make_index_sequence<std::size(kLevel2Ffts)>()),
              "kLevel2Ffts (dc_level2.h) disagrees with cuFFTDx's block_dim, stride, elements per thread or shared "
              "memory for one of the described SMs, or a length needs a Bluestein workspace");

template <std::size_t... I>
constexpr bool fits_default_shared(std::index_sequence<I...>) {
    return ((2 * kLevel2Ffts[I].ffts_per_block * kLevel2Ffts[I].n * kLevel2FftSharedPerLine <= 48 * 1024) && ...);
}
// No cudaFuncSetAttribute (opt-in shared memory) needed, so nothing to set per device or inside a graph capture.
static_assert(fits_default_shared(std::make_index_sequence<std::size(kLevel2Ffts)>()),
              "a Level-2 kernel would need more than 48 KiB of dynamic shared memory");

// One direction of the transform of a whole line across the threads that share it (all threads of the block call
// it). The barrier first: the previous transform's last shared-memory reads must finish before this one writes.
template <class Fft>
struct DeviceFft {
    void* shared;
    __device__ __forceinline__ void operator()(float2* td) {
        __syncthreads();
        Fft().execute(td, shared);
    }
};

template <int N>
using Fwd = DeviceFft<BlockFft<N, cufftdx::fft_direction::forward, kFftSm>>;
template <int N>
using Inv = DeviceFft<BlockFft<N, cufftdx::fft_direction::inverse, kFftSm>>;

extern __shared__ __align__(16) unsigned char dc_level2_shared[];

// The coil sums, after cuFFTDx's shared memory: line threadIdx.y's N elements.
template <int N>
__device__ __forceinline__ float2* line_accumulator() {
    auto* base = reinterpret_cast<float2*>(dc_level2_shared + Cfg<N>::per_block * N * kLevel2FftSharedPerLine);
    return base + threadIdx.y * N;
}

constexpr int kMaxThreads = 8 * 8;  // every shipped configuration: 8 threads per line, 8 lines per block

template <int N>
__global__ void __launch_bounds__(kMaxThreads) forward_rows_kernel(const DcParams p, float2* k, int64_t b0) {
    float2 td[Cfg<N>::ept];
    Fwd<N> fwd{dc_level2_shared};
    const int32_t h = static_cast<int32_t>(blockIdx.x * Cfg<N>::per_block + threadIdx.y);
    dc2::forward_row<Cfg<N>::ept>(p, k, b0 + blockIdx.z, b0, static_cast<int32_t>(blockIdx.y), h, h < p.H,
                                  static_cast<int32_t>(threadIdx.x), Cfg<N>::threads, td, fwd);
}

template <int N>
__global__ void __launch_bounds__(kMaxThreads) residual_columns_kernel(const DcParams p, float2* k, int64_t b0) {
    float2 td[Cfg<N>::ept];
    Fwd<N> fwd{dc_level2_shared};
    Inv<N> inv{dc_level2_shared};
    const int32_t w = static_cast<int32_t>(blockIdx.x * Cfg<N>::per_block + threadIdx.y);
    dc2::residual_column<Cfg<N>::ept>(p, k, b0 + blockIdx.z, b0, static_cast<int32_t>(blockIdx.y), w, w < p.W,
                                      static_cast<int32_t>(threadIdx.x), Cfg<N>::threads, td, fwd, inv);
}

template <int N>
__global__ void __launch_bounds__(kMaxThreads) adjoint_rows_kernel(const DcParams p, const float2* k, int64_t b0) {
    float2 td[Cfg<N>::ept];
    Inv<N> inv{dc_level2_shared};
    const int32_t h = static_cast<int32_t>(blockIdx.x * Cfg<N>::per_block + threadIdx.y);
    dc2::adjoint_row<Cfg<N>::ept>(p, k, b0 + blockIdx.y, b0, h, h < p.H, static_cast<int32_t>(threadIdx.x),
                                  Cfg<N>::threads, td, line_accumulator<N>(), inv);
}

template <int N, bool Columns>
__global__ void __launch_bounds__(kMaxThreads) fused_lines_kernel(const DcParams p, int64_t b0) {
    float2 td[Cfg<N>::ept];
    Fwd<N> fwd{dc_level2_shared};
    Inv<N> inv{dc_level2_shared};
    const int32_t line = static_cast<int32_t>(blockIdx.x * Cfg<N>::per_block + threadIdx.y);
    const bool valid = line < (Columns ? p.W : p.H);
    dc2::fused_line<Cfg<N>::ept, Columns>(p, b0 + blockIdx.y, line, valid, static_cast<int32_t>(threadIdx.x),
                                          Cfg<N>::threads, td, line_accumulator<N>(), fwd, inv);
}

template <int N>
void launch_length(const Level2Launch& l, const DcParams& p, float2* k, cudaStream_t stream) {
    static_assert(Cfg<N>::threads * Cfg<N>::per_block <= kMaxThreads, "block larger than the launch bounds");
    const dim3 grid(l.grid[0], l.grid[1], l.grid[2]);
    const dim3 block(l.block[0], l.block[1], l.block[2]);
    const auto shared = static_cast<std::size_t>(l.shared_bytes);
    switch (l.kernel) {
        case L2_FORWARD_ROWS: forward_rows_kernel<N><<<grid, block, shared, stream>>>(p, k, l.b0); break;
        case L2_RESIDUAL_COLUMNS: residual_columns_kernel<N><<<grid, block, shared, stream>>>(p, k, l.b0); break;
        case L2_ADJOINT_ROWS: adjoint_rows_kernel<N><<<grid, block, shared, stream>>>(p, k, l.b0); break;
        case L2_FUSED_ROWS: fused_lines_kernel<N, false><<<grid, block, shared, stream>>>(p, l.b0); break;
        case L2_FUSED_COLUMNS: fused_lines_kernel<N, true><<<grid, block, shared, stream>>>(p, l.b0); break;
        default: throw std::logic_error("Level-2 plan: unknown kernel " + std::to_string(l.kernel));
    }
}

// Instantiates the kernels of exactly the shipped lengths and runs the one of length l.n.
template <std::size_t... I>
bool launch_shipped(const Level2Launch& l, const DcParams& p, float2* k, cudaStream_t stream,
                    std::index_sequence<I...>) {
    return ((l.n == kLevel2Ffts[I].n ? (launch_length<kLevel2Ffts[I].n>(l, p, k, stream), true) : false) || ...);
}

void select_device(int device) {
    int current = -1;
    // Only when needed: a step may run inside a CUDA-graph capture, which refuses calls it cannot record.
    if (cudaGetDevice(&current) != cudaSuccess || current != device) {
        cudaGetLastError();
        check_cuda(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
    }
}

}  // namespace

int64_t dc_level2_workspace_bytes(int device, int64_t B, int64_t C, int64_t H, int64_t W, bool transform_h,
                                  bool transform_w) {
    const Level2Plan sizes_only = level2_plan(B, C, H, W, transform_h, transform_w, 1);
    if (!sizes_only.supported) throw std::invalid_argument("H, W: " + sizes_only.why_not);
    if (sizes_only.workspace_bytes == 0) return 0;
    int l2 = 0;
    check_cuda(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device),
               "cudaDeviceGetAttribute(cudaDevAttrL2CacheSize, " + std::to_string(device) + ")");
    return level2_plan(B, C, H, W, transform_h, transform_w, 0, l2).workspace_bytes;
}

void dc_level2_run(int device, std::uintptr_t stream_handle, const DcArgs& a) {
    const Level2Plan plan = check_level2_args(a);
    DcParams p = make_dc_params(a, plan.geometry);
    p.v = nullptr;  // Level 2 writes no coil images; K is the workspace
    select_device(device);
    auto* k = reinterpret_cast<float2*>(a.workspace);
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    for (const Level2Launch& l : plan.launches) {
        if (!launch_shipped(l, p, k, stream, std::make_index_sequence<std::size(kLevel2Ffts)>())) {
            throw std::logic_error("Level-2 plan: no kernel of length " + std::to_string(l.n));
        }
        check_cuda(cudaGetLastError(), std::string("cudaLaunchKernel(level2 ") + level2_kernel_name(l.kernel) +
                                           ", n = " + std::to_string(l.n) + ")");
    }
}

}  // namespace mbdl_fast
