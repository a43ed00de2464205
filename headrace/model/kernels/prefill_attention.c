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
#include "common.h"

/* The work items of both prefill kernels, request by request: KH heads x ceil(q_len / PF_TOK)
 * tiles of query tokens each. starts [2][B + 1] (malloc'd): request b's first query row, then
 * its first item; starts[1][B] is the number of items. */
int64_t *prefill_item_starts(const int64_t *q_lens, int64_t B, int64_t KH) {
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

/* Item `it`, and its rows: row r is token r / G and query head kh * G + r % G; at[r] its offset
 * in q and out (-1: a pad row past the item's tokens), pos[r] its position (pad rows:
 * INT32_MAX, so nothing is masked for them); the softmax state starts at m = -inf, l = 0. */
prefill_item prefill_item_rows(int64_t it, const int64_t *starts, const int64_t *q_lens,
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
                             int kv_fmt, float k_scale, float v_scale, int num_threads) {
    scale *= k_scale; /* the cache holds K / k_scale, V / v_scale */
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
                        copy_row_f32(k_cache, base + j * row + kh * D, D, kv_fmt, kf + j * D);
                        copy_row_f32(v_cache, base + j * row + kh * D, D, kv_fmt, vf + j * D);
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
                corr[r] = v_scale / l[r];
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
