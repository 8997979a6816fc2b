// Host-side logic of the Level-1 DC step, free of CUDA and cuFFT calls so that ctest runs it anywhere:
// the geometry (which axes are transformed, signs, rolls, scales, FFT layout), the argument checks, the
// plan-cache key and a thread-safe cache.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "dc_common.h"

namespace mbdl_fast {

// What one step needs from cuFFT and from the caller's buffers, given the sizes and the transformed axes.
struct DcGeometry {
    DcLayout layout;
    int32_t shift_h, shift_w, flip_h, flip_w;
    bool wide;            // B * C * H * W >= 2^31
    bool separate_v;      // V cannot be written over the FFT buffer: the caller passes a second (B, C, H, W) buffer
    int rank;             // 1 or 2
    int64_t n[2];         // transform lengths (slowest first)
    int64_t batch;        // number of transforms
    float z_scale;        // 1 / N
    float y_scale;        // c / sqrt(N)
};

// Throws std::invalid_argument naming the argument for sizes < 1, H * W >= 2^31, or no transformed axis.
DcGeometry dc_geometry(int64_t B, int64_t C, int64_t H, int64_t W, bool transform_h, bool transform_w);

// The pointers and strides of one step, as the Python wrapper passes them (device addresses as integers).
struct DcArgs {
    std::uintptr_t x = 0, coil = 0, mask = 0, y = 0, ahy = 0, gamma = 0, out = 0, z = 0, v = 0, workspace = 0;
    int64_t coil_batch_stride = 0;
    int64_t mask_sb = 0, mask_sh = 0, mask_sw = 0;
    int64_t workspace_bytes = 0;
    int64_t B = 0, C = 0, H = 0, W = 0;
    bool transform_h = true, transform_w = true;
};

// The checks both levels make (std::invalid_argument naming the argument): coil maps and their batch stride, y
// only with a 2-D transform, not both y and A^H y, mask strides >= 0.
void check_dc_inputs(const DcArgs& a);

// Checks every argument (std::invalid_argument "name: expected ..., got ...") and returns the geometry.
// `workspace_needed` is what the plans need (checked against workspace_bytes), or -1 to skip that check.
DcGeometry check_dc_args(const DcArgs& a, int64_t workspace_needed);

// The device-side parameter block of one step.
DcParams make_dc_params(const DcArgs& a, const DcGeometry& g);

// Plans are made per device, stream and transform shape. Per stream, because the parameter block and the
// workspace of a plan are used in stream order: two streams sharing them could race.
struct PlanKey {
    int device = 0;
    std::uintptr_t stream = 0;
    int layout = 0;
    int64_t planes = 0;  // B * C
    int64_t H = 0, W = 0;
    bool callbacks = true;  // plans with the LTO callbacks (else plain plans and separate kernels)

    bool operator==(const PlanKey& o) const {
        return device == o.device && stream == o.stream && layout == o.layout && planes == o.planes && H == o.H &&
               W == o.W && callbacks == o.callbacks;
    }
};

struct PlanKeyHash {
    std::size_t operator()(const PlanKey& k) const noexcept {
        std::size_t h = std::hash<int>()(k.device);
        auto mix = [&h](std::size_t v) { h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
        mix(std::hash<std::uintptr_t>()(k.stream));
        mix(std::hash<int>()(k.layout));
        mix(std::hash<int64_t>()(k.planes));
        mix(std::hash<int64_t>()(k.H));
        mix(std::hash<int64_t>()(k.W));
        mix(std::hash<bool>()(k.callbacks));
        return h;
    }
};

PlanKey make_plan_key(int device, std::uintptr_t stream, const DcGeometry& g, int64_t B, int64_t C, int64_t H,
                      int64_t W, bool callbacks = true);

// A map from PlanKey to entries created once: concurrent callers asking for one key get the same entry, and
// the factory runs once per key (under the cache's lock: plans are made rarely and slowly, never in a hot loop).
// Entries live until clear() and are never moved, so references stay valid.
template <class Entry>
class PlanCache {
   public:
    Entry& get_or_create(const PlanKey& key, const std::function<std::unique_ptr<Entry>()>& make) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto found = entries_.find(key);
        if (found != entries_.end()) return *found->second;
        std::unique_ptr<Entry> entry = make();  // may throw: then nothing is cached
        Entry& ref = *entry;
        entries_.emplace(key, std::move(entry));
        return ref;
    }

    std::size_t size() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return entries_.size();
    }

    // Calls f(key, entry) for every entry, under the cache's lock.
    template <class F>
    void for_each(F&& f) const {
        std::lock_guard<std::mutex> lock(mutex_);
        for (const auto& [key, entry] : entries_) f(key, *entry);
    }

    void clear() {
        std::lock_guard<std::mutex> lock(mutex_);
        entries_.clear();
    }

   private:
    mutable std::mutex mutex_;
    std::unordered_map<PlanKey, std::unique_ptr<Entry>, PlanKeyHash> entries_;
};

}  // namespace mbdl_fast
