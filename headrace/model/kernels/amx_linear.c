/* amx_linear: bf16 linear layers on AMX tiles for decode-sized batches (tile primitives and the
 * blocking: amx.h); amx_linear_argmax: the LM head with greedy's argmax taken in place of its
 * rows. Without AMX-BF16 in the build they abort: callers check amx_available(). */
#include "amx.h"

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
