// Passes over float32 gradients G (m×d, row-major) with float64 accumulation (docs/design.md §3).
//
// project_f32 + reduce_parts:  p = G·x        (x float64; the IHVP's first pass, a Gram row)
// combine_f32:                 y = α·x + β·Gᵀc (the IHVP's output pass; x unused if has_x == 0)
//
// NumPy mirrors of the same schedules: rank1inv.cuda.mirrors. Both kernels read G exactly
// once, coalesced (consecutive threads read consecutive floats of a row).

#define PROJECT_THREADS 256
#define PROJECT_PER_THREAD 8                                        // columns per thread
#define PROJECT_CHUNK (PROJECT_THREADS * PROJECT_PER_THREAD)      // columns per block
#define COMBINE_THREADS 256
#define COMBINE_PER_THREAD 4

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Block b handles columns [b·CHUNK, (b+1)·CHUNK) of every row and writes one float64 partial
// sum per row: part[b·m + r]. Column c of the chunk belongs to thread c % THREADS.
extern "C" __global__ void project_f32(const float* __restrict__ G, const double* __restrict__ x,
                                       double* __restrict__ part, int m, long long d) {
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
            const float* row = G + (size_t)(r0 + rr) * (size_t)d;
            double s = 0.0;
#pragma unroll
            for (int q = 0; q < PROJECT_PER_THREAD; ++q) {
                const long long c = c0 + (long long)q * PROJECT_THREADS;
                if (c < d) s += (double)row[c] * xv[q];
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
extern "C" __global__ void combine_f32(const float* __restrict__ G, const double* __restrict__ x,
                                       int has_x, const double* __restrict__ c, double alpha, double beta,
                                       double* __restrict__ y, int m, long long d) {
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
            const float* row = G + (size_t)(r0 + rr) * (size_t)d;
            const double ci = cs[rr];
#pragma unroll
            for (int q = 0; q < COMBINE_PER_THREAD; ++q) {
                const long long j = j0 + (long long)q * COMBINE_THREADS;
                if (j < d) acc[q] += ci * (double)row[j];
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
