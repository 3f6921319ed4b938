// Runs Kiln's CUDA C kernels on the host, for their tests where no GPU is: each thread of a
// block is a host thread (one set per launch, going through the blocks together), blocks run
// one after another (so a `__shared__` variable can be a function's static), `__syncthreads`
// is a barrier over the block and warp shuffles exchange through a barrier over the warp. It checks what the kernels compute, their indexing and their
// synchronisation, not their speed; memory is the host's.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace kiln_emulation {

struct Warp {
    std::barrier<> sync{32};
    std::uint64_t slots[32];
};

struct Block {
    explicit Block(unsigned threads) : sync(threads) {
        for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>());
    }
    std::barrier<> sync;
    std::vector<std::unique_ptr<Warp>> warps;
    std::atomic<int> votes{0};
};

inline dim3 grid_dim, block_dim;
inline Block* block;
inline thread_local dim3 thread_idx, block_idx;
inline thread_local unsigned thread_rank;

template <class T>
T shuffle(T value, unsigned source_lane) {
    static_assert(sizeof(T) <= sizeof(std::uint64_t), "a shuffled value is at most 64 bits");
    Warp& warp = *block->warps[thread_rank / 32];
    std::uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    warp.slots[thread_rank % 32] = bits;
    warp.sync.arrive_and_wait();
    T result;
    std::memcpy(&result, &warp.slots[source_lane % 32], sizeof(T));
    warp.sync.arrive_and_wait();
    return result;
}

inline int syncthreads_or(int predicate) {
    block->sync.arrive_and_wait();
    if (predicate) block->votes.fetch_add(1);
    block->sync.arrive_and_wait();
    const int any = block->votes.load() != 0;
    block->sync.arrive_and_wait();
    if (thread_rank == 0) block->votes.store(0);
    block->sync.arrive_and_wait();
    return any;
}

// Runs `kernel` over the grid; false when the launch is not one the emulation can run.
template <class Kernel>
bool run(dim3 grid, dim3 threads, Kernel kernel) {
    const unsigned count = threads.x * threads.y * threads.z;
    if (count == 0 || count % 32 != 0 || count > 1024) return false;
    grid_dim = grid;
    block_dim = threads;
    Block current(count);
    block = &current;
    std::vector<std::thread> workers;
    workers.reserve(count);
    for (unsigned rank = 0; rank < count; ++rank)
        workers.emplace_back([&, rank] {
            thread_rank = rank;
            thread_idx = dim3{rank % threads.x, rank / threads.x % threads.y, rank / (threads.x * threads.y)};
            for (unsigned z = 0; z < grid.z; ++z)
                for (unsigned y = 0; y < grid.y; ++y)
                    for (unsigned x = 0; x < grid.x; ++x) {
                        block_idx = dim3{x, y, z};
                        kernel();
                        // Every thread is done with this block (and its shared memory) before
                        // any starts the next.
                        current.sync.arrive_and_wait();
                    }
        });
    for (auto& worker : workers) worker.join();
    return true;
}

// Calls `kernel` with the arguments `args` points at, as cuLaunchKernel reads them.
template <class... A, std::size_t... I>
void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <class... A>
bool launch(void (*kernel)(A...), dim3 grid, dim3 threads, void** args) {
    return run(grid, threads, [=] { call(kernel, args, std::index_sequence_for<A...>{}); });
}

}  // namespace kiln_emulation

#define threadIdx (kiln_emulation::thread_idx)
#define blockIdx (kiln_emulation::block_idx)
#define blockDim (kiln_emulation::block_dim)
#define gridDim (kiln_emulation::grid_dim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
// Blocks run one at a time: a function's static is the block's shared memory.
#define __shared__ static

inline void __syncthreads() { kiln_emulation::block->sync.arrive_and_wait(); }
inline int __syncthreads_or(int predicate) { return kiln_emulation::syncthreads_or(predicate); }

template <class T>
T __shfl_sync(unsigned, T value, int source_lane) {
    return kiln_emulation::shuffle(value, (unsigned)source_lane);
}

template <class T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
    return kiln_emulation::shuffle(value, (kiln_emulation::thread_rank % 32) ^ (unsigned)lane_mask);
}

inline float __uint_as_float(unsigned bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline unsigned __float_as_uint(float f) {
    unsigned bits;
    std::memcpy(&bits, &f, sizeof bits);
    return bits;
}
