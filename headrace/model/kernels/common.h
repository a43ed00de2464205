/* What the kernel files share: the bf16 conversions, exp, denormal control and other small
 * inline helpers, and the few functions one file defines for another (hidden: only api.h's
 * functions leave the shared object). Every kernel file is compiled for the same flags by
 * build.py into one object. */
#ifndef HEADRACE_COMMON_H
#define HEADRACE_COMMON_H
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#elif defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "api.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define HAVE_AMX 1
#endif

static inline uint32_t f32_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

static inline float bits_f32(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {
    const uint32_t bits = f32_bits(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) /* NaN stays NaN */
        return (uint16_t)((bits >> 16) | 0x40u);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16); /* round to nearest even */
}

#if defined(__AVX512F__)
/* float32 -> bf16, round to nearest even, a NaN stays NaN: f32_to_bf16, 16 lanes. */
static inline __m256i to_bf16x16(__m512 x) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(x);
#else
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
#endif
}
#endif

/* Bytes per cache element of format kv_fmt (api.h's KV_*). */
static inline int64_t kv_elem_bytes(int kv_fmt) {
    return kv_fmt == KV_F32 ? 4 : kv_fmt == KV_BF16 ? 2 : 1;
}

/* float32 -> OCP fp8 with `mant` mantissa bits and exponent bias `bias` (E4M3: 3, 7; E5M2: 2,
 * 15): round to nearest even, saturating at the largest finite code `max_code` (0x7e, 0x7b; as
 * torch's float8_e4m3fn conversion does, and its float8_e5m2 one after a clamp); a NaN stays
 * NaN (0x7f). */
static inline uint8_t f32_to_fp8(float f, int mant, int bias, uint32_t max_code) {
    const uint32_t bits = f32_bits(f), sign = (bits >> 24) & 0x80u, a = bits & 0x7fffffffu;
    if (a > 0x7f800000u)
        return (uint8_t)(sign | 0x7fu);
    uint32_t code;
    if (a < (uint32_t)(128 - bias) << 23) { /* below the smallest normal: multiples of 2^-(bias
                                              * - 1 + mant), the top one the smallest normal */
        code = (uint32_t)__builtin_rintf(bits_f32(a) * ldexpf(1.0f, bias - 1 + mant));
    } else {
        const int shift = 23 - mant;
        code = ((a + (1u << (shift - 1)) - 1u + ((a >> shift) & 1u)) >> shift) -
               ((uint32_t)(127 - bias) << mant);
        code = code > max_code ? max_code : code;
    }
    return (uint8_t)(sign | code);
}

static inline uint8_t f32_to_e4m3(float f) { return f32_to_fp8(f, 3, 7, 0x7eu); }
static inline uint8_t f32_to_e5m2(float f) { return f32_to_fp8(f, 2, 15, 0x7bu); }

/* OCP fp8 -> float32, exact (E4M3's 0x7f and E5M2's top exponent: NaN, infinity). */
static inline float fp8_to_f32(uint8_t b, int mant, int bias) {
    const uint32_t e = (b & 0x7fu) >> mant, m = b & ((1u << mant) - 1u);
    float mag;
    if (e == 0)
        mag = (float)m * ldexpf(1.0f, 1 - bias - mant);
    else if (mant == 3 ? (b & 0x7fu) == 0x7fu : e == 31)
        mag = mant == 3 || m != 0 ? NAN : INFINITY;
    else
        mag = bits_f32(((e + 127 - (uint32_t)bias) << 23) | (m << (23 - mant)));
    return b & 0x80u ? -mag : mag;
}

/* What the vector widening below leaves fp8 values to be multiplied by: 2^8 for E4M3, 1
 * otherwise (and for float32 and bf16, which it does not widen). The one-pass decode attention
 * folds it into the score scale and the output's normalization. */
static inline float fp8_unit(int kv_fmt) { return kv_fmt == KV_E4M3 ? 256.0f : 1.0f; }

#if defined(__F16C__) && (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)))
#define HAVE_FP8_VECTORS 1
/* 16 fp8 values in 16-bit lanes, each byte in the lane's high half (b << 8), as the float16s of
 * the same value, E4M3's scaled by 2^-8: E5M2 is float16's top byte as it is; E4M3's sign,
 * exponent and mantissa shift right by one into float16's fields (the bias left at 15, not 7).
 * (E4M3's NaN code reads as 480; a cache written from finite values holds none.) */
static inline __m128i fp8_as_f16(__m128i hi_bytes, int kv_fmt) {
    if (kv_fmt == KV_E5M2)
        return hi_bytes;
    return _mm_and_si128(_mm_srai_epi16(hi_bytes, 1), _mm_set1_epi16(-16385 /* 0xbfff */));
}

/* 16 fp8 values at p as float32 over fp8_unit (E4M3's scaled by 2^-8), out[0] the first 8. */
static inline void fp8x16_to_ps(const uint8_t *p, int kv_fmt, __m256 out[2]) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p), z = _mm_setzero_si128();
    out[0] = _mm256_cvtph_ps(fp8_as_f16(_mm_unpacklo_epi8(z, b), kv_fmt));
    out[1] = _mm256_cvtph_ps(fp8_as_f16(_mm_unpackhi_epi8(z, b), kv_fmt));
}
#endif

/* A row of D cache elements (format kv_fmt) as float32: the cache itself where it holds
 * float32, else widened into `dst`. */
static inline const float *row_f32(const void *base, int64_t index, int64_t D, int kv_fmt,
                                   float *dst) {
    if (kv_fmt == KV_F32)
        return (const float *)base + index;
    if (kv_fmt == KV_BF16) {
        const uint16_t *src = (const uint16_t *)base + index;
#pragma omp simd
        for (int64_t d = 0; d < D; d++)
            dst[d] = bf16_to_f32(src[d]);
        return dst;
    }
    const uint8_t *src = (const uint8_t *)base + index;
#if defined(HAVE_FP8_VECTORS)
    if (D % 16 == 0) {
        const __m256 unit = _mm256_set1_ps(fp8_unit(kv_fmt));
        for (int64_t d = 0; d < D; d += 16) {
            __m256 x[2];
            fp8x16_to_ps(src + d, kv_fmt, x);
            _mm256_storeu_ps(dst + d, _mm256_mul_ps(x[0], unit));
            _mm256_storeu_ps(dst + d + 8, _mm256_mul_ps(x[1], unit));
        }
        return dst;
    }
#endif
    const int mant = kv_fmt == KV_E4M3 ? 3 : 2, bias = kv_fmt == KV_E4M3 ? 7 : 15;
    for (int64_t d = 0; d < D; d++)
        dst[d] = fp8_to_f32(src[d], mant, bias);
    return dst;
}

/* The same row as float32, always copied into `dst`. */
static inline void copy_row_f32(const void *base, int64_t index, int64_t D, int kv_fmt,
                                float *dst) {
    const float *src = row_f32(base, index, D, kv_fmt, dst);
    if (src != dst)
        memcpy(dst, src, sizeof(float) * (size_t)D);
}

/* D float32 values into a cache row of format kv_fmt, rounded to nearest even; fp8 ones divided
 * by `scale` first (as torch's write_kv divides). */
static inline void store_row(void *base, int64_t index, const float *src, int64_t D,
                             int kv_fmt, float scale) {
    if (kv_fmt == KV_F32) {
        memcpy((float *)base + index, src, sizeof(float) * (size_t)D);
    } else if (kv_fmt == KV_BF16) {
        uint16_t *dst = (uint16_t *)base + index;
        for (int64_t d = 0; d < D; d++)
            dst[d] = f32_to_bf16(src[d]);
    } else if (kv_fmt == KV_E4M3) {
        uint8_t *dst = (uint8_t *)base + index;
        for (int64_t d = 0; d < D; d++)
            dst[d] = f32_to_e4m3(src[d] / scale);
    } else {
        uint8_t *dst = (uint8_t *)base + index;
        for (int64_t d = 0; d < D; d++)
            dst[d] = f32_to_e5m2(src[d] / scale);
    }
}

/* exp(x) for x <= 0, vectorizable: 2^n * 2^f with a degree-6 polynomial for 2^f, f in
 * [-0.5, 0.5] (relative error ~2e-7); below -87 it is 0, where expf would go denormal. */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504088896341f;
    const float n = __builtin_rintf(t);
    const float f = t - n;
    float p = 1.53533017e-4f;
    p = p * f + 1.33989665e-3f;
    p = p * f + 9.61844519e-3f;
    p = p * f + 5.55034867e-2f;
    p = p * f + 2.40226522e-1f;
    p = p * f + 6.93147182e-1f;
    p = p * f + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, sizeof bits);
    bits += (int32_t)n << 23;
    memcpy(&p, &bits, sizeof p);
    return x <= -87.0f ? 0.0f : p;
}

/* exp_nonpos's polynomial for 2^f in vector lanes, from the ISA's fused multiply-add and
 * broadcast. */
#define EXP2_POLY(FMA, SET1, f)                                                                    \
    FMA(FMA(FMA(FMA(FMA(FMA(SET1(1.53533017e-4f), f, SET1(1.33989665e-3f)), f,                     \
                        SET1(9.61844519e-3f)),                                                     \
                    f, SET1(5.55034867e-2f)),                                                      \
                f, SET1(2.40226522e-1f)),                                                          \
            f, SET1(6.93147182e-1f)),                                                              \
        f, SET1(1.0f))

#if defined(__AVX512F__)
/* exp(x) = 2^n * 2^f: returns exp_nonpos's polynomial for 2^f, 16 lanes, and n in *n. */
static inline __m512 exp_split16(__m512 x, __m512 *n) {
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    *n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, *n);
    return EXP2_POLY(_mm512_fmadd_ps, _mm512_set1_ps, f);
}

/* exp_nonpos, 16 lanes at a time. */
static inline __m512 exp_nonpos16(__m512 x) {
    const __m512 floor = _mm512_set1_ps(-87.0f);
    const __mmask16 under = _mm512_cmp_ps_mask(x, floor, _CMP_LE_OQ);
    __m512 n;
    const __m512 p = exp_split16(_mm512_max_ps(x, floor), &n);
    const __m512i bits = _mm512_add_epi32(_mm512_castps_si512(p),
                                          _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23));
    return _mm512_maskz_mov_ps(~under, _mm512_castsi512_ps(bits));
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* exp_nonpos, 8 lanes at a time (AVX2 + FMA: the same polynomial). */
static inline __m256 exp_nonpos8(__m256 x) {
    const __m256 floor = _mm256_set1_ps(-87.0f);
    const __m256 under = _mm256_cmp_ps(x, floor, _CMP_LE_OQ);
    const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, floor), _mm256_set1_ps(1.44269504088896341f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 p = EXP2_POLY(_mm256_fmadd_ps, _mm256_set1_ps, _mm256_sub_ps(t, n));
    const __m256i bits = _mm256_add_epi32(_mm256_castps_si256(p),
                                          _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
    return _mm256_andnot_ps(under, _mm256_castsi256_ps(bits));
}
#endif

/* Flush denormals to zero: softmax weights of far-off keys underflow into them, and every
 * multiply with one would take the slow microcode path. Returns the old control word. */
static inline unsigned int flush_denormals(void) {
#if defined(__SSE__)
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
    return csr;
#else
    return 0;
#endif
}

static inline void restore_denormals(unsigned int csr) {
#if defined(__SSE__)
    _mm_setcsr(csr);
#else
    (void)csr;
#endif
}

static inline int64_t max_of(const int64_t *v, int64_t n) {
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++)
        m = v[i] > m ? v[i] : m;
    return m;
}

#if defined(__AVX512F__)
/* r[c] = column c of the 16 x 16 matrix of 32-bit lanes whose row i was r[i]: 64 shuffles, in
 * registers. Shuffles move bits and compute nothing, so the lanes may hold any 32-bit data. */
static inline void transpose16_regs(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int k = 0; k < 8; k++) { /* per 128-bit lane: [a0 b0 a1 b1], [a2 b2 a3 b3] */
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 4; k++) { /* u[4k + e], lane L: rows 4k .. 4k+3 of column 4L + e */
        u[4 * k] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
        u[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xee);
        u[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
        u[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xee);
    }
    for (int e = 0; e < 4; e++) { /* gather lane L of u[e], u[4+e], u[8+e], u[12+e] */
        const __m512 v0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x88);
        const __m512 w0 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x88);
        const __m512 v1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xdd);
        const __m512 w1 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xdd);
        r[e] = _mm512_shuffle_f32x4(v0, w0, 0x88);
        r[4 + e] = _mm512_shuffle_f32x4(v1, w1, 0x88);
        r[8 + e] = _mm512_shuffle_f32x4(v0, w0, 0xdd);
        r[12 + e] = _mm512_shuffle_f32x4(v1, w1, 0xdd);
    }
}
#endif

/* The next run of blocks [begin, *end) of NB from the shared counter (begin >= NB: none left):
 * a 2 nth-th of those left (at least 1), so runs start long, read front to back, and shorten
 * towards the end, where they even out the threads. */
static inline int64_t take_blocks(atomic_llong *next, int64_t NB, int64_t nth, int64_t *end) {
    int64_t begin = atomic_load(next);
    for (;;) {
        if (begin >= NB)
            return NB;
        int64_t take = (NB - begin) / (2 * nth);
        take = take > 1 ? take : 1;
        if (atomic_compare_exchange_weak(next, &begin, begin + take)) {
            *end = begin + take;
            return begin;
        }
    }
}

/* ---- defined in one file, used in another ---- */

/* decode_attention.c */
/* One thread's scratch for decode attention: the generic path's scores [H, max_len], row
 * buffer and softmax sums; the outputs being summed (+ request_d64's running max and sum); one
 * request's output [H, D], where it is converted before it is stored. */
typedef struct {
    float *scores, *acc, *buf, *inv_sum, *out;
} decode_scratch;
void decode_scratch_init(decode_scratch *s, int64_t H, int64_t KH, int64_t D, int64_t max_len);
void decode_scratch_free(decode_scratch *s);
void decode_requests(atomic_llong *next, const float *q, const void *k_cache, const void *v_cache,
                     const int64_t *block_table, const int64_t *ctx_lens, int64_t B, int64_t W,
                     int64_t H, int64_t KH, int64_t D, int64_t block_size, float scale, int kv_fmt,
                     float k_scale, float v_scale, decode_scratch *s, float *out,
                     uint16_t *out_bf16);

/* prefill_attention.c: the work items both prompt kernels share (PF_TOK query tokens each) */
#define PF_TOK 16
typedef struct {
    int64_t b, kh, nt, first; /* request, KV head, tokens (<= PF_TOK), the first's position */
    const int64_t *table;     /* the request's block table */
} prefill_item;
int64_t *prefill_item_starts(const int64_t *q_lens, int64_t B, int64_t KH);
prefill_item prefill_item_rows(int64_t it, const int64_t *starts, const int64_t *q_lens,
                               const int64_t *ctx_lens, const int64_t *block_table, int64_t B,
                               int64_t W, int64_t H, int64_t KH, int64_t D, int64_t *at,
                               int32_t *pos, float *m, float *l);

/* elementwise.c: rows t0 .. t1 of add_rms_norm, rope_write_kv and silu_mul */
void rms_rows(const void *x, int x_bf16, const float *residual, const float *weight, float eps,
              float *res_out, void *out, int out_bf16, int64_t t0, int64_t t1, int64_t N);
void rope_rows(const void *qkv, int qkv_bf16, const int64_t *positions, const float *cos,
               const float *sin, const int64_t *slots, float *q_out, void *k_cache, void *v_cache,
               int kv_fmt, float k_scale, float v_scale, int64_t t0, int64_t t1, int64_t H,
               int64_t KH, int64_t D);
void silu_rows(const void *x, void *out, int io_bf16, int64_t t0, int64_t t1, int64_t I);

/* q4_linear.c: q4_linear in the two halves decode_step.c calls apart. From GEMM_MIN_ROWS rows of
 * x on, the panel product: at 9-16 rows it took 0.5-0.9 of q4_rows' time, at 8 and fewer up to
 * 1.6x it (the bundled model's shapes, 2 threads). */
#define GEMM_MIN_ROWS 9
int64_t q4_prepared_floats(int64_t M, int64_t K);
void q4_prepare(const float *x, int64_t M, int64_t K, int64_t r0, int64_t r1, float *xp,
                float *sums);
void q4_columns(const float *xp, const float *sums, const uint8_t *nib, const float *scale,
                const float *offset, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                int64_t n0, int64_t n1);
/* and q8_linear's: x the rows as they are (few rows), xp q4_prepare's (the panel product's
 * tiles), sums the sums of each group of `group` of x (group_sums; read only with offsets) */
void group_sums(const float *x, int64_t M, int64_t K, int G, float *sums);
void q8_columns(const float *x, const float *xp, const float *sums, const int8_t *q,
                const float *scale, const float *offset, int G, const float *bias, float *y,
                int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1);

#endif /* HEADRACE_COMMON_H */
