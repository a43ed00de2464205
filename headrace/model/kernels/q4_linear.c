/* q4_linear: y[M, N] = x[M, K] . W[N, K]^T (+ bias) for float32 x and a weight kept as the GGUF
 * file's 4-bit blocks, for decode-sized batches on any x86 CPU (AVX-512, AVX2 + FMA; plain C
 * elsewhere): up to 8 rows by passes over the blocks (q4_rows), more by a panel product
 * (gemm_panel, 256-bit on every vector build).
 * q8_linear: the same for 8-bit weights with a scale (and optionally an offset) per G of them:
 * Q8_0 blocks (G = 32), the bundled model's LM head; Q6_K's (G = 16: int8 q - 32 and the scale
 * d * sc, exact); the 5-bit types' (G = 32; Q5_1 and Q5_K with an offset).
 *
 * Why: a decode step reads every weight once. As float32 that is 4 bytes a weight; as Q4 blocks
 * (16 bytes of nibbles plus a float32 scale and offset per 32 weights) 0.75, so a step bound by
 * memory reads under a fifth of the bytes. The arithmetic stays float32: per block,
 *     sum_j x_j (scale q_j + offset) = scale * sum_j x_j q_j + offset * sum_j x_j,
 * the same products as the dequantized weight's, summed in another order.
 *
 * Layout (kernels.q4_pack): nibbles [N, K/32, 16] uint8, byte j = weight j (low nibble) and
 * weight j + 16 (high nibble) of its block, GGUF's order; scale, offset [N, K/32] float32.
 * K is a multiple of 32. Rows of W are split among the threads.
 */
#include <omp.h>

#include "common.h"

/* The few-row passes' builds: 512-bit vectors (Q4_AVX512), 256-bit AVX2 ones, or plain C. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define Q4_AVX512 1
#else
#define Q4_AVX512 0
#endif
#if Q4_AVX512 || (defined(__AVX2__) && defined(__FMA__))
#define Q4_VECTOR 1
#else
#define Q4_VECTOR 0
#endif
#if Q4_VECTOR
#include <immintrin.h>
#endif

#define Q4_ROWS 8 /* rows of x per pass over a block of W (each decoded block serves them all) */

/* The sum of each block of 32 of x's values: the offset's share of every dot product. */
static void block_sums(const float *x, int64_t M, int64_t K, float *sums) {
    const int64_t nb = K / 32;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            float s = 0.0f;
            for (int j = 0; j < 32; j++)
                s += x[m * K + b * 32 + j];
            sums[m * nb + b] = s;
        }
}

/* The vector q4_rows sum x_j (1 + q_j / 16) times 16 scale; the rest of each row's sum is
 * sum over blocks of (offset - 16 scale) * (the block's sum of x). */
static inline float q4_offsets(const float *scale, const float *offset, const float *sums,
                               int64_t nb) {
    float off = 0.0f;
    for (int64_t b = 0; b < nb; b++)
        off += (offset[b] - 16.0f * scale[b]) * sums[b];
    return off;
}

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* A block's 32 weights (as four vectors) times 32 values of x, as 8 partial sums. */
static inline __m256 dot32(__m256 q0, __m256 q1, __m256 q2, __m256 q3, const float *xb) {
    __m256 t = _mm256_mul_ps(q0, _mm256_loadu_ps(xb));
    __m256 u = _mm256_mul_ps(q1, _mm256_loadu_ps(xb + 8));
    t = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xb + 16), t);
    u = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xb + 24), u);
    return _mm256_add_ps(t, u);
}
#endif

#if Q4_AVX512
/* Rows m0 .. m0 + R - 1 of y's column n in 512-bit vectors (R a constant, as in the AVX2
 * q4_rows below, which this follows). The block's 32 nibbles become 32 bf16s of 1 + q/16 in
 * one vector (ternary logic 0xEA: (q << 3) & 0x78 | 0x3F80), and interleaving them with zeros
 * makes two vectors of float32s, weights 0-3 8-11 16-19 24-27 and 4-7 12-15 20-23 28-31
 * (the interleave works within 128-bit lanes; q4_prepare puts x in that order). Per block and
 * row: a multiply and two FMAs, where the AVX2 code makes six operations. */
static inline __attribute__((always_inline)) void
q4_rows(const float *x, const uint8_t *nib, const float *scale, const float *offset,
        const float *sums, int64_t m0, const int R, int64_t K, float *out) {
    const int64_t nb = K / 32;
    __m512 acc[Q4_ROWS];
    for (int r = 0; r < R; r++)
        acc[r] = _mm512_setzero_ps();
    const __m512i field = _mm512_set1_epi16(0x0078), one = _mm512_set1_epi16(0x3F80);
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t b = 0; b < nb; b++) {
        /* bytes 0-15: weights 0-15 in the low nibbles; 16-31: the same bytes shifted right by
         * 4 in 16-bit lanes, weights 16-31 in the low nibbles */
        const __m128i v = _mm_loadu_si128((const __m128i *)(nib + b * 16));
        const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(v),
                                                     _mm_srli_epi16(v, 4), 1);
        const __m512i q = _mm512_slli_epi16(_mm512_cvtepu8_epi16(both), 3);
        const __m512i w = _mm512_ternarylogic_epi32(q, field, one, 0xEA);
        const __m512 q0 = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, w));
        const __m512 q1 = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, w));
        const __m512 s = _mm512_set1_ps(16.0f * scale[b]);
        for (int r = 0; r < R; r++) {
            const float *xb = x + (m0 + r) * K + b * 32;
            const __m512 t = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb + 16),
                                             _mm512_mul_ps(q0, _mm512_loadu_ps(xb)));
            acc[r] = _mm512_fmadd_ps(s, t, acc[r]);
        }
    }
    for (int r = 0; r < R; r++)
        out[r] = _mm512_reduce_add_ps(acc[r]) + q4_offsets(scale, offset, sums + (m0 + r) * nb,
                                                           nb);
}
#elif defined(__AVX2__) && defined(__FMA__)
/* Rows m0 .. m0 + R - 1 of y's column n, from x in q4_prepare's order. R is a constant in each
 * caller (q4_row's switch), so the accumulators live in registers.
 *
 * Decoding without int -> float conversions: each nibble q becomes the bf16 bits of 1 + q/16
 * (0x3F80 | q << 3, exact), and interleaving those 16-bit halves with zeros makes float32s. So
 * the block's sum is over x_j (1 + q_j / 16), and
 *     scale * sum x_j q_j + offset * sum x_j = 16 scale * sum x_j (1 + q_j/16)
 *                                              + (offset - 16 scale) * sum x_j.
 * The interleave works within 128-bit halves, which orders each block's weights as
 * 0-3 8-11 | 4-7 12-15 | 16-19 24-27 | 20-23 28-31; q4_prepare puts x in that order once. */
static inline __attribute__((always_inline)) void
q4_rows(const float *x, const uint8_t *nib, const float *scale, const float *offset,
        const float *sums, int64_t m0, const int R, int64_t K, float *out) {
    const int64_t nb = K / 32;
    __m256 acc[Q4_ROWS];
    for (int r = 0; r < R; r++)
        acc[r] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi16(0x000F), high4 = _mm256_set1_epi16(0x0078);
    const __m256i one = _mm256_set1_epi16(0x3F80), zero = _mm256_setzero_si256();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(nib + b * 16)));
        const __m256i lo = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(v, low4), 3), one);
        const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 1), high4), one);
        const __m256 q0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, lo));
        const __m256 q1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, lo));
        const __m256 q2 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, hi));
        const __m256 q3 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, hi));
        const __m256 s = _mm256_set1_ps(16.0f * scale[b]);
        for (int r = 0; r < R; r++)
            acc[r] = _mm256_fmadd_ps(s, dot32(q0, q1, q2, q3, x + (m0 + r) * K + b * 32), acc[r]);
    }
    for (int r = 0; r < R; r++)
        out[r] = hsum8(acc[r]) + q4_offsets(scale, offset, sums + (m0 + r) * nb, nb);
}
#endif

#if Q4_VECTOR
static void q4_row(const float *x, const uint8_t *nib, const float *scale, const float *offset,
                   const float *sums, int64_t m0, int rows, int64_t K, float *out) {
    switch (rows) {
#define Q4_CASE(R)                                                                                 \
    case R:                                                                                        \
        q4_rows(x, nib, scale, offset, sums, m0, R, K, out);                                       \
        break;
        Q4_CASE(1) Q4_CASE(2) Q4_CASE(3) Q4_CASE(4) Q4_CASE(5) Q4_CASE(6) Q4_CASE(7) Q4_CASE(8)
#undef Q4_CASE
    }
}
#else
static void q4_row(const float *x, const uint8_t *nib, const float *scale, const float *offset,
                   const float *sums, int64_t m0, int rows, int64_t K, float *out) {
    const int64_t nb = K / 32;
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (m0 + r) * K;
        float total = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *p = nib + b * 16;
            float t = 0.0f;
            for (int j = 0; j < 16; j++)
                t += xr[b * 32 + j] * (float)(p[j] & 0x0F) + xr[b * 32 + 16 + j] * (float)(p[j] >> 4);
            total += scale[b] * t + offset[b] * sums[(m0 + r) * nb + b];
        }
        out[r] = total;
    }
}
#endif

/* The widest vectors of this build: 0 where this file runs its plain-C path, else 256 (its
 * AVX2 code), or 512 where the build also has AVX-512: q4_rows and q8_rows then use it, and
 * so does torch's float32 matmul, which from 32 rows beats the 256-bit panel product
 * (layers.Q4Linear reads it). */
int q4_linear_vector_bits(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__) && defined(__FMA__)
    return 256;
#else
    return 0;
#endif
}

/* q8_linear: W[n, k] = scale[n, k / G] * q[n, k] (+ offset[n, k / G]), q int8 [N, K], scale and
 * offset float32 [N, K/G], G 32 or 16 (each block of 32 then has two scales). With offsets, the
 * offset's share of a row's sum is offset . sums, sums the per-group sums of x (group_sums). */
void group_sums(const float *x, int64_t M, int64_t K, int G, float *sums) {
    for (int64_t i = 0; i < M * (K / G); i++) {
        float s = 0.0f;
        for (int j = 0; j < G; j++)
            s += x[i * G + j];
        sums[i] = s;
    }
}

static inline float offset_share(const float *offset, const float *sums, int64_t ng) {
    float off = 0.0f;
    for (int64_t g = 0; g < ng; g++)
        off += offset[g] * sums[g];
    return off;
}

#if Q4_AVX512
/* q8_rows (below) in 512-bit vectors: 16 weights a vector, x as it is. */
static inline __attribute__((always_inline)) void
q8_rows(const float *x, const int8_t *q, const float *scale, const float *offset,
        const float *sums, int64_t m0, const int R, int64_t K, int G, float *out) {
    const int64_t nb = K / 32;
    __m512 acc[Q4_ROWS];
    for (int r = 0; r < R; r++)
        acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m128i *qb = (const __m128i *)(q + b * 32);
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qb)));
        const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qb + 1)));
        const __m512 s0 = _mm512_set1_ps(G == 32 ? scale[b] : scale[2 * b]);
        const __m512 s1 = _mm512_set1_ps(G == 32 ? scale[b] : scale[2 * b + 1]);
        for (int r = 0; r < R; r++) {
            const float *xb = x + (m0 + r) * K + b * 32;
            if (G == 32) {
                const __m512 t = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb + 16),
                                                 _mm512_mul_ps(q0, _mm512_loadu_ps(xb)));
                acc[r] = _mm512_fmadd_ps(s0, t, acc[r]);
            } else {
                acc[r] = _mm512_fmadd_ps(s0, _mm512_mul_ps(q0, _mm512_loadu_ps(xb)), acc[r]);
                acc[r] = _mm512_fmadd_ps(s1, _mm512_mul_ps(q1, _mm512_loadu_ps(xb + 16)), acc[r]);
            }
        }
    }
    const int64_t ng = K / G;
    for (int r = 0; r < R; r++)
        out[r] = _mm512_reduce_add_ps(acc[r]) +
                 (offset != NULL ? offset_share(offset, sums + (m0 + r) * ng, ng) : 0.0f);
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 dot16(__m256 q0, __m256 q1, const float *xb) {
    return _mm256_fmadd_ps(q1, _mm256_loadu_ps(xb + 8), _mm256_mul_ps(q0, _mm256_loadu_ps(xb)));
}

static inline __attribute__((always_inline)) void
q8_rows(const float *x, const int8_t *q, const float *scale, const float *offset,
        const float *sums, int64_t m0, const int R, int64_t K, int G, float *out) {
    const int64_t nb = K / 32;
    __m256 acc[Q4_ROWS];
    for (int r = 0; r < R; r++)
        acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *qb = q + b * 32;
        const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)qb)));
        const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + 8))));
        const __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + 16))));
        const __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + 24))));
        if (G == 32) {
            const __m256 s = _mm256_set1_ps(scale[b]);
            for (int r = 0; r < R; r++)
                acc[r] = _mm256_fmadd_ps(s, dot32(q0, q1, q2, q3, x + (m0 + r) * K + b * 32), acc[r]);
        } else {
            const __m256 s0 = _mm256_set1_ps(scale[2 * b]), s1 = _mm256_set1_ps(scale[2 * b + 1]);
            for (int r = 0; r < R; r++) {
                const float *xb = x + (m0 + r) * K + b * 32;
                acc[r] = _mm256_fmadd_ps(s0, dot16(q0, q1, xb), acc[r]);
                acc[r] = _mm256_fmadd_ps(s1, dot16(q2, q3, xb + 16), acc[r]);
            }
        }
    }
    const int64_t ng = K / G;
    for (int r = 0; r < R; r++)
        out[r] = hsum8(acc[r]) +
                 (offset != NULL ? offset_share(offset, sums + (m0 + r) * ng, ng) : 0.0f);
}
#endif

#if Q4_VECTOR
static void q8_row(const float *x, const int8_t *q, const float *scale, const float *offset,
                   const float *sums, int64_t m0, int rows, int64_t K, int G, float *out) {
    switch (rows) {
#define Q8_CASE(R)                                                                                 \
    case R:                                                                                        \
        q8_rows(x, q, scale, offset, sums, m0, R, K, G, out);                                      \
        break;
        Q8_CASE(1) Q8_CASE(2) Q8_CASE(3) Q8_CASE(4) Q8_CASE(5) Q8_CASE(6) Q8_CASE(7) Q8_CASE(8)
#undef Q8_CASE
    }
}
#else
static void q8_row(const float *x, const int8_t *q, const float *scale, const float *offset,
                   const float *sums, int64_t m0, int rows, int64_t K, int G, float *out) {
    const int64_t ng = K / G;
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (m0 + r) * K;
        float total = 0.0f;
        for (int64_t g = 0; g < ng; g++) {
            float t = 0.0f;
            for (int j = 0; j < G; j++)
                t += xr[g * G + j] * (float)q[g * G + j];
            total += scale[g] * t;
        }
        out[r] = total + (offset != NULL ? offset_share(offset, sums + (m0 + r) * ng, ng) : 0.0f);
    }
}
#endif

static void q8_small(const float *x, const int8_t *q, const float *scale, const float *offset,
                     const float *bias, float *y, int64_t M, int64_t N, int64_t K, int G,
                     int num_threads) {
    float *sums = NULL;
    if (offset != NULL) {
        sums = malloc(sizeof(float) * (size_t)(M * (K / G)));
        if (sums == NULL)
            abort();
        group_sums(x, M, K, G, sums);
    }
#pragma omp parallel num_threads(num_threads)
    {
        const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
        q8_columns(x, NULL, sums, q, scale, offset, G, bias, y, M, N, K, N * tid / nth,
                   N * (tid + 1) / nth);
    }
    free(sums);
}

/* Larger batches (GEMM_MIN_ROWS and more), for which q4_rows' passes do poorly: there each block
 * is decoded again per 8 rows, and every FMA loads its x.
 *
 * x is copied once, transposed into tiles of 16 rows ([K][16] floats each; the last tile 8 wide,
 * zero-padded). Each thread takes a range of W's rows and, GEMM_NR at a time, dequantizes them
 * to float32 into a panel (scale * q + offset: with a GGUF's fp16 scales scale * q is exact, so
 * these are the dequantized weight's bits), then runs every tile of x past it: per k, two
 * vectors of 8 rows of x and GEMM_NR broadcast weights make 2 * GEMM_NR FMAs into accumulators
 * that stay in registers (12 + 3 of the 16). Each output is one chain of multiply-adds over k,
 * so a row's result does not depend on the batch around it. */
#define GEMM_NR 6

typedef void (*dequant_fn)(const void *w, const float *scale, const float *offset, int64_t n,
                           int64_t K, float *out);

/* Row n of a q4_pack weight as K float32s. */
static void dequant_q4(const void *w, const float *scale, const float *offset, int64_t n,
                       int64_t K, float *out) {
    const int64_t nb = K / 32;
    const uint8_t *nib = (const uint8_t *)w + n * nb * 16;
    scale += n * nb;
    offset += n * nb;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = nib + b * 16;
        float *o = out + b * 32;
#if defined(__AVX2__) && defined(__FMA__)
        const __m256 s = _mm256_set1_ps(scale[b]), f = _mm256_set1_ps(offset[b]);
        const __m128i v = _mm_loadu_si128((const __m128i *)p), mask = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        const __m128i part[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int i = 0; i < 4; i++)
            _mm256_storeu_ps(o + 8 * i, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(
                                                               _mm256_cvtepu8_epi32(part[i])), f));
#else
        for (int j = 0; j < 16; j++) {
            o[j] = scale[b] * (float)(p[j] & 0x0F) + offset[b];
            o[16 + j] = scale[b] * (float)(p[j] >> 4) + offset[b];
        }
#endif
    }
}

/* Row n of an 8-bit weight (int8 [N, K], scale and offset [N, K/G], offset NULL for none) as K
 * float32s: dequant_q8 for G = 32 (Q8_0, the 5-bit types), dequant_q8g16 for G = 16 (Q6_K's).
 * scale * q is exact for a GGUF's, so with an offset the one rounding is the add's, fused or
 * not. */
static inline __attribute__((always_inline)) void
dequant_8bit(const int8_t *q, const float *scale, const float *offset, int64_t K, const int G,
             float *out) {
    for (int64_t g = 0; g < K / G; g++) {
#if defined(__AVX2__) && defined(__FMA__)
        const __m256 s = _mm256_set1_ps(scale[g]);
        const __m256 f = _mm256_set1_ps(offset != NULL ? offset[g] : 0.0f);
        for (int i = 0; i < G / 8; i++) {
            const __m128i v = _mm_loadl_epi64((const __m128i *)(q + g * G + 8 * i));
            const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            _mm256_storeu_ps(out + g * G + 8 * i, offset != NULL ? _mm256_fmadd_ps(s, w, f)
                                                                 : _mm256_mul_ps(s, w));
        }
#else
        for (int j = 0; j < G; j++)
            out[g * G + j] = offset != NULL ? scale[g] * (float)q[g * G + j] + offset[g]
                                            : scale[g] * (float)q[g * G + j];
#endif
    }
}

static void dequant_q8(const void *w, const float *scale, const float *offset, int64_t n,
                       int64_t K, float *out) {
    dequant_8bit((const int8_t *)w + n * K, scale + n * (K / 32),
                 offset != NULL ? offset + n * (K / 32) : NULL, K, 32, out);
}

static void dequant_q8g16(const void *w, const float *scale, const float *offset, int64_t n,
                          int64_t K, float *out) {
    dequant_8bit((const int8_t *)w + n * K, scale + n * (K / 16),
                 offset != NULL ? offset + n * (K / 16) : NULL, K, 16, out);
}

/* Rows r0 .. r1 - 1 of x [M, K] into tiles: rows m0 .. m0 + width - 1 at xt + m0 * K as
 * [K][width], width 16 (8 for a last tile of 8 rows). The call that prepares row M - 1 zeroes
 * the padding after it. */
static void tile_rows(const float *x, int64_t M, int64_t K, int64_t r0, int64_t r1, float *xt) {
    const int64_t padded = (M + 7) / 8 * 8;
    for (int64_t m = r0; m < (r1 == M ? padded : r1); m++) {
        const int64_t m0 = m / 16 * 16;
        const int width = padded - m0 >= 16 ? 16 : 8;
        float *t = xt + m0 * K + (m - m0);
        for (int64_t k = 0; k < K; k++)
            t[k * width] = m < M ? x[m * K + k] : 0.0f;
    }
}

/* y[m0 + j, c] for the tile's 8 * V rows and the panel's C rows of W (V, C constants in each
 * caller), written where m0 + j < M. */
static inline __attribute__((always_inline)) void
gemm_tile(const float *t, const float *panel, const float *bias, float *y, int64_t m0, int64_t M,
          int64_t N, int64_t K, const int V, const int C) {
    float out[2][8][GEMM_NR];
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[2][GEMM_NR];
    for (int v = 0; v < V; v++)
        for (int c = 0; c < C; c++)
            acc[v][c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m256 xv[2];
        for (int v = 0; v < V; v++)
            xv[v] = _mm256_loadu_ps(t + k * 8 * V + 8 * v);
        for (int c = 0; c < C; c++) {
            const __m256 w = _mm256_broadcast_ss(panel + c * K + k);
            for (int v = 0; v < V; v++)
                acc[v][c] = _mm256_fmadd_ps(xv[v], w, acc[v][c]);
        }
    }
    for (int v = 0; v < V; v++)
        for (int c = 0; c < C; c++) {
            float lanes[8];
            _mm256_storeu_ps(lanes, acc[v][c]);
            for (int j = 0; j < 8; j++)
                out[v][j][c] = lanes[j];
        }
#else
    for (int v = 0; v < V; v++)
        for (int j = 0; j < 8; j++)
            for (int c = 0; c < C; c++) {
                float s = 0.0f;
                for (int64_t k = 0; k < K; k++)
                    s += t[k * 8 * V + 8 * v + j] * panel[c * K + k];
                out[v][j][c] = s;
            }
#endif
    for (int v = 0; v < V; v++)
        for (int j = 0; j < 8 && m0 + 8 * v + j < M; j++)
            for (int c = 0; c < C; c++)
                y[(m0 + 8 * v + j) * N + c] = out[v][j][c] + (bias != NULL ? bias[c] : 0.0f);
}

/* The tiles of rows r0 .. r1 - 1 of xt (r0 a multiple of 16; r1 too, or M) against a panel of
 * C rows of W: y's columns n .. n + C - 1 (y, bias offset). */
static void gemm_panel(const float *xt, const float *panel, const float *bias, float *y,
                       int64_t r0, int64_t r1, int64_t M, int64_t N, int64_t K, int C) {
    const int64_t padded = (M + 7) / 8 * 8;
    for (int64_t m0 = r0; m0 < (r1 == M ? padded : r1); m0 += 16) {
        const int V = padded - m0 >= 16 ? 2 : 1;
        const float *t = xt + m0 * K;
        switch (V * 8 + C) {
#define GEMM_CASE(V, C)                                                                            \
    case V * 8 + C:                                                                                \
        gemm_tile(t, panel, bias, y, m0, M, N, K, V, C);                                           \
        break;
            GEMM_CASE(1, 1) GEMM_CASE(1, 2) GEMM_CASE(1, 3) GEMM_CASE(1, 4) GEMM_CASE(1, 5)
            GEMM_CASE(1, 6) GEMM_CASE(2, 1) GEMM_CASE(2, 2) GEMM_CASE(2, 3) GEMM_CASE(2, 4)
            GEMM_CASE(2, 5) GEMM_CASE(2, 6)
#undef GEMM_CASE
        }
    }
}

/* Columns n0 .. n1 - 1 of y [M, N] = x . W^T (+ bias), x as tile_rows left it, W's rows read
 * by `dequant`. */
static void gemm_columns(const float *xt, const void *w, const float *scale, const float *offset,
                         dequant_fn dequant, const float *bias, float *y, int64_t M, int64_t N,
                         int64_t K, int64_t n0, int64_t n1) {
    float *panel = aligned_alloc(64, sizeof(float) * (size_t)(GEMM_NR * K));
    if (panel == NULL)
        abort();
    /* Rows a pass over W serves: at least 64 (a decode step's in one pass), more while their
     * tiles fit in ~256 KB, so prompt-sized x stays in L2 as every panel runs past it instead
     * of streaming from memory once per panel. */
    int64_t rows = 65536 / K / 16 * 16;
    rows = rows > 64 ? rows : 64;
    for (int64_t r0 = 0; r0 < M; r0 += rows) {
        const int64_t r1 = M - r0 > rows ? r0 + rows : M;
        for (int64_t n = n0; n < n1; n += GEMM_NR) {
            const int C = n1 - n < GEMM_NR ? (int)(n1 - n) : GEMM_NR;
            for (int c = 0; c < C; c++)
                dequant(w, scale, offset, n + c, K, panel + c * K);
            gemm_panel(xt, panel, bias != NULL ? bias + n : NULL, y + n, r0, r1, M, N, K, C);
        }
    }
    free(panel);
}

/* The float32s q4_prepare writes to xp for M rows of K. */
int64_t q4_prepared_floats(int64_t M, int64_t K) {
    return M < GEMM_MIN_ROWS ? M * K : (M + 15) / 16 * 16 * K;
}

/* Rows r0 .. r1 - 1 of x [M, K] as q4_columns reads them, into xp (q4_prepared_floats) and
 * sums [M, K/32]. Few rows: each row in the lane order q4_rows reads a block of 32 in (a copy
 * for the plain-C path), and the sum of each block of 32; more: tile_rows' tiles (no sums).
 * Callers may prepare rows apart. */
void q4_prepare(const float *x, int64_t M, int64_t K, int64_t r0, int64_t r1, float *xp,
                float *sums) {
    if (M >= GEMM_MIN_ROWS) {
        tile_rows(x, M, K, r0, r1, xp);
        return;
    }
#if Q4_AVX512
    static const int order[32] = {0, 1,  2,  3,  8,  9,  10, 11, 16, 17, 18, 19, 24, 25, 26, 27,
                                  4, 5,  6,  7,  12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
#elif defined(__AVX2__) && defined(__FMA__)
    static const int order[32] = {0,  1,  2,  3,  8,  9,  10, 11, 4,  5,  6,  7,  12, 13, 14, 15,
                                  16, 17, 18, 19, 24, 25, 26, 27, 20, 21, 22, 23, 28, 29, 30, 31};
#endif
#if Q4_VECTOR
    for (int64_t i = r0 * K; i < r1 * K; i += 32)
        for (int j = 0; j < 32; j++)
            xp[i + j] = x[i + order[j]];
#else
    for (int64_t i = r0 * K; i < r1 * K; i++)
        xp[i] = x[i];
#endif
    block_sums(x + r0 * K, r1 - r0, K, sums + r0 * (K / 32));
}

/* Columns n0 .. n1 - 1 of y [M, N] = x . W^T (+ bias), from q4_prepare's xp and sums. Each
 * column's sums are the same whichever thread computes it. */
void q4_columns(const float *xp, const float *sums, const uint8_t *nib, const float *scale,
                const float *offset, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                int64_t n0, int64_t n1) {
    if (M >= GEMM_MIN_ROWS) {
        gemm_columns(xp, nib, scale, offset, dequant_q4, bias, y, M, N, K, n0, n1);
        return;
    }
    const int64_t nb = K / 32;
    float out[Q4_ROWS];
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m0 = 0; m0 < M; m0 += Q4_ROWS) {
            const int rows = M - m0 < Q4_ROWS ? (int)(M - m0) : Q4_ROWS;
            q4_row(xp, nib + n * nb * 16, scale + n * nb, offset + n * nb, sums, m0, rows, K, out);
            for (int r = 0; r < rows; r++)
                y[(m0 + r) * N + n] = out[r] + (bias != NULL ? bias[n] : 0.0f);
        }
}

void q4_linear(const float *x, const uint8_t *nib, const float *scale, const float *offset,
               const float *bias, float *y, int64_t M, int64_t N, int64_t K, int num_threads) {
    float *xp = aligned_alloc(64, sizeof(float) * (size_t)q4_prepared_floats(M, K));
    float *sums = malloc(sizeof(float) * (size_t)(M * (K / 32)));
    if (xp == NULL || sums == NULL)
        abort();
    q4_prepare(x, M, K, 0, M, xp, sums);
#pragma omp parallel num_threads(num_threads)
    {
        const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
        q4_columns(xp, sums, nib, scale, offset, bias, y, M, N, K, N * tid / nth,
                   N * (tid + 1) / nth);
    }
    free(xp);
    free(sums);
}

/* Columns n0 .. n1 - 1 of y [M, N] = x . W^T (+ bias) for an 8-bit weight: few rows from x as it
 * is (and, with offsets, sums: group_sums of x), more from xp, q4_prepare's tiles of x. The same
 * arithmetic as q8_linear's, column by column. */
void q8_columns(const float *x, const float *xp, const float *sums, const int8_t *q,
                const float *scale, const float *offset, int G, const float *bias, float *y,
                int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    if (M >= GEMM_MIN_ROWS) {
        gemm_columns(xp, q, scale, offset, G == 32 ? dequant_q8 : dequant_q8g16, bias, y, M, N, K,
                     n0, n1);
        return;
    }
    const int64_t ng = K / G;
    float out[Q4_ROWS];
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m0 = 0; m0 < M; m0 += Q4_ROWS) {
            const int rows = M - m0 < Q4_ROWS ? (int)(M - m0) : Q4_ROWS;
            q8_row(x, q + n * K, scale + n * ng, offset != NULL ? offset + n * ng : NULL, sums, m0,
                   rows, K, G, out);
            for (int r = 0; r < rows; r++)
                y[(m0 + r) * N + n] = out[r] + (bias != NULL ? bias[n] : 0.0f);
        }
}

void q8_linear(const float *x, const int8_t *q, const float *scale, const float *offset,
               const float *bias, float *y, int64_t M, int64_t N, int64_t K, int group,
               int num_threads) {
    if (group != 32 && group != 16)
        abort(); /* the binding passes K over the scales' count: 32 or 16 */
    if (M < GEMM_MIN_ROWS) {
        q8_small(x, q, scale, offset, bias, y, M, N, K, group, num_threads);
        return;
    }
    float *xt = aligned_alloc(64, sizeof(float) * (size_t)q4_prepared_floats(M, K));
    if (xt == NULL)
        abort();
    tile_rows(x, M, K, 0, M, xt);
#pragma omp parallel num_threads(num_threads)
    {
        const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
        gemm_columns(xt, q, scale, offset, group == 32 ? dequant_q8 : dequant_q8g16, bias, y, M,
                     N, K, N * tid / nth, N * (tid + 1) / nth);
    }
    free(xt);
}
