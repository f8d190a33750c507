// A small CPU emulation of the CUDA execution model, for running this project's .cu files in CI
// without a GPU (tests/cuemu/README.md). Compiled with the host C++ compiler, usually under
// AddressSanitizer and UBSan.
//
// Every thread of a block is a fiber on its own stack; blocks run one after another.
// A fiber runs until it reaches a barrier or returns, so the schedule decides the order of the
// code between barriers:
//   __syncthreads()      waits until every live thread of the block has arrived
//   __syncwarp()         waits until every live thread of its warp (32 consecutive linear ids)
//   __shfl_down_sync()   a warp exchange through a slot per thread, between two warp barriers
// A barrier that not every live thread reaches aborts with "deadlock", threads waiting at
// different __syncthreads with "divergent". __shared__ arrays
// become function-level statics: one copy per kernel, reused by the blocks in turn (they run
// sequentially). Policies (the schedule of fibers, and of blocks):
//   0 forward    lowest runnable thread first, blocks in order
//   1 reverse    highest runnable thread first, blocks in reverse
//   2 random     a random runnable thread each time, blocks shuffled (seeded)
//   3 warp-ahead the last warp runs first as far as it can, then the others, blocks in order
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <random>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUEMU_ASAN 1
#else
#define CUEMU_ASAN 0
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

// Switching between threads: on x86-64 a minimal switch of the callee-saved registers and the
// stack pointer (swapcontext also saves the signal mask, a system call per switch, and made the
// emulation about 3× slower); elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void cuemu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl cuemu_switch
    .type cuemu_switch, @function
cuemu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuemu_switch, .-cuemu_switch
)");
#define CUEMU_FAST_SWITCH 1
#else
#define CUEMU_FAST_SWITCH 0
#endif

namespace cuemu {

enum State { RUNNABLE, AT_BLOCK, AT_WARP, DONE };

struct Fiber {
    ucontext_t ctx;
    void* sp = nullptr;  // saved stack pointer (fast switch)
    State state = RUNNABLE;
    dim3 tid;
    int linear = 0;
    char* stack = nullptr;
    void* fake_stack = nullptr;
    int site = 0;  // the source line of the __syncthreads it waits at
};

constexpr size_t STACK_BYTES = 32 * 1024;

inline std::vector<Fiber> fibers;
inline std::vector<char*> stacks;  // one per thread of a block, reused by the blocks of a launch
inline std::vector<uint64_t> slots;  // one exchange slot per thread (shuffles)
inline Fiber* cur = nullptr;
inline dim3 block_idx, block_dim, grid_dim;
inline ucontext_t scheduler;
inline void* scheduler_sp = nullptr;
inline std::function<void()> body;
inline const void* main_stack_bottom = nullptr;
inline size_t main_stack_size = 0;

inline void to_scheduler() {
    Fiber* f = cur;
#if CUEMU_ASAN
    __sanitizer_start_switch_fiber(f->state == DONE ? nullptr : &f->fake_stack, main_stack_bottom, main_stack_size);
#endif
#if CUEMU_FAST_SWITCH
    cuemu_switch(&f->sp, scheduler_sp);
#else
    swapcontext(&f->ctx, &scheduler);
#endif
#if CUEMU_ASAN
    __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
}

inline void trampoline() {
#if CUEMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &main_stack_bottom, &main_stack_size);
#endif
    body();
    cur->state = DONE;
    to_scheduler();  // never resumed
}

// Bookkeeping per block: live threads, threads at the block barrier, and per warp the live,
// waiting and runnable threads; barriers are released as soon as their scope has arrived.
inline int n_live = 0, n_at_block = 0;
inline std::vector<int> w_live, w_at_warp, w_runnable;

inline void release_block() {
    if (n_live && n_at_block == n_live) {
        int first = -1;
        for (auto& f : fibers)
            if (f.state == AT_BLOCK) {
                if (first < 0) first = f.site;
                if (f.site != first) {
                    fprintf(stderr, "cuemu: divergent __syncthreads in block (%u, %u, %u): threads wait at line %d "
                            "and at line %d\n", block_idx.x, block_idx.y, block_idx.z, first, f.site);
                    abort();
                }
            }
        for (auto& f : fibers)
            if (f.state == AT_BLOCK) {
                f.state = RUNNABLE;
                ++w_runnable[f.linear >> 5];
            }
        n_at_block = 0;
    }
}

inline void release_warp(int w) {
    if (w_live[w] && w_at_warp[w] == w_live[w]) {
        for (int i = w * 32; i < std::min((int)fibers.size(), w * 32 + 32); ++i)
            if (fibers[i].state == AT_WARP) fibers[i].state = RUNNABLE;
        w_runnable[w] += w_at_warp[w];
        w_at_warp[w] = 0;
    }
}

// After a thread switched back to the scheduler: account for where it stopped.
inline void account(Fiber& f) {
    const int w = f.linear >> 5;
    --w_runnable[w];
    if (f.state == AT_BLOCK) ++n_at_block;
    if (f.state == AT_WARP) ++w_at_warp[w];
    if (f.state == DONE) {
        --n_live;
        --w_live[w];
    }
    release_warp(w);
    release_block();
}

inline int first_runnable(int w, bool reverse) {
    const int lo = w * 32, hi = std::min((int)fibers.size(), lo + 32);
    if (reverse) {
        for (int i = hi - 1; i >= lo; --i)
            if (fibers[i].state == RUNNABLE) return i;
    } else {
        for (int i = lo; i < hi; ++i)
            if (fibers[i].state == RUNNABLE) return i;
    }
    return -1;
}

inline int pick(int policy, std::mt19937& rng) {
    const int warps = (int)w_runnable.size();
    if (policy == 2) {
        std::vector<int> ready;
        for (int w = 0; w < warps; ++w)
            if (w_runnable[w] > 0) ready.push_back(w);
        if (ready.empty()) return -1;
        const int w = ready[std::uniform_int_distribution<int>(0, (int)ready.size() - 1)(rng)];
        std::vector<int> lanes;
        for (int i = w * 32; i < std::min((int)fibers.size(), w * 32 + 32); ++i)
            if (fibers[i].state == RUNNABLE) lanes.push_back(i);
        return lanes[std::uniform_int_distribution<int>(0, (int)lanes.size() - 1)(rng)];
    }
    const bool last_warp_first = policy == 1 || policy == 3;
    for (int k = 0; k < warps; ++k) {
        const int w = last_warp_first ? warps - 1 - k : k;
        if (w_runnable[w] > 0) return first_runnable(w, policy == 1);
    }
    return -1;
}

inline void run_block(int policy, std::mt19937& rng) {
    const int n = (int)(block_dim.x * block_dim.y * block_dim.z);
    const int warps = (n + 31) / 32;
    fibers.assign(n, Fiber());
    slots.assign(n, 0);
    n_live = n;
    n_at_block = 0;
    w_live.assign(warps, 0);
    w_at_warp.assign(warps, 0);
    for (int i = 0; i < n; ++i) {
        Fiber& f = fibers[i];
        f.linear = i;
        f.tid = dim3(i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y));
        if ((int)stacks.size() <= i) stacks.push_back((char*)malloc(STACK_BYTES));
        f.stack = stacks[i];
#if CUEMU_FAST_SWITCH
        // a frame that cuemu_switch "returns" from into trampoline, 16-byte aligned as at a call
        uintptr_t top = ((uintptr_t)(f.stack + STACK_BYTES)) & ~(uintptr_t)15;
        void** sp = (void**)top;
        *--sp = nullptr;                    // trampoline's return address (it never returns)
        *--sp = (void*)&trampoline;         // popped by ret
        for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
        f.sp = sp;
#else
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, (void (*)())trampoline, 0);
#endif
        ++w_live[i >> 5];
    }
    w_runnable = w_live;
    for (;;) {
        const int i = pick(policy, rng);
        if (i < 0) {
            if (n_live == 0) break;
            fprintf(stderr, "cuemu: deadlock at a barrier in block (%u, %u, %u): not every live thread reaches it\n",
                    block_idx.x, block_idx.y, block_idx.z);
            abort();
        }
        cur = &fibers[i];
        void* fake = nullptr;
#if CUEMU_ASAN
        __sanitizer_start_switch_fiber(&fake, cur->stack, STACK_BYTES);
#endif
#if CUEMU_FAST_SWITCH
        cuemu_switch(&scheduler_sp, cur->sp);
#else
        swapcontext(&scheduler, &cur->ctx);
#endif
#if CUEMU_ASAN
        __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
        account(*cur);
    }
    fibers.clear();
    cur = nullptr;
}

template <class... A, size_t... I>
void call(void (*f)(A...), void** argv, std::index_sequence<I...>) {
    f(*static_cast<std::decay_t<A>*>(argv[I])...);
}

template <class... A>
void launch(void (*f)(A...), dim3 grid, dim3 block, int policy, unsigned seed, void** argv) {
    std::mt19937 rng(seed);
    grid_dim = grid;
    block_dim = block;
    body = [&] { call(f, argv, std::index_sequence_for<A...>{}); };
    std::vector<dim3> blocks;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(dim3(x, y, z));
    if (policy == 1) std::reverse(blocks.begin(), blocks.end());
    if (policy == 2) std::shuffle(blocks.begin(), blocks.end(), rng);
    for (auto& b : blocks) {
        block_idx = b;
        run_block(policy, rng);
    }
    for (char* p : stacks) free(p);
    stacks.clear();
}

}  // namespace cuemu

#define threadIdx (cuemu::cur->tid)
#define blockIdx (cuemu::block_idx)
#define blockDim (cuemu::block_dim)
#define gridDim (cuemu::grid_dim)

namespace cuemu {
inline void sync_block(int site) {
    cur->state = AT_BLOCK;
    cur->site = site;
    to_scheduler();
}
}  // namespace cuemu
// every live thread of the block must wait at the same __syncthreads (the CUDA rule; hardware
// that counts arrivals would let threads at different barriers pass each other)
#define __syncthreads() cuemu::sync_block(__LINE__)

inline void __syncwarp(unsigned = 0xffffffffu) {
    cuemu::cur->state = cuemu::AT_WARP;
    cuemu::to_scheduler();
}

template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
    static_assert(sizeof(T) <= 8, "shuffles of at most 64 bits");
    const int me = cuemu::cur->linear, lane = me & 31;
    memcpy(&cuemu::slots[me], &v, sizeof(T));
    __syncwarp(mask);
    T out = v;
    const int src = me + (int)delta;
    if (lane + (int)delta < 32 && src < (int)cuemu::slots.size()) memcpy(&out, &cuemu::slots[src], sizeof(T));
    __syncwarp(mask);
    return out;
}

inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline double __longlong_as_double(long long v) {
    double d;
    memcpy(&d, &v, 8);
    return d;
}
inline long long __double_as_longlong(double d) {
    long long v;
    memcpy(&v, &d, 8);
    return v;
}
template <class T>
inline T min(T a, T b) {
    return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
    return a < b ? b : a;
}
