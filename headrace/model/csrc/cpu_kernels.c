/* headrace's CPU kernels, built by headrace/model/kernels.py with the host's C compiler and
 * OpenMP; the OpenMP runtime it links is the one torch already loaded, so both share one thread
 * pool.
 *
 * paged_decode_attention: decode attention read straight from the paged KV cache. One query
 * token per request, one request per work item: its query heads are scored against its keys
 * block by block through the block table, so K and V are read once, where they lie, with no
 * gathered copy. Head dim 64 (up to 4 query heads per KV head) takes one pass per request with
 * the online softmax; other shapes take two: scores (kept in a per-thread buffer), then the
 * softmax-weighted sum of V. Arithmetic is float32 whatever the cache's dtype (float32, bf16).
 *
 * paged_prefill_attention: the same for requests with several query tokens (prompt chunks):
 * causal, each request at its own query and context length, tiles of query tokens against
 * chunks of keys with an online softmax. paged_prefill_attention_amx: the same on AMX tiles
 * for a bf16 cache (after amx_linear, near the end of the file).
 *
 * add_rms_norm, rope_write_kv, silu_mul: the short runs of elementwise torch ops around the
 * linears (residual add + RMSNorm; RoPE + the K/V cache write; SwiGLU's activation), each as
 * one pass, because at decode sizes every torch op costs its thread wake-up.
 *
 * argmax_rows: greedy sampling's argmax over bf16 or float32 logits, without the upcast copy
 * (torch's argmax over [64, 49152] float32 took 3 ms, this 0.2-0.4 ms).
 *
 * amx_linear: bf16 linear layers on AMX tiles for decode-sized batches, their weights as bf16
 * tiles or as GGUF's 4-bit blocks made into tiles on the way (amx_linear_argmax: the LM head
 * with greedy's argmax taken in place of its rows); decode_layers: a whole decode step's
 * decoder layers in one call and one parallel region (all at the end of the file).
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__SSE__)
#include <xmmintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
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

/* A row of D cache elements as float32, into `dst`. */
static inline const float *row_f32(const void *base, int64_t index, int64_t D, int bf16,
                                   float *dst) {
    if (!bf16)
        return (const float *)base + index;
    const uint16_t *src = (const uint16_t *)base + index;
#pragma omp simd
    for (int64_t d = 0; d < D; d++)
        dst[d] = bf16_to_f32(src[d]);
    return dst;
}

/* The same row as float32, always copied into `dst`. */
static inline void copy_row_f32(const void *base, int64_t index, int64_t D, int bf16, float *dst) {
    const float *src = row_f32(base, index, D, bf16, dst);
    if (src != dst)
        memcpy(dst, src, sizeof(float) * (size_t)D);
}

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

#if defined(__AVX512F__)
/* exp(x) = 2^n * 2^f: returns exp_nonpos's polynomial for 2^f, 16 lanes, and n in *n. */
static inline __m512 exp_split16(__m512 x, __m512 *n) {
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    *n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, *n);
    __m512 p = _mm512_set1_ps(1.53533017e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.33989665e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.61844519e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55034867e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40226522e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93147182e-1f));
    return _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
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

#if defined(__AVX512F__)
/* head_dim 64 with at most 4 query heads per KV head (SmolLM2, Llama 3.2 1B, Qwen2 0.5B):
 * each KV head keeps its G query heads, then its G accumulators, in registers, 4 zmm each, and
 * converts each 64-element K or V slice once, in registers. The generic loop instead
 * round-trips every token row through a float32 buffer and reloads q and the accumulators from
 * memory for each head. `G` is a constant in each inlined copy. */
static inline void load64(const void *base, int64_t index, int bf16, __m512 x[4]) {
    if (bf16) {
        const uint16_t *p = (const uint16_t *)base + index;
        for (int c = 0; c < 4; c++)
            x[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + 16 * c))), 16));
    } else {
        const float *p = (const float *)base + index;
        for (int c = 0; c < 4; c++)
            x[c] = _mm512_loadu_ps(p + 16 * c);
    }
}

/* How many positions from t on, at most 16, lie in t's cache block and before len. */
static inline int64_t chunk_len(int64_t t, int64_t len, int64_t block_size) {
    int64_t n = block_size - t % block_size;
    n = n < 16 ? n : 16;
    return n < len - t ? n : len - t;
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
            int64_t len, int64_t block_size, int64_t KH, float scale, int bf16, int64_t elem,
            float *acc, float *ob, const int G) {
    const int64_t row = KH * 64, H = KH * G;
    float *run_max = acc + H * 64, *run_sum = run_max + H;
    for (int64_t h = 0; h < H; h++) {
        run_max[h] = -INFINITY;
        run_sum[h] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)(H * 64));
    for (int64_t t0 = 0, n; t0 < len; t0 += n) {
        n = chunk_len(t0, len, block_size);
        const int64_t base = (table[t0 / block_size] * block_size + t0 % block_size) * row;
        const char *next_k = NULL, *next_v = NULL;
        int64_t next_n = 0;
        if (t0 + n < len) {
            const int64_t t1 = t0 + n;
            const int64_t at = (table[t1 / block_size] * block_size + t1 % block_size) * row;
            next_k = (const char *)k_cache + at * elem;
            next_v = (const char *)v_cache + at * elem;
            next_n = chunk_len(t1, len, block_size);
        }
        const __mmask16 live = (__mmask16)((1u << n) - 1);
        for (int64_t kh = 0; kh < KH; kh++) {
            float p[4][16] __attribute__((aligned(64)));
            __m512 q[4][4];
            for (int g = 0; g < G; g++)
                for (int c = 0; c < 4; c++)
                    q[g][c] = _mm512_loadu_ps(qb + (kh * G + g) * 64 + 16 * c);
            for (int64_t i = 0; i < n; i++) {
                __m512 k[4];
                load64(k_cache, base + i * row + kh * 64, bf16, k);
                if (i < next_n) /* this head's slice of the next chunk's row i, K and V */
                    for (int64_t off = (i * row + kh * 64) * elem, o = 0; o < 64 * elem; o += 64) {
                        _mm_prefetch(next_k + off + o, _MM_HINT_T1);
                        _mm_prefetch(next_v + off + o, _MM_HINT_T1);
                    }
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
                                               _mm512_set1_ps(scale));
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
                load64(v_cache, base + i * row + kh * 64, bf16, v);
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
        const __m512 r = _mm512_set1_ps(1.0f / run_sum[h]);
        for (int c = 0; c < 4; c++)
            _mm512_storeu_ps(ob + h * 64 + 16 * c,
                             _mm512_mul_ps(_mm512_loadu_ps(acc + h * 64 + 16 * c), r));
    }
}
#endif

/* One thread's scratch for decode attention: the generic path's scores [H, max_len], row
 * buffer and softmax sums; the outputs being summed (+ request_d64's running max and sum); one
 * request's output [H, D], where it is converted before it is stored. */
typedef struct {
    float *scores, *acc, *buf, *inv_sum, *out;
} decode_scratch;

static void decode_scratch_init(decode_scratch *s, int64_t H, int64_t KH, int64_t D,
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

static void decode_scratch_free(decode_scratch *s) {
    free(s->scores);
    free(s->acc);
    free(s->buf);
    free(s->inv_sum);
    free(s->out);
}

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

/* One request's decode attention: q_b [H, D] over its `len` cached positions -> o_b [H, D]. */
static void decode_request(const float *qb, const void *k_cache, const void *v_cache,
                           const int64_t *table, int64_t len, float *ob, int64_t H, int64_t KH,
                           int64_t D, int64_t block_size, float scale, int kv_bf16,
                           decode_scratch *s) {
    const int64_t G = H / KH;
    const int64_t row = KH * D; /* one token's K (or V) for every KV head */
    const int64_t elem = kv_bf16 ? 2 : 4;
    const int64_t block_bytes = elem * block_size * row;
#if defined(__AVX512F__)
    if (D == 64 && G >= 1 && G <= 4) { /* a constant G per inlined copy: registers */
#define REQUEST_D64(g)                                                                        \
    request_d64(qb, k_cache, v_cache, table, len, block_size, KH, scale, kv_bf16, elem,      \
                s->acc, ob, g)
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
            const float *k = row_f32(k_cache, base + i * row, row, kv_bf16, buf);
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
            const float *v = row_f32(v_cache, base + i * row, row, kv_bf16, buf);
            if (next != NULL)
                prefetch_row(next + i * elem * row, elem * row);
            for (int64_t h = 0; h < H; h++)
                axpy(acc + h * D, scores[h * len + t0 + i], v + (h / G) * D, D);
        }
    }
    for (int64_t h = 0; h < H; h++)
        for (int64_t d = 0; d < D; d++)
            ob[h * D + d] = acc[h * D + d] * inv_sum[h];
}

static int64_t max_of(const int64_t *v, int64_t n) {
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++)
        m = v[i] > m ? v[i] : m;
    return m;
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
static void decode_requests(atomic_llong *next, const float *q, const void *k_cache,
                            const void *v_cache, const int64_t *block_table,
                            const int64_t *ctx_lens, int64_t B, int64_t W, int64_t H, int64_t KH,
                            int64_t D, int64_t block_size, float scale, int kv_bf16,
                            decode_scratch *s, float *out, uint16_t *out_bf16) {
    for (int64_t b = atomic_fetch_add(next, 1); b < B;) {
        const int64_t following = atomic_fetch_add(next, 1);
        if (following < B)
            prefetch_first_chunk(k_cache, v_cache, block_table + following * W,
                                 ctx_lens[following], block_size, KH * D, kv_bf16 ? 2 : 4);
        float *ob = out_bf16 != NULL ? s->out : out + b * H * D;
        decode_request(q + b * H * D, k_cache, v_cache, block_table + b * W, ctx_lens[b], ob, H,
                       KH, D, block_size, scale, kv_bf16, s);
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
                            int64_t block_size, float scale, int kv_bf16, int num_threads) {
    const int64_t max_len = max_of(ctx_lens, B);
    atomic_llong next = 0;
#pragma omp parallel num_threads(num_threads)
    {
        const unsigned int csr = flush_denormals();
        decode_scratch s;
        decode_scratch_init(&s, H, KH, D, max_len);
        decode_requests(&next, q, k_cache, v_cache, block_table, ctx_lens, B, W, H, KH, D,
                        block_size, scale, kv_bf16, &s, out, NULL);
        decode_scratch_free(&s);
        restore_denormals(csr);
    }
}

/* Attention for requests with several query tokens (prefill chunks), causal, read from the
 * paged cache where K and V lie. Query token i of request b sits at position
 * ctx_lens[b] - q_lens[b] + i and attends keys 0 .. its position. q, out: [sum(q_lens), H, D]
 * float32, request b's rows after those of requests 0 .. b-1. block_table: [B, W]. D % 8 == 0.
 *
 * Work item: one request, one KV head, PF_TOK query tokens, i.e. R = PF_TOK * G rows (token,
 * query head). The tile is held transposed, Q^T and O^T [D][R], so every inner loop runs
 * along 16 rows with no horizontal sums: a score column over 16 rows is a sum over d of
 * Q^T[d] * k[d], and O^T[d] gains sum over keys of v[d] * P[key]. Keys come in chunks of
 * PF_KEYS (within one cache block), converted to float32 once per work item and reused by all
 * R rows; the softmax is the online one (running max m, running sum l, O rescaled). */
#define PF_TOK 16

/* The work items of both prefill kernels, request by request: KH heads x ceil(q_len / PF_TOK)
 * tiles of query tokens each. starts [2][B + 1] (malloc'd): request b's first query row, then
 * its first item; starts[1][B] is the number of items. */
static int64_t *prefill_item_starts(const int64_t *q_lens, int64_t B, int64_t KH) {
    int64_t *starts = malloc(sizeof(int64_t) * (size_t)(2 * (B + 1)));
    if (starts == NULL)
        abort();
    int64_t *q_start = starts, *item_start = starts + B + 1;
    q_start[0] = item_start[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        q_start[b + 1] = q_start[b] + q_lens[b];
        item_start[b + 1] = item_start[b] + KH * ((q_lens[b] + PF_TOK - 1) / PF_TOK);
    }
    return starts;
}

typedef struct {
    int64_t b, kh, nt, first; /* request, KV head, tokens (<= PF_TOK), the first's position */
    const int64_t *table;     /* the request's block table */
} prefill_item;

/* Item `it`, and its rows: row r is token r / G and query head kh * G + r % G; at[r] its offset
 * in q and out (-1: a pad row past the item's tokens), pos[r] its position (pad rows:
 * INT32_MAX, so nothing is masked for them); the softmax state starts at m = -inf, l = 0. */
static prefill_item prefill_item_rows(int64_t it, const int64_t *starts, const int64_t *q_lens,
                                      const int64_t *ctx_lens, const int64_t *block_table,
                                      int64_t B, int64_t W, int64_t H, int64_t KH, int64_t D,
                                      int64_t *at, int32_t *pos, float *m, float *l) {
    const int64_t *q_start = starts, *item_start = starts + B + 1;
    int64_t b = 0, hi = B; /* the request holding item `it`: binary search */
    while (hi - b > 1) {
        const int64_t mid = (b + hi) / 2;
        if (item_start[mid] <= it)
            b = mid;
        else
            hi = mid;
    }
    const int64_t q_len = q_lens[b], tiles = (q_len + PF_TOK - 1) / PF_TOK, G = H / KH;
    const int64_t kh = (it - item_start[b]) / tiles;
    const int64_t t0 = (it - item_start[b]) % tiles * PF_TOK;
    const prefill_item w = {b, kh, q_len - t0 < PF_TOK ? q_len - t0 : PF_TOK,
                            ctx_lens[b] - q_len + t0, block_table + b * W};
    for (int64_t r = 0; r < PF_TOK * G; r++) {
        const int64_t t = r / G;
        at[r] = t < w.nt ? ((q_start[b] + t0 + t) * H + kh * G + r % G) * D : -1;
        pos[r] = t < w.nt ? (int32_t)(w.first + t) : INT32_MAX;
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    return w;
}
#define PF_KEYS 16

/* st[j][r] = sum_d qt[d][r] * kf[j][d] for 16 rows from r0 and 8 keys from j0. */
static inline void pf_scores8(const float *qt, const float *kf, float *st, int64_t R, int64_t D,
                              int64_t r0, int64_t j0) {
    float acc[8][16] = {{0}};
    for (int64_t d = 0; d < D; d++) {
        const float *qd = qt + d * R + r0;
        for (int k = 0; k < 8; k++) {
            const float kv = kf[(j0 + k) * D + d];
#pragma omp simd
            for (int l = 0; l < 16; l++)
                acc[k][l] += qd[l] * kv;
        }
    }
    for (int k = 0; k < 8; k++)
        memcpy(st + (j0 + k) * R + r0, acc[k], sizeof acc[k]);
}

/* ot[d][r] = ot[d][r] * corr[r] + sum_j vf[j][d] * st[j][r], 16 rows from r0, 8 dims from d0. */
static inline void pf_values8(float *ot, const float *vf, const float *st, const float *corr,
                              int64_t R, int64_t D, int64_t nk, int64_t r0, int64_t d0) {
    float acc[8][16];
    for (int k = 0; k < 8; k++)
#pragma omp simd
        for (int l = 0; l < 16; l++)
            acc[k][l] = ot[(d0 + k) * R + r0 + l] * corr[r0 + l];
    for (int64_t j = 0; j < nk; j++) {
        const float *p = st + j * R + r0;
        for (int k = 0; k < 8; k++) {
            const float vv = vf[j * D + d0 + k];
#pragma omp simd
            for (int l = 0; l < 16; l++)
                acc[k][l] += p[l] * vv;
        }
    }
    for (int k = 0; k < 8; k++)
        memcpy(ot + (d0 + k) * R + r0, acc[k], sizeof acc[k]);
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

/* dst[c][dst_off + i] = src[i][src_off + c] * scale for i, c < 16: a 16 x 16 block
 * transposed, its rows given by pointers (the tile's rows lie in q and out by token and head).
 * In registers; element by element it was a quarter of the kernel's time. */
static inline void transpose16(const float *const src[16], int64_t src_off, float scale,
                               float *const dst[16], int64_t dst_off) {
#if defined(__AVX512F__)
    __m512 r[16];
    for (int i = 0; i < 16; i++)
        r[i] = _mm512_loadu_ps(src[i] + src_off);
    transpose16_regs(r);
    const __m512 sc = _mm512_set1_ps(scale);
    for (int c = 0; c < 16; c++)
        _mm512_storeu_ps(dst[c] + dst_off, _mm512_mul_ps(r[c], sc));
#else
    for (int i = 0; i < 16; i++)
        for (int c = 0; c < 16; c++)
            dst[c][dst_off + i] = src[i][src_off + c] * scale;
#endif
}

void paged_prefill_attention(const float *q, const void *k_cache, const void *v_cache,
                             const int64_t *block_table, const int64_t *q_lens,
                             const int64_t *ctx_lens, float *out, int64_t B, int64_t W,
                             int64_t H, int64_t KH, int64_t D, int64_t block_size, float scale,
                             int kv_bf16, int num_threads) {
    const int64_t G = H / KH, R = PF_TOK * G, row = KH * D;
    const int64_t chunk = block_size < PF_KEYS ? block_size : PF_KEYS;
    int64_t *starts = prefill_item_starts(q_lens, B, KH);

#pragma omp parallel num_threads(num_threads)
    {
        const unsigned int csr = flush_denormals(); /* as in decode */
        float *qt = malloc(sizeof(float) * (size_t)(D * R));
        float *ot = malloc(sizeof(float) * (size_t)(D * R));
        float *st = malloc(sizeof(float) * (size_t)(PF_KEYS * R));
        float *kf = malloc(sizeof(float) * (size_t)(PF_KEYS * D));
        float *vf = malloc(sizeof(float) * (size_t)(PF_KEYS * D));
        float *m = malloc(sizeof(float) * (size_t)R), *l = malloc(sizeof(float) * (size_t)R);
        float *corr = malloc(sizeof(float) * (size_t)R);
        int32_t *pos = malloc(sizeof(int32_t) * (size_t)R);
        int64_t *at = malloc(sizeof(int64_t) * (size_t)R); /* row r in q and out; -1: pad row */
        float *zero_row = calloc((size_t)D, sizeof(float)); /* the query of a pad row */
        float *scratch = malloc(sizeof(float) * (size_t)D);  /* the output of a pad row */

#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < starts[2 * B + 1]; it++) {
            const prefill_item w = prefill_item_rows(it, starts, q_lens, ctx_lens, block_table,
                                                     B, W, H, KH, D, at, pos, m, l);
            const int64_t kh = w.kh, nt = w.nt, first = w.first, *table = w.table;
            for (int64_t r0 = 0; r0 < R; r0 += 16) { /* Q^T, scaled; pad rows are zero */
                const float *src[16];
                float *dst[16];
                for (int i = 0; i < 16; i++) {
                    src[i] = at[r0 + i] >= 0 ? q + at[r0 + i] : zero_row;
                    dst[i] = qt + i * R + r0;
                }
                int64_t d0 = 0;
                for (; d0 + 16 <= D; d0 += 16)
                    transpose16(src, d0, scale, dst, d0 * R);
                for (; d0 < D; d0++)
                    for (int i = 0; i < 16; i++)
                        qt[d0 * R + r0 + i] = scale * src[i][d0];
            }
            memset(ot, 0, sizeof(float) * (size_t)(D * R));

            const int64_t end = first + nt; /* keys 0 .. end - 1 */
            for (int64_t j0 = 0; j0 < end; j0 += chunk) {
                const int64_t nk = end - j0 < chunk ? end - j0 : chunk;
                const int64_t base = (table[j0 / block_size] * block_size + j0 % block_size) * row;
                for (int64_t j = 0; j < PF_KEYS; j++) {
                    if (j < nk) {
                        copy_row_f32(k_cache, base + j * row + kh * D, D, kv_bf16, kf + j * D);
                        copy_row_f32(v_cache, base + j * row + kh * D, D, kv_bf16, vf + j * D);
                    } else {
                        memset(kf + j * D, 0, sizeof(float) * (size_t)D);
                    }
                }
                for (int64_t r0 = 0; r0 < R; r0 += 16)
                    for (int64_t j = 0; j < PF_KEYS; j += 8)
                        pf_scores8(qt, kf, st, R, D, r0, j);
                /* causal mask and the chunk's padding; then the online softmax, per row */
                const int masked = j0 + nk - 1 > first || nk < PF_KEYS;
                for (int64_t r0 = 0; r0 < R; r0 += 16) {
                    if (masked)
                        for (int64_t j = 0; j < PF_KEYS; j++) {
                            float *sj = st + j * R + r0;
                            for (int k = 0; k < 16; k++)
                                if (j >= nk || j0 + j > pos[r0 + k])
                                    sj[k] = -INFINITY;
                        }
                    float mx[16], sum[16];
#pragma omp simd
                    for (int k = 0; k < 16; k++)
                        mx[k] = m[r0 + k];
                    for (int64_t j = 0; j < PF_KEYS; j++)
#pragma omp simd
                        for (int k = 0; k < 16; k++)
                            mx[k] = st[j * R + r0 + k] > mx[k] ? st[j * R + r0 + k] : mx[k];
#pragma omp simd
                    for (int k = 0; k < 16; k++) {
                        corr[r0 + k] = exp_nonpos(m[r0 + k] - mx[k]);
                        m[r0 + k] = mx[k];
                        sum[k] = 0.0f;
                    }
                    for (int64_t j = 0; j < PF_KEYS; j++)
#pragma omp simd
                        for (int k = 0; k < 16; k++) {
                            float *s = st + j * R + r0 + k;
                            *s = exp_nonpos(*s - mx[k]);
                            sum[k] += *s;
                        }
#pragma omp simd
                    for (int k = 0; k < 16; k++)
                        l[r0 + k] = l[r0 + k] * corr[r0 + k] + sum[k];
                }
                for (int64_t r0 = 0; r0 < R; r0 += 16)
                    for (int64_t d0 = 0; d0 < D; d0 += 8)
                        pf_values8(ot, vf, st, corr, R, D, nk, r0, d0);
            }
            for (int64_t r = 0; r < R; r++)
                corr[r] = 1.0f / l[r];
            for (int64_t d = 0; d < D; d++) /* normalize, along the rows */
#pragma omp simd
                for (int64_t r = 0; r < R; r++)
                    ot[d * R + r] *= corr[r];
            for (int64_t r0 = 0; r0 < R; r0 += 16) { /* O^T back into out's rows */
                const float *src[16];
                float *dst[16];
                for (int i = 0; i < 16; i++) {
                    src[i] = ot + i * R + r0; /* with d0 * R: row d0 + i of O^T */
                    dst[i] = at[r0 + i] >= 0 ? out + at[r0 + i] : scratch;
                }
                int64_t d0 = 0;
                for (; d0 + 16 <= D; d0 += 16)
                    transpose16(src, d0 * R, 1.0f, dst, d0);
                for (; d0 < D; d0++)
                    for (int i = 0; i < 16; i++)
                        dst[i][d0] = ot[d0 * R + r0 + i];
            }
        }
        free(qt);
        free(ot);
        free(st);
        free(kf);
        free(vf);
        free(m);
        free(l);
        free(corr);
        free(pos);
        free(at);
        free(zero_row);
        free(scratch);
        restore_denormals(csr);
    }
    free(starts);
}

/* The pre-norm step of a decoder layer, one call instead of a cast, an add and RMSNorm's
 * several ops (each a parallel region costing more than its arithmetic at decode sizes).
 * x: [T, N] float32 or bf16 (x_bf16); residual: [T, N] float32 or NULL;
 * res_out[t] = x[t] + residual[t] (float32);
 * out[t] = res_out[t] / sqrt(mean(res_out[t]^2) + eps) * weight, float32 or bf16 (out_bf16).
 * rms_rows: rows t0 .. t1 only, for a caller that shares them out itself. */
static void rms_rows(const void *x, int x_bf16, const float *residual, const float *weight,
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
 * q_out: [T, H, D] float32, rotated. The cache (k_cache/v_cache: [slots, KH, D], float32 or
 * bf16) gets rotated k and plain v at each token's slot.
 * rope_rows: tokens t0 .. t1 only, for a caller that shares them out itself. */
static void rope_rows(const void *qkv, int qkv_bf16, const int64_t *positions, const float *cos,
                      const float *sin, const int64_t *slots, float *q_out, void *k_cache,
                      void *v_cache, int kv_bf16, int64_t t0, int64_t t1, int64_t H, int64_t KH,
                      int64_t D) {
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
            if (kv_bf16) {
                uint16_t *kd = (uint16_t *)k_cache + at, *vd = (uint16_t *)v_cache + at;
                for (int64_t i = 0; i < D; i++) {
                    kd[i] = f32_to_bf16(rot[i]);
                    vd[i] = f32_to_bf16(v[i]);
                }
            } else {
                memcpy((float *)k_cache + at, rot, sizeof(float) * (size_t)D);
                memcpy((float *)v_cache + at, v, sizeof(float) * (size_t)D);
            }
        }
    }
}

void rope_write_kv(const void *qkv, int qkv_bf16, const int64_t *positions, const float *cos,
                   const float *sin, const int64_t *slots, float *q_out, void *k_cache,
                   void *v_cache, int kv_bf16, int64_t T, int64_t H, int64_t KH, int64_t D,
                   int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (T * (H + 2 * KH) * D >= 65536) \
    schedule(static)
    for (int64_t t = 0; t < T; t++)
        rope_rows(qkv, qkv_bf16, positions, cos, sin, slots, q_out, k_cache, v_cache, kv_bf16, t,
                  t + 1, H, KH, D);
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

#endif

/* SwiGLU's activation: out[t] = silu(gate[t]) * up[t], where x[t] = [gate | up] ([T, 2 * I])
 * as the fused gate/up projection writes it. x and out are float32 or bf16 (io_bf16).
 * silu_rows: rows t0 .. t1 only, for a caller that shares them out itself. */
static void silu_rows(const void *x, void *out, int io_bf16, int64_t t0, int64_t t1, int64_t I) {
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

/* ---- bf16 linear layers on AMX ----
 *
 * amx_linear: y = x W^T (+ bias) for bf16 x [M, K] and W [N, K], float32 accumulation, bf16 out,
 * with W packed once at load (order below) so that every B tile the kernel loads is 1 KB of
 * consecutive memory, and each thread reads W's runs of column blocks that it takes once, front
 * to back, asking for the next tile's weights while it computes. oneDNN's matmul reads the same
 * weights at about half that rate for the few rows of a decode step. A GGUF model's 4-bit
 * weights can stay 4-bit (W_Q4), each tile made from them just before it is multiplied.
 *
 * Blocking: 16 output columns at a time, against up to 64 rows of x: four accumulator tiles
 * (one per 16 rows), each K chunk's B tile loaded once and multiplied by up to four A tiles.
 * Two 32 x 32 passes (2 x 2 tiles, the textbook AMX blocking) measured slower here for every
 * row count up to 64: the second pass reads W again from L2, and tile loads from L2 are slow.
 * Beyond 64 rows, x is taken 64 rows at a time (each column block's W stays in L1/L2 across
 * them); the engine gives those sizes to oneDNN, which is faster there. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* All eight tiles, 16 rows x 64 B. amx_linear: 0-3 accumulators, 4-5 A (x rows, alternating),
 * 6 B (W columns); paged_prefill_attention_amx uses all eight (see there). */
static void configure_tiles(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* amx_linear's weight formats. W_BF16: bf16 B tiles (amx_pack), 1 KB each. W_Q4: GGUF's 4-bit
 * blocks (Q4_0, Q4_1) kept packed (amx_pack_q4), 320 B per tile: each 32-element K chunk of a
 * GGUF row is one quant block, w = d q + m with q in 0..15 and d, m float16. Per tile: d of its
 * 16 columns (float16), then m, then 16 rows of 16 bytes, byte j of row r holding column j / 2's
 * element 2r + j % 2 in its low nibble and column 8 + j / 2's in its high one. */
#define W_BF16 0
#define W_Q4 1
#define Q4_TILE_BYTES 320

static inline int64_t tile_bytes(int fmt) { return fmt == W_Q4 ? Q4_TILE_BYTES : 1024; }

/* The bf16 B tile (amx_pack's order) of 4-bit tile src into dst: bf16(d q + m), the same value
 * the bf16 model holds (it dequantizes to float32, then rounds): d q is exact in float32 (an
 * 11-bit mantissa times 4 bits), so the one rounding of the fma is that of q * d + m, and no
 * sum of multiples of float16's smallest step is a float32 subnormal, which cvtne2ps would
 * flush. */
static inline void unpack_q4_tile(const uint8_t *src, uint16_t *dst) {
    const __m512 d = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)src));
    const __m512 m = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(src + 32)));
    const __m512i lo_cols = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i hi_cols = _mm512_add_epi32(lo_cols, _mm512_set1_epi32(8));
    const __m512 d_lo = _mm512_permutexvar_ps(lo_cols, d);
    const __m512 d_hi = _mm512_permutexvar_ps(hi_cols, d);
    const __m512 m_lo = _mm512_permutexvar_ps(lo_cols, m);
    const __m512 m_hi = _mm512_permutexvar_ps(hi_cols, m);
    const __m512 levels = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int r = 0; r < 16; r++) {
        const __m128i bytes = _mm_load_si128((const __m128i *)(src + 64 + r * 16));
        const __m512i x = _mm512_cvtepu8_epi32(bytes);
        /* the low nibble by a permute (it reads only an index's low 4 bits), the high one by a
         * conversion: the two go to different ports */
        const __m512 q_lo = _mm512_permutexvar_ps(x, levels);
        const __m512 q_hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 4));
        const __m512bh w = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(q_hi, d_hi, m_hi),
                                               _mm512_fmadd_ps(q_lo, d_lo, m_lo));
        _mm512_store_si512((__m512i *)(dst + r * 32), (__m512i)w);
    }
}

/* How many W_Q4 tiles ahead column_block asks for the 4-bit weights into L1. Making a tile
 * from memory took 52 ns on one core with none asked for, 36 ns with this (~5 KB ahead), and
 * 32 ns from L1. */
#define Q4_AHEAD 16

/* c [64 x 16] float32 = `blocks` (1-4) 16-row tiles of a (lda apart) x the B tiles of one
 * column block (in format fmt), over KC chunks of 32. W_BF16: `next` is the next block's
 * tiles, asked for into L2. W_Q4: each tile is made into buf (two tiles' room, 64-byte
 * aligned, used in turn) just before it is multiplied. (Made two tiles ahead, through a ring
 * of four, it was 10% slower at 1-8 rows and no faster at 32-64.) */
static inline void column_block(const uint16_t *a, int64_t lda, const char *b, int fmt,
                                int64_t KC, int blocks, float *c, const char *next,
                                uint16_t *buf) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kc = 0; kc < KC; kc++) {
        const uint16_t *bt;
        if (fmt == W_Q4) {
            const char *ahead = b + (kc + Q4_AHEAD) * Q4_TILE_BYTES; /* may pass the end: */
            for (int at = 0; at < Q4_TILE_BYTES; at += 64)      /* prefetches do not fault */
                _mm_prefetch(ahead + at, _MM_HINT_T0);
            bt = buf + (kc & 1) * 512;
            unpack_q4_tile((const uint8_t *)b + kc * Q4_TILE_BYTES, (uint16_t *)bt);
        } else {
            if (next != NULL)
                for (int l = 0; l < 16; l++)
                    _mm_prefetch(next + kc * 1024 + l * 64, _MM_HINT_T1);
            bt = (const uint16_t *)b + kc * 512;
        }
        _tile_loadd(6, bt, 64);
        _tile_loadd(4, a + kc * 32, lda * 2);
        _tile_dpbf16ps(0, 4, 6);
        if (blocks > 1) {
            _tile_loadd(5, a + 16 * lda + kc * 32, lda * 2);
            _tile_dpbf16ps(1, 5, 6);
        }
        if (blocks > 2) {
            _tile_loadd(4, a + 32 * lda + kc * 32, lda * 2);
            _tile_dpbf16ps(2, 4, 6);
        }
        if (blocks > 3) {
            _tile_loadd(5, a + 48 * lda + kc * 32, lda * 2);
            _tile_dpbf16ps(3, 5, 6);
        }
    }
    _tile_stored(0, c, 64);
    _tile_stored(1, c + 256, 64);
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
}
/* Whether (v, i) beats (best, bi) under argmax's order: greater, or a NaN over a number, or
 * equal (both NaN, or the same value) at a lower index. */
static inline __mmask16 argmax_beats(__m512 v, __m512i i, __m512 best, __m512i bi) {
    const __mmask16 v_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __mmask16 b_nan = _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);
    const __mmask16 same = _mm512_cmp_ps_mask(v, best, _CMP_EQ_OQ) | (v_nan & b_nan);
    return (_mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) & ~b_nan) | (v_nan & ~b_nan) |
           (same & _mm512_cmplt_epi32_mask(i, bi));
}

/* A running argmax per row and lane, [M][16] each: amx_linear_argmax's instead of rows of y. */
typedef struct {
    float *best;
    int32_t *index;
} lane_argmax;

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

/* One of nth threads' share of amx_linear, with the tiles configured in this thread: runs of
 * 16-column blocks taken from the shared counter next_block (from 0, take_blocks) until none
 * are left. Taken as they come rather than as halves fixed in advance, because the two cores
 * here do not always run at the same speed, and a busy neighbour slows one thread only: once,
 * at one decode row, the second thread took twice as long over the same half, and the first
 * waited for it 40% of the linears' time. Decode steps in one engine, the three ways
 * alternated (medians of 80 steps each, two runs): 1 sequence 13.5 / 18.7 ms with halves,
 * 11.6 / 17.4 with runs of NB / 16, 10.6 / 17.9 with take_blocks' shrinking runs; 16
 * sequences 21.0 / 27.6, 21.3 / 28.0, 20.6 / 25.6; 64 sequences 54.8 / 70.8, 53.7 / 69.8,
 * 51.0 / 69.5. a: x with ceil(M / 16) * 16 readable rows (past row M any values: they reach
 * only output rows that are not stored). am: NULL, or where each row's float32 sums are folded
 * into this thread's per-lane argmax instead of being stored into y. Inlined, so that callers
 * passing NULL keep a loop with no argmax in it. */
static inline __attribute__((always_inline)) void
amx_linear_part(const uint16_t *a, const void *wp, int fmt, const float *bias, void *y,
                int y_f32, int64_t M, int64_t N, int64_t K, int64_t nth, atomic_llong *next_block,
                const lane_argmax *am) {
    const int64_t KC = K / 32, NB = N / 16, block_bytes = KC * tile_bytes(fmt);
    float c[64 * 16] __attribute__((aligned(64)));
    uint16_t buf[2 * 512] __attribute__((aligned(64)));
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t begin, end; (begin = take_blocks(next_block, NB, nth, &end)) < NB;) {
        for (int64_t nb = begin; nb < end; nb++) {
            const char *b = (const char *)wp + nb * block_bytes;
            const __m512 bv = bias != NULL ? _mm512_loadu_ps(bias + nb * 16) : _mm512_setzero_ps();
            const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32((int)(nb * 16)));
            for (int64_t m0 = 0; m0 < M; m0 += 64) {
                const int64_t rows = M - m0 < 64 ? M - m0 : 64;
                const char *next = m0 == 0 && nb + 1 < end ? b + block_bytes : NULL;
                column_block(a + m0 * K, K, b, fmt, KC, (int)((rows + 15) / 16), c, next, buf);
                for (int64_t r = 0; r < rows; r++) {
                    const __m512 v = _mm512_add_ps(_mm512_load_ps(c + r * 16), bv);
                    const int64_t at = (m0 + r) * N + nb * 16;
                    if (am != NULL) {
                        float *bp = am->best + (m0 + r) * 16;
                        int32_t *ip = am->index + (m0 + r) * 16;
                        const __m512 best = _mm512_loadu_ps(bp);
                        const __m512i bi = _mm512_loadu_si512(ip);
                        const __mmask16 win = argmax_beats(v, idx, best, bi);
                        _mm512_storeu_ps(bp, _mm512_mask_mov_ps(best, win, v));
                        _mm512_storeu_si512(ip, _mm512_mask_mov_epi32(bi, win, idx));
                    } else if (y_f32)
                        _mm512_storeu_ps((float *)y + at, v);
                    else
                        _mm256_storeu_si256((__m256i *)((uint16_t *)y + at), to_bf16x16(v));
                }
            }
        }
    }
}
#endif

/* 1 where amx_linear runs: compiled for AMX-BF16 and the kernel lets this process use the tile
 * registers (Linux asks each process to request them: arch_prctl ARCH_REQ_XCOMP_PERM). */
int amx_available(void) {
#ifdef HAVE_AMX
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
    return 0;
#endif
}

#ifdef HAVE_AMX
/* x [M, K] with rows to a multiple of 16, as A tiles read them: x itself, or (when M % 16 != 0)
 * a copy with zero rows after the last, which *owned holds for the caller to free (else NULL). */
static const uint16_t *rows_padded16(const uint16_t *x, int64_t M, int64_t K, uint16_t **owned) {
    *owned = NULL;
    if (M % 16 == 0)
        return x;
    const int64_t MP = (M + 15) / 16 * 16;
    *owned = malloc(sizeof(uint16_t) * (size_t)(MP * K));
    if (*owned == NULL)
        abort();
    memcpy(*owned, x, sizeof(uint16_t) * (size_t)(M * K));
    memset(*owned + M * K, 0, sizeof(uint16_t) * (size_t)((MP - M) * K));
    return *owned;
}

/* The lane holding the best (value, index) of v and i under argmax_beats: rotated halves
 * compared four times, so every lane ends with the best of all 16. */
static inline int32_t argmax_lanes(__m512 v, __m512i i) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int shift = 8; shift >= 1; shift /= 2) {
        const __m512i from = _mm512_and_si512(_mm512_add_epi32(lane, _mm512_set1_epi32(shift)),
                                              _mm512_set1_epi32(15));
        const __m512 v2 = _mm512_permutexvar_ps(from, v);
        const __m512i i2 = _mm512_permutexvar_epi32(from, i);
        const __mmask16 win = argmax_beats(v2, i2, v, i);
        v = _mm512_mask_mov_ps(v, win, v2);
        i = _mm512_mask_mov_epi32(i, win, i2);
    }
    return _mm_cvtsi128_si32(_mm512_castsi512_si128(i));
}
#endif

/* y [M, N] = x [M, K] bf16 . W^T (+ bias [N] float32, may be NULL); y is bf16, or float32
 * with y_f32 (the LM head: logits not rounded to bf16, where near-equal candidates would tie).
 * wp is W packed, in format fmt, as [N / 16][K / 32][tile]: for each 16 output columns and
 * 32-element K chunk, one B tile whose row r holds, per column, the K elements 2r and 2r + 1
 * (W_BF16: [16][16][2] bf16; W_Q4: made from 320 bytes, see there). Needs K % 32 == 0,
 * N % 16 == 0 and amx_available(). */
void amx_linear(const uint16_t *x, const void *wp, int fmt, const float *bias, void *y,
                int y_f32, int64_t M, int64_t N, int64_t K, int num_threads) {
#ifdef HAVE_AMX
    if (M <= 0)
        return;
    uint16_t *padded;
    const uint16_t *a = rows_padded16(x, M, K, &padded);
    atomic_llong next_block = 0;
#pragma omp parallel num_threads(num_threads)
    {
        configure_tiles();
        amx_linear_part(a, wp, fmt, bias, y, y_f32, M, N, K, omp_get_num_threads(), &next_block,
                        NULL);
        _tile_release();
    }
    free(padded);
#else
    (void)x, (void)wp, (void)fmt, (void)bias, (void)y, (void)y_f32, (void)M, (void)N, (void)K;
    (void)num_threads;
    abort(); /* callers check amx_available() */
#endif
}

/* amx_linear_argmax: out[m] = argmax over n of (x . W^T)[m, n], the float32 sums amx_linear
 * computes, without writing them: greedy sampling's LM head. At 64 rows the float32 logits
 * (64 x 49152 x 4 B = 12.6 MB) cost more to write and read back than the tiles take to compute
 * (LM head + argmax 8.4 ms; 4.6 ms with bf16 logits). As torch's argmax: the first index of the
 * maximum, a NaN counting as the maximum (the first NaN). x [M, K] bf16, M <= 128 or any; wp and
 * fmt as amx_linear's; out [M] int64. Needs K % 32 == 0, N % 16 == 0 and amx_available(). */

void amx_linear_argmax(const uint16_t *x, const void *wp, int fmt, int64_t *out, int64_t M,
                       int64_t N, int64_t K, int num_threads) {
#ifdef HAVE_AMX
    if (M <= 0)
        return;
    uint16_t *padded;
    const uint16_t *a = rows_padded16(x, M, K, &padded);
    float *best = malloc(sizeof(float) * (size_t)(num_threads * M * 16));
    int32_t *index = malloc(sizeof(int32_t) * (size_t)(num_threads * M * 16));
    if (best == NULL || index == NULL)
        abort();
    int threads = 1;
    atomic_llong next_block = 0;
#pragma omp parallel num_threads(num_threads)
    {
        configure_tiles();
        const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
#pragma omp single
        threads = (int)nth;
        const lane_argmax am = {best + tid * M * 16, index + tid * M * 16};
        for (int64_t r = 0; r < M; r++) {
            _mm512_storeu_ps(am.best + r * 16, _mm512_set1_ps(-INFINITY));
            _mm512_storeu_si512(am.index + r * 16, _mm512_set1_epi32(INT32_MAX));
        }
        amx_linear_part(a, wp, fmt, NULL, NULL, 1, M, N, K, nth, &next_block, &am);
        _tile_release();
    }
    for (int64_t r = 0; r < M; r++) { /* each row: the threads' lanes, then the lanes */
        __m512 v = _mm512_set1_ps(-INFINITY);
        __m512i i = _mm512_set1_epi32(INT32_MAX);
        for (int t = 0; t < threads; t++) {
            const __m512 tv = _mm512_loadu_ps(best + (t * M + r) * 16);
            const __m512i ti = _mm512_loadu_si512(index + (t * M + r) * 16);
            const __mmask16 win = argmax_beats(tv, ti, v, i);
            v = _mm512_mask_mov_ps(v, win, tv);
            i = _mm512_mask_mov_epi32(i, win, ti);
        }
        out[r] = argmax_lanes(v, i);
    }
    free(padded);
    free(best);
    free(index);
#else
    (void)x, (void)wp, (void)fmt, (void)out, (void)M, (void)N, (void)K, (void)num_threads;
    abort(); /* callers check amx_available() */
#endif
}

/* paged_prefill_attention_amx: paged_prefill_attention's work (same arguments, same items: 16
 * query tokens of one request x one KV head, R = 16 G rows) with both products on AMX tiles, for
 * a bf16 cache and head_dim % 32 == 0. The float32-FMA kernel runs at 70-180 GFLOP/s, and for a
 * 2048-token prompt attention took longer than all the linear layers. Per chunk of 32 keys:
 *   S^T [32, R] = K . Q^T: K's A tiles straight from the cache (16 keys of one block, a row
 *     apart; gathered where blocks are smaller), Q^T's B tiles built once per item.
 *   the online softmax down the columns, 16 query rows per vector: no horizontal reductions
 *     (row by row, their latency made the softmax two thirds of the kernel).
 *   O [R, D] += P . V: P's A tiles by a 16 x 16 transpose of its key pairs; V's B tiles hold
 *     keys 2i and 2i + 1 interleaved in row i. O stays float32 in memory.
 * The tiles multiply bf16. K and V are bf16 already; Q and P are float32, so each goes in as
 * hi = bf16(x) and lo = bf16(x - hi), both multiplied (twice the tile work): hi + lo carries 16
 * mantissa bits, and the outputs match the float32 kernel to ~1e-5 (the same test tolerance).
 * Q and P simply rounded to bf16, as flash attention does on GPUs, were ~1.6x faster again,
 * but the bf16 model's greedy text then parted from float32's at a 0.23-nat gap, past what
 * test_bfloat16_stays_close_to_float32 allows (0.15; the float32 kernel: 0.05). */
#ifdef HAVE_AMX
#define AMX_KEYS 32
/* The softmax's reference max moves only when a score passes it by more than this: weights
 * stay below e^8, and O (in memory, summed by the tiles) is rescaled only then, mostly at a
 * row's first chunk. Exact either way: O and the sum l share the reference. */
#define PF_MAX_SLACK 8.0f

static inline __m512 widen_bf16x16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* x = hi + lo to ~2^-17 relative, both bf16. */
static inline void split_bf16x16(__m512 x, __m256i *hi, __m256i *lo) {
    *hi = to_bf16x16(x);
    *lo = to_bf16x16(_mm512_sub_ps(x, widen_bf16x16(*hi)));
}

/* dst (16 rows of 16 32-bit elements, 64 B apart) = the transpose of the rows at src. */
static inline void transpose16_bits(const void *const src[16], void *dst) {
    __m512 r[16];
    for (int i = 0; i < 16; i++)
        r[i] = _mm512_castsi512_ps(_mm512_loadu_si512(src[i]));
    transpose16_regs(r);
    for (int c = 0; c < 16; c++)
        _mm512_store_si512((char *)dst + 64 * c, _mm512_castps_si512(r[c]));
}

/* Two vectors of 16 bf16 -> 16 32-bit lanes (a[i], b[i]): the pair layout of AMX operands. */
static inline __m512i pair_bf16x16(__m256i a, __m256i b) {
    const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                         40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                         32, 0);
    return _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), idx, _mm512_castsi256_si512(b));
}

/* V's B tiles for one key chunk, vt [D / 16] tiles: dims 16t .. 16t+15, row i holding
 * (v[2i][d], v[2i+1][d]) for each dim. A missing key is a zero row: its weight is 0, and 0 x
 * a stale NaN would not be. */
static inline void value_tiles(const uint16_t *const vrow[AMX_KEYS], int64_t D, uint16_t *vt) {
    for (int i = 0; i < 16; i++)
        for (int64_t d = 0; d < D; d += 16) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(vrow[2 * i] + d));
            const __m256i b = _mm256_loadu_si256((const __m256i *)(vrow[2 * i + 1] + d));
            _mm512_store_si512(vt + d * 32 + 32 * i, pair_bf16x16(a, b));
        }
}

/* Per-thread buffers (64-byte aligned, as the tiles like them). */
typedef struct {
    uint16_t *q;    /* [2][R][D]: Q's hi and lo rows, scaled */
    uint16_t *qt;   /* [2][RG][D / 32] B tiles: Q^T, hi and lo */
    uint16_t *kg;   /* [AMX_KEYS][D]: keys gathered where they span blocks */
    uint16_t *vt;   /* [D / 16] B tiles: V */
    float *st;      /* [AMX_KEYS][R]: S^T */
    uint32_t *pair; /* [2][16][16]: P's key pairs, hi and lo, for 16 rows */
    uint16_t *p;    /* [2][R][AMX_KEYS] A tiles: P, hi and lo */
    float *o;       /* [R][D] */
    float *m, *l;   /* [R]: the softmax's reference max and running sum */
    int32_t *pos;   /* [R]: each row's position (keys after it are masked) */
    int64_t *at;    /* [R]: each row's offset in q and out, -1 for a pad row */
    uint16_t *zero_row;
} prefill_scratch;

static void *alloc64(size_t bytes) {
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (p == NULL)
        abort();
    return p;
}

static void prefill_scratch_init(prefill_scratch *s, int64_t R, int64_t D) {
    const size_t r = (size_t)R, d = (size_t)D, u16 = sizeof(uint16_t), f32 = sizeof(float);
    s->q = alloc64(2 * r * d * u16);
    s->qt = alloc64(2 * r / 16 * d / 32 * 512 * u16);
    s->kg = alloc64(AMX_KEYS * d * u16);
    s->vt = alloc64(d / 16 * 512 * u16);
    s->st = alloc64(AMX_KEYS * r * f32);
    s->pair = alloc64(2 * 16 * 16 * sizeof(uint32_t));
    s->p = alloc64(2 * r * AMX_KEYS * u16);
    s->o = alloc64(r * d * f32);
    s->m = alloc64(r * f32);
    s->l = alloc64(r * f32);
    s->pos = alloc64(r * sizeof(int32_t));
    s->at = alloc64(r * sizeof(int64_t));
    s->zero_row = alloc64(d * u16);
    memset(s->zero_row, 0, d * u16);
}

static void prefill_scratch_free(prefill_scratch *s) {
    void *all[] = {s->q, s->qt, s->kg, s->vt, s->st, s->pair, s->p,
                   s->o, s->m,  s->l,  s->pos, s->at, s->zero_row};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        free(all[i]);
}

/* The 16 keys from t on, as an A tile: in place when they lie in one block, else gathered into
 * dst (zero rows past `end`). Returns the tile's address; *stride: its row stride, elements.
 * The block table is read only for keys before `end` (its entries after those are not blocks). */
static inline const uint16_t *key_tile(const uint16_t *k_cache, const int64_t *table, int64_t t,
                                       int64_t end, int64_t block_size, int64_t row,
                                       int64_t head, int64_t D, uint16_t *dst,
                                       const uint16_t *zero_row, int64_t *stride) {
    if (t < end && t % block_size + 16 <= block_size) { /* rows past `end`: still in the block */
        *stride = row;
        return k_cache + (table[t / block_size] * block_size + t % block_size) * row + head;
    }
    for (int64_t j = 0; j < 16; j++) {
        const int64_t u = t + j;
        const uint16_t *src =
            u < end ? k_cache + (table[u / block_size] * block_size + u % block_size) * row + head
                    : zero_row;
        memcpy(dst + j * D, src, sizeof(uint16_t) * (size_t)D);
    }
    *stride = D;
    return dst;
}

/* exp(x) for the softmax weights, x <= PF_MAX_SLACK or -inf: exp_nonpos16's polynomial, with
 * 2^n applied by scalef (-inf: clamped to -100, whose 2^-144 the flush-to-zero mode makes 0). */
static inline __m512 exp_weight16(__m512 x) {
    __m512 n;
    const __m512 p = exp_split16(_mm512_max_ps(x, _mm512_set1_ps(-100.0f)), &n);
    return _mm512_scalef_ps(p, n);
}

/* The online softmax over one chunk for rows 16g .. 16g+15 (one vector): where `masked`, masks
 * keys past each row's position (and past nk); moves the reference max, rescales O's rows if it
 * moved, adds to the sums, and leaves P (hi and lo) as A tiles. */
static inline void softmax_chunk(prefill_scratch *s, int64_t g, int64_t R, int64_t D,
                                 int64_t j0, int64_t nk, int masked) {
    const __m512i pos = _mm512_load_si512(s->pos + 16 * g);
    const __m512 old = _mm512_load_ps(s->m + 16 * g);
    __m512 x[AMX_KEYS], mx = old;
    for (int64_t j = 0; j < AMX_KEYS; j++) {
        x[j] = _mm512_load_ps(s->st + j * R + 16 * g);
        if (masked) {
            const __mmask16 live =
                j < nk ? _mm512_cmpge_epi32_mask(pos, _mm512_set1_epi32((int)(j0 + j))) : 0;
            x[j] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live, x[j]);
        }
        mx = _mm512_max_ps(mx, x[j]);
    }
    const __mmask16 grow =
        _mm512_cmp_ps_mask(mx, _mm512_add_ps(old, _mm512_set1_ps(PF_MAX_SLACK)), _CMP_GT_OQ);
    mx = _mm512_mask_mov_ps(old, grow, mx);
    _mm512_store_ps(s->m + 16 * g, mx);
    /* exp(old - new): 0 at a row's first chunk (old = -inf) */
    const __m512 corr =
        _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), grow, exp_nonpos16(_mm512_sub_ps(old, mx)));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < AMX_KEYS / 2; i++) {
        const __m512 w0 = exp_weight16(_mm512_sub_ps(x[2 * i], mx));
        const __m512 w1 = exp_weight16(_mm512_sub_ps(x[2 * i + 1], mx));
        sum = _mm512_add_ps(sum, _mm512_add_ps(w0, w1));
        __m256i hi0, lo0, hi1, lo1;
        split_bf16x16(w0, &hi0, &lo0);
        split_bf16x16(w1, &hi1, &lo1);
        _mm512_store_si512(s->pair + 16 * i, pair_bf16x16(hi0, hi1));
        _mm512_store_si512(s->pair + 256 + 16 * i, pair_bf16x16(lo0, lo1));
    }
    _mm512_store_ps(s->l + 16 * g, _mm512_fmadd_ps(_mm512_load_ps(s->l + 16 * g), corr, sum));
    for (int part = 0; part < 2; part++) { /* P row r: its 16 key pairs */
        const void *src[16];
        for (int i = 0; i < 16; i++)
            src[i] = s->pair + 256 * part + 16 * i;
        transpose16_bits(src, s->p + (part * R + 16 * g) * AMX_KEYS);
    }
    if (grow) {
        float c[16] __attribute__((aligned(64)));
        _mm512_store_ps(c, corr);
        for (int64_t r = 0; r < 16; r++) {
            float *orow = s->o + (16 * g + r) * D;
            for (int64_t d = 0; d < D; d += 16)
                _mm512_store_ps(orow + d,
                                _mm512_mul_ps(_mm512_load_ps(orow + d), _mm512_set1_ps(c[r])));
        }
    }
}

void paged_prefill_attention_amx(const float *q, const void *k_cache, const void *v_cache,
                                 const int64_t *block_table, const int64_t *q_lens,
                                 const int64_t *ctx_lens, float *out, int64_t B, int64_t W,
                                 int64_t H, int64_t KH, int64_t D, int64_t block_size,
                                 float scale, int kv_bf16, int num_threads) {
    (void)kv_bf16; /* bf16: the caller's check */
    const int64_t G = H / KH, R = PF_TOK * G, RG = R / 16, row = KH * D, DS = D / 32;
    const uint16_t *kc = k_cache, *vc = v_cache;
    int64_t *starts = prefill_item_starts(q_lens, B, KH);

#pragma omp parallel num_threads(num_threads)
    {
        configure_tiles();
        const unsigned int csr = flush_denormals();
        prefill_scratch s;
        prefill_scratch_init(&s, R, D);

#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < starts[2 * B + 1]; it++) {
            const prefill_item w = prefill_item_rows(it, starts, q_lens, ctx_lens, block_table,
                                                     B, W, H, KH, D, s.at, s.pos, s.m, s.l);
            const int64_t kh = w.kh, first = w.first, *table = w.table;
            for (int64_t r = 0; r < R; r++) /* Q, scaled, as hi and lo rows; pad rows zero */
                for (int64_t d = 0; d < D; d += 16) {
                    const __m512 x =
                        s.at[r] >= 0 ? _mm512_loadu_ps(q + s.at[r] + d) : _mm512_setzero_ps();
                    __m256i qhi, qlo;
                    split_bf16x16(_mm512_mul_ps(x, _mm512_set1_ps(scale)), &qhi, &qlo);
                    _mm256_store_si256((__m256i *)(s.q + r * D + d), qhi);
                    _mm256_store_si256((__m256i *)(s.q + (R + r) * D + d), qlo);
                }
            for (int64_t part = 0; part < 2; part++) /* Q^T: row i = dims 2i, 2i+1, 16 rows */
                for (int64_t g = 0; g < RG; g++)
                    for (int64_t ds = 0; ds < DS; ds++) {
                        const void *src[16];
                        for (int i = 0; i < 16; i++)
                            src[i] = s.q + (part * R + 16 * g + i) * D + 32 * ds;
                        transpose16_bits(src, s.qt + ((part * RG + g) * DS + ds) * 512);
                    }
            memset(s.o, 0, sizeof(float) * (size_t)(R * D));

            const int64_t end = first + w.nt; /* keys 0 .. end - 1 */
            for (int64_t j0 = 0; j0 < end; j0 += AMX_KEYS) {
                const int64_t nk = end - j0 < AMX_KEYS ? end - j0 : AMX_KEYS;
                int64_t ks0, ks1;
                const uint16_t *k0 = key_tile(kc, table, j0, end, block_size, row, kh * D, D,
                                              s.kg, s.zero_row, &ks0);
                const uint16_t *k1 = key_tile(kc, table, j0 + 16, end, block_size, row, kh * D,
                                              D, s.kg + 16 * D, s.zero_row, &ks1);
                const uint16_t *vrow[AMX_KEYS];
                for (int64_t j = 0, t = j0; j < AMX_KEYS; j++, t++)
                    vrow[j] = j < nk ? vc + (table[t / block_size] * block_size +
                                             t % block_size) * row + kh * D
                                     : s.zero_row;
                value_tiles(vrow, D, s.vt);

                for (int64_t g = 0; g < RG; g++) { /* S^T = K . (Q hi + Q lo)^T */
                    _tile_zero(0);
                    _tile_zero(1);
                    for (int64_t ds = 0; ds < DS; ds++) {
                        _tile_loadd(2, k0 + 32 * ds, ks0 * 2);
                        _tile_loadd(3, k1 + 32 * ds, ks1 * 2);
                        _tile_loadd(4, s.qt + (g * DS + ds) * 512, 64);
                        _tile_loadd(5, s.qt + ((RG + g) * DS + ds) * 512, 64);
                        _tile_dpbf16ps(0, 2, 4);
                        _tile_dpbf16ps(1, 3, 4);
                        _tile_dpbf16ps(0, 2, 5);
                        _tile_dpbf16ps(1, 3, 5);
                    }
                    _tile_stored(0, s.st + 16 * g, R * 4);
                    _tile_stored(1, s.st + 16 * R + 16 * g, R * 4);
                }
                /* no key past any row's position (the first row's: `first`), none missing */
                const int masked = nk < AMX_KEYS || j0 + AMX_KEYS - 1 > first;
                for (int64_t g = 0; g < RG; g++)
                    softmax_chunk(&s, g, R, D, j0, nk, masked);
                for (int64_t g = 0; g < RG; g++) { /* O += (P hi + P lo) . V */
                    float *orow = s.o + 16 * g * D;
                    _tile_loadd(5, s.p + 16 * g * AMX_KEYS, AMX_KEYS * 2);
                    _tile_loadd(7, s.p + (R + 16 * g) * AMX_KEYS, AMX_KEYS * 2);
                    for (int64_t dt = 0; dt < D / 16; dt += 2) { /* two chains at a time */
                        _tile_loadd(0, orow + 16 * dt, D * 4);
                        _tile_loadd(1, orow + 16 * dt + 16, D * 4);
                        _tile_loadd(2, s.vt + dt * 512, 64);
                        _tile_loadd(6, s.vt + dt * 512 + 512, 64);
                        _tile_dpbf16ps(0, 5, 2);
                        _tile_dpbf16ps(1, 5, 6);
                        _tile_dpbf16ps(0, 7, 2);
                        _tile_dpbf16ps(1, 7, 6);
                        _tile_stored(0, orow + 16 * dt, D * 4);
                        _tile_stored(1, orow + 16 * dt + 16, D * 4);
                    }
                }
            }
            for (int64_t r = 0; r < R; r++) {
                if (s.at[r] < 0)
                    continue;
                const __m512 inv = _mm512_set1_ps(1.0f / s.l[r]);
                for (int64_t d = 0; d < D; d += 16)
                    _mm512_storeu_ps(out + s.at[r] + d,
                                     _mm512_mul_ps(_mm512_load_ps(s.o + r * D + d), inv));
            }
        }
        prefill_scratch_free(&s);
        restore_denormals(csr);
        _tile_release();
    }
    free(starts);
}
#else
void paged_prefill_attention_amx(const float *q, const void *k_cache, const void *v_cache,
                                 const int64_t *block_table, const int64_t *q_lens,
                                 const int64_t *ctx_lens, float *out, int64_t B, int64_t W,
                                 int64_t H, int64_t KH, int64_t D, int64_t block_size,
                                 float scale, int kv_bf16, int num_threads) {
    (void)q, (void)k_cache, (void)v_cache, (void)block_table, (void)q_lens, (void)ctx_lens;
    (void)out, (void)B, (void)W, (void)H, (void)KH, (void)D, (void)block_size, (void)scale;
    (void)kv_bf16, (void)num_threads;
    abort(); /* callers check amx_available() */
}
#endif

/* decode_layers: every decoder layer of a decode step (one new token per request, at most 128
 * requests, every linear on amx_linear) in one call and one parallel region. Called layer by
 * layer from Python, a step is ~9 kernel calls per layer, each its own parallel region: with
 * OMP_WAIT_POLICY=PASSIVE (the engine's default, so that idle threads leave the cores to the
 * API server) every region wakes the sleeping second thread, and at one request that and the
 * Python between the calls took about as long as the arithmetic. Here the phases of a layer
 * are separated by step_barrier, which spins briefly (phases end close together) and only
 * then sleeps. The arithmetic is that of the separate kernels, in the same order, so the
 * results are the same bits. */
#ifdef HAVE_AMX
#include <limits.h>
#include <linux/futex.h>
#include <x86intrin.h>

typedef struct {
    atomic_int arrived, generation, sleepers;
    /* work counters, back at 0 for each phase: attention's (decode_requests), the linears'
     * (amx_linear_part) */
    atomic_llong next_request, next_block;
    int threads;
} step_barrier;

/* ~25 us at this machine's 2.1 GHz TSC: long enough to cover a phase's imbalance, short enough
 * that a thread whose partner was descheduled soon gives up its core. */
#define BARRIER_SPIN_TICKS 50000

static void step_barrier_wait(step_barrier *b) {
    const int generation = atomic_load(&b->generation);
    if (atomic_fetch_add(&b->arrived, 1) == b->threads - 1) { /* the last one releases */
        atomic_store(&b->arrived, 0);
        atomic_store(&b->next_request, 0); /* no thread takes work across a barrier */
        atomic_store(&b->next_block, 0);
        atomic_fetch_add(&b->generation, 1);
        if (atomic_load(&b->sleepers) > 0)
            syscall(SYS_futex, &b->generation, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
        return;
    }
    const uint64_t start = __rdtsc();
    while (atomic_load(&b->generation) == generation) {
        if (__rdtsc() - start < BARRIER_SPIN_TICKS) {
            _mm_pause();
            continue;
        }
        atomic_fetch_add(&b->sleepers, 1); /* before the check below: the releaser sees it */
        while (atomic_load(&b->generation) == generation)
            syscall(SYS_futex, &b->generation, FUTEX_WAIT_PRIVATE, generation, NULL, NULL, 0);
        atomic_fetch_sub(&b->sleepers, 1);
    }
}
#endif

/* One decoder layer's weights, as decode_layers reads them: RMSNorm weights float32 [hidden];
 * packed linears with float32 biases or NULL, and each one's format (amx_linear); the layer's
 * K and V caches. */
typedef struct {
    const float *input_norm, *post_norm;
    const void *qkv, *o, *gate_up, *down;
    const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias;
    void *k_cache, *v_cache;
    int qkv_fmt, o_fmt, gate_up_fmt, down_fmt;
} decode_layer;

/* decode_layers' buffers, carved one after another out of its scratch, each 64-byte aligned;
 * those an amx_linear reads (h, attn, act) have room for T rounded up to 16 rows. */
typedef struct {
    float *res[2], *q; /* the residual stream (in, out), rotated q */
    uint16_t *h, *qkv, *attn, *gate_up, *act, *mlp; /* mlp: o_proj's output, then the MLP's */
} decode_buffers;

/* The next `bytes` of the scratch at `base` (NULL: only counted) from offset *at. */
static void *carve(char *base, int64_t *at, int64_t bytes) {
    void *p = base == NULL ? NULL : base + *at;
    *at += (bytes + 63) / 64 * 64;
    return p;
}

/* Lays decode_layers' buffers out in `base` (NULL: only sizes them); returns the bytes. */
static int64_t decode_buffers_at(char *base, decode_buffers *b, int64_t T, int64_t hidden,
                                 int64_t H, int64_t KH, int64_t D, int64_t I) {
    const int64_t Tp = (T + 15) / 16 * 16;
    int64_t at = 0;
    b->res[0] = carve(base, &at, 4 * T * hidden);
    b->res[1] = carve(base, &at, 4 * T * hidden);
    b->h = carve(base, &at, 2 * Tp * hidden);
    b->qkv = carve(base, &at, 2 * T * (H + 2 * KH) * D);
    b->q = carve(base, &at, 4 * T * H * D);
    b->attn = carve(base, &at, 2 * Tp * H * D);
    b->gate_up = carve(base, &at, 2 * T * 2 * I);
    b->act = carve(base, &at, 2 * Tp * I);
    b->mlp = carve(base, &at, 2 * T * hidden);
    return at;
}

/* The scratch decode_layers needs for T tokens, in bytes. */
int64_t decode_layers_scratch(int64_t T, int64_t hidden, int64_t H, int64_t KH, int64_t D,
                              int64_t I) {
    decode_buffers b;
    return decode_buffers_at(NULL, &b, T, hidden, H, KH, D, I);
}

/* embeds: [T, hidden] bf16, the tokens' embeddings; out: [T, hidden] float32, the final
 * RMSNorm (final_norm) of the last layer's output plus the residual stream. positions, slots:
 * [T]; block_table [T, W] and ctx_lens [T] as for paged_decode_attention (token t is request
 * t's new token). Biases, caches and dims as the separate kernels take them; bf16 linears. */
void decode_layers(const decode_layer *layers, int64_t L, const uint16_t *embeds,
                   const float *final_norm, float eps, float *out, const int64_t *positions,
                   const float *cos, const float *sin, const int64_t *slots,
                   const int64_t *block_table, int64_t W, const int64_t *ctx_lens, int64_t T,
                   int64_t hidden, int64_t H, int64_t KH, int64_t D, int64_t I,
                   int64_t block_size, float scale, int kv_bf16, void *scratch,
                   int num_threads) {
#ifdef HAVE_AMX
    const int64_t QKV = (H + 2 * KH) * D;
    decode_buffers buf;
    decode_buffers_at(scratch, &buf, T, hidden, H, KH, D, I);
    float **res = buf.res, *q = buf.q;
    uint16_t *h = buf.h, *qkv = buf.qkv, *attn = buf.attn, *gate_up = buf.gate_up;
    uint16_t *act = buf.act, *mlp = buf.mlp;
    const int64_t max_len = max_of(ctx_lens, T);
    step_barrier barrier = {.threads = 0};
#pragma omp parallel num_threads(num_threads)
    {
        const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t r0 = T * tid / nth, r1 = T * (tid + 1) / nth; /* this thread's rows */
#pragma omp single
        barrier.threads = (int)nth; /* (the single's own barrier publishes it) */
        const unsigned int csr = flush_denormals();
        configure_tiles();
        decode_scratch ds;
        decode_scratch_init(&ds, H, KH, D, max_len);
        for (int64_t l = 0; l < L; l++) {
            const decode_layer *ly = layers + l;
            rms_rows(l == 0 ? embeds : mlp, 1, l == 0 ? NULL : res[1], ly->input_norm, eps,
                     res[0], h, 1, r0, r1, hidden);
            step_barrier_wait(&barrier);
            amx_linear_part(h, ly->qkv, ly->qkv_fmt, ly->qkv_bias, qkv, 0, T, QKV, hidden, nth,
                            &barrier.next_block, NULL);
            step_barrier_wait(&barrier);
            rope_rows(qkv, 1, positions, cos, sin, slots, q, ly->k_cache, ly->v_cache, kv_bf16,
                      r0, r1, H, KH, D);
            step_barrier_wait(&barrier);
            decode_requests(&barrier.next_request, q, ly->k_cache, ly->v_cache, block_table,
                            ctx_lens, T, W, H, KH, D, block_size, scale, kv_bf16, &ds, NULL,
                            attn);
            step_barrier_wait(&barrier);
            amx_linear_part(attn, ly->o, ly->o_fmt, ly->o_bias, mlp, 0, T, hidden, H * D, nth,
                            &barrier.next_block, NULL);
            step_barrier_wait(&barrier);
            rms_rows(mlp, 1, res[0], ly->post_norm, eps, res[1], h, 1, r0, r1, hidden);
            step_barrier_wait(&barrier);
            amx_linear_part(h, ly->gate_up, ly->gate_up_fmt, ly->gate_up_bias, gate_up, 0, T,
                            2 * I, hidden, nth, &barrier.next_block, NULL);
            step_barrier_wait(&barrier);
            silu_rows(gate_up, act, 1, r0, r1, I);
            step_barrier_wait(&barrier);
            amx_linear_part(act, ly->down, ly->down_fmt, ly->down_bias, mlp, 0, T, hidden, I,
                            nth, &barrier.next_block, NULL);
            step_barrier_wait(&barrier);
        }
        rms_rows(mlp, 1, res[1], final_norm, eps, res[0], out, 0, r0, r1, hidden);
        decode_scratch_free(&ds);
        _tile_release();
        restore_denormals(csr);
    }
#else
    (void)layers, (void)L, (void)embeds, (void)final_norm, (void)eps, (void)out;
    (void)positions, (void)cos, (void)sin, (void)slots, (void)block_table, (void)W;
    (void)ctx_lens, (void)T, (void)hidden, (void)H, (void)KH, (void)D, (void)I;
    (void)block_size, (void)scale, (void)kv_bf16, (void)scratch, (void)num_threads;
    abort(); /* callers check amx_available() */
#endif
}
