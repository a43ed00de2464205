/* add_rms_norm, rope_write_kv, silu_mul: the short runs of elementwise torch ops around the
 * linears (residual add + RMSNorm; RoPE + the K/V cache write; SwiGLU's activation), each as
 * one pass, because at decode sizes every torch op costs its thread wake-up. Their *_rows
 * bodies also serve decode_step.c's fused step.
 *
 * argmax_rows: greedy sampling's argmax over bf16 or float32 logits, without the upcast copy
 * (torch's argmax over [64, 49152] float32 took 3 ms, this 0.2-0.4 ms).
 *
 * logprob_rows: prompt logprobs' log_softmax, rank and top k in one call (over [256, 49152]
 * bf16 logits on the AMX Xeon: 4.5 ms, torch's ops 83 ms). */
#include "common.h"

/* The pre-norm step of a decoder layer, one call instead of a cast, an add and RMSNorm's
 * several ops (each a parallel region costing more than its arithmetic at decode sizes).
 * x: [T, N] float32 or bf16 (x_bf16); residual: [T, N] float32 or NULL;
 * res_out[t] = x[t] + residual[t] (float32);
 * out[t] = res_out[t] / sqrt(mean(res_out[t]^2) + eps) * weight, float32 or bf16 (out_bf16).
 * rms_rows: rows t0 .. t1 only, for a caller that shares them out itself. */
void rms_rows(const void *x, int x_bf16, const float *residual, const float *weight,
              float eps, float *res_out, void *out, int out_bf16, int64_t t0, int64_t t1,
              int64_t N) {
    for (int64_t t = t0; t < t1; t++) {
        float *r = res_out + t * N;
        if (x_bf16) {
            const uint16_t *xr = (const uint16_t *)x + t * N;
#pragma omp simd
            for (int64_t i = 0; i < N; i++)
                r[i] = bf16_to_f32(xr[i]);
        } else {
            memmove(r, (const float *)x + t * N, sizeof(float) * (size_t)N);
        }
        float ss = 0.0f;
        if (residual != NULL) {
            const float *rr = residual + t * N;
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < N; i++) {
                r[i] += rr[i];
                ss += r[i] * r[i];
            }
        } else {
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < N; i++)
                ss += r[i] * r[i];
        }
        const float inv = 1.0f / sqrtf(ss / (float)N + eps);
        if (out_bf16) {
            uint16_t *o = (uint16_t *)out + t * N;
#pragma omp simd
            for (int64_t i = 0; i < N; i++)
                o[i] = f32_to_bf16(r[i] * inv * weight[i]);
        } else {
            float *o = (float *)out + t * N;
#pragma omp simd
            for (int64_t i = 0; i < N; i++)
                o[i] = r[i] * inv * weight[i];
        }
    }
}

/* Below ~64k elements waking a second thread costs more than it saves (these three). */
void add_rms_norm(const void *x, int x_bf16, const float *residual, const float *weight,
                  float eps, float *res_out, void *out, int out_bf16, int64_t T, int64_t N,
                  int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (T * N >= 65536) schedule(static)
    for (int64_t t = 0; t < T; t++)
        rms_rows(x, x_bf16, residual, weight, eps, res_out, out, out_bf16, t, t + 1, N);
}

/* Rotate-half RoPE on q and k, and the step's K/V written into the paged cache, in one call.
 * qkv: [T, (H + 2 * KH) * D] float32 or bf16 (qkv_bf16), the fused projection's output.
 * cos, sin: [max_pos, D] float32 tables; positions, slots: [T].
 * q_out: [T, H, D] float32, rotated. The cache (k_cache/v_cache: [slots, KH, D], of format
 * kv_fmt) gets rotated k and plain v at each token's slot (fp8: over k_scale, v_scale).
 * rope_rows: tokens t0 .. t1 only, for a caller that shares them out itself. */
void rope_rows(const void *qkv, int qkv_bf16, const int64_t *positions, const float *cos,
               const float *sin, const int64_t *slots, float *q_out, void *k_cache,
               void *v_cache, int kv_fmt, float k_scale, float v_scale, int64_t t0, int64_t t1,
               int64_t H, int64_t KH, int64_t D) {
    const int64_t width = (H + 2 * KH) * D, half = D / 2;
    for (int64_t t = t0; t < t1; t++) {
        float x[width]; /* this token's q, k, v in float32 */
        if (qkv_bf16) {
            const uint16_t *src = (const uint16_t *)qkv + t * width;
#pragma omp simd
            for (int64_t i = 0; i < width; i++)
                x[i] = bf16_to_f32(src[i]);
        } else {
            memcpy(x, (const float *)qkv + t * width, sizeof(float) * (size_t)width);
        }
        const float *c = cos + positions[t] * D, *s = sin + positions[t] * D;
        float rot[D];
        for (int64_t h = 0; h < H + KH; h++) { /* q heads, then k heads */
            const float *xh = x + h * D;
            for (int64_t i = 0; i < half; i++) {
                rot[i] = xh[i] * c[i] - xh[i + half] * s[i];
                rot[i + half] = xh[i + half] * c[i + half] + xh[i] * s[i + half];
            }
            if (h < H) {
                memcpy(q_out + (t * H + h) * D, rot, sizeof(float) * (size_t)D);
                continue;
            }
            const int64_t at = (slots[t] * KH + (h - H)) * D;
            const float *v = x + (H + KH + (h - H)) * D;
            store_row(k_cache, at, rot, D, kv_fmt, k_scale);
            store_row(v_cache, at, v, D, kv_fmt, v_scale);
        }
    }
}

void rope_write_kv(const void *qkv, int qkv_bf16, const int64_t *positions, const float *cos,
                   const float *sin, const int64_t *slots, float *q_out, void *k_cache,
                   void *v_cache, int kv_fmt, float k_scale, float v_scale, int64_t T,
                   int64_t H, int64_t KH, int64_t D, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (T * (H + 2 * KH) * D >= 65536) \
    schedule(static)
    for (int64_t t = 0; t < T; t++)
        rope_rows(qkv, qkv_bf16, positions, cos, sin, slots, q_out, k_cache, v_cache, kv_fmt,
                  k_scale, v_scale, t, t + 1, H, KH, D);
}

/* silu(a) = a * sigmoid(a), from exp of a non-positive argument only (no overflow). */
static inline float silu(float a) {
    const float e = exp_nonpos(-fabsf(a));
    return a * (a >= 0.0f ? 1.0f : e) / (1.0f + e);
}

#if defined(__AVX512F__)
/* silu, 16 lanes at a time, with an exact division (vdivps) as torch's silu has; the compiler's
 * vectorization of the scalar loop cost ~2 cycles per element. */
static inline __m512 silu16(__m512 a) {
    const __m512 neg_abs = _mm512_or_ps(a, _mm512_set1_ps(-0.0f));
    const __m512 e = exp_nonpos16(neg_abs);
    const __mmask16 negative = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 num = _mm512_mask_mul_ps(a, negative, a, e); /* a, or a * e where a < 0 */
    const __m512 den = _mm512_add_ps(e, _mm512_set1_ps(1.0f));
    return _mm512_div_ps(num, den);
}

static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

#elif defined(__AVX2__) && defined(__FMA__)
/* silu16's twin, 8 lanes (the scalar loop did not vectorize: ~16 cycles per element). */
static inline __m256 silu8(__m256 a) {
    const __m256 e = exp_nonpos8(_mm256_or_ps(a, _mm256_set1_ps(-0.0f)));
    const __m256 negative = _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_LT_OQ);
    const __m256 num = _mm256_blendv_ps(a, _mm256_mul_ps(a, e), negative);
    return _mm256_div_ps(num, _mm256_add_ps(e, _mm256_set1_ps(1.0f)));
}
#endif

/* SwiGLU's activation: out[t] = silu(gate[t]) * up[t], where x[t] = [gate | up] ([T, 2 * I])
 * as the fused gate/up projection writes it. x and out are float32 or bf16 (io_bf16).
 * silu_rows: rows t0 .. t1 only, for a caller that shares them out itself. */
void silu_rows(const void *x, void *out, int io_bf16, int64_t t0, int64_t t1, int64_t I) {
    for (int64_t t = t0; t < t1; t++) {
        int64_t i = 0;
        if (io_bf16) {
            const uint16_t *g = (const uint16_t *)x + t * 2 * I, *u = g + I;
            uint16_t *o = (uint16_t *)out + t * I;
#if defined(__AVX512F__)
            for (; i + 16 <= I; i += 16) {
                /* silu rounded to bf16 before the multiply, as torch's two bf16 ops do */
                const __m256i s = to_bf16x16(silu16(load_bf16x16(g + i)));
                const __m512 prod = _mm512_mul_ps(load_bf16x16((const uint16_t *)&s),
                                                  load_bf16x16(u + i));
                _mm256_storeu_si256((__m256i *)(o + i), to_bf16x16(prod));
            }
#endif
            for (; i < I; i++) {
                const float s = bf16_to_f32(f32_to_bf16(silu(bf16_to_f32(g[i]))));
                o[i] = f32_to_bf16(s * bf16_to_f32(u[i]));
            }
        } else {
            const float *g = (const float *)x + t * 2 * I, *u = g + I;
            float *o = (float *)out + t * I;
#if defined(__AVX512F__)
            for (; i + 16 <= I; i += 16)
                _mm512_storeu_ps(o + i,
                                 _mm512_mul_ps(silu16(_mm512_loadu_ps(g + i)),
                                               _mm512_loadu_ps(u + i)));
#elif defined(__AVX2__) && defined(__FMA__)
            for (; i + 8 <= I; i += 8)
                _mm256_storeu_ps(o + i,
                                 _mm256_mul_ps(silu8(_mm256_loadu_ps(g + i)),
                                               _mm256_loadu_ps(u + i)));
#endif
            for (; i < I; i++)
                o[i] = silu(g[i]) * u[i];
        }
    }
}

void silu_mul(const void *x, void *out, int io_bf16, int64_t T, int64_t I, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (T * I >= 65536) schedule(static)
    for (int64_t t = 0; t < T; t++)
        silu_rows(x, out, io_bf16, t, t + 1, I);
}

/* The first index of each row's largest value, as torch.argmax: a NaN counts as the largest
 * (the first NaN wins). Rows are float32 or bf16. One vectorized pass of block maxima finds the
 * first block holding the maximum (or a NaN); only that block is searched element by element. */
#define ARGMAX_BLOCK 512
static inline float logit_at(const void *row, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

static int64_t argmax_row(const void *row, int bf16, int64_t n) {
    float best = -INFINITY;
    int64_t best_block = 0;
    for (int64_t b0 = 0; b0 < n; b0 += ARGMAX_BLOCK) {
        const int64_t end = b0 + ARGMAX_BLOCK < n ? b0 + ARGMAX_BLOCK : n;
        float m = -INFINITY;
        int nan = 0;
        if (bf16) {
            const uint16_t *x = (const uint16_t *)row;
#pragma omp simd reduction(max : m) reduction(| : nan)
            for (int64_t i = b0; i < end; i++) {
                const float v = bf16_to_f32(x[i]);
                nan |= v != v;
                m = v > m ? v : m;
            }
        } else {
            const float *x = (const float *)row;
#pragma omp simd reduction(max : m) reduction(| : nan)
            for (int64_t i = b0; i < end; i++) {
                nan |= x[i] != x[i];
                m = x[i] > m ? x[i] : m;
            }
        }
        if (nan) { /* no earlier block had one: the first NaN of this block is the answer */
            for (int64_t i = b0; i < end; i++)
                if (logit_at(row, bf16, i) != logit_at(row, bf16, i))
                    return i;
        }
        if (m > best) {
            best = m;
            best_block = b0;
        }
    }
    for (int64_t i = best_block; i < n; i++)
        if (logit_at(row, bf16, i) == best)
            return i;
    return 0; /* n == 0; all -inf rows were answered by the scan (index 0) */
}

void argmax_rows(const void *x, int bf16, int64_t rows, int64_t n, int64_t *out,
                 int num_threads) {
    const int64_t esize = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(num_threads) if (rows * n >= 65536) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        out[r] = argmax_row((const char *)x + r * n * esize, bf16, n);
}

/* logprob_rows: log-probabilities from logits, for prompt logprobs. Per row of x ([rows, n],
 * float32 or bf16) and its token target[r]: target_lp[r] = x[target] - logsumexp(x); rank[r] =
 * 1 + how many logits exceed x[target]; top_lp / top_ids ([rows, k], k <= 64): the k largest
 * log-probabilities, best first (equal ones by index). One pass finds the maximum, one sums
 * the exponentials and counts the rank, one keeps the top k (a block is skipped when its
 * maximum cannot enter); torch's log_softmax, compare and topk take a pass each and write a
 * [rows, n] tensor between them. */
#define TOPK_BLOCK 256
static void logprob_row(const float *x, int64_t n, int64_t target, int k, float *target_lp,
                        int64_t *rank, float *top_lp, int64_t *top_ids) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; i++)
        m = x[i] > m ? x[i] : m;
    const float xt = x[target];
    double s = 0.0; /* blocks of float32 sums, added in double: 49,152 terms in float32 alone
                     * drifted by 1e-4 */
    int64_t above = 0;
    for (int64_t b0 = 0; b0 < n; b0 += TOPK_BLOCK) {
        const int64_t end = b0 + TOPK_BLOCK < n ? b0 + TOPK_BLOCK : n;
        float bs = 0.0f;
        int64_t ba = 0;
#pragma omp simd reduction(+ : bs, ba)
        for (int64_t i = b0; i < end; i++) {
            bs += exp_nonpos(x[i] - m);
            ba += x[i] > xt;
        }
        s += bs;
        above += ba;
    }
    const float lse = m + (float)log(s);
    *target_lp = xt - lse;
    *rank = above + 1;
    int have = 0;
    for (int64_t b0 = 0; b0 < n && k > 0; b0 += TOPK_BLOCK) {
        const int64_t end = b0 + TOPK_BLOCK < n ? b0 + TOPK_BLOCK : n;
        float bm = -INFINITY;
#pragma omp simd reduction(max : bm)
        for (int64_t i = b0; i < end; i++)
            bm = x[i] > bm ? x[i] : bm;
        if (have == k && bm <= top_lp[k - 1])
            continue;
        for (int64_t i = b0; i < end; i++) {
            if (have == k && x[i] <= top_lp[k - 1])
                continue;
            int j = have < k ? have++ : k - 1; /* insert x[i] before the first smaller one */
            while (j > 0 && top_lp[j - 1] < x[i]) {
                top_lp[j] = top_lp[j - 1];
                top_ids[j] = top_ids[j - 1];
                j--;
            }
            top_lp[j] = x[i];
            top_ids[j] = i;
        }
    }
    for (int j = 0; j < have; j++)
        top_lp[j] -= lse;
}

void logprob_rows(const void *x, int bf16, int64_t rows, int64_t n, const int64_t *target, int k,
                  float *target_lp, int64_t *rank, float *top_lp, int64_t *top_ids,
                  int num_threads) {
#pragma omp parallel num_threads(num_threads) if (rows * n >= 65536)
    {
        float *buf = bf16 ? malloc(sizeof(float) * (size_t)n) : NULL;
        if (bf16 && buf == NULL)
            abort();
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *row = (const float *)x + r * n;
            if (bf16) {
                const uint16_t *src = (const uint16_t *)x + r * n;
#pragma omp simd
                for (int64_t i = 0; i < n; i++)
                    buf[i] = bf16_to_f32(src[i]);
                row = buf;
            }
            logprob_row(row, n, target[r], k, target_lp + r, rank + r, top_lp + r * k,
                        top_ids + r * k);
        }
        free(buf);
    }
}
