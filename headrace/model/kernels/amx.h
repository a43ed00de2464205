/* AMX tile primitives, shared by amx_linear.c, amx_attention.c and decode_step.c (all static
 * inline, compiled into each; empty without HAVE_AMX). */
#ifndef HEADRACE_AMX_H
#define HEADRACE_AMX_H
#include "common.h"

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
#ifdef HAVE_AMX
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* All eight tiles, 16 rows x 64 B. amx_linear: 0-3 accumulators, 4-5 A (x rows, alternating),
 * 6 B (W columns); paged_prefill_attention_amx uses all eight (see there). */
static inline void configure_tiles(void) {
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
 * element 2r + j % 2 in its low nibble and column 8 + j / 2's in its high one. (The formats'
 * numbers and Q4_TILE_BYTES: api.h.) */
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
#endif /* HEADRACE_AMX_H */
