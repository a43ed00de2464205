/* The functions headrace's Python calls, and the structs it passes. api.py reads this file to
 * bind them (ctypes types from these C types: pointers, int64_t, int, float), and
 * every kernel file is compiled against it, so the Python side and the C definitions cannot
 * drift apart. Only these leave the shared object (-fvisibility=hidden elsewhere). */
#ifndef HEADRACE_API_H
#define HEADRACE_API_H
#include <stdint.h>

#define HR_API __attribute__((visibility("default")))

/* The KV cache's element formats (kv_fmt): float32, bf16, and OCP fp8 E4M3 (finite, max 448)
 * or E5M2 (max 57344). An fp8 cache holds K / k_scale and V / v_scale (k_scale, v_scale: one
 * each per layer; 1 where no scales were computed, and for the other formats). Attention
 * computes in float32 whichever. */
#define KV_F32 0
#define KV_BF16 1
#define KV_E4M3 2
#define KV_E5M2 3

/* decode_attention.c: decode attention over the paged cache (q, out [B, H, D] float32) */
HR_API void paged_decode_attention(const float *q, const void *k_cache, const void *v_cache,
                                   const int64_t *block_table, const int64_t *ctx_lens,
                                   float *out, int64_t B, int64_t W, int64_t H, int64_t KH,
                                   int64_t D, int64_t block_size, float scale, int kv_fmt,
                                   float k_scale, float v_scale, int num_threads);

/* prefill_attention.c: causal attention of prompt chunks over the paged cache */
HR_API void paged_prefill_attention(const float *q, const void *k_cache, const void *v_cache,
                                    const int64_t *block_table, const int64_t *q_lens,
                                    const int64_t *ctx_lens, float *out, int64_t B, int64_t W,
                                    int64_t H, int64_t KH, int64_t D, int64_t block_size,
                                    float scale, int kv_fmt, float k_scale, float v_scale,
                                    int num_threads);

/* elementwise.c: the small steps around the linears, greedy's argmax, and logprobs */
HR_API void add_rms_norm(const void *x, int x_bf16, const float *residual, const float *weight,
                         float eps, float *res_out, void *out, int out_bf16, int64_t T, int64_t N,
                         int num_threads);
HR_API void rope_write_kv(const void *qkv, int qkv_bf16, const int64_t *positions,
                          const float *cos, const float *sin, const int64_t *slots, float *q_out,
                          void *k_cache, void *v_cache, int kv_fmt, float k_scale,
                          float v_scale, int64_t T, int64_t H, int64_t KH, int64_t D,
                          int num_threads);
HR_API void silu_mul(const void *x, void *out, int io_bf16, int64_t T, int64_t I, int num_threads);
HR_API void argmax_rows(const void *x, int bf16, int64_t rows, int64_t n, int64_t *out,
                        int num_threads);
HR_API void logprob_rows(const void *x, int bf16, int64_t rows, int64_t n, const int64_t *target,
                         int k, float *target_lp, int64_t *rank, float *top_lp, int64_t *top_ids,
                         int num_threads);

/* amx_linear.c: bf16 linears on AMX tiles (amx_available: 1 where they run) */
HR_API int amx_available(void);
HR_API void amx_linear(const uint16_t *x, const void *wp, int fmt, const float *bias, void *y,
                       int y_f32, int64_t M, int64_t N, int64_t K, int num_threads);
HR_API void amx_linear_argmax(const uint16_t *x, const void *wp, int fmt, int64_t *out, int64_t M,
                              int64_t N, int64_t K, int num_threads);

/* amx_attention.c: paged_prefill_attention on AMX tiles, for a bf16 cache */
HR_API void paged_prefill_attention_amx(const float *q, const void *k_cache, const void *v_cache,
                                        const int64_t *block_table, const int64_t *q_lens,
                                        const int64_t *ctx_lens, float *out, int64_t B,
                                        int64_t W, int64_t H, int64_t KH, int64_t D,
                                        int64_t block_size, float scale, int kv_fmt,
                                        int num_threads);

/* q4_linear.c: float32 linears reading GGUF 4-bit (Q4_0, Q4_1, Q4_K) and 8-bit blocks (Q8_0,
 * group 32; Q6_K as int8 with a scale per 16, group 16; the 5-bit types as int8 with a scale and
 * offset per 32) */
HR_API int q4_linear_vector_bits(void);
HR_API void q4_linear(const float *x, const uint8_t *nib, const float *scale, const float *offset,
                      const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                      int num_threads);
HR_API void q8_linear(const float *x, const int8_t *q, const float *scale, const float *offset,
                      const float *bias, float *y, int64_t M, int64_t N, int64_t K, int group,
                      int num_threads);

/* decode_step.c: every decoder layer of a decode step in one call. A W_Q4F32 linear is a
 * q4_weight (q4_linear's layout), a W_Q8F32 one a q8_weight (q8_linear's), a W_SPLIT one a
 * split_weight: parts of those two kinds, each with its rows of the output and its bias, one
 * after another. W_BF16 and W_Q4 are amx_linear's packed tiles. */
#define W_BF16 0
#define W_Q4 1
#define W_Q4F32 2
#define W_Q8F32 3
#define W_SPLIT 4
#define Q4_TILE_BYTES 320 /* a W_Q4 tile (amx.h) */
typedef struct {
    const uint8_t *nibbles;
    const float *scale, *offset;
} q4_weight;
typedef struct {
    const int8_t *q;
    const float *scale, *offset;
    int64_t group;
} q8_weight;
typedef struct {
    const void *weight;
    const float *bias;
    int64_t rows;
    int fmt;
} linear_part;
typedef struct {
    const linear_part *parts;
    int64_t count;
} split_weight;
/* One decoder layer: RMSNorm weights float32 [hidden]; linears with float32 biases or NULL, and
 * each one's format; the layer's K and V caches and their scales. */
typedef struct {
    const float *input_norm, *post_norm;
    const void *qkv, *o, *gate_up, *down;
    const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias;
    void *k_cache, *v_cache;
    int qkv_fmt, o_fmt, gate_up_fmt, down_fmt;
    float k_scale, v_scale;
} decode_layer;
HR_API int64_t decode_layers_scratch(int64_t T, int64_t hidden, int64_t H, int64_t KH, int64_t D,
                                     int64_t I, int f32);
HR_API void decode_layers(const decode_layer *layers, int64_t L, const void *embeds,
                          const float *final_norm, float eps, float *out,
                          const int64_t *positions, const float *cos, const float *sin,
                          const int64_t *slots, const int64_t *block_table, int64_t W,
                          const int64_t *ctx_lens, int64_t T, int64_t hidden, int64_t H,
                          int64_t KH, int64_t D, int64_t I, int64_t block_size, float scale,
                          int kv_fmt, void *scratch, int num_threads);

#endif /* HEADRACE_API_H */
