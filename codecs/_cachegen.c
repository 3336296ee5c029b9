/*
 * CacheGen entropy coder: the CPU fast path of kvstore.codecs.cachegen.
 *
 * One "stream" is a [tokens, channels] slab; Python passes one per (layer,
 * K/V), with channels = kv_heads x head_dim (rows are contiguous in the LKTHD
 * layout).  Each stream is coded on its own.  Worker threads (Python's, with
 * the GIL released here) claim streams one at a time from a shared atomic
 * counter, so a core slowed down by other work simply takes fewer streams.
 *
 * Per stream the encoder
 *   1. quantizes every value on a fixed grid, q = rint(x / step);
 *   2. for every channel, measures four predictors (EMA of the channel with
 *      shift 0 = previous token, 2 and 5, and the group anchor) and keeps the
 *      one whose residuals cost least under the best-fitting distribution of a
 *      fixed library (256 entries: discretized Laplace and Gaussian shapes
 *      over a grid of scales);
 *   3. maps residuals to symbols j = r >> shift in [-32, 32) (ESC otherwise,
 *      with j stored aside as a zigzag varint) plus `shift` raw low bits, row
 *      by row and fused with the residuals (vector code; a scalar pass runs
 *      only for rows with escapes or raw bits);
 *   4. codes the symbols with 16 interleaved rANS lanes that share one stream
 *      of 16-bit words, in lock-step: symbol i goes to lane i % 16, and at
 *      each step the lanes that renormalize read their word in lane order.
 *      That is the layout of interleaved SIMD rANS: the AVX2 coder handles
 *      the 16 lanes as two vectors of 8 (a movemask, a popcount and a
 *      permutation per vector and step), a GPU would use one thread per lane
 *      (a ballot and a popcount), and the scalar coder gives the same bytes.
 *
 * Since the predictors run on the integer grid, prediction is lossless: the
 * only loss is the rounding of step 1, and errors never propagate.
 *
 * The decoder checks everything it reads: a word stream that runs out or is
 * not fully consumed, a lane that does not end in the initial state, an
 * escape list of the wrong length all fail with a clear message; decoding
 * never reads or writes out of bounds and always ends after T*D symbols.
 *
 * Scratch memory is per thread and kept between calls (it grows to the
 * largest stream seen: about 6 bytes per element of one stream), so a chunk
 * costs no allocation and no page faults in the hot path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

#define PROB_BITS 12
#define PROB_SCALE (1u << PROB_BITS)
#define NSYM 65 /* j in [-32, 32) plus ESC */
#define ESC 64
#define JOFF 32
#define NENT 256
#define RANS_L (1u << 15) /* states live in [2^15, 2^31) */
#define LANES 16
#define EMA_F 8
#define QMAX (1 << 21) /* |q| bound (the step floor keeps real data below 2^20): int32 predictors never overflow */
#define MAX_SHIFT 24
#define MAX_FREQ (PROB_SCALE - 64) /* every symbol costs >= 0.0227 bits: bounds the output per input byte */
#define WORD_SLACK 8 /* words the vector encoder may scribble below its output: part of the capacity */

enum { DT_F16 = 0, DT_BF16 = 1, DT_F32 = 2 };
enum { MODE_EMA0 = 0, MODE_EMA2 = 1, MODE_EMA5 = 2, MODE_ANCHOR = 3, NMODES = 4 };
static const int EMA_K[3] = {0, 2, 5};

typedef struct {
    uint32_t xmax; /* renormalize (emit a word) while x >= xmax */
    uint32_t rcp;  /* fixed-point reciprocal of freq (Alverson) */
    uint32_t bias;
    uint32_t cmpl; /* PROB_SCALE - freq */
    uint32_t rshift;
} EncSym;

static uint16_t g_freq[NENT][NSYM];
static uint8_t g_shift[NENT];
static int32_t g_jlo[NENT], g_jhi[NENT]; /* codable j of an entry: [jlo, jhi], frequencies > 0 */
static EncSym g_enc[NENT][NSYM];
static uint32_t g_fc[NENT * NSYM];            /* freq | cum << 16: the vector encoder gathers it */
static uint32_t g_dec[NENT][PROB_SCALE];      /* freq | (slot - cum) << 12 | sym << 24, by slot */
static int32_t g_expand[256][8];              /* decoder: lane i takes word popcount(mask & ((1 << i) - 1)) */
static int32_t g_compact[256][8];             /* encoder: emitted lanes' words, ascending, at the top */
/* Encoder-side model of each entry (only steers choices; never affects decoding). */
static double g_mean[NENT]; /* E|r| for Laplace entries, E r^2 for Gaussian ones */
static double g_lam[NENT];  /* d(code length)/d(statistic), bits */
static double g_ent[NENT];  /* entropy incl. raw bits, bits per symbol */
static int g_ready = 0;
static int g_simd = 0; /* AVX2 coders usable on this CPU */
static int cpu_has_simd(void);

/* ------------------------------------------------------------------ dtypes */

/* Row loops get an AVX2+F16C clone (fp16 conversions become single
 * instructions, row loops vectorize) and a baseline one; the loader picks. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HOT
#endif
/* The hand-written AVX2/F16C code: compiled for those instructions whatever
 * the build flags, called only when the CPU has them (g_simd). */
#if HAVE_X86
#define AVX2 __attribute__((target("avx2,bmi,bmi2,popcnt,f16c,fma")))
#else
#define AVX2
#endif
#define INLINE static inline __attribute__((always_inline))

INLINE float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE uint16_t f32_to_bf16(float f) {
    /* Round to nearest even, NaN to the canonical quiet NaN: what torch does. */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return f != f ? 0x7fc0 : (uint16_t)r;
}

#if HAVE_X86
/* fp16 rows with F16C: gcc does not vectorize _Float16 conversions by itself. */
AVX2 static void f16_to_f32_avx2(const uint16_t *restrict p, int D, float *restrict out) {
    int c = 0;
    for (; c + 8 <= D; c += 8) _mm256_storeu_ps(out + c, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + c))));
    for (; c < D; c++) out[c] = _cvtsh_ss(p[c]);
}

AVX2 static void f32_to_f16_avx2(const float *restrict v, int D, uint16_t *restrict p) {
    int c = 0;
    for (; c + 8 <= D; c += 8)
        _mm_storeu_si128((__m128i *)(p + c), _mm256_cvtps_ph(_mm256_loadu_ps(v + c), _MM_FROUND_TO_NEAREST_INT));
    for (; c < D; c++) p[c] = _cvtss_sh(v[c], _MM_FROUND_TO_NEAREST_INT);
}
#endif

/* One row of D values, converted to float. */
INLINE void load_row(const void *restrict x, int dt, int64_t base, int D, float *restrict out) {
    if (dt == DT_F16) {
#if HAVE_X86
        if (g_simd) {
            f16_to_f32_avx2((const uint16_t *)x + base, D, out);
            return;
        }
#endif
        const _Float16 *p = (const _Float16 *)x + base;
        for (int c = 0; c < D; c++) out[c] = (float)p[c];
    } else if (dt == DT_BF16) {
        const uint16_t *p = (const uint16_t *)x + base;
        for (int c = 0; c < D; c++) out[c] = bf16_to_f32(p[c]);
    } else {
        const float *p = (const float *)x + base;
        for (int c = 0; c < D; c++) out[c] = p[c];
    }
}

/* ------------------------------------------------------------- the library */

static PyObject *py_set_library(PyObject *self, PyObject *args) {
    Py_buffer freq, shift, mean, lam, ent;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*", &freq, &shift, &mean, &lam, &ent)) return NULL;
    PyObject *ret = NULL;
    if (freq.len != (Py_ssize_t)sizeof(g_freq) || shift.len != NENT || mean.len != NENT * 8 ||
        lam.len != NENT * 8 || ent.len != NENT * 8) {
        PyErr_SetString(PyExc_ValueError, "library buffers have the wrong size");
        goto done;
    }
    const uint16_t *f = (const uint16_t *)freq.buf;
    const uint8_t *sh = (const uint8_t *)shift.buf;
    for (int e = 0; e < NENT; e++) {
        uint32_t total = 0;
        int first = -1, last = -1, gaps = 0;
        for (int s = 0; s < NSYM; s++) {
            uint16_t v = f[e * NSYM + s];
            if ((s == ESC && v == 0) || v > MAX_FREQ) {
                PyErr_SetString(PyExc_ValueError, "library: escape needs a frequency, none above 4032");
                goto done;
            }
            if (s < ESC && v) {
                gaps += last >= 0 && s != last + 1;
                if (first < 0) first = s;
                last = s;
            }
            total += v;
        }
        if (total != PROB_SCALE || sh[e] > MAX_SHIFT) {
            PyErr_SetString(PyExc_ValueError, "library: frequencies must sum to 4096, shift <= 24");
            goto done;
        }
        /* The vector symbol mapper tests a range, not the table: the codable
         * symbols of an entry must be contiguous (true of unimodal shapes). */
        if (gaps) {
            PyErr_SetString(PyExc_ValueError, "library: an entry's nonzero frequencies must be contiguous");
            goto done;
        }
        g_jlo[e] = first < 0 ? 1 : first - JOFF;
        g_jhi[e] = first < 0 ? 0 : last - JOFF;
    }
    for (int e = 0; e < NENT; e++) {
        uint32_t c = 0;
        g_shift[e] = sh[e];
        for (int s = 0; s < NSYM; s++) {
            uint32_t fr = f[e * NSYM + s];
            g_freq[e][s] = (uint16_t)fr;
            g_fc[e * NSYM + s] = fr | (c << 16);
            for (uint32_t k = 0; k < fr; k++) g_dec[e][c + k] = fr | (k << 12) | ((uint32_t)s << 24);
            EncSym *es = &g_enc[e][s];
            es->xmax = ((RANS_L >> PROB_BITS) << 16) * fr;
            es->cmpl = PROB_SCALE - fr;
            if (fr < 2) {
                es->rcp = ~0u;
                es->rshift = 0;
                es->bias = c + PROB_SCALE - 1;
            } else {
                uint32_t b = 0;
                while (fr > (1u << b)) b++;
                es->rcp = (uint32_t)(((1ull << (b + 31)) + fr - 1) / fr);
                es->rshift = b - 1;
                es->bias = c;
            }
            es->rshift += 32;
            c += fr;
        }
    }
    for (int m = 0; m < 256; m++) {
        int cnt = __builtin_popcount((unsigned)m), k = 0;
        for (int i = 0; i < 8; i++) {
            g_expand[m][i] = __builtin_popcount((unsigned)m & ((1u << i) - 1));
            g_compact[m][i] = 0;
        }
        for (int i = 0; i < 8; i++)
            if (m & (1 << i)) g_compact[m][8 - cnt + k++] = i;
    }
    memcpy(g_mean, mean.buf, sizeof(g_mean));
    memcpy(g_lam, lam.buf, sizeof(g_lam));
    memcpy(g_ent, ent.buf, sizeof(g_ent));
    g_simd = cpu_has_simd() && getenv("KVSTORE_CODEC_NO_SIMD") == NULL;
    g_ready = 1;
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&freq);
    PyBuffer_Release(&shift);
    PyBuffer_Release(&mean);
    PyBuffer_Release(&lam);
    PyBuffer_Release(&ent);
    return ret;
}

/* Best entry of [lo, lo+128) for statistic m: code length per symbol is
 * ent + lam * (m - mean) (exact for an exponential family member). */
static int best_entry(int lo, double m, double *cost) {
    int a = lo, b = lo + 127;
    while (a < b) { /* first entry with mean >= m */
        int mid = (a + b) / 2;
        if (g_mean[mid] < m) a = mid + 1;
        else b = mid;
    }
    int best = a;
    double bc = 1e300;
    for (int e = a - 2; e <= a + 1; e++) {
        if (e < lo || e >= lo + 128) continue;
        double c = g_ent[e] + g_lam[e] * (m - g_mean[e]);
        if (c < bc) bc = c, best = e;
    }
    *cost = bc;
    return best;
}

static int choose_entry(double s1, double s2, double n, double *cost) {
    double cl, cg;
    int el = best_entry(0, s1 / n, &cl);
    int eg = best_entry(128, s2 / n, &cg);
    if (cl <= cg) {
        *cost = cl;
        return el;
    }
    *cost = cg;
    return eg;
}

/* --------------------------------------------------------------- bit I/O */

typedef struct {
    uint8_t *out;
    int64_t pos; /* bytes written */
    uint64_t acc;
    int nbits;
} BitWriter;

static inline void bw_put(BitWriter *w, uint32_t v, int n) {
    w->acc |= (uint64_t)v << w->nbits;
    w->nbits += n;
    while (w->nbits >= 8) {
        w->out[w->pos++] = (uint8_t)w->acc;
        w->acc >>= 8;
        w->nbits -= 8;
    }
}

static inline void bw_flush(BitWriter *w) {
    if (w->nbits > 0) w->out[w->pos++] = (uint8_t)w->acc;
    w->acc = 0;
    w->nbits = 0;
}

/* Read n <= 24 bits at bit offset `off` of a buffer of `len` bytes (caller checked bounds). */
static inline uint32_t bits_at(const uint8_t *p, int64_t len, int64_t off, int n) {
    int64_t byte = off >> 3;
    uint64_t v;
    if (byte + 8 <= len) {
        memcpy(&v, p + byte, 8); /* little-endian host, see module init */
    } else {
        v = 0;
        for (int k = 0; byte + k < len && k < 8; k++) v |= (uint64_t)p[byte + k] << (8 * k);
    }
    return (uint32_t)((v >> (off & 7)) & ((1u << n) - 1));
}

/* ------------------------------------------------------------ predictors */

/* Predictor state per channel, int32 throughout so row loops vectorize:
 * |q| <= QMAX = 2^21 keeps q * 2^EMA_F and every difference below 2^31. */
INLINE int32_t ema_pred(int32_t m) { return (m + (1 << (EMA_F - 1))) >> EMA_F; }
INLINE int32_t ema_next(int32_t m, int32_t q, int k) { return m + ((q * (1 << EMA_F) - m) >> k); }

/* ------------------------------------------------------- per-thread scratch */

typedef struct {
    void *p;
    size_t n;
} Scratch;

/* A per-thread buffer of at least n bytes, kept for the next call (NULL: out of memory). */
static void *scratch(Scratch *s, size_t n) {
    if (s->n < n) {
        free(s->p);
        s->n = 0;
        s->p = aligned_alloc(64, (n + 63) & ~(size_t)63);
        if (!s->p) return NULL;
        s->n = n;
    }
    return s->p;
}

static __thread Scratch t_q, t_sym, t_work, t_words;

/* ---------------------------------------------------------------- encode */

typedef struct {
    int T, H, D, G, dt;
} Geo;

static inline int64_t elem_index(const Geo *g, int64_t stream, int t, int c) {
    int64_t lk = stream / g->H, h = stream % g->H;
    return ((lk * g->T + t) * g->H + h) * g->D + c;
}

/* Grid quantization of one stream into q[T*D]. */
HOT static void quantize_stream(const void *restrict x, const Geo *g, int64_t s, float step, int32_t *restrict q,
                                float *restrict row) {
    const int T = g->T, D = g->D;
    const float inv = 1.0f / step;
    const int64_t base0 = elem_index(g, s, 0, 0), stride = (int64_t)g->H * D;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds to nearest even */
    for (int t = 0; t < T; t++) {
        load_row(x, g->dt, base0 + t * stride, D, row);
        int32_t *qr = q + (int64_t)t * D;
        for (int c = 0; c < D; c++) {
            float y = row[c] * inv;
            y = y == y ? y : 0.0f;
            y = y > (float)QMAX ? (float)QMAX : y;
            y = y < -(float)QMAX ? -(float)QMAX : y;
            qr[c] = (int32_t)((y + magic) - magic);
        }
    }
}

/* Sum of |r| and r^2 of every predictor, per channel (float: they only steer choices). */
HOT static void measure_predictors(const int32_t *restrict q, int T, int D, int G, int32_t *restrict m,
                                   float *restrict s1, float *restrict s2) {
    /* m: [4][D] states (EMA0, EMA2, EMA5, anchor); s1, s2: [4][D]. */
    for (int md = 0; md < NMODES; md++)
        for (int c = 0; c < D; c++) {
            m[md * D + c] = md == MODE_ANCHOR ? q[c] : q[c] * (1 << EMA_F);
            s1[md * D + c] = s2[md * D + c] = 0.0f;
        }
    for (int t = 1; t < T; t++) {
        const int32_t *v = q + (int64_t)t * D;
        for (int md = 0; md < 3; md++) {
            const int k = EMA_K[md];
            int32_t *mm = m + md * D;
            float *a = s1 + md * D, *b = s2 + md * D;
            for (int c = 0; c < D; c++) {
                float r = (float)(v[c] - ema_pred(mm[c]));
                a[c] += fabsf(r);
                b[c] += r * r;
                mm[c] = ema_next(mm[c], v[c], k);
            }
        }
        int32_t *anc = m + MODE_ANCHOR * D;
        float *a = s1 + MODE_ANCHOR * D, *b = s2 + MODE_ANCHOR * D;
        const int anchor_row = (t % G) == 0;
        for (int c = 0; c < D; c++) {
            float r = (float)(v[c] - anc[c]);
            a[c] += fabsf(r);
            b[c] += r * r;
            anc[c] = anchor_row ? v[c] : anc[c];
        }
    }
}

HOT static void moments_stream(const void *restrict x, const Geo *g, int64_t s, int every, double *restrict so,
                               double *restrict qo, float *restrict row) {
    const int D = g->D;
    for (int c = 0; c < D; c++) so[c] = qo[c] = 0.0;
    const int64_t base0 = elem_index(g, s, 0, 0), stride = (int64_t)g->H * D;
    for (int t = 0; t < g->T; t += every) {
        load_row(x, g->dt, base0 + t * stride, D, row);
        for (int c = 0; c < D; c++) {
            float v = row[c];
            v = ((v == v) & (v < 3e38f) & (v > -3e38f)) ? v : 0.0f; /* NaN/inf must not poison the step */
            so[c] += v;
            qo[c] += (double)v * v;
        }
    }
}

/* The grid step of a stream from its sampled per-channel sums: the RMS of
 * the channel-centred values times the level's scale, floored so that |q|
 * stays below about 2^20.  layer_steps() in cachegen.py computes the same
 * (float64, channels summed in order), for the torch path. */
static float stream_step(const double *so, const double *qo, int D, double samples, double scale) {
    double var = 0, qsum = 0, qmax = qo[0];
    for (int c = 0; c < D; c++) {
        const double m = so[c] / samples;
        const double v = qo[c] / samples - m * m;
        var += v > 0 ? v : 0.0;
        qsum += qo[c];
        qmax = qo[c] > qmax ? qo[c] : qmax;
    }
    double spread = sqrt(var / D);
    const double whole = sqrt(qsum / D / samples);
    spread = spread > 0 ? spread : whole > 0 ? whole : 1.0;
    const double floor_ = sqrt(qmax) / (double)(1 << 20);
    double st = scale * spread;
    st = st >= floor_ ? st : floor_;
    st = isfinite(st) && st > 0 ? st : 1.0;
    return (float)st;
}

/* Per-channel coding parameters of a stream's rows after the first. */
typedef struct {
    int32_t *anchor; /* -1 where the channel uses the anchor predictor, else 0 */
    int32_t *k;      /* EMA shift */
    int32_t *m;      /* predictor state */
    int32_t *b;      /* raw low bits */
    int32_t *lo, *hi; /* codable j range */
    int32_t *r;      /* one row of residuals */
} RowCtx;

/* Residuals of one row (t >= 1) against the chosen predictors, then their
 * symbols; returns nonzero when some symbol escapes.  Vectorizes. */
HOT static int encode_row(const int32_t *restrict v, int D, int anchor_row, const int32_t *restrict anchor,
                          const int32_t *restrict kk, int32_t *restrict m, const int32_t *restrict b,
                          const int32_t *restrict lo, const int32_t *restrict hi, int32_t *restrict r,
                          uint8_t *restrict sym) {
    int esc = 0;
    for (int c = 0; c < D; c++) {
        const int32_t mc = m[c], vc = v[c];
        const int32_t pred = anchor[c] ? mc : ema_pred(mc);
        const int32_t rv = vc - pred;
        const int32_t next_anchor = anchor_row ? vc : mc;
        m[c] = anchor[c] ? next_anchor : ema_next(mc, vc, kk[c]);
        r[c] = rv;
        const int32_t j = rv >> b[c]; /* floor division: gcc shifts arithmetically */
        const int ok = (j >= lo[c]) & (j <= hi[c]);
        esc |= !ok;
        sym[c] = (uint8_t)(ok ? j + JOFF : ESC);
    }
    return esc;
}

/* Raw low bits and escapes of one row, in symbol order. */
static uint32_t row_extras(const int32_t *r, const uint8_t *sym, int D, const int32_t *b, int with_bits, BitWriter *bw,
                           uint8_t *esc, uint32_t ne) {
    for (int c = 0; c < D; c++) {
        const int bc = b[c];
        const int32_t rv = r[c];
        const int32_t j = rv >> bc;
        if (with_bits && bc) bw_put(bw, (uint32_t)(rv - j * (1 << bc)), bc);
        if (sym[c] == ESC) {
            uint32_t z = j < 0 ? ((uint32_t)(-(j + 1)) << 1) | 1u : (uint32_t)j << 1;
            do {
                uint8_t byte = z & 0x7f;
                z >>= 7;
                esc[ne++] = byte | (z ? 0x80 : 0);
            } while (z);
        }
    }
    return ne;
}

/* Entry of each lane for the rANS step that starts at symbol i0 (rows of D). */
INLINE const uint8_t *step_entries(int64_t i0, int D, int aligned, int row0, const uint8_t *ent, uint8_t *etab,
                                   const uint8_t *row0tab) {
    if (aligned) return i0 < D ? row0tab : ent + (i0 % D);
    for (int l = 0; l < LANES; l++) {
        int64_t i = i0 + l;
        etab[l] = i < D ? (uint8_t)row0 : ent[i % D];
    }
    return etab;
}

/* rANS encoder, scalar: backwards, lanes in reverse order so that the decoder,
 * going forwards, reads each step's words in lane order.  `out` points one
 * past the end of the word buffer; returns the new start, NULL if full. */
static uint16_t *rans_encode_scalar(const uint8_t *sym, int64_t n, int D, int row0, const uint8_t *ent,
                                    uint16_t *words, uint16_t *out, uint32_t *st) {
    uint8_t etab[LANES], row0tab[LANES];
    memset(row0tab, row0, LANES);
    const int aligned = D % LANES == 0;
    const int64_t nsteps = (n + LANES - 1) / LANES;
    for (int64_t k = nsteps - 1; k >= 0; k--) {
        if (out - words < LANES) return NULL;
        const uint8_t *ep = step_entries(k * LANES, D, aligned && (k + 1) * LANES <= n, row0, ent, etab, row0tab);
        for (int l = LANES - 1; l >= 0; l--) {
            int64_t i = k * LANES + l;
            if (i >= n) continue;
            const EncSym *es = &g_enc[ep[l]][sym[i]];
            uint32_t xs = st[l];
            /* Branch-free renormalization (taken ~1 time in 6, unpredictably):
             * always store, advance only when the word is really emitted. */
            const int emit = xs >= es->xmax;
            out[-1] = (uint16_t)xs;
            out -= emit;
            xs = emit ? xs >> 16 : xs;
            uint32_t qq = (uint32_t)(((uint64_t)xs * es->rcp) >> es->rshift);
            st[l] = xs + es->bias + qq * es->cmpl;
        }
    }
    return out;
}

/* The rANS encoding state of one stream: symbols in, words out (backwards). */
typedef struct {
    const uint8_t *sym;
    const uint8_t *ent;
    int row0;
    uint16_t *words; /* start of the word buffer */
    uint16_t *out;   /* words written so far start here */
    uint32_t st[LANES];
} Enc;

#if HAVE_X86
/* One vector of 8 lanes of an encoder step: emit words (stored, ascending by
 * lane, just below *out), then x = (x / f) * 4096 + x % f + cum.  The division
 * runs in double precision, where the quotient of two integers below 2^31 is
 * exact after truncation (IEEE division rounds correctly). */
AVX2 static inline __m256i enc_vec(__m256i x, __m256i e, __m256i s, uint16_t **out) {
    const __m256i fc = _mm256_i32gather_epi32((const int *)g_fc, _mm256_add_epi32(_mm256_mullo_epi32(e, _mm256_set1_epi32(NSYM)), s), 4);
    const __m256i f = _mm256_and_si256(fc, _mm256_set1_epi32(0xffff));
    const __m256i cum = _mm256_srli_epi32(fc, 16);
    const __m256i xmax = _mm256_slli_epi32(f, 19); /* ((RANS_L >> 12) << 16) * f */
    const __m256i emit = _mm256_cmpgt_epi32(x, _mm256_sub_epi32(xmax, _mm256_set1_epi32(1)));
    /* Branch-free: some lane emits in most steps, unpredictably. */
    const int mask = _mm256_movemask_ps(_mm256_castsi256_ps(emit));
    const __m256i w = _mm256_and_si256(x, _mm256_set1_epi32(0xffff));
    const __m256i packed = _mm256_permutevar8x32_epi32(w, _mm256_load_si256((const __m256i *)g_compact[mask]));
    const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(packed, packed), 0x08);
    _mm_storeu_si128((__m128i *)(*out - 8), _mm256_castsi256_si128(w16));
    *out -= __builtin_popcount((unsigned)mask);
    x = _mm256_blendv_epi8(x, _mm256_srli_epi32(x, 16), emit);
    const __m128i xl = _mm256_castsi256_si128(x), xh = _mm256_extracti128_si256(x, 1);
    const __m128i fl = _mm256_castsi256_si128(f), fh = _mm256_extracti128_si256(f, 1);
    const __m128i ql = _mm256_cvttpd_epi32(_mm256_div_pd(_mm256_cvtepi32_pd(xl), _mm256_cvtepi32_pd(fl)));
    const __m128i qh = _mm256_cvttpd_epi32(_mm256_div_pd(_mm256_cvtepi32_pd(xh), _mm256_cvtepi32_pd(fh)));
    const __m256i q = _mm256_set_m128i(qh, ql);
    const __m256i cmpl = _mm256_sub_epi32(_mm256_set1_epi32(PROB_SCALE), f);
    return _mm256_add_epi32(_mm256_add_epi32(x, cum), _mm256_mullo_epi32(q, cmpl));
}

/* The AVX2 encoder: same words as rans_encode_scalar, for D % 16 == 0.  With
 * two streams (b != NULL) their steps are interleaved, as in the decoder, so
 * two independent dependency chains (divide, multiply) overlap.  Returns 0,
 * or -1 if an output buffer would overflow. */
AVX2 static int rans_encode_avx2(Enc *a, Enc *b, int64_t n, int D) {
    __m256i xa0 = _mm256_loadu_si256((const __m256i *)a->st), xa1 = _mm256_loadu_si256((const __m256i *)(a->st + 8));
    __m256i xb0 = xa0, xb1 = xa1;
    const __m256i ra = _mm256_set1_epi32(a->row0);
    __m256i rb = ra;
    Enc *bb = b ? b : a;
    if (b) {
        xb0 = _mm256_loadu_si256((const __m256i *)b->st);
        xb1 = _mm256_loadu_si256((const __m256i *)(b->st + 8));
        rb = _mm256_set1_epi32(b->row0);
    }
    uint16_t *oa = a->out, *ob = bb->out;
    const int64_t nsteps = n / LANES;
    int c = (int)((n - LANES) % D); /* column of the step's first symbol, counted down */
    for (int64_t k = nsteps - 1; k >= 0; k--, c = c ? c - LANES : D - LANES) {
        if (oa - a->words < LANES + WORD_SLACK || ob - bb->words < LANES + WORD_SLACK) return -1;
        const int64_t i0 = k * LANES;
        __m256i ea0, ea1, eb0, eb1;
        if (i0 < D) {
            ea0 = ea1 = ra;
            eb0 = eb1 = rb;
        } else {
            ea0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(a->ent + c)));
            ea1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(a->ent + c + 8)));
            eb0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bb->ent + c)));
            eb1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bb->ent + c + 8)));
        }
        xa1 = enc_vec(xa1, ea1, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(a->sym + i0 + 8))), &oa);
        xa0 = enc_vec(xa0, ea0, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(a->sym + i0))), &oa);
        if (b) {
            xb1 = enc_vec(xb1, eb1, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b->sym + i0 + 8))), &ob);
            xb0 = enc_vec(xb0, eb0, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b->sym + i0))), &ob);
        }
    }
    _mm256_storeu_si256((__m256i *)a->st, xa0);
    _mm256_storeu_si256((__m256i *)(a->st + 8), xa1);
    a->out = oa;
    if (b) {
        _mm256_storeu_si256((__m256i *)b->st, xb0);
        _mm256_storeu_si256((__m256i *)(b->st + 8), xb1);
        b->out = ob;
    }
    return 0;
}
#endif

/* Returns 0, -1 when a buffer is too small (cannot happen with the Python-side
 * bounds), -2 when out of memory. */
/* Step, predictors, entries, symbols (into sym), raw bits and escapes of one
 * stream.  Returns 0, or -2 when out of memory. */
static int enc_symbols(const void *x, const Geo *g, int64_t s, double scale, int every, float *step_out,
                       uint8_t *ent_out, uint8_t *mode_out, uint8_t *row0_out, uint8_t *raw, uint32_t *nraw,
                       uint8_t *esc, uint32_t *nesc, uint8_t *sym) {
    const int T = g->T, D = g->D;
    const int64_t n = (int64_t)T * D;
    int32_t *q = scratch(&t_q, (size_t)n * 4);
    /* work: row[D] | s1[4D] | s2[4D] | m[4D] | anchor, k, b, lo, hi, r [D each] | sums, sumsq [D doubles each] */
    float *work = scratch(&t_work, (size_t)D * 19 * 4 + (size_t)D * 16);
    if (!q || !work) return -2;
    double *sums = (double *)(work + 19 * D), *sumsq = sums + D;
    float *row = work, *s1 = work + D, *s2 = work + 5 * D;
    int32_t *m = (int32_t *)(work + 9 * D);
    RowCtx rc = {(int32_t *)(work + 13 * D), (int32_t *)(work + 14 * D), m, (int32_t *)(work + 15 * D),
                 (int32_t *)(work + 16 * D), (int32_t *)(work + 17 * D), (int32_t *)(work + 18 * D)};

    /* The step from every `every`-th token: the stream is small enough to
     * stay in cache for the quantization pass that follows. */
    moments_stream(x, g, s, every, sums, sumsq, row);
    const float step = stream_step(sums, sumsq, D, (double)((T + every - 1) / every), scale);
    *step_out = step;
    quantize_stream(x, g, s, step, q, row);

    /* Row 0 is coded with one table for the whole stream (it carries the channel means). */
    {
        double a = 0, b = 0, cost;
        for (int c = 0; c < D; c++) {
            double v = q[c];
            a += fabs(v);
            b += v * v;
        }
        *row0_out = (uint8_t)choose_entry(a, b, D, &cost);
    }

    measure_predictors(q, T, D, g->G, m, s1, s2);
    int with_bits = 0;
    for (int c = 0; c < D; c++) {
        int best_mode = 0, best_e = 0;
        double best_cost = 1e300;
        if (T > 1) {
            for (int md = 0; md < NMODES; md++) {
                double cost;
                int e = choose_entry(s1[md * D + c], s2[md * D + c], T - 1, &cost);
                if (cost < best_cost) best_cost = cost, best_mode = md, best_e = e;
            }
        }
        mode_out[c] = (uint8_t)best_mode;
        ent_out[c] = (uint8_t)best_e;
        rc.anchor[c] = best_mode == MODE_ANCHOR ? -1 : 0;
        rc.k[c] = best_mode == MODE_ANCHOR ? 0 : EMA_K[best_mode];
        rc.m[c] = best_mode == MODE_ANCHOR ? q[c] : q[c] * (1 << EMA_F);
        rc.b[c] = g_shift[best_e];
        rc.lo[c] = g_jlo[best_e];
        rc.hi[c] = g_jhi[best_e];
        with_bits |= rc.b[c] != 0;
    }

    /* Symbols, raw low bits and escapes, in symbol order. */
    BitWriter bw = {raw, 0, 0, 0};
    uint32_t ne = 0;
    {
        const int e0 = *row0_out, b0 = g_shift[e0];
        for (int c = 0; c < D; c++) {
            const int32_t rv = q[c], j = rv >> b0;
            const int ok = j >= g_jlo[e0] && j <= g_jhi[e0];
            sym[c] = (uint8_t)(ok ? j + JOFF : ESC);
            rc.r[c] = b0; /* row 0 uses the row-0 entry's shift everywhere */
        }
        ne = row_extras(q, sym, D, rc.r, 1, &bw, esc, ne);
    }
    for (int t = 1; t < T; t++) {
        uint8_t *sr = sym + (int64_t)t * D;
        const int e = encode_row(q + (int64_t)t * D, D, (t % g->G) == 0, rc.anchor, rc.k, rc.m, rc.b, rc.lo, rc.hi,
                                 rc.r, sr);
        if (e | with_bits) ne = row_extras(rc.r, sr, D, rc.b, with_bits, &bw, esc, ne);
    }
    bw_flush(&bw);
    *nraw = (uint32_t)bw.pos;
    *nesc = ne;
    return 0;
}

typedef struct {
    const void *x;
    const double *scales;
    int every;
    float *steps;
    uint8_t *ent, *modes, *row0;
    uint16_t *words;
    int64_t cap_words;
    uint32_t *nwords;
    uint8_t *raw;
    int64_t cap_raw;
    uint32_t *nraw;
    uint8_t *esc;
    int64_t cap_esc;
    uint32_t *nesc;
} EncArgs;

/* Encode streams s and s + 1 (when count == 2): symbols of each, then their
 * rANS words, interleaved.  The words run backwards into per-thread scratch
 * and are copied to the start of each stream's region, so the caller's
 * buffer is touched only as far as the output reaches.  Returns 0, -1 when a
 * buffer is too small (cannot happen with the Python-side bounds), -2 when
 * out of memory. */
static int enc_streams(const Geo *g, const EncArgs *A, int64_t s, int count) {
    const int D = g->D;
    const int64_t n = (int64_t)g->T * D, cw = A->cap_words;
    uint8_t *symbuf = scratch(&t_sym, 2 * (size_t)n + 64);
    uint16_t *wbuf = scratch(&t_words, 2 * (size_t)cw * 2);
    if (!symbuf || !wbuf) return -2;
    Enc enc[2];
    for (int k = 0; k < count; k++) {
        const int64_t t = s + k;
        int rc = enc_symbols(A->x, g, t, A->scales[t], A->every, A->steps + t, A->ent + t * D, A->modes + t * D,
                             A->row0 + t, A->raw + t * A->cap_raw, A->nraw + t, A->esc + t * A->cap_esc, A->nesc + t,
                             symbuf + k * n);
        if (rc) return rc;
        enc[k] = (Enc){symbuf + k * n, A->ent + t * D, A->row0[t], wbuf + k * cw, wbuf + (k + 1) * cw, {0}};
        for (int l = 0; l < LANES; l++) enc[k].st[l] = RANS_L;
    }
#if HAVE_X86
    if (g_simd && D % LANES == 0) {
        if (rans_encode_avx2(&enc[0], count == 2 ? &enc[1] : NULL, n, D)) return -1;
    } else
#endif
    {
        for (int k = 0; k < count; k++) {
            enc[k].out = rans_encode_scalar(enc[k].sym, n, D, enc[k].row0, enc[k].ent, enc[k].words, enc[k].out,
                                            enc[k].st);
            if (!enc[k].out) return -1;
        }
    }
    for (int k = 0; k < count; k++) {
        uint16_t *out = enc[k].out;
        if (out - enc[k].words < 2 * LANES) return -1;
        for (int l = LANES - 1; l >= 0; l--) {
            *--out = (uint16_t)enc[k].st[l];
            *--out = (uint16_t)(enc[k].st[l] >> 16);
        }
        const int64_t nw = (enc[k].words + cw) - out;
        memcpy(A->words + (s + k) * cw, out, (size_t)nw * 2);
        A->nwords[s + k] = (uint32_t)nw;
    }
    return 0;
}

static int get_geo(Geo *g, int dt, int T, int H, int D, int G) {
    if (dt < 0 || dt > 2 || T < 1 || H < 1 || D < 1 || G < 1 || T > (1 << 20) || D > (1 << 16)) {
        PyErr_SetString(PyExc_ValueError, "bad geometry");
        return -1;
    }
    g->dt = dt;
    g->T = T;
    g->H = H;
    g->D = D;
    g->G = G;
    return 0;
}

static int need(Py_buffer *b, int64_t bytes, const char *what) {
    if (b->len < bytes) {
        PyErr_Format(PyExc_ValueError, "buffer %s too small", what);
        return -1;
    }
    return 0;
}

/* The next stream of [0, s_end) for this worker, from the shared counter. */
static inline int64_t claim(int64_t *counter) { return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED); }

/* encode(x, dtype, T, H, D, G, every, nstreams, counter, scales, steps, ent, modes, row0, words, cap_words,
 *        nwords, raw, cap_raw, nraw, esc, cap_esc, nesc)
 * scales: float64 per stream (level base x depth factor); the step of each
 * stream (float32, written to steps) is scale x its spread, measured over
 * every `every`-th token.  Per-stream outputs are indexed by stream;
 * words/raw/esc have one region of cap_* items per stream.  Every worker calls this with the same counter
 * (int64[1], initially 0) and encodes the streams it claims. */
static PyObject *py_encode(PyObject *self, PyObject *args) {
    Py_buffer x, counter, scales, steps, ent, modes, row0, words, nwords, raw, nraw, esc, nesc;
    int dt, T, H, D, G, every;
    Py_ssize_t ns, cap_words, cap_raw, cap_esc;
    if (!PyArg_ParseTuple(args, "y*iiiiiinw*y*w*w*w*w*w*nw*w*nw*w*nw*", &x, &dt, &T, &H, &D, &G, &every, &ns,
                          &counter, &scales, &steps, &ent, &modes, &row0, &words, &cap_words, &nwords, &raw,
                          &cap_raw, &nraw, &esc, &cap_esc, &nesc))
        return NULL;
    PyObject *ret = NULL;
    Geo g;
    if (!g_ready) {
        PyErr_SetString(PyExc_RuntimeError, "set_library() was not called");
        goto done;
    }
    if (get_geo(&g, dt, T, H, D, G) < 0) goto done;
    const int64_t n = (int64_t)T * D;
    const int64_t isz = dt == DT_F32 ? 4 : 2;
    if (ns < 0 || cap_words < n + 2 * LANES + WORD_SLACK || cap_raw < (n * MAX_SHIFT + 7) / 8 || cap_esc < n * 5) {
        PyErr_SetString(PyExc_ValueError, "bad stream count or capacities");
        goto done;
    }
    if (every < 1 || every > T) {
        PyErr_SetString(PyExc_ValueError, "bad moment stride");
        goto done;
    }
    if (need(&x, ns * n * isz, "x") || need(&counter, 8, "counter") || need(&scales, ns * 8, "scales") ||
        need(&steps, ns * 4, "steps") ||
        need(&ent, ns * D, "ent") || need(&modes, ns * D, "modes") || need(&row0, ns, "row0") ||
        need(&words, ns * cap_words * 2, "words") || need(&nwords, ns * 4, "nwords") ||
        need(&raw, ns * cap_raw, "raw") || need(&nraw, ns * 4, "nraw") || need(&esc, ns * cap_esc, "esc") ||
        need(&nesc, ns * 4, "nesc"))
        goto done;
    const EncArgs A = {x.buf, scales.buf, every, steps.buf, ent.buf, modes.buf, row0.buf, words.buf, cap_words,
                       nwords.buf, raw.buf, cap_raw, nraw.buf, esc.buf, cap_esc, nesc.buf};
    const int64_t npairs = (ns + 1) / 2;
    int64_t *ctr = counter.buf;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    /* Workers claim streams two at a time (see rans_encode_avx2). */
    for (int64_t k = claim(ctr); k < npairs && rc == 0; k = claim(ctr)) rc = enc_streams(&g, &A, 2 * k, 2 * k + 1 < ns ? 2 : 1);
    Py_END_ALLOW_THREADS
    if (rc == -2) {
        PyErr_NoMemory();
        goto done;
    }
    if (rc != 0) {
        PyErr_SetString(PyExc_RuntimeError, "rANS word buffer overflow (bug)");
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&counter);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&steps);
    PyBuffer_Release(&ent);
    PyBuffer_Release(&modes);
    PyBuffer_Release(&row0);
    PyBuffer_Release(&words);
    PyBuffer_Release(&nwords);
    PyBuffer_Release(&raw);
    PyBuffer_Release(&nraw);
    PyBuffer_Release(&esc);
    PyBuffer_Release(&nesc);
    return ret;
}

/* ---------------------------------------------------------------- decode */

/* Error codes of dec_stream, turned into messages by the caller. */
enum {
    E_OK = 0,
    E_WORDS_SHORT = 1,
    E_WORDS_LEFT = 2,
    E_STATE = 3,
    E_ESC = 4,
    E_RAW = 5,
    E_MEM = 6,
    E_TABLE = 7
};

static const char *dec_msg(int rc) {
    switch (rc) {
    case E_WORDS_SHORT: return "rANS stream ends early";
    case E_WORDS_LEFT: return "rANS stream has trailing words";
    case E_STATE: return "rANS lane does not end in its initial state";
    case E_ESC: return "escape list does not match the stream";
    case E_RAW: return "raw-bit section does not match the stream";
    case E_MEM: return "out of memory";
    case E_TABLE: return "side information out of range";
    default: return "decode failed";
    }
}

typedef struct {
    const uint8_t *w; /* little-endian 16-bit words */
    int64_t nw;
    const uint8_t *raw;
    int64_t nraw;
    const uint8_t *esc; /* zigzag varints */
    int64_t nesc;       /* bytes */
} StreamIn;

/* One decoder step of up to 16 lanes, scalar, reading words from a clamped
 * index (so it is safe at the very end of the stream); sets *over when a lane
 * wanted a word past the end. */
static inline void dec_step_scalar(uint32_t *st, const uint8_t *ep, int active, const uint8_t *w, int64_t nw,
                                   int64_t *pp, int *over, uint8_t *so) {
    for (int l = 0; l < active; l++) {
        const uint32_t xs = st[l];
        const uint32_t d = g_dec[ep[l]][xs & (PROB_SCALE - 1)];
        st[l] = (d & 0xfff) * (xs >> PROB_BITS) + ((d >> 12) & 0xfff);
        so[l] = (uint8_t)(d >> 24);
    }
    int64_t p = *pp;
    const int64_t last = nw - 1;
    for (int l = 0; l < active; l++) {
        const uint32_t xs = st[l];
        const int needw = xs < RANS_L;
        const int64_t at = p < last ? p : last;
        const uint32_t word = (uint32_t)(w[2 * at] | (w[2 * at + 1] << 8));
        *over |= needw & (p > last);
        st[l] = needw ? (xs << 16) | word : xs;
        p += needw;
    }
    *pp = p;
}

#if HAVE_X86
/* One vector of 8 lanes of a decoder step (see the module comment). */
AVX2 static inline __m256i dec_vec(__m256i x, __m256i e, const uint8_t *w, int64_t *p, __m256i *sym) {
    const __m256i slot = _mm256_and_si256(x, _mm256_set1_epi32(PROB_SCALE - 1));
    const __m256i d = _mm256_i32gather_epi32((const int *)g_dec, _mm256_or_si256(_mm256_slli_epi32(e, PROB_BITS), slot), 4);
    const __m256i m12 = _mm256_set1_epi32(0xfff);
    x = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_and_si256(d, m12), _mm256_srli_epi32(x, PROB_BITS)),
                         _mm256_and_si256(_mm256_srli_epi32(d, 12), m12));
    *sym = _mm256_srli_epi32(d, 24);
    const __m256i needw = _mm256_cmpgt_epi32(_mm256_set1_epi32(RANS_L), x);
    const int mask = _mm256_movemask_ps(_mm256_castsi256_ps(needw));
    const __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + 2 * *p)));
    const __m256i mine = _mm256_permutevar8x32_epi32(words, _mm256_load_si256((const __m256i *)g_expand[mask]));
    x = _mm256_blendv_epi8(x, _mm256_or_si256(_mm256_slli_epi32(x, 16), mine), needw);
    *p += __builtin_popcount((unsigned)mask);
    return x;
}

/* The rANS decoding state of one stream. */
typedef struct {
    const uint8_t *w; /* little-endian 16-bit words */
    int64_t nw, p;    /* words, next word */
    int64_t i0;       /* next symbol (a multiple of LANES) */
    const uint8_t *ent;
    int row0;
    uint8_t *sym; /* out: every symbol of the stream */
    uint32_t st[LANES];
} Dec;

/* Vector steps while every word a step could take is in bounds (D % 16 == 0).
 * With two streams (b != NULL) the steps of both are interleaved: each step
 * is a chain of dependent latencies (gather, multiply, compare, permute), so
 * two independent chains keep the core busy where one leaves it waiting.
 * Stops when either stream nears its end; the scalar steps finish each one. */
AVX2 static void rans_decode_avx2(Dec *a, Dec *b, int64_t n, int D) {
    __m256i xa0 = _mm256_loadu_si256((const __m256i *)a->st), xa1 = _mm256_loadu_si256((const __m256i *)(a->st + 8));
    __m256i xb0 = xa0, xb1 = xa1;
    const __m256i ra = _mm256_set1_epi32(a->row0);
    __m256i rb = ra;
    const Dec *bb = b ? b : a;
    if (b) {
        xb0 = _mm256_loadu_si256((const __m256i *)b->st);
        xb1 = _mm256_loadu_si256((const __m256i *)(b->st + 8));
        rb = _mm256_set1_epi32(b->row0);
    }
    int64_t pa = a->p, pb = bb->p, i0 = a->i0;
    const int64_t nwa = a->nw, nwb = bb->nw;
    int c = (int)(i0 % D); /* column of the step's first symbol */
    for (; i0 + LANES <= n && pa + LANES <= nwa && pb + LANES <= nwb; i0 += LANES, c = c + LANES == D ? 0 : c + LANES) {
        __m256i ea0, ea1, eb0, eb1, s0, s1;
        if (i0 < D) {
            ea0 = ea1 = ra;
            eb0 = eb1 = rb;
        } else {
            ea0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(a->ent + c)));
            ea1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(a->ent + c + 8)));
            eb0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bb->ent + c)));
            eb1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bb->ent + c + 8)));
        }
        xa0 = dec_vec(xa0, ea0, a->w, &pa, &s0);
        xa1 = dec_vec(xa1, ea1, a->w, &pa, &s1);
        __m256i s16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(s0, s1), 0xd8);
        _mm_storeu_si128((__m128i *)(a->sym + i0),
                         _mm_packus_epi16(_mm256_castsi256_si128(s16), _mm256_extracti128_si256(s16, 1)));
        if (b) {
            xb0 = dec_vec(xb0, eb0, b->w, &pb, &s0);
            xb1 = dec_vec(xb1, eb1, b->w, &pb, &s1);
            s16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(s0, s1), 0xd8);
            _mm_storeu_si128((__m128i *)(b->sym + i0),
                             _mm_packus_epi16(_mm256_castsi256_si128(s16), _mm256_extracti128_si256(s16, 1)));
        }
    }
    _mm256_storeu_si256((__m256i *)a->st, xa0);
    _mm256_storeu_si256((__m256i *)(a->st + 8), xa1);
    a->p = pa;
    a->i0 = i0;
    if (b) {
        _mm256_storeu_si256((__m256i *)b->st, xb0);
        _mm256_storeu_si256((__m256i *)(b->st + 8), xb1);
        b->p = pb;
        b->i0 = i0;
    }
}
#endif

/* Read and check the lane states at the head of a stream's words. */
static int rans_start(Dec *d, const StreamIn *in, int row0, const uint8_t *ent, uint8_t *sym) {
    d->w = in->w;
    d->nw = in->nw;
    d->p = 2 * LANES;
    d->i0 = 0;
    d->ent = ent;
    d->row0 = row0;
    d->sym = sym;
    if (in->nw < 2 * LANES) return E_WORDS_SHORT;
    const uint8_t *w = in->w;
    for (int l = 0; l < LANES; l++) {
        d->st[l] = ((uint32_t)(w[4 * l] | (w[4 * l + 1] << 8)) << 16) | (uint32_t)(w[4 * l + 2] | (w[4 * l + 3] << 8));
        if (d->st[l] < RANS_L || d->st[l] >= (1u << 31)) return E_STATE;
    }
    return E_OK;
}

/* Decode the rest of a stream (vector steps, then scalar ones near the end)
 * and check that it ends exactly where the encoder started. */
static int rans_finish(Dec *d, int64_t n, int D) {
    const int aligned = D % LANES == 0; /* then a step never straddles two rows */
#if HAVE_X86
    if (g_simd && aligned) rans_decode_avx2(d, NULL, n, D);
#endif
    uint8_t etab[LANES], row0tab[LANES];
    memset(row0tab, d->row0, LANES);
    int over = 0;
    int64_t p = d->p;
    for (int64_t i0 = d->i0; i0 < n; i0 += LANES) {
        const int active = n - i0 < LANES ? (int)(n - i0) : LANES;
        const uint8_t *ep = step_entries(i0, D, aligned && active == LANES, d->row0, d->ent, etab, row0tab);
        dec_step_scalar(d->st, ep, active, d->w, d->nw, &p, &over, d->sym + i0);
    }
    if (over) return E_WORDS_SHORT;
    if (p != d->nw) return E_WORDS_LEFT;
    for (int l = 0; l < LANES; l++)
        if (d->st[l] != RANS_L) return E_STATE;
    return E_OK;
}

/* Residual of each symbol of one row: escapes and raw bits resolved, clamped
 * to what a valid stream can hold (so later int32 arithmetic cannot overflow). */
static int row_residuals(const uint8_t *sym, int D, const uint8_t *shifts, const StreamIn *in, int64_t *bitoff,
                         int64_t *ne, int32_t *rr) {
    for (int c = 0; c < D; c++) {
        int64_t j;
        if (sym[c] == ESC) {
            uint64_t z = 0;
            int sh = 0;
            for (;;) {
                if (*ne >= in->nesc || sh > 28) return E_ESC; /* 5 bytes at most */
                const uint8_t byte = in->esc[(*ne)++];
                z |= (uint64_t)(byte & 0x7f) << sh;
                sh += 7;
                if (!(byte & 0x80)) break;
            }
            j = (z & 1) ? -(int64_t)(z >> 1) - 1 : (int64_t)(z >> 1);
        } else {
            j = (int64_t)sym[c] - JOFF;
        }
        const int b = shifts[c];
        int64_t r = j * ((int64_t)1 << b);
        if (b) {
            r += bits_at(in->raw, in->nraw, *bitoff, b);
            *bitoff += b;
        }
        r = r > 2 * QMAX ? 2 * QMAX : r;
        r = r < -2 * QMAX ? -2 * QMAX : r;
        rr[c] = (int32_t)r;
    }
    return E_OK;
}

/* Residuals of a row without escapes or raw bits; returns nonzero if it has an escape. */
HOT static int plain_residuals(const uint8_t *restrict sym, int D, int32_t *restrict rr) {
    int esc = 0;
    for (int c = 0; c < D; c++) {
        esc |= sym[c] == ESC;
        rr[c] = (int32_t)sym[c] - JOFF;
    }
    return esc;
}

/* Predictors and output for one row, converted and stored (vectorizes). */
#define REBUILD(STORE)                                                                         \
    for (int c = 0; c < D; c++) {                                                              \
        const int32_t mc = m[c];                                                               \
        const int32_t pred = anchor[c] ? mc : ema_pred(mc);                                    \
        int32_t qv = pred + rr[c];                                                             \
        qv = qv > QMAX ? QMAX : qv;                                                            \
        qv = qv < -QMAX ? -QMAX : qv;                                                          \
        m[c] = anchor[c] ? (anchor_row ? qv : mc) : ema_next(mc, qv, kk[c]);                   \
        const float v = (float)qv * step;                                                      \
        STORE;                                                                                 \
    }
HOT static void rebuild_f16(const int32_t *restrict rr, int D, const int32_t *restrict anchor,
                            const int32_t *restrict kk, int32_t *restrict m, int anchor_row, float step,
                            _Float16 *restrict p) {
    REBUILD(p[c] = (_Float16)v)
}
/* With F16C the row is rebuilt in float and converted 8 at a time. */
HOT static void rebuild_vals(const int32_t *restrict rr, int D, const int32_t *restrict anchor,
                             const int32_t *restrict kk, int32_t *restrict m, int anchor_row, float step,
                             float *restrict p) {
    REBUILD(p[c] = v)
}
HOT static void rebuild_bf16(const int32_t *restrict rr, int D, const int32_t *restrict anchor,
                             const int32_t *restrict kk, int32_t *restrict m, int anchor_row, float step,
                             uint16_t *restrict p) {
    REBUILD(p[c] = f32_to_bf16(v))
}
HOT static void rebuild_f32(const int32_t *restrict rr, int D, const int32_t *restrict anchor,
                            const int32_t *restrict kk, int32_t *restrict m, int anchor_row, float step,
                            float *restrict p) {
    REBUILD(p[c] = v)
}
#undef REBUILD

static void rebuild_row(const int32_t *rr, int D, const int32_t *anchor, const int32_t *kk, int32_t *m, int t,
                        int anchor_row, float step, int dt, void *out, float *vals) {
#if HAVE_X86
    if (t > 0 && dt == DT_F16 && g_simd) {
        rebuild_vals(rr, D, anchor, kk, m, anchor_row, step, vals);
        f32_to_f16_avx2(vals, D, out);
        return;
    }
#endif
    if (t == 0) {
        /* Row 0 holds the values themselves; it starts every predictor. */
        for (int c = 0; c < D; c++) {
            int32_t qv = rr[c];
            qv = qv > QMAX ? QMAX : qv;
            qv = qv < -QMAX ? -QMAX : qv;
            m[c] = anchor[c] ? qv : qv * (1 << EMA_F);
            const float v = (float)qv * step;
            if (dt == DT_F16) ((_Float16 *)out)[c] = (_Float16)v;
            else if (dt == DT_BF16) ((uint16_t *)out)[c] = f32_to_bf16(v);
            else ((float *)out)[c] = v;
        }
    } else if (dt == DT_F16) {
        rebuild_f16(rr, D, anchor, kk, m, anchor_row, step, out);
    } else if (dt == DT_BF16) {
        rebuild_bf16(rr, D, anchor, kk, m, anchor_row, step, out);
    } else {
        rebuild_f32(rr, D, anchor, kk, m, anchor_row, step, out);
    }
}

/* Side information of a stream that decoding relies on: predictor modes in
 * range, and the raw-bit section exactly as long as the entries imply. */
static int dec_check(const Geo *g, const uint8_t *ent, const uint8_t *modes, int row0, const StreamIn *in,
                     int64_t *rowbits_out) {
    const int T = g->T, D = g->D;
    for (int c = 0; c < D; c++)
        if (modes[c] >= NMODES) return E_TABLE;
    int64_t rowbits = 0;
    for (int c = 0; c < D; c++) rowbits += g_shift[ent[c]];
    const int64_t total_bits = (int64_t)D * g_shift[row0] + (int64_t)(T - 1) * rowbits;
    if ((total_bits + 7) / 8 != in->nraw) return E_RAW;
    *rowbits_out = rowbits;
    return E_OK;
}

/* Residuals, predictors and output of a stream whose symbols are decoded. */
static int dec_rebuild(const Geo *g, int64_t s, float step, const uint8_t *ent, const uint8_t *modes, int row0,
                       int64_t rowbits, const StreamIn *in, const uint8_t *sym, void *out) {
    const int T = g->T, D = g->D;
    /* work: rr[D] | m[D] | kk[D] | anchor[D] | vals[D] (float) | pre[D] | shifts[D] and row0 shifts[D] (bytes) */
    int32_t *work = scratch(&t_work, (size_t)D * 8 * 4);
    if (!work) return E_MEM;
    int32_t *rr = work, *m = work + D, *kk = work + 2 * D, *anchor = work + 3 * D, *pre = work + 5 * D;
    float *vals = (float *)(work + 4 * D);
    uint8_t *shifts = (uint8_t *)(work + 6 * D), *shifts0 = shifts + D;
    for (int c = 0, acc = 0; c < D; c++) {
        pre[c] = acc; /* bit offset of the channel's raw bits within a row */
        acc += g_shift[ent[c]];
        anchor[c] = modes[c] == MODE_ANCHOR ? -1 : 0;
        kk[c] = modes[c] == MODE_ANCHOR ? 0 : EMA_K[modes[c]];
        shifts[c] = g_shift[ent[c]];
        shifts0[c] = g_shift[row0];
    }
    int64_t bitoff = 0, ne = 0;
    const int64_t base0 = elem_index(g, s, 0, 0), stride = (int64_t)g->H * D;
    const int64_t isz = g->dt == DT_F32 ? 4 : 2;
    for (int t = 0; t < T; t++) {
        const uint8_t *sr = sym + (int64_t)t * D;
        if (t > 0 && !plain_residuals(sr, D, rr)) {
            /* No escapes in this row: add the raw low bits (if any) at the
             * row's fixed bit offsets, with 8-byte loads while in bounds. */
            if (rowbits && bitoff + rowbits + 64 <= in->nraw * 8) {
                const uint8_t *base = in->raw + (bitoff >> 3);
                const int off0 = (int)(bitoff & 7);
                for (int c = 0; c < D; c++) {
                    const int off = off0 + pre[c], b = shifts[c];
                    uint64_t v;
                    memcpy(&v, base + (off >> 3), 8);
                    int32_t r = rr[c] * (1 << b) + (int32_t)((v >> (off & 7)) & ((1u << b) - 1));
                    r = r > 2 * QMAX ? 2 * QMAX : r;
                    rr[c] = r < -2 * QMAX ? -2 * QMAX : r;
                }
                bitoff += rowbits;
            } else if (rowbits) {
                int rc = row_residuals(sr, D, shifts, in, &bitoff, &ne, rr);
                if (rc != E_OK) return rc;
            }
        } else {
            int rc = row_residuals(sr, D, t == 0 ? shifts0 : shifts, in, &bitoff, &ne, rr);
            if (rc != E_OK) return rc;
        }
        rebuild_row(rr, D, anchor, kk, m, t, t > 0 && (t % g->G) == 0, step, g->dt,
                    (char *)out + (base0 + t * stride) * isz, vals);
    }
    if (ne != in->nesc) return E_ESC;
    return E_OK;
}

typedef struct {
    const float *steps;
    const uint8_t *ent, *modes, *row0;
    const uint8_t *words, *raw, *esc;
    const int64_t *wo, *ro, *eo;
    void *out;
} DecArgs;

/* Decode streams s and s + 1 (when count == 2), their rANS steps interleaved.
 * Returns an error code and sets *bad to the stream it concerns. */
static int dec_streams(const Geo *g, const DecArgs *A, int64_t s, int count, int64_t *bad) {
    const int D = g->D;
    const int64_t n = (int64_t)g->T * D;
    uint8_t *symbuf = scratch(&t_sym, 2 * (size_t)n + 64);
    if (!symbuf) return E_MEM;
    StreamIn in[2];
    Dec dec[2];
    int64_t rowbits[2];
    int rc;
    for (int k = 0; k < count; k++) {
        const int64_t t = s + k;
        in[k] = (StreamIn){A->words + A->wo[t], (A->wo[t + 1] - A->wo[t]) / 2, A->raw + A->ro[t],
                           A->ro[t + 1] - A->ro[t], A->esc + A->eo[t], A->eo[t + 1] - A->eo[t]};
        *bad = t;
        if ((rc = dec_check(g, A->ent + t * D, A->modes + t * D, A->row0[t], &in[k], &rowbits[k])) != E_OK) return rc;
        if ((rc = rans_start(&dec[k], &in[k], A->row0[t], A->ent + t * D, symbuf + k * n)) != E_OK) return rc;
    }
#if HAVE_X86
    if (count == 2 && g_simd && D % LANES == 0) rans_decode_avx2(&dec[0], &dec[1], n, D);
#endif
    for (int k = 0; k < count; k++) {
        const int64_t t = s + k;
        *bad = t;
        if ((rc = rans_finish(&dec[k], n, D)) != E_OK) return rc;
        rc = dec_rebuild(g, t, A->steps[t], A->ent + t * D, A->modes + t * D, A->row0[t], rowbits[k], &in[k],
                         symbuf + k * n, A->out);
        if (rc != E_OK) return rc;
    }
    return E_OK;
}

/* decode(out, dtype, T, H, D, G, nstreams, counter, steps, ent, modes, row0,
 *        words, word_off, raw, raw_off, esc, esc_off)
 * *_off are int64 arrays of nstreams+1 byte offsets.  Workers share the
 * counter as in encode(); the first error stops every worker. */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    Py_buffer out, counter, steps, ent, modes, row0, words, woff, raw, roff, esc, eoff;
    int dt, T, H, D, G;
    Py_ssize_t ns;
    if (!PyArg_ParseTuple(args, "w*iiiiinw*y*y*y*y*y*y*y*y*y*y*", &out, &dt, &T, &H, &D, &G, &ns, &counter,
                          &steps, &ent, &modes, &row0, &words, &woff, &raw, &roff, &esc, &eoff))
        return NULL;
    PyObject *ret = NULL;
    Geo g;
    if (!g_ready) {
        PyErr_SetString(PyExc_RuntimeError, "set_library() was not called");
        goto done;
    }
    if (get_geo(&g, dt, T, H, D, G) < 0) goto done;
    const int64_t n = (int64_t)T * D;
    const int64_t isz = dt == DT_F32 ? 4 : 2;
    if (ns < 0) {
        PyErr_SetString(PyExc_ValueError, "bad stream count");
        goto done;
    }
    if (need(&out, ns * n * isz, "out") || need(&counter, 8, "counter") || need(&steps, ns * 4, "steps") ||
        need(&ent, ns * D, "ent") || need(&modes, ns * D, "modes") || need(&row0, ns, "row0") ||
        need(&woff, (ns + 1) * 8, "word offsets") || need(&roff, (ns + 1) * 8, "raw offsets") ||
        need(&eoff, (ns + 1) * 8, "escape offsets"))
        goto done;
    const int64_t *wo = woff.buf, *ro = roff.buf, *eo = eoff.buf;
    for (Py_ssize_t s = 0; s < ns; s++) {
        if (wo[s] < 0 || wo[s + 1] < wo[s] || wo[s + 1] > words.len || ((wo[s + 1] - wo[s]) & 1) ||
            ro[s] < 0 || ro[s + 1] < ro[s] || ro[s + 1] > raw.len || eo[s] < 0 || eo[s + 1] < eo[s] ||
            eo[s + 1] > esc.len) {
            PyErr_SetString(PyExc_ValueError, "stream offsets out of range");
            goto done;
        }
    }
    int rc = E_OK;
    int64_t bad = -1;
    int64_t *ctr = counter.buf;
    const DecArgs A = {steps.buf, ent.buf, modes.buf, row0.buf, words.buf, raw.buf, esc.buf, wo, ro, eo, out.buf};
    const int64_t npairs = (ns + 1) / 2;
    Py_BEGIN_ALLOW_THREADS
    /* Workers claim streams two at a time (see rans_decode_avx2). */
    for (int64_t k = claim(ctr); k < npairs; k = claim(ctr)) {
        rc = dec_streams(&g, &A, 2 * k, 2 * k + 1 < ns ? 2 : 1, &bad);
        if (rc != E_OK) {
            __atomic_store_n(ctr, npairs, __ATOMIC_RELAXED); /* the others stop after their pair */
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (rc != E_OK) {
        if (rc == E_MEM) PyErr_NoMemory();
        else PyErr_Format(PyExc_ValueError, "stream %lld: %s", (long long)bad, dec_msg(rc));
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&counter);
    PyBuffer_Release(&steps);
    PyBuffer_Release(&ent);
    PyBuffer_Release(&modes);
    PyBuffer_Release(&row0);
    PyBuffer_Release(&words);
    PyBuffer_Release(&woff);
    PyBuffer_Release(&raw);
    PyBuffer_Release(&roff);
    PyBuffer_Release(&esc);
    PyBuffer_Release(&eoff);
    return ret;
}

static PyObject *py_simd(PyObject *self, PyObject *args) { return PyBool_FromLong(g_simd); }

static int cpu_has_simd(void) {
#if HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* set_simd(on): use the AVX2 coders if on and the CPU has them (tests compare both paths). */
static PyObject *py_set_simd(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    g_simd = on && cpu_has_simd();
    return PyBool_FromLong(g_simd);
}

static PyMethodDef methods[] = {
    {"set_library", py_set_library, METH_VARARGS, "Install the 256-entry distribution library."},
    {"encode", py_encode, METH_VARARGS, "Encode the streams this worker claims (see the module comment)."},
    {"decode", py_decode, METH_VARARGS, "Decode the streams this worker claims into the output buffer."},
    {"simd", py_simd, METH_NOARGS, "True when the AVX2 coders are in use."},
    {"set_simd", py_set_simd, METH_VARARGS, "Use the AVX2 coders (when the CPU has them) or not."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cachegen",
    "Compiled CacheGen kernels (rANS over 16 lock-step lanes); see codecs/_cachegen.c.", -1, methods,
};

PyMODINIT_FUNC PyInit__cachegen(void) {
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the word stream is read with native 16-bit loads: little-endian hosts only"
#endif
    return PyModule_Create(&module);
}
