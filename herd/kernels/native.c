/* Weight-only int8 and int4 products of a few bfloat16 rows (decode) on CPUs with AVX512-BF16, int8
 * products of tens of rows (a prefill's experts), and dequantization into bf16 tiles for products of
 * many rows (prefill; quant.py runs the GEMM).
 *
 * A decode step reads every weight once, so it runs as fast as memory delivers the weight bytes.
 * torch's kernels convert each weight to float32 and reach about half of that; here each weight
 * becomes a bfloat16 (exact: int8 and int4 values fit its 8-bit significand) and vdpbf16ps
 * multiplies 32 of them by the bfloat16 activations per instruction, summing in float32 as a
 * bfloat16 GEMV does. herd builds this file on first use with -march=native (native.py) and
 * threads it with the OpenMP runtime torch already loaded. On CPUs with AVX2 but no AVX512-BF16 (most
 * desktops: Intel's since Alder Lake, AMD's before Zen 4) it holds the int8 and int4 row kernels
 * and float32 tiles for prefill, with float32 FMAs (`herd_level`).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <omp.h>

#define ROWS_AT_ONCE 4

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch rounds */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HERD_LEVEL 2

/* The lanes of the last, partial 64-wide block of a row of K (none when K % 64 == 0) */
static inline __mmask64 tail_mask(int64_t K) { return (__mmask64)((K % 64) ? (~0ULL >> (64 - K % 64)) : 0); }

/* 16 int8 weights as float32 */
static inline __m512 widen(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }

/* 64 int8 weights as two vectors of 32 bfloat16 */
static inline void to_bf16_pairs(__m512i b, __m512bh *lo, __m512bh *hi) {
    *lo = _mm512_cvtne2ps_pbh(widen(_mm512_extracti32x4_epi32(b, 1)), widen(_mm512_castsi512_si128(b)));
    *hi = _mm512_cvtne2ps_pbh(widen(_mm512_extracti32x4_epi32(b, 3)), widen(_mm512_extracti32x4_epi32(b, 2)));
}

/* R (1-4, a constant once inlined, so the sums stay in registers) rows of x times one weight row */
static inline __attribute__((always_inline)) void int8_row(const uint16_t *x, const int8_t *row, float scale,
                                                           uint16_t *y, int64_t N, int64_t K, const int R) {
    const int64_t full = K / 64 * 64;
    const __mmask64 tail = tail_mask(K);
    __m512 acc[ROWS_AT_ONCE][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    __m512bh lo, hi;
    for (int64_t k = 0; k < full; k += 64) {
        to_bf16_pairs(_mm512_loadu_si512(row + k), &lo, &hi);
        for (int r = 0; r < R; r++) {
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], lo, (__m512bh)_mm512_loadu_si512(x + r * K + k));
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], hi, (__m512bh)_mm512_loadu_si512(x + r * K + k + 32));
        }
    }
    if (tail) { /* masked lanes are zero in weights and x alike, so they add nothing */
        to_bf16_pairs(_mm512_maskz_loadu_epi8(tail, row + full), &lo, &hi);
        for (int r = 0; r < R; r++) {
            __m512i x0 = _mm512_maskz_loadu_epi16((__mmask32)tail, x + r * K + full);
            __m512i x1 = _mm512_maskz_loadu_epi16((__mmask32)(tail >> 32), x + r * K + full + 32);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], lo, (__m512bh)x0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], hi, (__m512bh)x1);
        }
    }
    for (int r = 0; r < R; r++) y[r * N] = to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) * scale);
}

#elif defined(__AVX2__) && defined(__FMA__)
#define HERD_LEVEL 1 /* AVX2: the int8 row kernel alone, in float32 FMAs */

/* 8 bfloat16 as float32 (exact) */
static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 8 int8 weights as float32 (exact) */
static inline __m256 int8x8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* As the AVX-512 one: R rows of x times one weight row, each product exact, summed in float32 */
static inline __attribute__((always_inline)) void int8_row(const uint16_t *x, const int8_t *row, float scale,
                                                           uint16_t *y, int64_t N, int64_t K, const int R) {
    __m256 acc[ROWS_AT_ONCE][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m256 w0 = int8x8(row + k), w1 = int8x8(row + k + 8);
        for (int r = 0; r < R; r++) {
            acc[r][0] = _mm256_fmadd_ps(w0, bf16x8(x + r * K + k), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, bf16x8(x + r * K + k + 8), acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        float s = sum8(_mm256_add_ps(acc[r][0], acc[r][1]));
        for (int64_t t = k; t < K; t++) s += (float)row[t] * from_bf16(x[r * K + t]);
        y[r * N] = to_bf16(s * scale);
    }
}
#else
#define HERD_LEVEL 0
#endif

#if HERD_LEVEL > 0
/* y[m, n] = scale[n] * sum_k x[m, k] q[n, k]: x bf16 [M, K], q int8 [N, K], scale and y bf16. Row n
 * is read from memory once and converted once per four rows of x. */
void herd_int8_rows_bf16(const uint16_t *x, const int8_t *q, const uint16_t *scale, uint16_t *y, int64_t M,
                         int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *row = q + n * K;
        const float s = from_bf16(scale[n]);
        for (int64_t m = 0; m < M; m += ROWS_AT_ONCE) {
            const uint16_t *xm = x + m * K;
            uint16_t *ym = y + m * N + n;
            switch (M - m < ROWS_AT_ONCE ? M - m : ROWS_AT_ONCE) {
                case 1: int8_row(xm, row, s, ym, N, K, 1); break;
                case 2: int8_row(xm, row, s, ym, N, K, 2); break;
                case 3: int8_row(xm, row, s, ym, N, K, 3); break;
                default: int8_row(xm, row, s, ym, N, K, 4); break;
            }
        }
    }
}

#endif

#if HERD_LEVEL == 1
/* 8 bf16 (scale, zero) pairs as float32 scales and offsets zero - 8 scale: w = q * scale + offset */
static inline void scales_offsets(const uint16_t *p, __m256 *scale, __m256 *offset) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *scale = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
    *offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), *scale, zero);
}

/* int4 rows in float32 FMAs (AVX2), for torch's CPU int4 packing in blocks of `block` output rows (32
 * on AVX2 CPUs, 64 on AVX-512 ones without BF16): byte d of a block's input column k holds rows d
 * (low nibble) and d + block / 2 (high). Each nibble becomes the float q exactly; per group the sums
 * take the scale and x's group sum the offset, w = (q - 8) * scale + zero:
 * y = scale * sum(x q) + (zero - 8 scale) * sum(x). Each row of x re-reads the block's weights (from
 * cache): twice torch's AVX2 kernel for one row, even with two (docs/quantization.md). */
void herd_int4_rows_avx2(const uint16_t *x, const uint8_t *packed, const uint16_t *scale_zero, uint16_t *y,
                         int64_t M, int64_t N, int64_t K, int64_t group, int64_t block) {
    const int64_t groups = K / group, half = block / 2;
    float *xf = malloc(sizeof(float) * M * K), *xsum = malloc(sizeof(float) * M * groups);
    if (xf == NULL || xsum == NULL) abort();
    for (int64_t i = 0; i < M * K; i++) xf[i] = from_bf16(x[i]);
    for (int64_t i = 0; i < M * groups; i++) {
        float s = 0.0f;
        for (int64_t k = 0; k < group; k++) s += xf[i * group + k];
        xsum[i] = s;
    }
    const __m256i nibble = _mm256_set1_epi32(15);
#pragma omp parallel for schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += block) {
        const uint8_t *wb = packed + n0 * K / 2;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = xf + m * K;
            for (int64_t u = 0; u < half; u += 16) { /* 16 bytes a column: rows n0 + u.. and n0 + half + u.. */
                const int64_t rows[4] = {n0 + u, n0 + u + 8, n0 + half + u, n0 + half + u + 8};
                __m256 out[4];
                for (int j = 0; j < 4; j++) out[j] = _mm256_setzero_ps();
                for (int64_t g = 0; g < groups; g++) {
                    __m256 acc[4];
                    for (int j = 0; j < 4; j++) acc[j] = _mm256_setzero_ps();
                    for (int64_t k = g * group; k < (g + 1) * group; k++) {
                        const uint8_t *p = wb + k * half + u; /* 8 bytes widened as loaded, then split */
                        const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
                        const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
                        const __m256i q[4] = {_mm256_and_si256(b0, nibble), _mm256_and_si256(b1, nibble),
                                              _mm256_srli_epi32(b0, 4), _mm256_srli_epi32(b1, 4)};
                        const __m256 xk = _mm256_broadcast_ss(xm + k);
                        for (int j = 0; j < 4; j++) acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[j]), xk, acc[j]);
                    }
                    const __m256 xs = _mm256_set1_ps(xsum[m * groups + g]);
                    for (int j = 0; j < 4; j++) {
                        __m256 scale, offset;
                        scales_offsets(scale_zero + (g * N + rows[j]) * 2, &scale, &offset);
                        out[j] = _mm256_fmadd_ps(acc[j], scale, _mm256_fmadd_ps(offset, xs, out[j]));
                    }
                }
                for (int j = 0; j < 4; j++) {
                    float o[8];
                    _mm256_storeu_ps(o, out[j]);
                    for (int i = 0; i < 8; i++) y[m * N + rows[j] + i] = to_bf16(o[i]);
                }
            }
        }
    }
    free(xf);
    free(xsum);
}

/* Tiles in float32 for products of many rows (prefill) on CPUs without bf16 GEMMs, whose GEMMs then
 * run in float32 (herd.kernels.cpu.upcast). int8: rows n_begin..n_end of W = q * scale[:, None] as
 * [n_end - n_begin, K]. int4: columns n_begin..n_end (whole blocks) of Wᵀ [K, N] from torch's CPU
 * packing in blocks of `block` rows, as [K, n_end - n_begin]. */
void herd_int8_dequantize_f32(const int8_t *q, const uint16_t *scale, float *out, int64_t K, int64_t n_begin,
                              int64_t n_end) {
#pragma omp parallel for schedule(static)
    for (int64_t n = n_begin; n < n_end; n++) {
        const int8_t *row = q + n * K;
        float *o = out + (n - n_begin) * K;
        const float s = from_bf16(scale[n]);
        const __m256 sv = _mm256_set1_ps(s);
        int64_t k = 0;
        for (; k + 8 <= K; k += 8)
            _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                      _mm_loadl_epi64((const __m128i *)(row + k)))), sv));
        for (; k < K; k++) o[k] = (float)row[k] * s;
    }
}

void herd_int4_dequantize_f32(const uint8_t *packed, const uint16_t *scale_zero, float *out, int64_t N, int64_t K,
                              int64_t group, int64_t block, int64_t n_begin, int64_t n_end) {
    const int64_t width = n_end - n_begin, half = block / 2;
    const __m256i nibble = _mm256_set1_epi32(15);
#pragma omp parallel for schedule(static)
    for (int64_t n0 = n_begin; n0 < n_end; n0 += block) {
        const uint8_t *wb = packed + n0 * K / 2;
        float *o = out + (n0 - n_begin);
        for (int64_t g = 0; g < K / group; g++) {
            for (int64_t u = 0; u < half; u += 8) { /* rows n0 + u.. (low nibbles) and n0 + half + u.. (high) */
                __m256 scale[2], offset[2];
                for (int h = 0; h < 2; h++)
                    scales_offsets(scale_zero + (g * N + n0 + u + h * half) * 2, &scale[h], &offset[h]);
                for (int64_t k = g * group; k < (g + 1) * group; k++) {
                    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(wb + k * half + u)));
                    _mm256_storeu_ps(o + k * width + u, _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(_mm256_and_si256(b, nibble)), scale[0], offset[0]));
                    _mm256_storeu_ps(o + k * width + half + u, _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), scale[1], offset[1]));
                }
            }
        }
    }
}
#endif

#if HERD_LEVEL == 2
/* Rows n_begin..n_end of W = q * scale[:, None] in bfloat16, as [n_end - n_begin, K], for products of
 * many rows (torch's int8 to bf16 conversion and multiply take about 1.4 ms per million weights). */
void herd_int8_dequantize_bf16(const int8_t *q, const uint16_t *scale, uint16_t *out, int64_t K, int64_t n_begin,
                               int64_t n_end) {
    const int64_t full = K / 64 * 64;
    const __mmask64 tail = tail_mask(K);
#pragma omp parallel for schedule(static)
    for (int64_t n = n_begin; n < n_end; n++) {
        const int8_t *row = q + n * K;
        uint16_t *o = out + (n - n_begin) * K;
        const __m512 s = _mm512_set1_ps(from_bf16(scale[n]));
        for (int64_t k = 0; k < K; k += 64) {
            __m512i b = k == full ? _mm512_maskz_loadu_epi8(tail, row + k) : _mm512_loadu_si512(row + k);
            __m512i lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(widen(_mm512_extracti32x4_epi32(b, 1)), s),
                                                      _mm512_mul_ps(widen(_mm512_castsi512_si128(b)), s));
            __m512i hi = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(widen(_mm512_extracti32x4_epi32(b, 3)), s),
                                                      _mm512_mul_ps(widen(_mm512_extracti32x4_epi32(b, 2)), s));
            if (k == full) {
                _mm512_mask_storeu_epi16(o + k, (__mmask32)tail, lo);
                _mm512_mask_storeu_epi16(o + k + 32, (__mmask32)(tail >> 32), hi);
            } else {
                _mm512_storeu_si512(o + k, lo);
                _mm512_storeu_si512(o + k + 32, hi);
            }
        }
    }
}

/* 16 bf16 (scale, zero) pairs of rows r..r+15 as float32 scales and zeros */
static inline void scales_zeros(const uint16_t *p, __m512 *scale, __m512 *zero) {
    __m512i v = _mm512_loadu_si512(p);
    *scale = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *zero = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}

/* The same for torch's CPU int4 packing with blocks of 64 output rows (quant.py; N % 64 == 0): in a
 * block, input column k holds 32 bytes whose low nibbles are rows 0..31 and high nibbles rows
 * 32..63. w = (q - 8) * scale + zero per group of the input, scale_zero bf16 [K / group, N, 2].
 * Each dot product takes columns k and k + 1 of 16 rows, so bytes of the two columns are
 * interleaved, and a nibble becomes the bfloat16 q - 8 by a table lookup. */
void herd_int4_rows_bf16(const uint16_t *x, const uint8_t *packed, const uint16_t *scale_zero, uint16_t *y,
                         int64_t M, int64_t N, int64_t K, int64_t group) {
    const int64_t groups = K / group;
    float xsum[M * groups]; /* sum of each row's x over each group: the zeros multiply it */
    for (int64_t i = 0; i < M * groups; i++) {
        float s = 0.0f;
        for (int64_t k = 0; k < group; k++) s += from_bf16(x[i * group + k]);
        xsum[i] = s;
    }
    uint16_t table[32] = {0};
    for (int i = 0; i < 16; i++) table[i] = to_bf16((float)(i - 8));
    const __m512i minus8 = _mm512_loadu_si512(table);
    const __m256i nibble = _mm256_set1_epi8(15);
#pragma omp parallel for schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
        const uint8_t *wb = packed + n0 * K / 2;
        for (int64_t m0 = 0; m0 < M; m0 += ROWS_AT_ONCE) {
            const int64_t rows = M - m0 < ROWS_AT_ONCE ? M - m0 : ROWS_AT_ONCE;
            __m512 out[ROWS_AT_ONCE][4];
            for (int64_t m = 0; m < ROWS_AT_ONCE; m++)
                for (int i = 0; i < 4; i++) out[m][i] = _mm512_setzero_ps();
            for (int64_t g = 0; g < groups; g++) {
                __m512 acc[ROWS_AT_ONCE][4];
                for (int64_t m = 0; m < ROWS_AT_ONCE; m++)
                    for (int i = 0; i < 4; i++) acc[m][i] = _mm512_setzero_ps();
                for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
                    const uint8_t *p = wb + k * 32;
                    __m512bh w[4]; /* rows 0-15, 16-31 (low nibbles), 32-47, 48-63 (high) */
                    for (int h = 0; h < 2; h++) {
                        __m128i a = _mm_loadu_si128((const __m128i *)(p + 16 * h));
                        __m128i b = _mm_loadu_si128((const __m128i *)(p + 32 + 16 * h));
                        __m256i pairs = _mm256_set_m128i(_mm_unpackhi_epi8(a, b), _mm_unpacklo_epi8(a, b));
                        __m256i lo = _mm256_and_si256(pairs, nibble);
                        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(pairs, 4), nibble);
                        w[h] = (__m512bh)_mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(lo), minus8);
                        w[2 + h] = (__m512bh)_mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(hi), minus8);
                    }
                    for (int64_t m = 0; m < rows; m++) {
                        uint32_t xk;
                        memcpy(&xk, x + (m0 + m) * K + k, 4);
                        __m512bh xs = (__m512bh)_mm512_set1_epi32((int)xk);
                        for (int i = 0; i < 4; i++) acc[m][i] = _mm512_dpbf16_ps(acc[m][i], w[i], xs);
                    }
                }
                for (int i = 0; i < 4; i++) {
                    __m512 scale, zero;
                    scales_zeros(scale_zero + (g * N + n0 + 16 * i) * 2, &scale, &zero);
                    for (int64_t m = 0; m < rows; m++)
                        out[m][i] = _mm512_fmadd_ps(acc[m][i], scale,
                                                    _mm512_fmadd_ps(zero, _mm512_set1_ps(xsum[(m0 + m) * groups + g]),
                                                                    out[m][i]));
                }
            }
            for (int64_t m = 0; m < rows; m++)
                for (int i = 0; i < 4; i++)
                    _mm256_storeu_si256((__m256i *)(y + (m0 + m) * N + n0 + 16 * i),
                                        (__m256i)_mm512_cvtneps_pbh(out[m][i]));
        }
    }
}

/* Columns n_begin..n_end of Wᵀ [K, N] in bfloat16, as [K, n_end - n_begin], from torch's CPU int4
 * packing (blocks of 64 rows; N and both ends multiples of 64), for products of many rows: one pass
 * that writes each column k's 64 values of a block side by side, rounding (q - 8) * scale + zero once. */
void herd_int4_dequantize_bf16(const uint8_t *packed, const uint16_t *scale_zero, uint16_t *out, int64_t N, int64_t K,
                               int64_t group, int64_t n_begin, int64_t n_end) {
    const int64_t width = n_end - n_begin;
#pragma omp parallel for schedule(static)
    for (int64_t n0 = n_begin; n0 < n_end; n0 += 64) {
        const uint8_t *wb = packed + n0 * K / 2;
        uint16_t *o = out + (n0 - n_begin);
        for (int64_t g = 0; g < K / group; g++) {
            __m512 scale[4], offset[4];
            for (int i = 0; i < 4; i++) {
                __m512 zero;
                scales_zeros(scale_zero + (g * N + n0 + 16 * i) * 2, &scale[i], &zero);
                offset[i] = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale[i], zero); /* zero - 8 scale */
            }
            for (int64_t k = g * group; k < (g + 1) * group; k++) {
                const uint8_t *p = wb + k * 32;
                for (int h = 0; h < 2; h++) {
                    __m128i b = _mm_loadu_si128((const __m128i *)(p + 16 * h));
                    __m128i lo = _mm_and_si128(b, _mm_set1_epi8(15));
                    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
                    __m512 wlo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), scale[h], offset[h]);
                    __m512 whi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), scale[2 + h],
                                                 offset[2 + h]);
                    _mm256_storeu_si256((__m256i *)(o + k * width + 16 * h), (__m256i)_mm512_cvtneps_pbh(wlo));
                    _mm256_storeu_si256((__m256i *)(o + k * width + 32 + 16 * h), (__m256i)_mm512_cvtneps_pbh(whi));
                }
            }
        }
    }
}

/* RMS norm of `rows` bfloat16 rows of D: y = bf16(x * rsqrt(mean(x²) + eps)), then with a weight
 * (w may be NULL) bf16(y * w): the references' roundings (normalised in float32 and cast back, then
 * scaled). One call instead of the half-dozen torch ops a norm of one decode row costs. */
void herd_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t D, float eps) {
#pragma omp parallel for schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * D;
        uint16_t *yr = y + r * D;
        __m512 acc = _mm512_setzero_ps();
        int64_t d = 0;
        for (; d + 16 <= D; d += 16) {
            __m512 v = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xr + d))), 16));
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float s = _mm512_reduce_add_ps(acc);
        for (; d < D; d++) s += from_bf16(xr[d]) * from_bf16(xr[d]);
        const float inv = 1.0f / sqrtf(s / (float)D + eps);
        for (d = 0; d < D; d++) {
            uint16_t n = to_bf16(from_bf16(xr[d]) * inv);
            yr[d] = w ? to_bf16(from_bf16(n) * from_bf16(w[d])) : n;
        }
    }
}

/* Products of tens of rows (a prefill's experts): what the row kernel computes, but each block of 16
 * weight rows becomes bfloat16 once, in a buffer that stays in cache, and every row of x is multiplied
 * with it there, 6 rows of x by 4 weight rows per step in registers. Dequantized tiles through
 * torch's GEMM read the int8 weights from memory while nothing else runs; here the reading of
 * one block overlaps the arithmetic of another. */
#define GEMM_N 16
#define GEMM_M 6

/* R (1-6) rows of x [R, K] by the GEMM_N converted rows w [GEMM_N, Kp] (zero past K and past n_valid) */
static inline __attribute__((always_inline)) void int8_block(const uint16_t *x, const uint16_t *w, const float *scale,
                                                             uint16_t *y, int64_t N, int64_t K, int64_t Kp,
                                                             int n_valid, const int R) {
    const int64_t full = K / 32 * 32;
    const __mmask32 tail = (__mmask32)((K % 32) ? (~0U >> (32 - K % 32)) : 0);
    for (int n4 = 0; n4 < n_valid; n4 += 4) {
        const uint16_t *w0 = w + n4 * Kp;
        __m512 acc[GEMM_M][4];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
        __m512bh wv[4];
        for (int64_t k = 0; k < full; k += 32) {
            for (int j = 0; j < 4; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w0 + j * Kp + k);
            for (int r = 0; r < R; r++) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * K + k);
                for (int j = 0; j < 4; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv[j], xv);
            }
        }
        if (tail) { /* the buffer is zero past K, and so are the masked lanes of x */
            for (int j = 0; j < 4; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w0 + j * Kp + full);
            for (int r = 0; r < R; r++) {
                const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + r * K + full);
                for (int j = 0; j < 4; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv[j], xv);
            }
        }
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 4 && n4 + j < n_valid; j++)
                y[r * N + n4 + j] = to_bf16(_mm512_reduce_add_ps(acc[r][j]) * scale[n4 + j]);
    }
}

/* y [M, N] = x [M, K] @ (q [N, K] * scale[:, None])ᵀ, x, scale and y bfloat16; `scratch` holds
 * `threads` buffers of GEMM_N * Kp bfloat16 (Kp: K rounded up to 64). */
void herd_int8_gemm_bf16(const uint16_t *x, const int8_t *q, const uint16_t *scale, uint16_t *y, int64_t M,
                         int64_t N, int64_t K, uint16_t *scratch, int threads) {
    const int64_t Kp = (K + 63) / 64 * 64, blocks = (N + GEMM_N - 1) / GEMM_N;
    const __mmask64 tail = tail_mask(K);
#pragma omp parallel num_threads(threads)
    {
        uint16_t *w = scratch + (int64_t)omp_get_thread_num() * GEMM_N * Kp;
        float s[GEMM_N];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n0 = b * GEMM_N;
            const int n_valid = (int)(N - n0 < GEMM_N ? N - n0 : GEMM_N);
            for (int i = 0; i < n_valid; i++) {
                const int8_t *row = q + (n0 + i) * K;
                s[i] = from_bf16(scale[n0 + i]);
                for (int64_t k = 0; k < Kp; k += 64) {
                    __m512bh lo, hi;
                    to_bf16_pairs(k + 64 > K ? _mm512_maskz_loadu_epi8(tail, row + k) : _mm512_loadu_si512(row + k),
                                  &lo, &hi);
                    _mm512_storeu_si512(w + i * Kp + k, (__m512i)lo);
                    _mm512_storeu_si512(w + i * Kp + k + 32, (__m512i)hi);
                }
            }
            for (int i = n_valid; i < GEMM_N; i++) memset(w + i * Kp, 0, Kp * 2);
            for (int64_t m = 0; m < M; m += GEMM_M) {
                const uint16_t *xm = x + m * K;
                uint16_t *ym = y + m * N + n0;
                switch (M - m < GEMM_M ? M - m : GEMM_M) {
                    case 1: int8_block(xm, w, s, ym, N, K, Kp, n_valid, 1); break;
                    case 2: int8_block(xm, w, s, ym, N, K, Kp, n_valid, 2); break;
                    case 3: int8_block(xm, w, s, ym, N, K, Kp, n_valid, 3); break;
                    case 4: int8_block(xm, w, s, ym, N, K, Kp, n_valid, 4); break;
                    case 5: int8_block(xm, w, s, ym, N, K, Kp, n_valid, 5); break;
                    default: int8_block(xm, w, s, ym, N, K, Kp, n_valid, 6); break;
                }
            }
        }
    }
}
#endif

/* What this build holds: 2, every kernel (AVX512-BF16); 1, the row kernels and float32 tiles (AVX2); 0, none. */
int herd_level(void) { return HERD_LEVEL; }
