/* y = x @ W^T straight from the packed TaCQ codes, for the CPU (built and loaded by cpu_kernel.py).
 *
 * qweight [words, N]: each output feature's codes as one little-endian bit stream along the input features,
 * word w of every output feature in row w, so a run of neighbouring output features decodes with one shift
 * and one mask per code and the compiler vectorizes the loops over them. scale_t / zero_t are the grids
 * transposed to [groups, N] (float32), group g covering input features [g * group_size, (g + 1) * group_size).
 */
#include <stdint.h>
#include <string.h>

#define BLOCK_N 64     /* output features per task: their accumulators stay in L1 */
#define MAX_ROWS 8     /* rows of x the fused kernel serves (decoded once, used for every row) */

static inline int min_int(int a, int b) { return a < b ? a : b; }

/* codes j of output features n0 .. n0 + count - 1, as floats */
static inline void decode_codes(const uint32_t *qweight, int64_t n_out, int n0, int count, int64_t j, int bits,
                                float *codes) {
    const int64_t bit = j * bits;
    const int offset = (int)(bit & 31);
    const uint32_t mask = (1u << bits) - 1u;
    const uint32_t *low = qweight + (bit >> 5) * n_out + n0;
    if (offset + bits <= 32) {
        for (int n = 0; n < count; n++) codes[n] = (float)((low[n] >> offset) & mask);
    } else { /* a 3-bit code at offset 30 or 31 continues in the next word */
        const uint32_t *high = low + n_out;
        for (int n = 0; n < count; n++)
            codes[n] = (float)(((low[n] >> offset) | (high[n] << (32 - offset))) & mask);
    }
}

/* y[rows, N] = x[rows, K] @ grid^T for rows <= MAX_ROWS: the grid part only (kept weights are added apart) */
void fused_grid_matmul(const float *x, int rows, int64_t cols, const uint32_t *qweight, int64_t n_out,
                       const float *scale_t, const float *zero_t, int64_t group_size, int bits, float *y,
                       int threads) {
    const int64_t groups = (cols + group_size - 1) / group_size;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < n_out; n0 += BLOCK_N) {
        const int count = min_int(BLOCK_N, (int)(n_out - n0));
        float acc[MAX_ROWS][BLOCK_N], dot[MAX_ROWS][BLOCK_N], codes[BLOCK_N];
        memset(acc, 0, sizeof acc);
        for (int64_t g = 0; g < groups; g++) {
            const int64_t start = g * group_size, stop = start + group_size < cols ? start + group_size : cols;
            float x_sum[MAX_ROWS] = {0};
            memset(dot, 0, sizeof dot);
            for (int64_t j = start; j < stop; j++) {
                decode_codes(qweight, n_out, (int)n0, count, j, bits, codes);
                for (int m = 0; m < rows; m++) {
                    const float xv = x[m * cols + j];
                    x_sum[m] += xv;
                    for (int n = 0; n < count; n++) dot[m][n] += xv * codes[n];
                }
            }
            const float *s = scale_t + g * n_out + n0, *z = zero_t + g * n_out + n0;
            for (int m = 0; m < rows; m++)
                for (int n = 0; n < count; n++) acc[m][n] += s[n] * (dot[m][n] - z[n] * x_sum[m]);
        }
        for (int m = 0; m < rows; m++) memcpy(y + m * n_out + n0, acc[m], count * sizeof(float));
    }
}

/* grid weights of input features [start, stop) as weight_t[stop - start, N] (float32), for an addmm */
void decode_grid_block(const uint32_t *qweight, int64_t n_out, const float *scale_t, const float *zero_t,
                       int64_t group_size, int bits, int64_t start, int64_t stop, float *weight_t, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = start; j < stop; j++) {
        float *row = weight_t + (j - start) * n_out;
        const float *s = scale_t + (j / group_size) * n_out, *z = zero_t + (j / group_size) * n_out;
        for (int64_t n0 = 0; n0 < n_out; n0 += BLOCK_N) {
            const int count = min_int(BLOCK_N, (int)(n_out - n0));
            decode_codes(qweight, n_out, (int)n0, count, j, bits, row + n0);
            for (int n = 0; n < count; n++) row[n0 + n] = s[n0 + n] * (row[n0 + n] - z[n0 + n]);
        }
    }
}

/* y[rows, N] += x[rows, K] @ S^T for the kept weights S, read straight from their 16-bit gap encoding
 * (packing.py: each entry's distance to the previous stored position, minus one; fillers hold 0). For the few
 * rows of the fused kernel; with many rows the strided updates would miss the cache, add_kept_to_tile instead. */
void add_kept_weights(const float *x, int rows, int64_t cols, const uint16_t *gaps, const float *values, int64_t nnz,
                      int64_t n_out, float *y) {
    int64_t position = -1;
    for (int64_t k = 0; k < nnz; k++) {
        position += (int64_t)gaps[k] + 1;
        const int64_t n = position / cols, j = position % cols;
        for (int m = 0; m < rows; m++) y[m * n_out + n] += values[k] * x[m * cols + j];
    }
}

/* the kept weights of input features [start, stop) added into a tile from decode_grid_block */
void add_kept_to_tile(const uint16_t *gaps, const float *values, int64_t nnz, int64_t cols, int64_t n_out,
                      int64_t start, int64_t stop, float *weight_t) {
    int64_t position = -1;
    for (int64_t k = 0; k < nnz; k++) {
        position += (int64_t)gaps[k] + 1;
        const int64_t n = position / cols, j = position % cols;
        if (j >= start && j < stop) weight_t[(j - start) * n_out + n] += values[k];
    }
}
