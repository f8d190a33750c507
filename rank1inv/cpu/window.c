/* The m×m level-2 work of a sliding window (rank1inv/groups/window.py, docs/design.md §6), in plain
 * single-threaded loops: no BLAS call, so nothing wakes multi-threaded BLAS workers that would
 * then spin against the passes over G on a busy machine.
 *
 * rank1inv_chol_drop: removing one row and column from an upper Cholesky factor in O(n²).
 *
 * R (n×n, upper, row-major with leading dimension ld) satisfies RᵀR = K. Deleting row and
 * column k of K gives K̃ = R̃ᵀR̃ with
 *   rows i < k:  R̃[i, :] = R[i, :] without column k,
 *   rows i > k:  the trailing block T = R[k+1:, k+1:] becomes chol(TᵀT + xxᵀ), x = R[k, k+1:]:
 *                a rank-one *update* (no downdate), done by one Givens rotation per row that
 *                rotates x into the row: for row i, r = hypot(T_ii, x_i), c = T_ii/r, s = x_i/r,
 *                row ← c·row + s·x, x ← c·x − s·row (the LINPACK dchud recurrence, backward
 *                stable).
 * The result is written shifted up and left by one into dst (n−1 × n−1, same leading
 * dimension); dst may be src (each source row is read before the destination row above it is
 * written). Entries of dst below the diagonal of its first n−1 rows are set to zero.
 * x is a caller-provided scratch vector of n doubles.
 *
 * The NumPy mirror of this exact order of operations is rank1inv.groups.window.drop_rows_numpy; the
 * CUDA version is rank1inv/cuda/cholesky_update.cu.
 *
 * rank1inv_chol_drop_solve: the same drop, and b ← R̃⁻ᵀb for the new (n−1)-factor R̃ in the same
 * sweep: each row of R̃ takes its forward-substitution step right after it is written, while
 * it is in cache (the operations of rank1inv_solve_ut, in its order: bitwise the same result
 * as the drop followed by the solve, with one read of the factor fewer).
 *
 * rank1inv_solve_ut / rank1inv_solve_u: Rᵀy = b and R c = y for upper R, in place, O(n²)
 * (LAPACK's trsv does the same arithmetic).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

/* One Givens rotation of (source row, x) over columns lo..n-1, the row written one column to
 * the left. The row pointers never overlap within a call (d is the row above s, or another
 * buffer), so the loop vectorizes (AVX2 where available: 4× faster at n = 1024 here). */
MULTIVERSION static void rotate(const double *__restrict s, double *__restrict d, double *__restrict x, int64_t lo,
                                int64_t n, double c, double sn) {
    for (int64_t j = lo; j < n; ++j) {
        const double t = s[j], u = x[j];
        d[j - 1] = c * t + sn * u;
        x[j] = c * u - sn * t;
    }
}

/* One step of forward substitution with row q of a factor (n1 unknowns): b[q] ← b[q]/r[q], then
 * b[j] −= b[q]·r[j] for j > q (rank1inv_solve_ut's loop body). */
static inline void forward_step(const double *r, int64_t q, int64_t n1, double *b) {
    const double y = b[q] / r[q];
    b[q] = y;
    if (y != 0.0)
        for (int64_t j = q + 1; j < n1; ++j) b[j] -= y * r[j];
}

static inline void drop(const double *src, double *dst, int64_t ld, int64_t n, int64_t k, double *x, double *rhs) {
    /* rows above k: drop column k */
    for (int64_t i = 0; i < k; ++i) {
        const double *s = src + i * ld;
        double *d = dst + i * ld;
        if (d != s) memcpy(d, s, (size_t)k * sizeof(double));
        memmove(d + k, s + k + 1, (size_t)(n - k - 1) * sizeof(double));
        if (rhs) forward_step(d, i, n - 1, rhs);
    }
    /* the row being removed becomes the update vector x[j] for columns j > k */
    for (int64_t j = k + 1; j < n; ++j) x[j] = src[k * ld + j];
    for (int64_t i = k + 1; i < n; ++i) {
        const double *s = src + i * ld;
        double *d = dst + (i - 1) * ld;
        const double a = s[i], b = x[i];
        const double r = hypot(a, b);
        const double c = a / r, sn = b / r;
        if (d != s - ld) memset(d, 0, (size_t)(i - 1) * sizeof(double)); /* in place: already zero */
        d[i - 1] = r;
        rotate(s, d, x, i + 1, n, c, sn);
        if (rhs) forward_step(d, i - 1, n - 1, rhs);
    }
}

MULTIVERSION void rank1inv_chol_drop(const double *src, double *dst, int64_t ld, int64_t n, int64_t k, double *x) {
    drop(src, dst, ld, n, k, x, 0);
}

MULTIVERSION void rank1inv_chol_drop_solve(const double *src, double *dst, int64_t ld, int64_t n, int64_t k, double *x,
                                           double *rhs) {
    drop(src, dst, ld, n, k, x, rhs);
}

/* b ← y with Rᵀy = b (forward substitution, row k of R updates the later unknowns). Leading
 * zeros of b stay zero and cost nothing (a new gradient's e_slot is last in age order). */
MULTIVERSION
void rank1inv_solve_ut(const double *R, int64_t ld, int64_t n, double *b) {
    int64_t k = 0;
    while (k < n && b[k] == 0.0) ++k;
    for (; k < n; ++k) {
        const double *r = R + k * ld;
        const double y = b[k] / r[k];
        b[k] = y;
        if (y != 0.0)
            for (int64_t j = k + 1; j < n; ++j) b[j] -= y * r[j];
    }
}

typedef double v4d __attribute__((vector_size(32)));

static inline v4d load4(const double *p) {
    v4d r;
    __builtin_memcpy(&r, p, sizeof r);
    return r;
}
static inline void store4(double *p, v4d v) { __builtin_memcpy(p, &v, sizeof v); }

/* Σ_j a[j]·x[j] for j in [lo, hi), 8 lanes. */
static inline double dot(const double *a, const double *x, int64_t lo, int64_t hi) {
    v4d s0 = {0, 0, 0, 0}, s1 = {0, 0, 0, 0};
    int64_t j = lo;
    for (; j + 8 <= hi; j += 8) {
        s0 += load4(a + j) * load4(x + j);
        s1 += load4(a + j + 4) * load4(x + j + 4);
    }
    double t = 0.0;
    for (; j < hi; ++j) t += a[j] * x[j];
    v4d s = s0 + s1;
    return t + ((s[0] + s[1]) + (s[2] + s[3]));
}

/* y ← c with R c = y (back substitution, dot products along the rows of R). */
MULTIVERSION
void rank1inv_solve_u(const double *R, int64_t ld, int64_t n, double *y) {
    for (int64_t i = n - 1; i >= 0; --i) {
        const double *r = R + i * ld;
        y[i] = (y[i] - dot(r, y, i + 1, n)) / r[i];
    }
}
