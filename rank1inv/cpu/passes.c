/* CPU passes over stored gradients with float64 accumulation (docs/design.md §3).
 *
 * project:  p[i] = Σ_j G[i, j] · x[j]
 *     Columns in tiles of 32768 (x's tile stays in L2); rows in blocks of 4 share each load of
 *     x; per row, 8 float64 lanes accumulate columns j ≡ l (mod 8) (16-bit rows: in split
 *     column order, below) and are summed at the end.
 * combine:  y[j] = α·x[j] + β·Σ_i c[i] · G[i, j]
 *     Columns in chunks of 8192 (accumulators stay in L2), rows added 16 at a time in order
 *     (the last < 16 in blocks of 8): one accumulator update per 16 rows (bfloat16 combine
 *     1.15× faster than per 8 on the 2-vCPU Intel VM, docs/benchmarks.md).
 *
 * *_multi: the same for up to 8 vectors in one pass over G.
 * *_blocks: the same over a batch of equal column blocks (block-diagonal layouts).
 *
 * Every function exists for three storage types, suffix _f32 (float), _bf16 and _f16 (16-bit
 * bit patterns: bfloat16, IEEE half). 16-bit values are decoded to float in registers (exactly:
 * every bfloat16 and half is a float) and widened to double; no float32 or float64 copy of G is
 * made. The bodies are written once (always-inline, specialised by a constant loader); the
 * 16-bit ones decode eight values at a time in split order (even columns, then odd).
 *
 * Single-threaded; rank1inv/cpu/__init__.py splits rows (project), columns (combine) or blocks
 * over a few Python threads (ctypes releases the GIL). G is row-major with leading dimension ld
 * (a block of a wider matrix is allowed). Built as an optional extension module and called
 * through ctypes (module rank1inv.cpu._kernels, with window.c); without it
 * rank1inv/_passes.py converts tiles to float64 instead.
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 8192

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif
#define INLINE static inline __attribute__((always_inline))

typedef double v4d __attribute__((vector_size(32)));

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

/* ---------------------------------------------------------------- element loaders */
typedef double (*load1_t)(const void *row, int64_t j);

INLINE double f32_at(const void *row, int64_t j) { return (double)((const float *)row)[j]; }

INLINE double bf16_at(const void *row, int64_t j) {
    uint32_t bits = (uint32_t)((const uint16_t *)row)[j] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return (double)f;
}

/* IEEE half: exponent and mantissa shifted into float position, then one multiplication by
 * 2^112 rebiases the exponent and normalizes subnormals (exact); the inputs are finite. */
INLINE double f16_at(const void *row, int64_t j) {
    const uint32_t h = ((const uint16_t *)row)[j];
    uint32_t bits = (h & 0x7fffu) << 13;
    float f;
    memcpy(&f, &bits, sizeof f);
    f *= 5.192296858534828e+33f; /* 2^112 */
    memcpy(&bits, &f, sizeof bits);
    bits |= (h & 0x8000u) << 16;
    memcpy(&f, &bits, sizeof f);
    return (double)f;
}

/* A thread's scratch buffer (a static __thread array), its address taken once: without the empty
 * asm GCC recomputes the address of a thread-local array in a shared library, a call to
 * __tls_get_addr, inside the loops that use it (combine: once per 16 rows × 4 columns; float32
 * combine in cache 1.5× faster with it, docs/benchmarks.md). */
INLINE double *scratch(double *buffer) {
    __asm__("" : "+r"(buffer));
    return buffer;
}

INLINE const void *row_at(const void *G, int64_t r, int64_t ld, int64_t es) {
    return (const char *)G + r * ld * es;
}

typedef uint16_t v4u16 __attribute__((vector_size(8)));
typedef uint32_t v4u32 __attribute__((vector_size(16)));
typedef float v4f __attribute__((vector_size(16)));

/* Four stored values as doubles. Half is decoded four lanes at a time (integer widening, shifts
 * and one float multiplication: f16_at's arithmetic); float32 and bfloat16 are left to the
 * compiler, which vectorizes their scalar form best (measured). */
INLINE v4d cvt4(load1_t at, const void *row, int64_t j) {
    if (at == f16_at) {
        v4u16 h;
        memcpy(&h, (const uint16_t *)row + j, sizeof h);
        v4u32 w = __builtin_convertvector(h, v4u32);
        v4f f;
        v4u32 mag = (w & 0x7fffu) << 13;
        memcpy(&f, &mag, sizeof f);
        f *= 5.192296858534828e+33f;
        v4u32 fb;
        memcpy(&fb, &f, sizeof fb);
        fb |= (w & 0x8000u) << 16;
        memcpy(&f, &fb, sizeof f);
        return (v4d){f[0], f[1], f[2], f[3]}; /* lane by lane: one vcvtps2pd, as in bf16_split */
    }
    v4d r = {at(row, j), at(row, j + 1), at(row, j + 2), at(row, j + 3)};
    return r;
}

/* ---------------------------------------------------------------- bodies (written once) */
/* p[0..rows) += the products of rows 1..4 of G starting at G (leading dimension ld) with x. */
INLINE void project_rows(const void *G, int64_t rows, int64_t ld, int64_t d, const double *x, double *p,
                         load1_t at, int64_t es) {
    const void *g[4];
    for (int r = 0; r < 4; ++r) g[r] = row_at(G, r < rows ? r : 0, ld, es);
    v4d a[4] = {{0}}, b[4] = {{0}};
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) {
        v4d x0 = load4(x + j), x1 = load4(x + j + 4);
        for (int r = 0; r < 4; ++r) {
            a[r] += cvt4(at, g[r], j) * x0;
            b[r] += cvt4(at, g[r], j + 4) * x1;
        }
    }
    for (int r = 0; r < rows; ++r) {
        double t = 0.0;
        for (int64_t k = j; k < d; ++k) t += at(g[r], k) * x[k];
        p[r] += t + hsum(a[r], b[r]);
    }
}

/* ---------------------------------------------------------------- 16-bit values in split order */
/* Eight 16-bit values read as four 32-bit words: the even columns are the words shifted up by 16,
 * the odd ones the words with their low half cleared, one instruction each for four values (the
 * zero-extending loader takes four for eight). A bfloat16 is then a float; a half is decoded from
 * there. The 16-bit passes keep x and their accumulators in the same split order, per group of 8
 * columns the 4 even then the 4 odd (split8), so nothing is shuffled back per value
 * (single-threaded on the 2-vCPU AMD EPYC Zen 3 VM: bfloat16 project 1.18× and combine 1.09×
 * faster in cache, float16 project 1.77× and combine 1.34× from memory, docs/benchmarks.md). */
INLINE void bf16_split(const void *row, int64_t j, v4d *even, v4d *odd) {
    v4u32 w;
    memcpy(&w, (const uint16_t *)row + j, sizeof w);
    v4u32 e = w << 16, o = w & 0xffff0000u;
    v4f fe, fo;
    memcpy(&fe, &e, sizeof fe);
    memcpy(&fo, &o, sizeof fo);
    /* lane by lane: GCC turns this into one vcvtps2pd each, __builtin_convertvector into two */
    *even = (v4d){fe[0], fe[1], fe[2], fe[3]};
    *odd = (v4d){fo[0], fo[1], fo[2], fo[3]};
}

/* Half in split order: the words shifted (even) or masked (odd) hold a half in their upper 16
 * bits, decoded as f16_at does (magnitude into float position, one multiplication by 2^112, the
 * sign or-ed back). */
INLINE void f16_split(const void *row, int64_t j, v4d *even, v4d *odd) {
    v4u32 w;
    memcpy(&w, (const uint16_t *)row + j, sizeof w);
    const v4u32 t[2] = {w << 16, w & 0xffff0000u};
    v4d *out[2] = {even, odd};
    for (int k = 0; k < 2; ++k) {
        v4u32 bits = (t[k] & 0x7fff0000u) >> 3;
        v4f f;
        memcpy(&f, &bits, sizeof f);
        f *= 5.192296858534828e+33f; /* 2^112 */
        memcpy(&bits, &f, sizeof bits);
        bits |= t[k] & 0x80000000u;
        memcpy(&f, &bits, sizeof f);
        *out[k] = (v4d){f[0], f[1], f[2], f[3]};
    }
}

/* The split decoder of a 16-bit loader (none for float32). */
typedef void (*split_t)(const void *row, int64_t j, v4d *even, v4d *odd);
INLINE split_t split_of(load1_t at) { return at == bf16_at ? bf16_split : at == f16_at ? f16_split : 0; }

/* xs[0..n8) ← x[0..n8) in split order (n8: n rounded down to a multiple of 8). */
INLINE void split8(const double *x, double *xs, int64_t n) {
    for (int64_t j = 0; j + 8 <= n; j += 8)
        for (int i = 0; i < 4; ++i) {
            xs[j + i] = x[j + 2 * i];
            xs[j + 4 + i] = x[j + 2 * i + 1];
        }
}

/* p[0..rows) += the products of rows 1..4 of 16-bit G with x (xs: x in split order). Per row,
 * lane l of a sums the columns j ≡ 2l (mod 8), of b j ≡ 2l + 1, added as project_rows adds its
 * two accumulators. */
INLINE void project_rows_split(const void *G, int64_t rows, int64_t ld, int64_t d, const double *x, const double *xs,
                               double *p, load1_t at) {
    const split_t split = split_of(at);
    const void *g[4];
    for (int r = 0; r < 4; ++r) g[r] = row_at(G, r < rows ? r : 0, ld, 2);
    v4d a[4] = {{0}}, b[4] = {{0}};
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) {
        v4d xe = load4(xs + j), xo = load4(xs + j + 4);
        for (int r = 0; r < 4; ++r) {
            v4d e, o;
            split(g[r], j, &e, &o);
            a[r] += e * xe;
            b[r] += o * xo;
        }
    }
    for (int r = 0; r < rows; ++r) {
        double t = 0.0;
        for (int64_t k = j; k < d; ++k) t += at(g[r], k) * x[k];
        p[r] += t + hsum(a[r], b[r]);
    }
}

/* Σ_{r < 8} cc[r]·v[r] summed as sum8 sums: ((0+1)+(2+3))+((4+5)+(6+7)). */
INLINE v4d dot8(const v4d *cc, const v4d *v) {
    return ((cc[0] * v[0] + cc[1] * v[1]) + (cc[2] * v[2] + cc[3] * v[3])) +
           ((cc[4] * v[4] + cc[5] * v[5]) + (cc[6] * v[6] + cc[7] * v[7]));
}

/* acc[0..n8) (split order) += Σ_{r < rows} c[r]·G[r, 0..n8) for up to 16 rows, n8 a multiple
 * of 8: per column the operations of combine_rows16 (rows > 8) or combine_rows, in their order. */
INLINE void combine_rows_split(const void *G, int64_t rows, int64_t ld, int64_t n8, const double *c, double *acc,
                               load1_t at) {
    const split_t split = split_of(at);
    const void *g[16];
    v4d cc[16];
    for (int r = 0; r < 16; ++r) {
        g[r] = row_at(G, r < rows ? r : 0, ld, 2);
        double v = r < rows ? c[r] : 0.0;
        v4d t = {v, v, v, v};
        cc[r] = t;
    }
    const int wide = rows > 8;
    for (int64_t j = 0; j < n8; j += 8) {
        v4d e[16], o[16];
        for (int r = 0; r < (wide ? 16 : 8); ++r) split(g[r], j, e + r, o + r);
        v4d se = dot8(cc, e), so = dot8(cc, o);
        if (wide) {
            se += dot8(cc + 8, e + 8);
            so += dot8(cc + 8, o + 8);
        }
        store4(acc + j, load4(acc + j) + se);
        store4(acc + j + 4, load4(acc + j + 4) + so);
    }
}

/* y[0..n) = α·x + β·acc, acc's columns below n8 in split order (0 for float32; x may be NULL). */
INLINE void write_out(const double *acc, int64_t n, int64_t n8, const double *x, double alpha, double beta,
                        double *y) {
    for (int64_t j = 0; j < n8; j += 8)
        for (int l = 0; l < 4; ++l) {
            const int64_t e = j + 2 * l, o = e + 1;
            y[e] = (x ? alpha * x[e] : 0.0) + beta * acc[j + l];
            y[o] = (x ? alpha * x[o] : 0.0) + beta * acc[j + 4 + l];
        }
    for (int64_t j = n8; j < n; ++j) y[j] = (x ? alpha * x[j] : 0.0) + beta * acc[j];
}

/* Columns in tiles of PTILE, every row per tile: the tile of x (256 KiB) stays in L2 instead of
 * being read from L3 or memory once per block of rows (bfloat16 at d = 2·10⁶: 1.4× faster,
 * docs/benchmarks.md). */
#define PTILE 32768
INLINE void project(const void *G, int64_t m, int64_t d, int64_t ld, const double *x, double *p, load1_t at,
                    int64_t es) {
    static __thread double xs_[PTILE]; /* 16-bit: x's tile in split order */
    double *xs = scratch(xs_);
    for (int64_t i = 0; i < m; ++i) p[i] = 0.0;
    for (int64_t j0 = 0; j0 < d; j0 += PTILE) {
        const int64_t n = (d - j0 < PTILE) ? d - j0 : PTILE;
        const void *G0 = (const char *)G + j0 * es;
        int64_t i = 0;
        if (split_of(at)) {
            split8(x + j0, xs, n);
            for (; i < m; i += 4)
                project_rows_split(row_at(G0, i, ld, es), (m - i < 4) ? m - i : 4, ld, n, x + j0, xs, p + i, at);
            continue;
        }
        for (; i < m; i += 4)
            project_rows(row_at(G0, i, ld, es), (m - i < 4) ? m - i : 4, ld, n, x + j0, p + i, at, es);
    }
}

/* Σ_{r < 8} cc[r]·G[r, j..j+4) (cc: broadcast coefficients), summed ((0+1)+(2+3))+((4+5)+(6+7)). */
INLINE v4d sum8(const v4d *cc, const void *const *g, int64_t j, load1_t at) {
    v4d lo = (cc[0] * cvt4(at, g[0], j) + cc[1] * cvt4(at, g[1], j)) +
             (cc[2] * cvt4(at, g[2], j) + cc[3] * cvt4(at, g[3], j));
    v4d hi = (cc[4] * cvt4(at, g[4], j) + cc[5] * cvt4(at, g[5], j)) +
             (cc[6] * cvt4(at, g[6], j) + cc[7] * cvt4(at, g[7], j));
    return lo + hi;
}

/* acc[0..n) += Σ_{r < rows} c[r] · G[r, 0..n) for up to 8 rows. */
INLINE void combine_rows(const void *G, int64_t rows, int64_t ld, int64_t n, const double *c, double *acc, load1_t at,
                         int64_t es) {
    const void *g[8];
    v4d cc[8];
    for (int r = 0; r < 8; ++r) {
        g[r] = row_at(G, r < rows ? r : 0, ld, es);
        double v = r < rows ? c[r] : 0.0;
        v4d t = {v, v, v, v};
        cc[r] = t;
    }
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) store4(acc + j, load4(acc + j) + sum8(cc, g, j, at));
    for (; j < n; ++j) {
        double t = 0.0;
        for (int r = 0; r < rows; ++r) t += c[r] * at(g[r], j);
        acc[j] += t;
    }
}

/* acc[0..n) += Σ_{r < 16} c[r] · G[r, 0..n) for 16 rows (one update of acc per 16 rows). */
INLINE void combine_rows16(const void *G, int64_t ld, int64_t n, const double *c, double *acc, load1_t at,
                           int64_t es) {
    const void *g[16];
    v4d cc[16];
    for (int r = 0; r < 16; ++r) {
        g[r] = row_at(G, r, ld, es);
        v4d t = {c[r], c[r], c[r], c[r]};
        cc[r] = t;
    }
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) store4(acc + j, load4(acc + j) + (sum8(cc, g, j, at) + sum8(cc + 8, g + 8, j, at)));
    for (; j < n; ++j) {
        double t = 0.0;
        for (int r = 0; r < 16; ++r) t += c[r] * at(g[r], j);
        acc[j] += t;
    }
}

INLINE void combine(const void *G, int64_t m, int64_t d, int64_t ld, const double *c, const double *x, double alpha,
                    double beta, double *y, load1_t at, int64_t es) {
    static __thread double acc_[CHUNK];
    double *acc = scratch(acc_);
    for (int64_t j0 = 0; j0 < d; j0 += CHUNK) {
        int64_t n = (d - j0 < CHUNK) ? d - j0 : CHUNK;
        const void *G0 = (const char *)G + j0 * es;
        /* 16-bit: the columns below n8 in split order, the last < 8 by combine_rows(16) */
        const int64_t n8 = split_of(at) ? n / 8 * 8 : 0;
        for (int64_t j = 0; j < n; ++j) acc[j] = 0.0;
        int64_t i = 0;
        for (; i + 16 <= m; i += 16) {
            if (n8) combine_rows_split(row_at(G0, i, ld, es), 16, ld, n8, c + i, acc, at);
            combine_rows16((const char *)row_at(G0, i, ld, es) + n8 * es, ld, n - n8, c + i, acc + n8, at, es);
        }
        for (; i < m; i += 8) {
            const int64_t rows = (m - i < 8) ? m - i : 8;
            if (n8) combine_rows_split(row_at(G0, i, ld, es), rows, ld, n8, c + i, acc, at);
            combine_rows((const char *)row_at(G0, i, ld, es) + n8 * es, rows, ld, n - n8, c + i, acc + n8, at, es);
        }
        write_out(acc, n, n8, x ? x + j0 : 0, alpha, beta, y + j0);
    }
}

/* k ≤ MULTI right-hand sides in one pass over G, each vector a row of X (d long, ldx apart):
 * P[q·ldp + i] = Σ_j G[i, j] · X[q·ldx + j]. Columns in chunks of PCHUNK, rows 4 at a time: each
 * 4 × PCHUNK piece of G is read from memory once and from L1 for the other vectors. */
#define MULTI 8
#define PCHUNK 512
INLINE void project_multi(const void *G, int64_t m, int64_t d, int64_t ld, const double *X, int64_t ldx, int64_t k,
                          double *P, int64_t ldp, load1_t at, int64_t es) {
    for (int64_t q = 0; q < k; ++q)
        for (int64_t i = 0; i < m; ++i) P[q * ldp + i] = 0.0;
    static __thread double xs_[MULTI * PCHUNK]; /* 16-bit: the chunks of X in split order */
    double *xs = scratch(xs_);
    const int split = split_of(at) && k <= MULTI;
    for (int64_t j0 = 0; j0 < d; j0 += PCHUNK) {
        int64_t n = (d - j0 < PCHUNK) ? d - j0 : PCHUNK;
        const void *G0 = (const char *)G + j0 * es;
        if (split)
            for (int64_t q = 0; q < k; ++q) split8(X + q * ldx + j0, xs + q * PCHUNK, n);
        for (int64_t i = 0; i < m; i += 4) {
            int64_t rows = (m - i < 4) ? m - i : 4;
            for (int64_t q = 0; q < k; ++q)
                if (split)
                    project_rows_split(row_at(G0, i, ld, es), rows, ld, n, X + q * ldx + j0, xs + q * PCHUNK,
                                       P + q * ldp + i, at);
                else
                    project_rows(row_at(G0, i, ld, es), rows, ld, n, X + q * ldx + j0, P + q * ldp + i, at, es);
        }
    }
}

/* Y[q·ldy + j] = α·X[q·ldx + j] + β·Σ_i C[q·ldc + i] · G[i, j] for k ≤ MULTI vectors (X may be
 * NULL). Columns in chunks of MCHUNK with k accumulators in L2: each 8 × MCHUNK piece of G is
 * read from memory once and from L2 for the other vectors. */
#define MCHUNK 2048
INLINE void combine_multi(const void *G, int64_t m, int64_t d, int64_t ld, const double *C, int64_t ldc,
                          const double *X, int64_t ldx, int64_t k, double alpha, double beta, double *Y, int64_t ldy,
                          load1_t at, int64_t es) {
    static __thread double acc_[MULTI * MCHUNK];
    double *acc = scratch(acc_);
    if (k > MULTI) return;
    for (int64_t j0 = 0; j0 < d; j0 += MCHUNK) {
        int64_t n = (d - j0 < MCHUNK) ? d - j0 : MCHUNK;
        const void *G0 = (const char *)G + j0 * es;
        const int64_t n8 = split_of(at) ? n / 8 * 8 : 0; /* 16-bit: columns below n8 in split order */
        for (int64_t t = 0; t < k * MCHUNK; ++t) acc[t] = 0.0;
        for (int64_t i = 0; i < m; i += 8)
            for (int64_t q = 0; q < k; ++q) {
                const int64_t rows = (m - i < 8) ? m - i : 8;
                if (n8) combine_rows_split(row_at(G0, i, ld, es), rows, ld, n8, C + q * ldc + i, acc + q * MCHUNK, at);
                combine_rows((const char *)row_at(G0, i, ld, es) + n8 * es, rows, ld, n - n8, C + q * ldc + i,
                             acc + q * MCHUNK + n8, at, es);
            }
        for (int64_t q = 0; q < k; ++q)
            write_out(acc + q * MCHUNK, n, n8, X ? X + q * ldx + j0 : 0, alpha, beta, Y + q * ldy + j0);
    }
}

/* ---------------------------------------------------------------- exported, per storage type */
/* The block versions run nb equal blocks G_b = G + b·sb (m × d each, leading dimension ld),
 * with x, c, p, y laid out block after block: p[b·m + i], y[b·d + j]. Strides in elements. */
#define EXPORT_PASSES(SUFFIX, AT, ES)                                                                                \
    MULTIVERSION void rank1inv_project_##SUFFIX(const void *G, int64_t m, int64_t d, int64_t ld, const double *x,    \
                                                double *p) {                                                         \
        project(G, m, d, ld, x, p, AT, ES);                                                                          \
    }                                                                                                                \
    MULTIVERSION void rank1inv_combine_##SUFFIX(const void *G, int64_t m, int64_t d, int64_t ld, const double *c,    \
                                                const double *x, double alpha, double beta, double *y) {             \
        combine(G, m, d, ld, c, x, alpha, beta, y, AT, ES);                                                          \
    }                                                                                                                \
    MULTIVERSION void rank1inv_project_multi_##SUFFIX(const void *G, int64_t m, int64_t d, int64_t ld,               \
                                                      const double *X, int64_t ldx, int64_t k, double *P,            \
                                                      int64_t ldp) {                                                 \
        project_multi(G, m, d, ld, X, ldx, k, P, ldp, AT, ES);                                                       \
    }                                                                                                                \
    MULTIVERSION void rank1inv_combine_multi_##SUFFIX(const void *G, int64_t m, int64_t d, int64_t ld,               \
                                                      const double *C, int64_t ldc, const double *X, int64_t ldx,    \
                                                      int64_t k, double alpha, double beta, double *Y,               \
                                                      int64_t ldy) {                                                 \
        combine_multi(G, m, d, ld, C, ldc, X, ldx, k, alpha, beta, Y, ldy, AT, ES);                                  \
    }                                                                                                                \
    MULTIVERSION void rank1inv_project_blocks_##SUFFIX(const void *G, int64_t nb, int64_t sb, int64_t m, int64_t d,  \
                                                       int64_t ld, const double *x, double *p) {                     \
        for (int64_t b = 0; b < nb; ++b)                                                                             \
            project((const char *)G + b * sb * (ES), m, d, ld, x + b * d, p + b * m, AT, ES);                        \
    }                                                                                                                \
    MULTIVERSION void rank1inv_combine_blocks_##SUFFIX(const void *G, int64_t nb, int64_t sb, int64_t m, int64_t d,  \
                                                       int64_t ld, const double *c, const double *x, double alpha,   \
                                                       double beta, double *y) {                                     \
        for (int64_t b = 0; b < nb; ++b)                                                                             \
            combine((const char *)G + b * sb * (ES), m, d, ld, c + b * m, x ? x + b * d : 0, alpha, beta, y + b * d, \
                    AT, ES);                                                                                         \
    }

EXPORT_PASSES(f32, f32_at, 4)
EXPORT_PASSES(bf16, bf16_at, 2)
EXPORT_PASSES(f16, f16_at, 2)

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "rank1inv's compiled CPU kernels (called through ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
