// Passes over stored gradients G (m×d, row-major) with float64 accumulation (docs/design.md §3).
//
// project<E> + reduce_parts:  p = G·x        (x float64; the IHVP's first pass, a Gram row)
// combine<E>:                 y = α·x + β·Gᵀc (the IHVP's output pass; x unused if has_x == 0)
//
// E is the storage type: F32 (float), BF16 and F16 (bit patterns in unsigned short: CuPy has
// no bfloat16). Every element is decoded from its bits in double arithmetic, so CuPy's
// -ftz=true (which flushes float subnormals) cannot change a value: the GPU reads exactly what
// the CPU reads. NumPy mirrors of the same schedules: rank1inv.cuda.mirrors. Both kernels read
// G exactly once, coalesced (consecutive threads read consecutive elements of a row).

#define PROJECT_THREADS 256
#define PROJECT_PER_THREAD 8                                        // columns per thread
#define PROJECT_CHUNK (PROJECT_THREADS * PROJECT_PER_THREAD)      // columns per block
#define COMBINE_THREADS 256
#define COMBINE_PER_THREAD 4

// float: normal values convert exactly (FTZ does not touch them); subnormals are m·2^-149
struct F32 {
    typedef float T;
    static __device__ __forceinline__ double at(const float* p, long long i) {
        const unsigned u = __float_as_uint(p[i]);
        const double v = ((u >> 23) & 0xffu) ? (double)__uint_as_float(u & 0x7fffffffu)
                                             : (double)(u & 0x7fffffu) * 1.401298464324817e-45;
        return (u >> 31) ? -v : v;
    }
};
// bfloat16: the top half of a float; exponent rebiased into a double (1023 − 127 = 896)
struct BF16 {
    typedef unsigned short T;
    static __device__ __forceinline__ double at(const unsigned short* p, long long i) {
        const unsigned h = p[i], e = (h >> 7) & 0xffu, m = h & 0x7fu;
        const double v = e ? __longlong_as_double(((unsigned long long)(e + 896u) << 52) | ((unsigned long long)m << 45))
                           : (double)m * 9.183549615799121e-41;  // 2^-133
        return (h & 0x8000u) ? -v : v;
    }
};
// IEEE half: exponent rebiased into a double (1023 − 15 = 1008), subnormals m·2^-24
struct F16 {
    typedef unsigned short T;
    static __device__ __forceinline__ double at(const unsigned short* p, long long i) {
        const unsigned h = p[i], e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
        const double v = e ? __longlong_as_double(((unsigned long long)(e + 1008u) << 52) | ((unsigned long long)m << 42))
                           : (double)m * 5.9604644775390625e-08;
        return (h & 0x8000u) ? -v : v;
    }
};

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Block b handles columns [b·CHUNK, (b+1)·CHUNK) of every row and writes one float64 partial
// sum per row: part[b·m + r]. Column c of the chunk belongs to thread c % THREADS.
template <class E>
__global__ void project(const typename E::T* __restrict__ G, const double* __restrict__ x, double* __restrict__ part,
                        int m, long long d) {
    __shared__ double red[PROJECT_THREADS / 32][32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long c0 = (long long)blockIdx.x * PROJECT_CHUNK + tid;
    double xv[PROJECT_PER_THREAD];
#pragma unroll
    for (int q = 0; q < PROJECT_PER_THREAD; ++q) {
        const long long c = c0 + (long long)q * PROJECT_THREADS;
        xv[q] = c < d ? x[c] : 0.0;
    }
    for (int r0 = 0; r0 < m; r0 += 32) {
        const int rows = min(32, m - r0);
        for (int rr = 0; rr < rows; ++rr) {
            const typename E::T* row = G + (size_t)(r0 + rr) * (size_t)d;
            double s = 0.0;
#pragma unroll
            for (int q = 0; q < PROJECT_PER_THREAD; ++q) {
                const long long c = c0 + (long long)q * PROJECT_THREADS;
                if (c < d) s += E::at(row, c) * xv[q];
            }
            s = warp_sum(s);
            if (lane == 0) red[warp][rr] = s;
        }
        __syncthreads();
        if (tid < rows) {
            double t = 0.0;
#pragma unroll
            for (int w = 0; w < PROJECT_THREADS / 32; ++w) t += red[w][tid];
            part[(size_t)blockIdx.x * m + r0 + tid] = t;
        }
        __syncthreads();
    }
}

// p[r] = Σ_b part[b·m + r], in chunk order (the mirror sums in the same order).
extern "C" __global__ void reduce_parts(const double* __restrict__ part, double* __restrict__ p, int m, int chunks) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= m) return;
    double s = 0.0;
    for (int b = 0; b < chunks; ++b) s += part[(size_t)b * m + r];
    p[r] = s;
}

// Thread t of block b owns columns b·THREADS·PER + t + q·THREADS (q < PER) and sums over all
// rows in order, with c staged through shared memory 256 rows at a time.
template <class E>
__global__ void combine(const typename E::T* __restrict__ G, const double* __restrict__ x, int has_x,
                        const double* __restrict__ c, double alpha, double beta, double* __restrict__ y, int m,
                        long long d) {
    __shared__ double cs[COMBINE_THREADS];
    const int tid = threadIdx.x;
    const long long j0 = (long long)blockIdx.x * COMBINE_THREADS * COMBINE_PER_THREAD + tid;
    double acc[COMBINE_PER_THREAD];
#pragma unroll
    for (int q = 0; q < COMBINE_PER_THREAD; ++q) acc[q] = 0.0;
    for (int r0 = 0; r0 < m; r0 += COMBINE_THREADS) {
        const int rows = min(COMBINE_THREADS, m - r0);
        if (tid < rows) cs[tid] = c[r0 + tid];
        __syncthreads();
#pragma unroll 4
        for (int rr = 0; rr < rows; ++rr) {
            const typename E::T* row = G + (size_t)(r0 + rr) * (size_t)d;
            const double ci = cs[rr];
#pragma unroll
            for (int q = 0; q < COMBINE_PER_THREAD; ++q) {
                const long long j = j0 + (long long)q * COMBINE_THREADS;
                if (j < d) acc[q] += ci * E::at(row, j);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < COMBINE_PER_THREAD; ++q) {
        const long long j = j0 + (long long)q * COMBINE_THREADS;
        if (j < d) y[j] = (has_x ? alpha * x[j] : 0.0) + beta * acc[q];
    }
}

template __global__ void project<F32>(const float*, const double*, double*, int, long long);
template __global__ void project<BF16>(const unsigned short*, const double*, double*, int, long long);
template __global__ void project<F16>(const unsigned short*, const double*, double*, int, long long);
template __global__ void combine<F32>(const float*, const double*, int, const double*, double, double, double*, int,
                                      long long);
template __global__ void combine<BF16>(const unsigned short*, const double*, int, const double*, double, double,
                                       double*, int, long long);
template __global__ void combine<F16>(const unsigned short*, const double*, int, const double*, double, double,
                                      double*, int, long long);
