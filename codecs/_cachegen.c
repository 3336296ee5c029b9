/*
 * CacheGen entropy coder: the CPU fast path of kvstore.codecs.cachegen.
 *
 * One "stream" is a [tokens, channels] slab; Python passes one per (layer,
 * K/V), with channels = kv_heads x head_dim (rows are contiguous in the LKTHD
 * layout).  Each stream is coded on its own, so Python splits the streams of a
 * chunk across threads (the GIL is released here).
 *
 * Per stream the encoder
 *   1. quantizes every value on a fixed grid, q = rint(x / step);
 *   2. for every channel, measures four predictors (EMA of the channel with
 *      shift 0 = previous token, 2 and 5, and the group anchor) and keeps the
 *      one whose residuals cost least under the best-fitting distribution of a
 *      fixed library (256 entries: discretized Laplace and Gaussian shapes
 *      over a grid of scales);
 *   3. maps residuals to symbols j = r >> shift in [-32, 32) (ESC otherwise,
 *      with j stored aside as a zigzag varint) plus `shift` raw low bits;
 *   4. codes the symbols with 16 interleaved rANS lanes that share one stream
 *      of 16-bit words, in lock-step: symbol i goes to lane i % 16, and at
 *      each step the lanes that renormalize read their word in lane order.
 *      That is the layout a GPU decodes with one lane per thread (a ballot
 *      and a popcount per step, two streams per warp), and the CPU decodes it
 *      the same way.
 *
 * Since the predictors run on the integer grid, prediction is lossless: the
 * only loss is the rounding of step 1, and errors never propagate.
 *
 * The decoder checks everything it reads: a word stream that runs out or is
 * not fully consumed, a lane that does not end in the initial state, an
 * escape list of the wrong length all fail with a clear message; decoding
 * never reads or writes out of bounds and always ends after T*D symbols.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PROB_BITS 12
#define PROB_SCALE (1u << PROB_BITS)
#define NSYM 65 /* j in [-32, 32) plus ESC */
#define ESC 64
#define JOFF 32
#define NENT 256
#define RANS_L (1u << 15) /* states live in [2^15, 2^31): the reciprocal trick below is exact there */
#define LANES 16
#define EMA_F 8
#define QMAX (1 << 21) /* |q| bound (the step floor keeps real data below 2^20): int32 predictors never overflow */
#define MAX_SHIFT 24
#define MAX_FREQ (PROB_SCALE - 64) /* every symbol costs >= 0.0227 bits: bounds the output per input byte */

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
static uint16_t g_cum[NENT][NSYM + 1];
static uint32_t g_fc[NENT][NSYM]; /* freq | cum << 16, one load in the decoder */
static uint8_t g_slot[NENT][PROB_SCALE];
static uint8_t g_shift[NENT];
static EncSym g_enc[NENT][NSYM];
/* Encoder-side model of each entry (only steers choices; never affects decoding). */
static double g_mean[NENT]; /* E|r| for Laplace entries, E r^2 for Gaussian ones */
static double g_lam[NENT];  /* d(code length)/d(statistic), bits */
static double g_ent[NENT];  /* entropy incl. raw bits, bits per symbol */
static int g_ready = 0;

/* ------------------------------------------------------------------ dtypes */

/* Hot loops get an AVX2+F16C clone (fp16 conversions become single
 * instructions, row loops vectorize) and a baseline one; the loader picks. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HOT
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

/* One row of D values, converted to float. */
INLINE void load_row(const void *restrict x, int dt, int64_t base, int D, float *restrict out) {
    if (dt == DT_F16) {
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

INLINE void store_row(void *restrict out, int dt, int64_t base, int D, const float *restrict v) {
    if (dt == DT_F16) {
        _Float16 *p = (_Float16 *)out + base;
        for (int c = 0; c < D; c++) p[c] = (_Float16)v[c];
    } else if (dt == DT_BF16) {
        uint16_t *p = (uint16_t *)out + base;
        for (int c = 0; c < D; c++) p[c] = f32_to_bf16(v[c]);
    } else {
        float *p = (float *)out + base;
        for (int c = 0; c < D; c++) p[c] = v[c];
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
        for (int s = 0; s < NSYM; s++) {
            uint16_t v = f[e * NSYM + s];
            if ((s == ESC && v == 0) || v > MAX_FREQ) {
                PyErr_SetString(PyExc_ValueError, "library: escape needs a frequency, none above 4032");
                goto done;
            }
            total += v;
        }
        if (total != PROB_SCALE || sh[e] > MAX_SHIFT) {
            PyErr_SetString(PyExc_ValueError, "library: frequencies must sum to 4096, shift <= 24");
            goto done;
        }
    }
    for (int e = 0; e < NENT; e++) {
        uint32_t c = 0;
        g_shift[e] = sh[e];
        for (int s = 0; s < NSYM; s++) {
            uint32_t fr = f[e * NSYM + s];
            g_freq[e][s] = (uint16_t)fr;
            g_cum[e][s] = (uint16_t)c;
            g_fc[e][s] = fr | (c << 16);
            memset(&g_slot[e][c], s, fr);
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
        g_cum[e][NSYM] = (uint16_t)c; /* == 4096 wraps to 0 in uint16; never read as a bound */
    }
    memcpy(g_mean, mean.buf, sizeof(g_mean));
    memcpy(g_lam, lam.buf, sizeof(g_lam));
    memcpy(g_ent, ent.buf, sizeof(g_ent));
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
    if (n == 0) return;
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
    if (n == 0) return 0;
    int64_t byte = off >> 3;
    uint64_t v = 0;
    int take = (int)((((off & 7) + n) + 7) >> 3);
    for (int k = 0; k < take && byte + k < len; k++) v |= (uint64_t)p[byte + k] << (8 * k);
    return (uint32_t)((v >> (off & 7)) & ((1u << n) - 1));
}

/* ------------------------------------------------------------ predictors */

/* Predictor state per channel, int32 throughout so row loops vectorize:
 * |q| <= QMAX = 2^21 keeps q * 2^EMA_F and every difference below 2^31. */
INLINE int32_t ema_pred(int32_t m) { return (m + (1 << (EMA_F - 1))) >> EMA_F; }
INLINE int32_t ema_next(int32_t m, int32_t q, int k) { return m + ((q * (1 << EMA_F) - m) >> k); }

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

/* Residuals of the chosen predictors, row after row, into r[T*D] (row 0: q itself). */
HOT static void residuals(const int32_t *restrict q, int T, int D, int G, const uint8_t *restrict modes,
                          int32_t *restrict m, int32_t *restrict kk, int32_t *restrict r) {
    for (int c = 0; c < D; c++) {
        m[c] = modes[c] == MODE_ANCHOR ? q[c] : q[c] * (1 << EMA_F);
        kk[c] = modes[c] == MODE_ANCHOR ? 0 : EMA_K[modes[c]];
        r[c] = q[c];
    }
    for (int t = 1; t < T; t++) {
        const int32_t *v = q + (int64_t)t * D;
        int32_t *rr = r + (int64_t)t * D;
        const int anchor_row = (t % G) == 0;
        for (int c = 0; c < D; c++) {
            const int anchor = modes[c] == MODE_ANCHOR;
            int32_t pred = anchor ? m[c] : ema_pred(m[c]);
            rr[c] = v[c] - pred;
            int32_t next_anchor = anchor_row ? v[c] : m[c];
            m[c] = anchor ? next_anchor : ema_next(m[c], v[c], kk[c]);
        }
    }
}

/* Returns 0, -1 when a buffer is too small (cannot happen with the Python-side
 * bounds), -2 when out of memory. */
static int enc_stream(const void *x, const Geo *g, int64_t s, float step, uint8_t *ent_out,
                      uint8_t *mode_out, uint8_t *row0_out, uint16_t *words, int64_t cap_words,
                      uint32_t *nwords, uint8_t *raw, uint32_t *nraw, uint8_t *esc, uint32_t *nesc,
                      int32_t *q, int32_t *r, uint8_t *sym, uint8_t *tab, float *work) {
    const int T = g->T, D = g->D;
    const int64_t n = (int64_t)T * D;
    /* work: row[D] | s1[4D] | s2[4D] | m[4D] (int32) | k[D] (int32) */
    float *row = work, *s1 = work + D, *s2 = work + 5 * D;
    int32_t *m = (int32_t *)(work + 9 * D), *kk = (int32_t *)(work + 13 * D);

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
    }
    residuals(q, T, D, g->G, mode_out, m, kk, r);

    /* Symbols, raw low bits and escapes, in symbol order. */
    BitWriter bw = {raw, 0, 0, 0};
    uint32_t ne = 0;
    for (int t = 0; t < T; t++) {
        for (int c = 0; c < D; c++) {
            const int64_t i = (int64_t)t * D + c;
            const int e = t == 0 ? *row0_out : ent_out[c];
            const int b = g_shift[e];
            const int32_t rv = r[i];
            const int32_t j = rv >> b; /* floor division: gcc shifts arithmetically */
            tab[i] = (uint8_t)e;
            if (b) bw_put(&bw, (uint32_t)(rv - j * (1 << b)), b);
            if (j < -JOFF || j >= JOFF || g_freq[e][j + JOFF] == 0) {
                /* Outside the alphabet or given no probability: escape, j as a zigzag varint. */
                sym[i] = ESC;
                uint32_t z = j < 0 ? ((uint32_t)(-(j + 1)) << 1) | 1u : (uint32_t)j << 1;
                do {
                    uint8_t byte = z & 0x7f;
                    z >>= 7;
                    esc[ne++] = byte | (z ? 0x80 : 0);
                } while (z);
            } else {
                sym[i] = (uint8_t)(j + JOFF);
            }
        }
    }
    bw_flush(&bw);
    *nraw = (uint32_t)bw.pos;
    *nesc = ne;

    /* rANS, backwards: lanes in reverse order so that the decoder, going
     * forwards, reads each step's words in lane order. */
    uint32_t st[LANES];
    for (int l = 0; l < LANES; l++) st[l] = RANS_L;
    uint16_t *out = words + cap_words;
    int64_t nsteps = (n + LANES - 1) / LANES;
    for (int64_t k = nsteps - 1; k >= 0; k--) {
        if (out - words < LANES) return -1;
        for (int l = LANES - 1; l >= 0; l--) {
            int64_t i = k * LANES + l;
            if (i >= n) continue;
            const EncSym *es = &g_enc[tab[i]][sym[i]];
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
    if (out - words < 2 * LANES) return -1;
    for (int l = LANES - 1; l >= 0; l--) {
        *--out = (uint16_t)st[l];
        *--out = (uint16_t)(st[l] >> 16);
    }
    int64_t nw = (words + cap_words) - out;
    memmove(words, out, (size_t)nw * 2);
    *nwords = (uint32_t)nw;
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

/* encode(x, dtype, T, H, D, G, s_lo, s_hi, steps, ent, modes, row0, words, cap_words, nwords,
 *        raw, cap_raw, nraw, esc, nesc)
 * Per-stream outputs are indexed by global stream; words/raw/esc have one
 * region of cap_* items per stream. */
static PyObject *py_encode(PyObject *self, PyObject *args) {
    Py_buffer x, steps, ent, modes, row0, words, nwords, raw, nraw, esc, nesc;
    int dt, T, H, D, G;
    Py_ssize_t s_lo, s_hi, cap_words, cap_raw;
    if (!PyArg_ParseTuple(args, "y*iiiiinny*w*w*w*w*nw*w*nw*w*w*", &x, &dt, &T, &H, &D, &G, &s_lo,
                          &s_hi, &steps, &ent, &modes, &row0, &words, &cap_words, &nwords, &raw,
                          &cap_raw, &nraw, &esc, &nesc))
        return NULL;
    PyObject *ret = NULL;
    Geo g;
    int32_t *q = NULL, *r = NULL;
    uint8_t *sym = NULL, *tab = NULL;
    float *work = NULL;
    if (!g_ready) {
        PyErr_SetString(PyExc_RuntimeError, "set_library() was not called");
        goto done;
    }
    if (get_geo(&g, dt, T, H, D, G) < 0) goto done;
    const int64_t n = (int64_t)T * D;
    const int64_t isz = dt == DT_F32 ? 4 : 2;
    if (s_lo < 0 || s_hi < s_lo || cap_words < n + 2 * LANES || cap_raw < (n * MAX_SHIFT + 7) / 8) {
        PyErr_SetString(PyExc_ValueError, "bad stream range or capacities");
        goto done;
    }
    if (need(&x, s_hi * n * isz, "x") || need(&steps, s_hi * 4, "steps") ||
        need(&ent, s_hi * D, "ent") || need(&modes, s_hi * D, "modes") || need(&row0, s_hi, "row0") ||
        need(&words, s_hi * cap_words * 2, "words") || need(&nwords, s_hi * 4, "nwords") ||
        need(&raw, s_hi * cap_raw, "raw") || need(&nraw, s_hi * 4, "nraw") ||
        need(&esc, s_hi * n * 5, "esc") || need(&nesc, s_hi * 4, "nesc"))
        goto done;
    q = malloc((size_t)n * 4);
    r = malloc((size_t)n * 4);
    sym = malloc((size_t)n);
    tab = malloc((size_t)n);
    work = malloc((size_t)D * 14 * 4);
    if (!q || !r || !sym || !tab || !work) {
        PyErr_NoMemory();
        goto done;
    }
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t s = s_lo; s < s_hi && rc == 0; s++) {
        rc = enc_stream(x.buf, &g, s, ((const float *)steps.buf)[s], (uint8_t *)ent.buf + s * D,
                        (uint8_t *)modes.buf + s * D, (uint8_t *)row0.buf + s,
                        (uint16_t *)words.buf + s * cap_words, cap_words, (uint32_t *)nwords.buf + s,
                        (uint8_t *)raw.buf + s * cap_raw, (uint32_t *)nraw.buf + s,
                        (uint8_t *)esc.buf + s * n * 5, (uint32_t *)nesc.buf + s, q, r, sym, tab, work);
    }
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
    free(q);
    free(r);
    free(sym);
    free(tab);
    free(work);
    PyBuffer_Release(&x);
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

/* rANS: all T*D symbols of a stream into sym[].
 *
 * Each step is two passes over the 16 lanes: first every lane decodes its
 * symbol (independent work the CPU overlaps), then the lanes that dropped
 * below RANS_L take the next words in lane order (a running count, as a GPU
 * warp does with a ballot and popcount). */
HOT static int rans_decode(const StreamIn *in, int64_t n, int D, int row0, const uint8_t *ent, uint8_t *sym) {
    if (in->nw < 2 * LANES) return E_WORDS_SHORT;
    uint32_t st[LANES];
    uint8_t etab[LANES], row0tab[LANES];
    const uint8_t *w = in->w;
    for (int l = 0; l < LANES; l++) {
        st[l] = ((uint32_t)(w[4 * l] | (w[4 * l + 1] << 8)) << 16) | (uint32_t)(w[4 * l + 2] | (w[4 * l + 3] << 8));
        if (st[l] < RANS_L || st[l] >= (1u << 31)) return E_STATE;
        row0tab[l] = (uint8_t)row0;
    }
    const int64_t nw = in->nw, last = nw - 1;
    const int aligned = D % LANES == 0; /* then a step never straddles two rows */
    int64_t p = 2 * LANES;
    int over = 0;
    int c = 0, row = 0;
    for (int64_t i0 = 0; i0 < n; i0 += LANES) {
        const int active = n - i0 < LANES ? (int)(n - i0) : LANES;
        const uint8_t *ep;
        if (aligned) {
            ep = row == 0 ? row0tab : ent + c;
            c += LANES;
            if (c == D) c = 0, row++;
        } else {
            for (int l = 0; l < active; l++) {
                etab[l] = row == 0 ? (uint8_t)row0 : ent[c];
                if (++c == D) c = 0, row++;
            }
            ep = etab;
        }
        uint8_t *so = sym + i0;
        for (int l = 0; l < active; l++) {
            const int e = ep[l];
            const uint32_t xs = st[l];
            const uint32_t slot = xs & (PROB_SCALE - 1);
            const uint32_t sy = g_slot[e][slot];
            const uint32_t fc = g_fc[e][sy];
            st[l] = (fc & 0xffff) * (xs >> PROB_BITS) + slot - (fc >> 16);
            so[l] = (uint8_t)sy;
        }
        if (p + LANES <= nw) {
            /* Common case: every word this step could take is in bounds. */
            for (int l = 0; l < active; l++) {
                const uint32_t xs = st[l];
                const int needw = xs < RANS_L;
                uint16_t word;
                memcpy(&word, w + 2 * p, 2); /* little-endian host assumed, see module init */
                st[l] = needw ? (xs << 16) | word : xs;
                p += needw;
            }
        } else {
            /* Near the end: read from a clamped index, remember running past it. */
            for (int l = 0; l < active; l++) {
                const uint32_t xs = st[l];
                const int needw = xs < RANS_L;
                const int64_t at = p < last ? p : last;
                const uint32_t word = (uint32_t)(w[2 * at] | (w[2 * at + 1] << 8));
                over |= needw & (p > last);
                st[l] = needw ? (xs << 16) | word : xs;
                p += needw;
            }
        }
    }
    if (over) return E_WORDS_SHORT;
    if (p != in->nw) return E_WORDS_LEFT;
    for (int l = 0; l < LANES; l++)
        if (st[l] != RANS_L) return E_STATE;
    return E_OK;
}

/* Residual of each symbol of one row: escapes and raw bits resolved, clamped
 * to what a valid stream can hold (so later int32 arithmetic cannot overflow). */
INLINE int row_residuals(const uint8_t *sym, int D, const uint8_t *shifts, const StreamIn *in, int64_t *bitoff,
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

/* Predictors and output for one row (vectorizes: no escapes, no raw bits here). */
HOT static void rebuild_row(const int32_t *restrict rr, int D, const uint8_t *restrict modes,
                            const int32_t *restrict kk, int32_t *restrict m, int t, int anchor_row, float step,
                            float *restrict vals) {
    for (int c = 0; c < D; c++) {
        const int anchor = modes[c] == MODE_ANCHOR;
        int32_t pred = t == 0 ? 0 : anchor ? m[c] : ema_pred(m[c]);
        int32_t qv = pred + rr[c];
        qv = qv > QMAX ? QMAX : qv;
        qv = qv < -QMAX ? -QMAX : qv;
        int32_t init = anchor ? qv : qv * (1 << EMA_F);
        int32_t upd = anchor ? (anchor_row ? qv : m[c]) : ema_next(m[c], qv, kk[c]);
        m[c] = t == 0 ? init : upd;
        vals[c] = (float)qv * step;
    }
}

HOT static void store_row_hot(void *restrict out, int dt, int64_t base, int D, const float *restrict v) {
    store_row(out, dt, base, D, v);
}

static int dec_stream(const Geo *g, int64_t s, float step, const uint8_t *ent, const uint8_t *modes, int row0,
                      const StreamIn *in, void *out, uint8_t *sym, int32_t *work) {
    const int T = g->T, D = g->D;
    const int64_t n = (int64_t)T * D;
    for (int c = 0; c < D; c++)
        if (modes[c] >= NMODES) return E_TABLE;

    /* Raw-bit budget is fixed by the side information: check it first. */
    int64_t rowbits = 0;
    for (int c = 0; c < D; c++) rowbits += g_shift[ent[c]];
    const int64_t total_bits = (int64_t)D * g_shift[row0] + (int64_t)(T - 1) * rowbits;
    if ((total_bits + 7) / 8 != in->nraw) return E_RAW;

    int rc = rans_decode(in, n, D, row0, ent, sym);
    if (rc != E_OK) return rc;

    /* work: rr[D] | m[D] | kk[D] | vals[D] (float) | shifts[D] and row0 shifts[D] (bytes) */
    int32_t *rr = work, *m = work + D, *kk = work + 2 * D;
    float *vals = (float *)(work + 3 * D);
    uint8_t *shifts = (uint8_t *)(work + 4 * D), *shifts0 = shifts + D;
    for (int c = 0; c < D; c++) {
        kk[c] = modes[c] == MODE_ANCHOR ? 0 : EMA_K[modes[c]];
        shifts[c] = g_shift[ent[c]];
        shifts0[c] = g_shift[row0];
    }
    int64_t bitoff = 0, ne = 0;
    const int64_t base0 = elem_index(g, s, 0, 0), stride = (int64_t)g->H * D;
    for (int t = 0; t < T; t++) {
        rc = row_residuals(sym + (int64_t)t * D, D, t == 0 ? shifts0 : shifts, in, &bitoff, &ne, rr);
        if (rc != E_OK) return rc;
        rebuild_row(rr, D, modes, kk, m, t, t > 0 && (t % g->G) == 0, step, vals);
        store_row_hot(out, g->dt, base0 + t * stride, D, vals);
    }
    if (ne != in->nesc) return E_ESC;
    return E_OK;
}


/* decode(out, dtype, T, H, D, G, s_lo, s_hi, steps, ent, modes, row0,
 *        words, word_off, raw, raw_off, esc, esc_off)
 * *_off are int64 arrays of nstreams+1 byte offsets. */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    Py_buffer out, steps, ent, modes, row0, words, woff, raw, roff, esc, eoff;
    int dt, T, H, D, G;
    Py_ssize_t s_lo, s_hi;
    if (!PyArg_ParseTuple(args, "w*iiiiinny*y*y*y*y*y*y*y*y*y*", &out, &dt, &T, &H, &D, &G, &s_lo,
                          &s_hi, &steps, &ent, &modes, &row0, &words, &woff, &raw, &roff, &esc, &eoff))
        return NULL;
    PyObject *ret = NULL;
    Geo g;
    uint8_t *sym = NULL;
    int32_t *work = NULL;
    if (!g_ready) {
        PyErr_SetString(PyExc_RuntimeError, "set_library() was not called");
        goto done;
    }
    if (get_geo(&g, dt, T, H, D, G) < 0) goto done;
    const int64_t n = (int64_t)T * D;
    const int64_t isz = dt == DT_F32 ? 4 : 2;
    if (s_lo < 0 || s_hi < s_lo) {
        PyErr_SetString(PyExc_ValueError, "bad stream range");
        goto done;
    }
    if (need(&out, s_hi * n * isz, "out") || need(&steps, s_hi * 4, "steps") ||
        need(&ent, s_hi * D, "ent") || need(&modes, s_hi * D, "modes") || need(&row0, s_hi, "row0") ||
        need(&woff, (s_hi + 1) * 8, "word offsets") || need(&roff, (s_hi + 1) * 8, "raw offsets") ||
        need(&eoff, (s_hi + 1) * 8, "escape offsets"))
        goto done;
    const int64_t *wo = woff.buf, *ro = roff.buf, *eo = eoff.buf;
    for (Py_ssize_t s = s_lo; s < s_hi; s++) {
        if (wo[s] < 0 || wo[s + 1] < wo[s] || wo[s + 1] > words.len || ((wo[s + 1] - wo[s]) & 1) ||
            ro[s] < 0 || ro[s + 1] < ro[s] || ro[s + 1] > raw.len || eo[s] < 0 || eo[s + 1] < eo[s] ||
            eo[s + 1] > esc.len) {
            PyErr_SetString(PyExc_ValueError, "stream offsets out of range");
            goto done;
        }
    }
    sym = malloc((size_t)n);
    work = malloc((size_t)D * 6 * 4);
    if (!sym || !work) {
        PyErr_NoMemory();
        goto done;
    }
    int rc = E_OK;
    Py_ssize_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t s = s_lo; s < s_hi; s++) {
        StreamIn in = {(const uint8_t *)words.buf + wo[s], (wo[s + 1] - wo[s]) / 2,
                       (const uint8_t *)raw.buf + ro[s], ro[s + 1] - ro[s],
                       (const uint8_t *)esc.buf + eo[s], eo[s + 1] - eo[s]};
        rc = dec_stream(&g, s, ((const float *)steps.buf)[s], (const uint8_t *)ent.buf + s * D,
                        (const uint8_t *)modes.buf + s * D, ((const uint8_t *)row0.buf)[s], &in,
                        out.buf, sym, work);
        if (rc != E_OK) {
            bad = s;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (rc != E_OK) {
        PyErr_Format(PyExc_ValueError, "stream %zd: %s", bad, dec_msg(rc));
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    free(sym);
    free(work);
    PyBuffer_Release(&out);
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

/* moments(x, dtype, T, H, D, every, s_lo, s_hi, sum, sumsq): per-channel sums (float64) of
 * each stream over tokens 0, every, 2*every, ... */
static PyObject *py_moments(PyObject *self, PyObject *args) {
    Py_buffer x, sum, sq;
    int dt, T, H, D, every;
    Py_ssize_t s_lo, s_hi;
    if (!PyArg_ParseTuple(args, "y*iiiiinnw*w*", &x, &dt, &T, &H, &D, &every, &s_lo, &s_hi, &sum, &sq))
        return NULL;
    PyObject *ret = NULL;
    Geo g;
    if (get_geo(&g, dt, T, H, D, 1) < 0) goto done;
    const int64_t n = (int64_t)T * D;
    const int64_t isz = dt == DT_F32 ? 4 : 2;
    if (s_lo < 0 || s_hi < s_lo || need(&x, s_hi * n * isz, "x") || need(&sum, s_hi * D * 8, "sum") ||
        need(&sq, s_hi * D * 8, "sumsq")) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad stream range");
        goto done;
    }
    float *row = malloc((size_t)D * 4);
    if (!row) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t s = s_lo; s < s_hi; s++)
        moments_stream(x.buf, &g, s, every < 1 ? 1 : every, (double *)sum.buf + s * D, (double *)sq.buf + s * D, row);
    free(row);
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&sum);
    PyBuffer_Release(&sq);
    return ret;
}

static PyMethodDef methods[] = {
    {"set_library", py_set_library, METH_VARARGS, "Install the 256-entry distribution library."},
    {"encode", py_encode, METH_VARARGS, "Encode a range of streams (see module docstring)."},
    {"decode", py_decode, METH_VARARGS, "Decode a range of streams into the output buffer."},
    {"moments", py_moments, METH_VARARGS, "Per-channel sum and sum of squares of a range of streams."},
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
