// Removing row and column k from an upper Cholesky factor R (n×n, row-major, leading dimension
// ld) in O(n²): the same operations in the same order as rank1inv/cpu/window.c (see
// there for the math; NumPy mirror: rank1inv.groups.window.drop_rows_numpy).
//
// One thread block: the Givens rotations are sequential over rows, each row's update is
// parallel over its columns (thread t owns columns j ≡ t mod blockDim.x). dst may equal src:
// rows above k are then shifted through registers (read all, sync, write all; rows of at most
// DROP_THREADS·DROP_PER_THREAD columns, checked by the launcher); below k every source row is
// read before the row above it is written. x is a scratch vector of n doubles.

#define DROP_THREADS 1024
#define DROP_PER_THREAD 16  // registers for the in-place shift: rows up to 16 384 columns

extern "C" __global__ void chol_drop(const double* __restrict__ src, double* dst, long long ld, int n, int k,
                                     double* __restrict__ x) {
    const int tid = threadIdx.x, nt = blockDim.x;
    __shared__ double rot[2];
    double keep[DROP_PER_THREAD];
    for (int i = 0; i < k && src != dst; ++i) {  // rows above k: drop column k (out of place)
        const double* s = src + (long long)i * ld;
        double* d = dst + (long long)i * ld;
        for (int j = tid; j < n - 1; j += nt) d[j] = j < k ? s[j] : s[j + 1];
    }
    for (int i = 0; i < k && src == dst; ++i) {  // in place
        const double* s = src + (long long)i * ld;
        double* d = dst + (long long)i * ld;
        int q = 0;
        for (int j = tid; j < n - 1 && q < DROP_PER_THREAD; j += nt, ++q) keep[q] = j < k ? s[j] : s[j + 1];
        __syncthreads();
        q = 0;
        for (int j = tid; j < n - 1 && q < DROP_PER_THREAD; j += nt, ++q) d[j] = keep[q];
        __syncthreads();
    }
    for (int j = k + 1 + tid; j < n; j += nt) x[j] = src[(long long)k * ld + j];
    __syncthreads();
    for (int i = k + 1; i < n; ++i) {
        const double* s = src + (long long)i * ld;
        double* d = dst + (long long)(i - 1) * ld;
        if (tid == 0) {
            const double a = s[i], b = x[i];
            const double r = hypot(a, b);
            rot[0] = a / r;
            rot[1] = b / r;
            d[i - 1] = r;
        }
        __syncthreads();
        const double c = rot[0], sn = rot[1];
        for (int j = tid; j < i - 1; j += nt) d[j] = 0.0;
        for (int j = i + 1 + tid; j < n; j += nt) {
            const double t = s[j], u = x[j];
            d[j - 1] = c * t + sn * u;
            x[j] = c * u - sn * t;
        }
        __syncthreads();
    }
}
