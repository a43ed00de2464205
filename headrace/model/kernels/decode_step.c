/* decode_layers: every decoder layer of a decode step (one new token per request) in one call
 * and one parallel region. Called layer by layer from Python, a step is ~9 kernel calls per
 * layer, each its own parallel region: with OMP_WAIT_POLICY=PASSIVE (the engine's default, so
 * that idle threads leave the cores to the API server) every region wakes the sleeping second
 * thread, and at one request that and the Python between the calls took about as long as the
 * arithmetic. Here the phases of a layer are separated by step_barrier, which spins briefly
 * (phases end close together) and only then sleeps. The arithmetic is that of the separate
 * kernels, in the same order, so the results are the same bits.
 *
 * Two kinds of linears, one for every layer: AMX tiles (W_BF16, W_Q4; bf16 activations, at most
 * 128 requests) or the GGUF's blocks in float32 (float32 activations, as many requests as the
 * block linears take: 128, or 16 over bf16 weights or on AVX-512): q4_columns for 4-bit blocks
 * (W_Q4F32), q8_columns for int8 ones (W_Q8F32), and parts of the two in one linear (W_SPLIT). */
#include <limits.h>
#include <linux/futex.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "amx.h"
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
/* ~25 us at a 2.1 GHz TSC: long enough to cover a phase's imbalance, short enough that a
 * thread whose partner was descheduled soon gives up its core. */
#define BARRIER_SPIN_TICKS 50000
static inline uint64_t spin_clock(void) { return __rdtsc(); }
static inline void spin_pause(void) { _mm_pause(); }
#else
#include <time.h>
#define BARRIER_SPIN_TICKS 25000 /* ns */
static inline uint64_t spin_clock(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}
static inline void spin_pause(void) {}
#endif

typedef struct {
    atomic_int arrived, generation, sleepers;
    /* work counters, back at 0 for each phase: attention's (decode_requests), the linears'
     * (take_blocks) */
    atomic_llong next_request, next_block;
    int threads;
} step_barrier;

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
    const uint64_t start = spin_clock();
    while (atomic_load(&b->generation) == generation) {
        if (spin_clock() - start < BARRIER_SPIN_TICKS) {
            spin_pause();
            continue;
        }
        atomic_fetch_add(&b->sleepers, 1); /* before the check below: the releaser sees it */
        while (atomic_load(&b->generation) == generation)
            syscall(SYS_futex, &b->generation, FUTEX_WAIT_PRIVATE, generation, NULL, NULL, 0);
        atomic_fetch_sub(&b->sleepers, 1);
    }
}

/* decode_layers' buffers, carved one after another out of its scratch, each 64-byte aligned;
 * activations are bf16 (AMX) or float32 (block linears). Those an amx_linear reads (h, attn, act)
 * have room for T rounded up to 16 rows; xp and sums hold q4_prepare's rows of the input of the
 * block linear at hand, sums16 its sums per 16. */
typedef struct {
    float *res[2], *q; /* the residual stream (in, out), rotated q */
    void *h, *qkv, *attn, *gate_up, *act, *mlp; /* mlp: o_proj's output, then the MLP's */
    float *xp, *sums, *sums16; /* sums16: per 16 of x, for W_Q8F32 groups of 16 with offsets */
} decode_buffers;

/* The next `bytes` of the scratch at `base` (NULL: only counted) from offset *at. */
static void *carve(char *base, int64_t *at, int64_t bytes) {
    void *p = base == NULL ? NULL : base + *at;
    *at += (bytes + 63) / 64 * 64;
    return p;
}

/* Lays decode_layers' buffers out in `base` (NULL: only sizes them); returns the bytes. */
static int64_t decode_buffers_at(char *base, decode_buffers *b, int64_t T, int64_t hidden,
                                 int64_t H, int64_t KH, int64_t D, int64_t I, int f32) {
    const int64_t Tp = (T + 15) / 16 * 16, e = f32 ? 4 : 2;
    int64_t most_k = hidden > H * D ? hidden : H * D; /* the widest linear input */
    most_k = most_k > I ? most_k : I;
    int64_t at = 0;
    b->res[0] = carve(base, &at, 4 * T * hidden);
    b->res[1] = carve(base, &at, 4 * T * hidden);
    b->h = carve(base, &at, e * Tp * hidden);
    b->qkv = carve(base, &at, e * T * (H + 2 * KH) * D);
    b->q = carve(base, &at, 4 * T * H * D);
    b->attn = carve(base, &at, e * Tp * H * D);
    b->gate_up = carve(base, &at, e * T * 2 * I);
    b->act = carve(base, &at, e * Tp * I);
    b->mlp = carve(base, &at, e * T * hidden);
    b->xp = f32 ? carve(base, &at, 4 * q4_prepared_floats(T, most_k)) : NULL;
    b->sums = f32 ? carve(base, &at, 4 * T * (most_k / 32)) : NULL;
    b->sums16 = f32 ? carve(base, &at, 4 * T * (most_k / 16)) : NULL;
    return at;
}

/* The scratch decode_layers needs for T tokens, in bytes (f32: block linears). */
int64_t decode_layers_scratch(int64_t T, int64_t hidden, int64_t H, int64_t KH, int64_t D,
                              int64_t I, int f32) {
    decode_buffers b;
    return decode_buffers_at(NULL, &b, T, hidden, H, KH, D, I, f32);
}

/* Columns n0 .. n1 - 1 of a W_Q4F32 or W_Q8F32 linear's output y [T, N] (row stride N). */
static void block_columns(const decode_buffers *b, const float *x, const void *w, int fmt,
                          const float *bias, float *y, int64_t T, int64_t N, int64_t K,
                          int64_t n0, int64_t n1) {
    if (fmt == W_Q4F32) {
        const q4_weight *q = w;
        q4_columns(b->xp, b->sums, q->nibbles, q->scale, q->offset, bias, y, T, N, K, n0, n1);
    } else {
        const q8_weight *q = w;
        const int G = (int)q->group;
        q8_columns(x, b->xp, G == 32 ? b->sums : b->sums16, q->q, q->scale, q->offset, G, bias, y,
                   T, N, K, n0, n1);
    }
}

/* This thread's share of a layer's linear y [T, N] = x [T, K] . W^T (+ bias): runs of 16 columns
 * taken from the shared counter. Float32 linears read x (the activations as they are) or b's
 * q4_prepare rows; a W_SPLIT linear's run is cut where its parts meet, each part writing its
 * columns of y. AMX: x is the bf16 activations as amx_linear reads them (tiles configured in
 * this thread). */
static void layer_linear(const decode_buffers *b, const void *x, const void *w, int fmt,
                         const float *bias, void *y, int64_t T, int64_t N, int64_t K, int64_t nth,
                         atomic_llong *next) {
    if (fmt == W_Q4F32 || fmt == W_Q8F32 || fmt == W_SPLIT) {
        const int64_t NB = (N + 15) / 16;
        for (int64_t begin, end; (begin = take_blocks(next, NB, nth, &end)) < NB;) {
            const int64_t n0 = begin * 16, n1 = end * 16 < N ? end * 16 : N;
            if (fmt != W_SPLIT) {
                block_columns(b, x, w, fmt, bias, y, T, N, K, n0, n1);
                continue;
            }
            const split_weight *split = w;
            for (int64_t p = 0, c0 = 0; p < split->count; c0 += split->parts[p++].rows) {
                const linear_part *part = split->parts + p;
                const int64_t c1 = c0 + part->rows;
                const int64_t lo = n0 > c0 ? n0 : c0, hi = n1 < c1 ? n1 : c1;
                if (lo < hi) /* the part's columns from c0: its weight's rows from 0 */
                    block_columns(b, x, part->weight, part->fmt, part->bias, (float *)y + c0, T,
                                  N, K, lo - c0, hi - c0);
            }
        }
        return;
    }
#ifdef HAVE_AMX
    amx_linear_part(x, w, fmt, bias, y, 0, T, N, K, nth, next, NULL);
#else
    abort(); /* callers check amx_available() */
#endif
}

/* Whether a linear reads the sums of each 16 of x: a W_Q8F32 weight in groups of 16 with
 * offsets, alone or as a W_SPLIT part. */
static int reads_sums16(const void *w, int fmt) {
    if (fmt == W_Q8F32) {
        const q8_weight *q = w;
        return q->group == 16 && q->offset != NULL;
    }
    if (fmt == W_SPLIT) {
        const split_weight *split = w;
        for (int64_t p = 0; p < split->count; p++)
            if (reads_sums16(split->parts[p].weight, split->parts[p].fmt))
                return 1;
    }
    return 0;
}

/* Rows r0 .. r1 - 1 of x [T, K] prepared for float32 linears (nothing for AMX): q4_prepare's,
 * and for few rows the sums of each 16 of x too where a linear reads them (b->sums16 set). */
static void prepare_rows(const decode_buffers *b, int f32, const void *x, int64_t T, int64_t r0,
                         int64_t r1, int64_t K) {
    if (f32 && r1 > r0) {
        q4_prepare((const float *)x, T, K, r0, r1, b->xp, b->sums);
        if (b->sums16 != NULL && T < GEMM_MIN_ROWS) /* the 8-bit columns then read x, these */
            group_sums((const float *)x + r0 * K, r1 - r0, K, 16, b->sums16 + r0 * (K / 16));
    }
}

/* embeds: [T, hidden], the tokens' embeddings (bf16 for AMX linears, float32 for block ones); out:
 * [T, hidden] float32, the final RMSNorm (final_norm) of the last layer's output plus the
 * residual stream. positions, slots: [T]; block_table [T, W] and ctx_lens [T] as for
 * paged_decode_attention (token t is request t's new token). Biases, caches and dims as the
 * separate kernels take them. */
void decode_layers(const decode_layer *layers, int64_t L, const void *embeds,
                   const float *final_norm, float eps, float *out, const int64_t *positions,
                   const float *cos, const float *sin, const int64_t *slots,
                   const int64_t *block_table, int64_t W, const int64_t *ctx_lens, int64_t T,
                   int64_t hidden, int64_t H, int64_t KH, int64_t D, int64_t I,
                   int64_t block_size, float scale, int kv_fmt, void *scratch,
                   int num_threads) {
    const int f32 = layers[0].qkv_fmt >= W_Q4F32, bf = !f32; /* bf: bf16 activations */
    const int64_t QKV = (H + 2 * KH) * D;
    decode_buffers buf;
    decode_buffers_at(scratch, &buf, T, hidden, H, KH, D, I, f32);
    int sums16 = 0;
    for (int64_t l = 0; l < L && f32; l++) {
        const decode_layer *ly = layers + l;
        sums16 |= reads_sums16(ly->qkv, ly->qkv_fmt) | reads_sums16(ly->o, ly->o_fmt) |
                  reads_sums16(ly->gate_up, ly->gate_up_fmt) | reads_sums16(ly->down, ly->down_fmt);
    }
    if (!sums16)
        buf.sums16 = NULL; /* no linear reads them: not computed */
    float **res = buf.res, *q = buf.q;
    void *h = buf.h, *qkv = buf.qkv, *attn = buf.attn, *gate_up = buf.gate_up;
    void *act = buf.act, *mlp = buf.mlp;
    const int64_t max_len = max_of(ctx_lens, T);
    step_barrier barrier = {.threads = 0};
#pragma omp parallel num_threads(num_threads)
    {
        const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t r0 = T * tid / nth, r1 = T * (tid + 1) / nth; /* this thread's rows */
#pragma omp single
        barrier.threads = (int)nth; /* (the single's own barrier publishes it) */
        const unsigned int csr = flush_denormals();
#ifdef HAVE_AMX
        if (bf)
            configure_tiles();
#endif
        decode_scratch ds;
        decode_scratch_init(&ds, H, KH, D, max_len);
        for (int64_t l = 0; l < L; l++) {
            const decode_layer *ly = layers + l;
            rms_rows(l == 0 ? embeds : mlp, bf, l == 0 ? NULL : res[1], ly->input_norm, eps,
                     res[0], h, bf, r0, r1, hidden);
            prepare_rows(&buf, f32, h, T, r0, r1, hidden);
            step_barrier_wait(&barrier);
            layer_linear(&buf, h, ly->qkv, ly->qkv_fmt, ly->qkv_bias, qkv, T, QKV, hidden,
                         nth, &barrier.next_block);
            step_barrier_wait(&barrier);
            rope_rows(qkv, bf, positions, cos, sin, slots, q, ly->k_cache, ly->v_cache, kv_fmt,
                      ly->k_scale, ly->v_scale, r0, r1, H, KH, D);
            step_barrier_wait(&barrier);
            decode_requests(&barrier.next_request, q, ly->k_cache, ly->v_cache, block_table,
                            ctx_lens, T, W, H, KH, D, block_size, scale, kv_fmt, ly->k_scale,
                            ly->v_scale, &ds, f32 ? attn : NULL, f32 ? NULL : attn);
            step_barrier_wait(&barrier);
            if (f32) { /* the requests were taken as they came: prepare by rows after them */
                prepare_rows(&buf, f32, attn, T, r0, r1, H * D);
                step_barrier_wait(&barrier);
            }
            layer_linear(&buf, attn, ly->o, ly->o_fmt, ly->o_bias, mlp, T, hidden, H * D,
                         nth, &barrier.next_block);
            step_barrier_wait(&barrier);
            rms_rows(mlp, bf, res[0], ly->post_norm, eps, res[1], h, bf, r0, r1, hidden);
            prepare_rows(&buf, f32, h, T, r0, r1, hidden);
            step_barrier_wait(&barrier);
            layer_linear(&buf, h, ly->gate_up, ly->gate_up_fmt, ly->gate_up_bias, gate_up,
                         T, 2 * I, hidden, nth, &barrier.next_block);
            step_barrier_wait(&barrier);
            silu_rows(gate_up, act, bf, r0, r1, I);
            prepare_rows(&buf, f32, act, T, r0, r1, I);
            step_barrier_wait(&barrier);
            layer_linear(&buf, act, ly->down, ly->down_fmt, ly->down_bias, mlp, T, hidden,
                         I, nth, &barrier.next_block);
            step_barrier_wait(&barrier);
        }
        rms_rows(mlp, bf, res[1], final_norm, eps, res[0], out, 0, r0, r1, hidden);
        decode_scratch_free(&ds);
#ifdef HAVE_AMX
        if (bf)
            _tile_release();
#endif
        restore_denormals(csr);
    }
}
