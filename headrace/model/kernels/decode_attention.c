/* paged_decode_attention: decode attention read straight from the paged KV cache. One query
 * token per request, one request per work item: its query heads are scored against its keys
 * block by block through the block table, so K and V are read once, where they lie, with no
 * gathered copy. Head dim 64 (up to 4 query heads per KV head) takes one pass per request with
 * the online softmax; other shapes take two: scores (kept in a per-thread buffer), then the
 * softmax-weighted sum of V. Arithmetic is float32 whatever the cache's dtype (float32, bf16,
 * fp8).
 * decode_step.c runs the same per-request code (decode_requests) inside its fused step. */
#include "common.h"

/* q . k over D elements. */
static inline float dot(const float *restrict q, const float *restrict k, int64_t D) {
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
        for (int64_t d = 16; d < D; d += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; d++)
        s += q[d] * k[d];
    return s;
}

/* acc += p * v over D elements. */
static inline void axpy(float *restrict acc, float p, const float *restrict v, int64_t D) {
#pragma omp simd
    for (int64_t d = 0; d < D; d++)
        acc[d] += p * v[d];
}

/* Asks for the next token row (`bytes` long) of the block after this one, while this one is
 * computed: spread over the block's tokens, so the prefetches never queue up at once. */
static inline void prefetch_row(const char *row, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64)
        __builtin_prefetch(row + off, 0, 1);
}

/* The block holding the tokens after the block at t0, or NULL at the context's end. */
static inline const char *next_block(const void *cache, const int64_t *table, int64_t t0,
                                     int64_t len, int64_t block_size, int64_t block_bytes) {
    if (t0 + block_size >= len)
        return NULL;
    return (const char *)cache + table[t0 / block_size + 1] * block_bytes;
}

/* In place, per query head h: scores[h * len + t] -> exp(score - max) over t; inv_sum[h] is
 * one over their sum (the output's normalization, applied once at the end). */
static inline void softmax_heads(float *scores, int64_t H, int64_t len, float *inv_sum) {
    for (int64_t h = 0; h < H; h++) {
        float *sh = scores + h * len;
        float m = sh[0];
        /* vectorized: as a scalar loop each compare waits on the one before (perf put it at a
         * fifth of the kernel's time) */
#pragma omp simd reduction(max : m)
        for (int64_t t = 1; t < len; t++)
            m = sh[t] > m ? sh[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; t++) {
            sh[t] = exp_nonpos(sh[t] - m);
            sum += sh[t];
        }
        inv_sum[h] = 1.0f / sum;
    }
}

/* How many positions from t on, at most 16, lie in t's cache block and before len. */
static inline int64_t chunk_len(int64_t t, int64_t len, int64_t block_size) {
    int64_t n = block_size - t % block_size;
    n = n < 16 ? n : 16;
    return n < len - t ? n : len - t;
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
/* Where position t's row lies in the cache, in elements (`row` of them a position). These
 * helpers are forced inline: the one-pass paths call them in their inner loops, and as calls
 * they cost a bf16 cache ~30% (decode_attention.py, 20.8 -> 27.0 ms). */
static inline __attribute__((always_inline)) int64_t
row_at(const int64_t *table, int64_t t, int64_t block_size, int64_t row) {
    return (table[t / block_size] * block_size + t % block_size) * row;
}

/* The chunk after the one of n positions at t0: its first K and V rows, and its length (0 and
 * NULL rows at the context's end). */
typedef struct {
    const char *k, *v;
    int64_t n;
} next_chunk;

static inline __attribute__((always_inline)) next_chunk
chunk_after(const void *k_cache, const void *v_cache, const int64_t *table, int64_t t0, int64_t n,
            int64_t len, int64_t block_size, int64_t row, int64_t elem) {
    next_chunk next = {NULL, NULL, 0};
    if (t0 + n < len) {
        const int64_t at = row_at(table, t0 + n, block_size, row) * elem;
        next.k = (const char *)k_cache + at;
        next.v = (const char *)v_cache + at;
        next.n = chunk_len(t0 + n, len, block_size);
    }
    return next;
}

/* Asks for one head's 64-element slice of row i of the next chunk, K and V, into L2. */
static inline __attribute__((always_inline)) void
prefetch_slice(next_chunk next, int64_t off, int64_t elem) {
    for (int64_t o = 0; o < 64 * elem; o += 64) {
        _mm_prefetch(next.k + off + o, _MM_HINT_T1);
        _mm_prefetch(next.v + off + o, _MM_HINT_T1);
    }
}

/* The online softmax's state for H heads before the first chunk: outputs acc [H, 64] at 0,
 * then the running maxima at -inf and sums at 0. */
static inline __attribute__((always_inline)) void online_start(float *acc, int64_t H) {
    float *run_max = acc + H * 64, *run_sum = run_max + H;
    for (int64_t h = 0; h < H; h++) {
        run_max[h] = -INFINITY;
        run_sum[h] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)(H * 64));
}

#endif

#if defined(__AVX512F__)
/* head_dim 64 with at most 4 query heads per KV head (SmolLM2, Llama 3.2 1B, Qwen2 0.5B):
 * each KV head keeps its G query heads, then its G accumulators, in registers, 4 zmm each, and
 * converts each 64-element K or V slice once, in registers. The generic loop instead
 * round-trips every token row through a float32 buffer and reloads q and the accumulators from
 * memory for each head. `G` is a constant in each inlined copy. */
static inline void load64(const void *base, int64_t index, int kv_fmt, __m512 x[4]) {
    if (kv_fmt == KV_F32) {
        const float *p = (const float *)base + index;
        for (int c = 0; c < 4; c++)
            x[c] = _mm512_loadu_ps(p + 16 * c);
    } else if (kv_fmt == KV_BF16) {
        const uint16_t *p = (const uint16_t *)base + index;
        for (int c = 0; c < 4; c++)
            x[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + 16 * c))), 16));
    } else { /* fp8 over fp8_unit (HAVE_FP8_VECTORS: decode_request's check) */
#if defined(HAVE_FP8_VECTORS)
        const uint8_t *p = (const uint8_t *)base + index;
        for (int c = 0; c < 4; c++) {
            const __m128i b = _mm_loadu_si128((const __m128i *)(p + 16 * c));
            const __m128i z = _mm_setzero_si128();
            const __m256i h = _mm256_set_m128i(fp8_as_f16(_mm_unpackhi_epi8(z, b), kv_fmt),
                                               fp8_as_f16(_mm_unpacklo_epi8(z, b), kv_fmt));
            x[c] = _mm512_cvtph_ps(h);
        }
#endif
    }
}

/* One request, in one pass over its cache with the online softmax: chunk by chunk of up to 16
 * positions, each KV head's G scores, their exp against the running max (earlier sums and
 * outputs rescaled when it grows), and the values they weigh. K and V are read together,
 * chunk after chunk, and while a chunk is computed the next one's rows are asked for into L2,
 * one head's slice at a time, so the reads stay spread over the work: two passes (all scores,
 * then all values) left the reads bunched and took ~1.2x as long. acc: the per-thread buffer,
 * G * KH * 66 floats (outputs, running max, running sum); ob: the request's output [H, 64]. */
static inline __attribute__((always_inline)) void
request_d64(const float *qb, const void *k_cache, const void *v_cache, const int64_t *table,
            int64_t len, int64_t block_size, int64_t KH, float scale, float v_scale, int kv_fmt,
            int64_t elem, float *acc, float *ob, const int G) {
    const int64_t row = KH * 64, H = KH * G;
    const float unit = fp8_unit(kv_fmt), qk_scale = scale * unit; /* load64's fp8 */
    const float out_scale = unit * v_scale;
    float *run_max = acc + H * 64, *run_sum = run_max + H;
    online_start(acc, H);
    for (int64_t t0 = 0, n; t0 < len; t0 += n) {
        n = chunk_len(t0, len, block_size);
        const int64_t base = row_at(table, t0, block_size, row);
        const next_chunk next =
            chunk_after(k_cache, v_cache, table, t0, n, len, block_size, row, elem);
        const __mmask16 live = (__mmask16)((1u << n) - 1);
        for (int64_t kh = 0; kh < KH; kh++) {
            float p[4][16] __attribute__((aligned(64)));
            __m512 q[4][4];
            for (int g = 0; g < G; g++)
                for (int c = 0; c < 4; c++)
                    q[g][c] = _mm512_loadu_ps(qb + (kh * G + g) * 64 + 16 * c);
            for (int64_t i = 0; i < n; i++) {
                __m512 k[4];
                load64(k_cache, base + i * row + kh * 64, kv_fmt, k);
                if (i < next.n) /* this head's slice of the next chunk's row i */
                    prefetch_slice(next, (i * row + kh * 64) * elem, elem);
                for (int g = 0; g < G; g++) {
                    __m512 a = _mm512_mul_ps(q[g][0], k[0]);
                    for (int c = 1; c < 4; c++)
                        a = _mm512_fmadd_ps(q[g][c], k[c], a);
                    p[g][i] = _mm512_reduce_add_ps(a);
                }
            }
            __m512 o[4][4];
            for (int g = 0; g < G; g++) {
                const int64_t h = kh * G + g;
                const __m512 s = _mm512_mul_ps(_mm512_maskz_load_ps(live, p[g]),
                                               _mm512_set1_ps(qk_scale));
                const float chunk_max = _mm512_mask_reduce_max_ps(live, s);
                const float m = chunk_max > run_max[h] ? chunk_max : run_max[h];
                /* exp(old max - new max): the earlier sum and outputs in the new max's scale */
                const float r = run_max[h] == -INFINITY ? 0.0f : exp_nonpos(run_max[h] - m);
                const __m512 e =
                    _mm512_maskz_mov_ps(live, exp_nonpos16(_mm512_sub_ps(s, _mm512_set1_ps(m))));
                run_sum[h] = run_sum[h] * r + _mm512_reduce_add_ps(e);
                run_max[h] = m;
                _mm512_store_ps(p[g], e);
                for (int c = 0; c < 4; c++)
                    o[g][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + h * 64 + 16 * c),
                                            _mm512_set1_ps(r));
            }
            for (int64_t i = 0; i < n; i++) {
                __m512 v[4];
                load64(v_cache, base + i * row + kh * 64, kv_fmt, v);
                for (int g = 0; g < G; g++) {
                    const __m512 w = _mm512_set1_ps(p[g][i]);
                    for (int c = 0; c < 4; c++)
                        o[g][c] = _mm512_fmadd_ps(w, v[c], o[g][c]);
                }
            }
            for (int g = 0; g < G; g++)
                for (int c = 0; c < 4; c++)
                    _mm512_storeu_ps(acc + (kh * G + g) * 64 + 16 * c, o[g][c]);
        }
    }
    for (int64_t h = 0; h < H; h++) {
        const __m512 r = _mm512_set1_ps(out_scale / run_sum[h]);
        for (int c = 0; c < 4; c++)
            _mm512_storeu_ps(ob + h * 64 + 16 * c,
                             _mm512_mul_ps(_mm512_loadu_ps(acc + h * 64 + 16 * c), r));
    }
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
/* request_d64's AVX2 twin (head_dim 64, at most 4 query heads per KV head): one pass per
 * request with the online softmax, chunk by chunk of up to 16 positions. A K row lives in 8 ymm
 * while each query head's dot product with it is summed into one vector; the chunk's vectors
 * are reduced 8 at a time by a transposing hadd tree (one horizontal sum per score costs more
 * than the dot product). bf16 and fp8 rows are widened in registers; V rows are widened once
 * per chunk into a float32 buffer the G heads then read from L1. Without this the AVX2 build
 * ran the two-pass loop, which was bound by its own arithmetic: a bf16 cache took as long as a
 * float32 one, though it is half the bytes. */
static inline void load64_avx2(const void *base, int64_t index, int kv_fmt, __m256 x[8]) {
    if (kv_fmt == KV_F32) {
        const float *p = (const float *)base + index;
        for (int c = 0; c < 8; c++)
            x[c] = _mm256_loadu_ps(p + 8 * c);
    } else if (kv_fmt == KV_BF16) {
        const uint16_t *p = (const uint16_t *)base + index;
        for (int c = 0; c < 8; c++)
            x[c] = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 8 * c))), 16));
    } else { /* fp8 over fp8_unit (HAVE_FP8_VECTORS: decode_request's check) */
#if defined(HAVE_FP8_VECTORS)
        for (int c = 0; c < 4; c++)
            fp8x16_to_ps((const uint8_t *)base + index + 16 * c, kv_fmt, x + 2 * c);
#endif
    }
}

/* out[j] = the sum of the 8 lanes of v[j], j < 8. */
static inline __m256 hsum8x8(const __m256 v[8]) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* acc: the per-thread buffer, G * KH * 66 floats (outputs, running max, running sum);
 * ob: the request's output [H, 64]. */
static inline __attribute__((always_inline)) void
request_d64_avx2(const float *qb, const void *k_cache, const void *v_cache,
                 const int64_t *table, int64_t len, int64_t block_size, int64_t KH,
                 float scale, float v_scale, int kv_fmt, int64_t elem, float *acc, float *ob,
                 const int G) {
    const int64_t row = KH * 64, H = KH * G;
    const float unit = fp8_unit(kv_fmt), qk_scale = scale * unit; /* load64_avx2's fp8 */
    const float out_scale = unit * v_scale;
    float *run_max = acc + H * 64, *run_sum = run_max + H;
    online_start(acc, H);
    float vbuf[16 * 64] __attribute__((aligned(32)));
    for (int64_t t0 = 0, n; t0 < len; t0 += n) {
        n = chunk_len(t0, len, block_size);
        const int64_t base = row_at(table, t0, block_size, row);
        const next_chunk next =
            chunk_after(k_cache, v_cache, table, t0, n, len, block_size, row, elem);
        for (int64_t kh = 0; kh < KH; kh++) {
            __m256 part[4][16];
            float p[4][16] __attribute__((aligned(32)));
            for (int64_t i = 0; i < n; i++) {
                __m256 k[8];
                load64_avx2(k_cache, base + i * row + kh * 64, kv_fmt, k);
                if (i < next.n) /* this head's slice of the next chunk's row i */
                    prefetch_slice(next, (i * row + kh * 64) * elem, elem);
                for (int g = 0; g < G; g++) {
                    const float *q = qb + (kh * G + g) * 64;
                    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(q), k[0]);
                    for (int c = 1; c < 8; c++)
                        a = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), k[c], a);
                    part[g][i] = a;
                }
            }
            for (int g = 0; g < G; g++) {
                for (int64_t i = n; i < 16; i++)
                    part[g][i] = _mm256_setzero_ps();
                _mm256_store_ps(p[g], hsum8x8(part[g]));
                _mm256_store_ps(p[g] + 8, hsum8x8(part[g] + 8));
            }
            for (int64_t i = 0; i < n; i++) /* V's rows once, for every head */
                if (kv_fmt != KV_F32) {
                    __m256 v[8];
                    load64_avx2(v_cache, base + i * row + kh * 64, kv_fmt, v);
                    for (int c = 0; c < 8; c++)
                        _mm256_store_ps(vbuf + i * 64 + 8 * c, v[c]);
                }
            for (int g = 0; g < G; g++) {
                const int64_t h = kh * G + g;
                float m = run_max[h];
                for (int64_t i = 0; i < n; i++) {
                    p[g][i] *= qk_scale;
                    m = p[g][i] > m ? p[g][i] : m;
                }
                /* exp(old max - new max): the earlier sum and outputs in the new max's scale */
                const float r = run_max[h] == -INFINITY ? 0.0f : exp_nonpos(run_max[h] - m);
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int64_t i = 0; i < n; i++) {
                    p[g][i] = exp_nonpos(p[g][i] - m);
                    sum += p[g][i];
                }
                run_sum[h] = run_sum[h] * r + sum;
                run_max[h] = m;
                __m256 o[8];
                for (int c = 0; c < 8; c++)
                    o[c] = _mm256_mul_ps(_mm256_loadu_ps(acc + h * 64 + 8 * c), _mm256_set1_ps(r));
                for (int64_t i = 0; i < n; i++) {
                    const float *v = kv_fmt != KV_F32 ? vbuf + i * 64
                                          : (const float *)v_cache + base + i * row + kh * 64;
                    const __m256 w = _mm256_set1_ps(p[g][i]);
                    for (int c = 0; c < 8; c++)
                        o[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * c), o[c]);
                }
                for (int c = 0; c < 8; c++)
                    _mm256_storeu_ps(acc + h * 64 + 8 * c, o[c]);
            }
        }
    }
    for (int64_t h = 0; h < H; h++) {
        const __m256 r = _mm256_set1_ps(out_scale / run_sum[h]);
        for (int c = 0; c < 8; c++)
            _mm256_storeu_ps(ob + h * 64 + 8 * c,
                             _mm256_mul_ps(_mm256_loadu_ps(acc + h * 64 + 8 * c), r));
    }
}
#endif

void decode_scratch_init(decode_scratch *s, int64_t H, int64_t KH, int64_t D,
                         int64_t max_len) {
    s->scores = malloc(sizeof(float) * (size_t)(H * max_len));
    s->acc = malloc(sizeof(float) * (size_t)(H * D + 2 * H));
    s->buf = malloc(sizeof(float) * (size_t)(KH * D));
    s->inv_sum = malloc(sizeof(float) * (size_t)H);
    s->out = malloc(sizeof(float) * (size_t)(H * D));
    if (s->scores == NULL || s->acc == NULL || s->buf == NULL || s->inv_sum == NULL ||
        s->out == NULL)
        abort();
}

void decode_scratch_free(decode_scratch *s) {
    free(s->scores);
    free(s->acc);
    free(s->buf);
    free(s->inv_sum);
    free(s->out);
}

/* One request's decode attention: q_b [H, D] over its `len` cached positions -> o_b [H, D]. The
 * cache holds K / k_scale and V / v_scale: k_scale joins the score's scale, v_scale the output's
 * normalization. */
static void decode_request(const float *qb, const void *k_cache, const void *v_cache,
                           const int64_t *table, int64_t len, float *ob, int64_t H, int64_t KH,
                           int64_t D, int64_t block_size, float scale, int kv_fmt,
                           float k_scale, float v_scale, decode_scratch *s) {
    scale *= k_scale;
    const int64_t G = H / KH;
    const int64_t row = KH * D; /* one token's K (or V) for every KV head */
    const int64_t elem = kv_elem_bytes(kv_fmt);
    const int64_t block_bytes = elem * block_size * row;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    /* the one-pass paths widen fp8 with F16C's conversions */
#if defined(HAVE_FP8_VECTORS)
    const int one_pass = D == 64 && G >= 1 && G <= 4;
#else
    const int one_pass = D == 64 && G >= 1 && G <= 4 && kv_fmt <= KV_BF16;
#endif
#endif
#if defined(__AVX512F__)
    if (one_pass) { /* a constant G per inlined copy: registers */
#define REQUEST_D64(g)                                                                        \
    request_d64(qb, k_cache, v_cache, table, len, block_size, KH, scale, v_scale, kv_fmt,   \
                elem, s->acc, ob, g)
        switch (G) {
        case 1: REQUEST_D64(1); break;
        case 2: REQUEST_D64(2); break;
        case 3: REQUEST_D64(3); break;
        default: REQUEST_D64(4); break;
        }
#undef REQUEST_D64
        return;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if (one_pass) {
#define REQUEST_D64(g)                                                                        \
    request_d64_avx2(qb, k_cache, v_cache, table, len, block_size, KH, scale, v_scale,     \
                     kv_fmt, elem, s->acc, ob, g)
        switch (G) {
        case 1: REQUEST_D64(1); break;
        case 2: REQUEST_D64(2); break;
        case 3: REQUEST_D64(3); break;
        default: REQUEST_D64(4); break;
        }
#undef REQUEST_D64
        return;
    }
#endif
    float *scores = s->scores, *acc = s->acc, *buf = s->buf, *inv_sum = s->inv_sum;
    /* pass 1: scores[h * len + t] = scale * q_h . k_t (q_h's KV head); a block's K (and V)
     * for all heads is one contiguous run of block_size * KH * D elements, read front to
     * back */
    for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const int64_t n = len - t0 < block_size ? len - t0 : block_size;
        const int64_t base = table[t0 / block_size] * block_size * row;
        const char *next = next_block(k_cache, table, t0, len, block_size, block_bytes);
        for (int64_t i = 0; i < n; i++) {
            const float *k = row_f32(k_cache, base + i * row, row, kv_fmt, buf);
            if (next != NULL)
                prefetch_row(next + i * elem * row, elem * row);
            for (int64_t h = 0; h < H; h++)
                scores[h * len + t0 + i] = scale * dot(qb + h * D, k + (h / G) * D, D);
        }
    }
    softmax_heads(scores, H, len, inv_sum);
    /* pass 2: acc_h = sum_t p_ht v_t */
    memset(acc, 0, sizeof(float) * (size_t)(H * D));
    for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const int64_t n = len - t0 < block_size ? len - t0 : block_size;
        const int64_t base = table[t0 / block_size] * block_size * row;
        const char *next = next_block(v_cache, table, t0, len, block_size, block_bytes);
        for (int64_t i = 0; i < n; i++) {
            const float *v = row_f32(v_cache, base + i * row, row, kv_fmt, buf);
            if (next != NULL)
                prefetch_row(next + i * elem * row, elem * row);
            for (int64_t h = 0; h < H; h++)
                axpy(acc + h * D, scores[h * len + t0 + i], v + (h / G) * D, D);
        }
    }
    for (int64_t h = 0; h < H; h++)
        for (int64_t d = 0; d < D; d++)
            ob[h * D + d] = acc[h * D + d] * (inv_sum[h] * v_scale);
}

/* The first chunk of a request's K and V (its first 16 positions, or its first block if
 * smaller), asked for into L1: request_d64 asks for each next chunk as it goes, but a request's
 * first one would otherwise be read cold (~5% of the time over 64 requests at context ~192). */
static void prefetch_first_chunk(const void *k_cache, const void *v_cache, const int64_t *table,
                                 int64_t len, int64_t block_size, int64_t row, int64_t elem) {
    int64_t n = len < 16 ? len : 16;
    n = n < block_size ? n : block_size;
    const int64_t at = table[0] * block_size * row * elem;
    for (int64_t o = 0; o < n * row * elem; o += 64) {
        __builtin_prefetch((const char *)k_cache + at + o, 0, 3);
        __builtin_prefetch((const char *)v_cache + at + o, 0, 3);
    }
}

/* This thread's share of the decode attention of B requests: it takes requests one at a time
 * from the shared counter `next` (one per work item, as they come: contexts differ), each time
 * claiming the following one too and asking for its first chunk. Outputs: out [B, H, D]
 * float32, or with out_bf16 [B, H * D] bf16 instead (o_proj's input, rounded as torch's cast
 * rounds). */
void decode_requests(atomic_llong *next, const float *q, const void *k_cache,
                     const void *v_cache, const int64_t *block_table,
                     const int64_t *ctx_lens, int64_t B, int64_t W, int64_t H, int64_t KH,
                     int64_t D, int64_t block_size, float scale, int kv_fmt, float k_scale,
                     float v_scale, decode_scratch *s, float *out, uint16_t *out_bf16) {
    for (int64_t b = atomic_fetch_add(next, 1); b < B;) {
        const int64_t following = atomic_fetch_add(next, 1);
        if (following < B)
            prefetch_first_chunk(k_cache, v_cache, block_table + following * W,
                                 ctx_lens[following], block_size, KH * D,
                                 kv_elem_bytes(kv_fmt));
        float *ob = out_bf16 != NULL ? s->out : out + b * H * D;
        decode_request(q + b * H * D, k_cache, v_cache, block_table + b * W, ctx_lens[b], ob, H,
                       KH, D, block_size, scale, kv_fmt, k_scale, v_scale, s);
        if (out_bf16 != NULL) {
            uint16_t *o = out_bf16 + b * H * D;
            int64_t i = 0;
#if defined(__AVX512F__)
            for (; i + 16 <= H * D; i += 16)
                _mm256_storeu_si256((__m256i *)(o + i), to_bf16x16(_mm512_loadu_ps(ob + i)));
#endif
            for (; i < H * D; i++)
                o[i] = f32_to_bf16(ob[i]);
        }
        b = following;
    }
}

/* q, out: [B, H, D] float32. k_cache, v_cache: [num_blocks, block_size, KH, D].
 * block_table: [B, W]. ctx_lens: [B], each >= 1 and <= W * block_size. */
void paged_decode_attention(const float *q, const void *k_cache, const void *v_cache,
                            const int64_t *block_table, const int64_t *ctx_lens, float *out,
                            int64_t B, int64_t W, int64_t H, int64_t KH, int64_t D,
                            int64_t block_size, float scale, int kv_fmt, float k_scale,
                            float v_scale, int num_threads) {
    const int64_t max_len = max_of(ctx_lens, B);
    atomic_llong next = 0;
#pragma omp parallel num_threads(num_threads)
    {
        const unsigned int csr = flush_denormals();
        decode_scratch s;
        decode_scratch_init(&s, H, KH, D, max_len);
        decode_requests(&next, q, k_cache, v_cache, block_table, ctx_lens, B, W, H, KH, D,
                        block_size, scale, kv_fmt, k_scale, v_scale, &s, out, NULL);
        decode_scratch_free(&s);
        restore_denormals(csr);
    }
}
