// B = λ⁻¹ L̃⁻¹ from M-FAC's D, in 32×32 tiles (M-FAC appendix B, Figure 3), any m.
//
// D is the m×m upper-triangular coefficient matrix (row-major); L̃[r, c] = D[c, r] / (n + D[c, c])
// below the diagonal and 1 on it (rank1inv/groups/coefficients.py). B is row-major m×m and lower triangular.
//
// Schedule (NumPy mirror: rank1inv._coef.b_blocked):
//   1. mfac_b_diagonal: every diagonal tile is inverted by its row recurrence, one thread block
//      per tile, all independent.
//   2. mfac_b_sweep, for t = 1 .. nt-1: every tile (i, j) with i - j >= t adds
//      L̃[i, k] · B[k, j] for k = j + t - 1 (the sub-diagonal finished in step t - 1) to its
//      accumulator, which lives in B's own (zeroed) tile; tiles with i - j == t then complete
//      B[i, j] = -λ · B[i, i] · acc. No tile written in a step is read by another in that step.
//   2'. mfac_b_columns (instead of the sweeps, for small m): one thread block per tile column j
//      walks down it, tile (i, j) for i = j + 1 .. nt-1, accumulating the same terms
//      k = j .. i-1 in the same order in a register instead of in B: the same floating-point
//      operations as the sweeps, in 2 launches instead of nt, but only nt blocks in flight.
// Partial tiles at the bottom/right edge are masked: out-of-range entries read as the identity.

#define TILE 32

template <typename T>
__device__ __forceinline__ T ltilde(const T* __restrict__ D, int m, T n, int r, int c) {
    if (r == c) return T(1);
    if (r >= m || c >= m || r < c) return T(0);
    return D[(size_t)c * m + r] / (n + D[(size_t)c * m + c]);
}

// This thread's entry of B[i, i] · A, where A is the tile whose entry this thread holds in acc
// (the completion B[i, j] = -λ · B[i, i] · acc of both schedules). Stages both tiles through
// the block's shared tiles, after a barrier: the caller may still be reading them.
template <typename T>
__device__ __forceinline__ T diagonal_times(const T* __restrict__ B, int m, int i, T acc, T (*Ls)[TILE + 1],
                                            T (*Xs)[TILE + 1]) {
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int r = i * TILE + ty, dc = i * TILE + tx;
    __syncthreads();
    Xs[ty][tx] = acc;
    Ls[ty][tx] = (r < m && dc < m) ? B[(size_t)r * m + dc] : T(0);
    __syncthreads();
    T out = T(0);
#pragma unroll 8
    for (int q = 0; q < TILE; ++q) out += Ls[ty][q] * Xs[q][tx];
    return out;
}

template <typename T>
__global__ void mfac_b_diagonal(const T* __restrict__ D, T* __restrict__ B, int m, T n, T damp) {
    __shared__ T L[TILE][TILE + 1];
    __shared__ T X[TILE][TILE + 1];
    const int base = blockIdx.x * TILE;
    const int tx = threadIdx.x, ty = threadIdx.y;  // column, row inside the tile
    L[ty][tx] = ltilde(D, m, n, base + ty, base + tx);
    X[ty][tx] = (ty == tx) ? T(1) : T(0);
    __syncthreads();
    for (int r = 1; r < TILE; ++r) {  // X[r, c] = -Σ_{k=c}^{r-1} L[r, k] X[k, c]
        if (ty == 0 && tx < r) {
            T acc = T(0);
            for (int k = tx; k < r; ++k) acc += L[r][k] * X[k][tx];
            X[r][tx] = -acc;
        }
        __syncthreads();
    }
    const int gr = base + ty, gc = base + tx;
    if (gr < m && gc < m) B[(size_t)gr * m + gc] = (gc <= gr) ? X[ty][tx] / damp : T(0);
}

template <typename T>
__global__ void mfac_b_sweep(const T* __restrict__ D, T* __restrict__ B, int m, T n, T damp, int t, int nt) {
    const int j = blockIdx.y;
    const int i = j + t + blockIdx.x;
    if (i >= nt) return;
    const int k = j + t - 1;
    __shared__ T Ls[TILE][TILE + 1];
    __shared__ T Xs[TILE][TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int r = i * TILE + ty, c = j * TILE + tx;
    Ls[ty][tx] = ltilde(D, m, n, i * TILE + ty, k * TILE + tx);
    const int kr = k * TILE + ty;
    Xs[ty][tx] = (kr < m && c < m) ? B[(size_t)kr * m + c] : T(0);
    __syncthreads();
    T acc = (r < m && c < m) ? B[(size_t)r * m + c] : T(0);
#pragma unroll 8
    for (int q = 0; q < TILE; ++q) acc += Ls[ty][q] * Xs[q][tx];
    if (i - j != t) {
        if (r < m && c < m) B[(size_t)r * m + c] = acc;
        return;
    }
    const T out = diagonal_times(B, m, i, acc, Ls, Xs);
    if (r < m && c < m) B[(size_t)r * m + c] = -damp * out;
}

template <typename T>
__global__ void mfac_b_columns(const T* __restrict__ D, T* __restrict__ B, int m, T n, T damp, int nt) {
    const int j = blockIdx.x;
    __shared__ T Ls[TILE][TILE + 1];
    __shared__ T Xs[TILE][TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int c = j * TILE + tx;
    for (int i = j + 1; i < nt; ++i) {  // uniform across the block: barriers are safe
        const int r = i * TILE + ty;
        T acc = T(0);
        for (int k = j; k < i; ++k) {  // tiles (k, j), k < i, are final (earlier i)
            Ls[ty][tx] = ltilde(D, m, n, r, k * TILE + tx);
            const int kr = k * TILE + ty;
            Xs[ty][tx] = (kr < m && c < m) ? B[(size_t)kr * m + c] : T(0);
            __syncthreads();
#pragma unroll 8
            for (int q = 0; q < TILE; ++q) acc += Ls[ty][q] * Xs[q][tx];
            __syncthreads();
        }
        const T out = diagonal_times(B, m, i, acc, Ls, Xs);
        if (r < m && c < m) B[(size_t)r * m + c] = -damp * out;
        __syncthreads();  // tile (i, j) is read as a (k, j) tile for the next i
    }
}

template __global__ void mfac_b_diagonal<float>(const float*, float*, int, float, float);
template __global__ void mfac_b_diagonal<double>(const double*, double*, int, double, double);
template __global__ void mfac_b_sweep<float>(const float*, float*, int, float, float, int, int);
template __global__ void mfac_b_sweep<double>(const double*, double*, int, double, double, int, int);
template __global__ void mfac_b_columns<float>(const float*, float*, int, float, float, int);
template __global__ void mfac_b_columns<double>(const double*, double*, int, double, double, int);
