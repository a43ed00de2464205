#include "amx.h"

/* paged_prefill_attention_amx: paged_prefill_attention's work (same arguments but the fp8
 * scales, same items: 16 query tokens of one request x one KV head, R = 16 G rows) with both
 * products on AMX tiles, for a bf16 cache and head_dim % 32 == 0. The float32-FMA kernel runs
 * at 70-180 GFLOP/s, and for a 2048-token prompt attention took longer than all the linear
 * layers. Per chunk of 32 keys:
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
                                 float scale, int kv_fmt, int num_threads) {
    (void)kv_fmt; /* bf16: the caller's check */
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
                                 float scale, int kv_fmt, int num_threads) {
    (void)q, (void)k_cache, (void)v_cache, (void)block_table, (void)q_lens, (void)ctx_lens;
    (void)out, (void)B, (void)W, (void)H, (void)KH, (void)D, (void)block_size, (void)scale;
    (void)kv_fmt, (void)num_threads;
    abort(); /* callers check amx_available() */
}
#endif
