/* CPU passes over float32 gradients with float64 accumulation (docs/design.md §3).
 *
 * project_f32:  p[i] = Σ_j G[i, j] · x[j]
 *     Rows in blocks of 4 share each load of x; per row, 8 float64 lanes accumulate columns
 *     j ≡ l (mod 8) and are summed at the end.
 * combine_f32:  y[j] = α·x[j] + β·Σ_i c[i] · G[i, j]
 *     Columns in chunks of 8192 (accumulators stay in L2), rows added 8 at a time in order.
 *
 * *_multi_f32: the same for up to 8 vectors in one pass over G.
 * *_blocks_f32: the same over a batch of equal column blocks (block-diagonal layouts).
 *
 * Single-threaded; rank1inv/cpu/__init__.py splits rows (project), columns (combine) or blocks
 * over a few Python threads (ctypes releases the GIL). G is row-major with leading dimension ld
 * (a block of a wider matrix is allowed). Built as an optional extension module and called
 * through ctypes (module rank1inv.cpu._kernels, with window.c); without it
 * rank1inv/_passes.py converts tiles to float64 instead.
 */
#include <Python.h>
#include <stdint.h>

#define CHUNK 8192

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

typedef double v4d __attribute__((vector_size(32)));

static inline v4d cvt4(const float *g) {
    v4d r = {g[0], g[1], g[2], g[3]};
    return r;
}
static inline v4d load4(const double *x) {
    v4d r;
    __builtin_memcpy(&r, x, sizeof r);
    return r;
}
static inline void store4(double *x, v4d v) { __builtin_memcpy(x, &v, sizeof v); }
static inline double hsum(v4d a, v4d b) {
    v4d s = a + b;
    return (s[0] + s[1]) + (s[2] + s[3]);
}

/* p[0..rows) for rows 1..4 of G starting at G (leading dimension ld). */
MULTIVERSION
static void project_rows(const float *G, int64_t rows, int64_t ld, int64_t d, const double *x, double *p) {
    const float *g[4];
    for (int r = 0; r < 4; ++r) g[r] = G + (r < rows ? r : 0) * ld;
    v4d a[4] = {{0}}, b[4] = {{0}};
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) {
        v4d x0 = load4(x + j), x1 = load4(x + j + 4);
        for (int r = 0; r < 4; ++r) {
            a[r] += cvt4(g[r] + j) * x0;
            b[r] += cvt4(g[r] + j + 4) * x1;
        }
    }
    for (int r = 0; r < rows; ++r) {
        double t = 0.0;
        for (int64_t k = j; k < d; ++k) t += (double)g[r][k] * x[k];
        p[r] = t + hsum(a[r], b[r]);
    }
}

void rank1inv_project_f32(const float *G, int64_t m, int64_t d, int64_t ld, const double *x, double *p) {
    for (int64_t i = 0; i < m; i += 4) project_rows(G + i * ld, (m - i < 4) ? m - i : 4, ld, d, x, p + i);
}

/* acc[0..n) += Σ_{r < rows} c[r] · G[r, 0..n) for up to 8 rows. */
MULTIVERSION
static void combine_rows(const float *G, int64_t rows, int64_t ld, int64_t n, const double *c, double *acc) {
    const float *g[8];
    v4d cc[8];
    for (int r = 0; r < 8; ++r) {
        g[r] = G + (r < rows ? r : 0) * ld;
        double v = r < rows ? c[r] : 0.0;
        v4d t = {v, v, v, v};
        cc[r] = t;
    }
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        v4d lo = (cc[0] * cvt4(g[0] + j) + cc[1] * cvt4(g[1] + j)) + (cc[2] * cvt4(g[2] + j) + cc[3] * cvt4(g[3] + j));
        v4d hi = (cc[4] * cvt4(g[4] + j) + cc[5] * cvt4(g[5] + j)) + (cc[6] * cvt4(g[6] + j) + cc[7] * cvt4(g[7] + j));
        store4(acc + j, load4(acc + j) + (lo + hi));
    }
    for (; j < n; ++j) {
        double t = 0.0;
        for (int r = 0; r < rows; ++r) t += c[r] * (double)g[r][j];
        acc[j] += t;
    }
}

void rank1inv_combine_f32(const float *G, int64_t m, int64_t d, int64_t ld, const double *c, const double *x,
                          double alpha, double beta, double *y) {
    static __thread double acc[CHUNK];
    for (int64_t j0 = 0; j0 < d; j0 += CHUNK) {
        int64_t n = (d - j0 < CHUNK) ? d - j0 : CHUNK;
        for (int64_t j = 0; j < n; ++j) acc[j] = 0.0;
        for (int64_t i = 0; i < m; i += 8) combine_rows(G + i * ld + j0, (m - i < 8) ? m - i : 8, ld, n, c + i, acc);
        for (int64_t j = 0; j < n; ++j) y[j0 + j] = (x ? alpha * x[j0 + j] : 0.0) + beta * acc[j];
    }
}

/* k ≤ MULTI right-hand sides in one pass over G, each vector a row of X (d long, ldx apart):
 * P[q·ldp + i] = Σ_j G[i, j] · X[q·ldx + j]. Columns in chunks of PCHUNK, rows 4 at a time: each
 * 4 × PCHUNK piece of G (8 KiB) is read from memory once and from L1 for the other vectors. */
#define MULTI 8
#define PCHUNK 512
void rank1inv_project_multi_f32(const float *G, int64_t m, int64_t d, int64_t ld, const double *X, int64_t ldx,
                                int64_t k, double *P, int64_t ldp) {
    double part[4];
    for (int64_t q = 0; q < k; ++q)
        for (int64_t i = 0; i < m; ++i) P[q * ldp + i] = 0.0;
    for (int64_t j0 = 0; j0 < d; j0 += PCHUNK) {
        int64_t n = (d - j0 < PCHUNK) ? d - j0 : PCHUNK;
        for (int64_t i = 0; i < m; i += 4) {
            int64_t rows = (m - i < 4) ? m - i : 4;
            for (int64_t q = 0; q < k; ++q) {
                project_rows(G + i * ld + j0, rows, ld, n, X + q * ldx + j0, part);
                for (int64_t r = 0; r < rows; ++r) P[q * ldp + i + r] += part[r];
            }
        }
    }
}

/* Y[q·ldy + j] = α·X[q·ldx + j] + β·Σ_i C[q·ldc + i] · G[i, j] for k ≤ MULTI vectors (X may be
 * NULL). Columns in chunks of MCHUNK with k accumulators in L2: each 8 × MCHUNK piece of G
 * (64 KiB) is read from memory once and from L2 for the other vectors. */
#define MCHUNK 2048
void rank1inv_combine_multi_f32(const float *G, int64_t m, int64_t d, int64_t ld, const double *C, int64_t ldc,
                                const double *X, int64_t ldx, int64_t k, double alpha, double beta, double *Y,
                                int64_t ldy) {
    static __thread double acc[MULTI * MCHUNK];
    if (k > MULTI) return;
    for (int64_t j0 = 0; j0 < d; j0 += MCHUNK) {
        int64_t n = (d - j0 < MCHUNK) ? d - j0 : MCHUNK;
        for (int64_t t = 0; t < k * MCHUNK; ++t) acc[t] = 0.0;
        for (int64_t i = 0; i < m; i += 8)
            for (int64_t q = 0; q < k; ++q)
                combine_rows(G + i * ld + j0, (m - i < 8) ? m - i : 8, ld, n, C + q * ldc + i, acc + q * MCHUNK);
        for (int64_t q = 0; q < k; ++q)
            for (int64_t j = 0; j < n; ++j)
                Y[q * ldy + j0 + j] = (X ? alpha * X[q * ldx + j0 + j] : 0.0) + beta * acc[q * MCHUNK + j];
    }
}

/* The same passes over nb equal blocks G_b = G + b·sb (m × d each, leading dimension ld), with
 * x, c, p, y laid out block after block: p[b·m + i], y[b·d + j]. */
void rank1inv_project_blocks_f32(const float *G, int64_t nb, int64_t sb, int64_t m, int64_t d, int64_t ld,
                                 const double *x, double *p) {
    for (int64_t b = 0; b < nb; ++b) rank1inv_project_f32(G + b * sb, m, d, ld, x + b * d, p + b * m);
}

void rank1inv_combine_blocks_f32(const float *G, int64_t nb, int64_t sb, int64_t m, int64_t d, int64_t ld,
                                 const double *c, const double *x, double alpha, double beta, double *y) {
    for (int64_t b = 0; b < nb; ++b)
        rank1inv_combine_f32(G + b * sb, m, d, ld, c + b * m, x ? x + b * d : 0, alpha, beta, y + b * d);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "rank1inv's compiled CPU kernels (called through ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
