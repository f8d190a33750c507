// M-FAC Algorithm 2's forward substitution (eq. 11–12) for any m, in one thread block.
//
// Solves Uᵀ q = b with U = D + n·I (D upper triangular, row-major m×m), i.e.
//   q_i = r_i / (n + D_ii),  r_j -= D_ij · q_i  for j > i,  starting from r = b.
// Tiles of 32 unknowns are solved in order: warp 0 runs the 32-step recurrence inside the tile,
// then all threads subtract the tile's contribution from every later unknown (a 32-wide GEMV).
// The paper's kernel keeps one unknown per thread and so stops at m = 1024; here each thread
// owns ⌈m / blockDim⌉ unknowns and the residuals r live in the output q (global memory, any m).
// NumPy mirror: rank1inv.cuda.mirrors.forward_substitution.
// (rank1inv's IHVP uses the equivalent q = λ·B·p / diag(U), two GEMVs; this kernel is the
// literal Algorithm 2 path, kept for comparison and benchmarks.)

#define FS_TILE 32

template <typename T>
__global__ void mfac_forward_substitution(const T* __restrict__ D, const T* __restrict__ b, T* q, int m, T n) {
    T* r = q;  // residuals, overwritten by q tile by tile
    __shared__ T qt[FS_TILE];
    for (int j = threadIdx.x; j < m; j += blockDim.x) r[j] = b[j];
    __syncthreads();
    for (int t0 = 0; t0 < m; t0 += FS_TILE) {
        const int tn = min(FS_TILE, m - t0);
        if (threadIdx.x < 32) {  // warp 0: the recurrence inside the tile
            for (int i = 0; i < tn; ++i) {
                const int gi = t0 + i;
                const T qi = ((volatile T*)r)[gi] / (n + D[(size_t)gi * m + gi]);
                __syncwarp();
                const int j = t0 + (int)threadIdx.x;
                if ((int)threadIdx.x > i && (int)threadIdx.x < tn) r[j] -= D[(size_t)gi * m + j] * qi;
                if (threadIdx.x == 0) qt[i] = qi;
                __syncwarp();
            }
        }
        __syncthreads();
        for (int j = t0 + tn + threadIdx.x; j < m; j += blockDim.x) {  // the rest: r_j -= Σ_i D_ij q_i
            T acc = T(0);
            for (int i = 0; i < tn; ++i) acc += D[(size_t)(t0 + i) * m + j] * qt[i];
            r[j] -= acc;
        }
        __syncthreads();
        if (threadIdx.x < tn) q[t0 + threadIdx.x] = qt[threadIdx.x];
        __syncthreads();
    }
}

template __global__ void mfac_forward_substitution<float>(const float*, const float*, float*, int, float);
template __global__ void mfac_forward_substitution<double>(const double*, const double*, double*, int, double);
