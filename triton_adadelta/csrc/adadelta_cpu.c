/* The CPU path's fused AdaDelta update: one call per step over a segment table.

   The table is the Triton kernel's (kernels/adadelta.py, SegmentTable): int64 rows of
   n_pieces columns, one column per piece of a param:

       PARAM_ROW   address of the piece's first param element
       GRAD_ROW    address of its first grad element
       STATE_ROW   its offset in square_avg / acc_delta, in elements
       NUMEL_ROW   its length (0 for an empty tail)
       GROUP_ROW   its row of the hyper-parameter table
       ALIGNED_ROW (the kernel's; every access here is unaligned-safe)

   and each hyper-parameter row is (lr, rho, 1 - rho, eps, weight_decay, maximize,
   lr_is_tensor, unused) in the state's dtype. One step is, in this order:

       g = g / grad_scale            if a GradScaler's scale is given
       g = -g                        if maximize
       g = g + weight_decay * p      if weight_decay != 0
       v = rho * v + (1 - rho) * g * g
       d = sqrt(u + eps) / sqrt(v + eps) * g
       u = rho * u + (1 - rho) * d * d
       p = p - lr * d

   Every operation rounds as the corresponding eager torch op does on the CPU:
   `fma` is used exactly where torch's CPU kernels fuse (`add(alpha=)` and
   `addcmul`), and the library is compiled with -ffp-contract=off so that no other
   multiply-add is contracted; sqrt and division are the IEEE ones. With torch's own
   sqrt (set_sqrt), a step is bit-identical to torch.optim.Adadelta. */

#include <math.h>
#include <pthread.h>
#include <stdint.h>

/* Rows of the segment table and columns of the hyper-parameter table: the same
   numbers as kernels/adadelta.py (checked by the Python loader). */
enum { PARAM_ROW, GRAD_ROW, STATE_ROW, NUMEL_ROW, GROUP_ROW, ALIGNED_ROW, N_TABLE_ROWS };
enum { LR, RHO, ONE_MINUS_RHO, EPS, WEIGHT_DECAY, MAXIMIZE, LR_IS_TENSOR, N_HPARAMS = 8 };

/* The loader compares these with the Python constants before the first call. */
const int64_t adadelta_layout[] = {
    PARAM_ROW, GRAD_ROW, STATE_ROW, NUMEL_ROW, GROUP_ROW, ALIGNED_ROW, N_TABLE_ROWS,
    LR, RHO, ONE_MINUS_RHO, EPS, WEIGHT_DECAY, MAXIMIZE, LR_IS_TENSOR, N_HPARAMS,
};

#define FLAG_GRAD_SCALE 1
#define FLAG_MAXIMIZE 2
#define FLAG_WEIGHT_DECAY 4
#define FLAG_LR_TENSOR 8

/* Elements per block: the block's g, sqrt inputs and outputs stay in L1 (256 was
   fastest of 256, 1024 and 4096 in a 16M-element step on this machine). */
#define BLOCK 256

#define MAX_THREADS 64

/* torch's CPU sqrt is MKL VML's vmsSqrt/vmdSqrt (mode HA | FTZDAZ_OFF |
   ERRMODE_IGNORE), which is not always correctly rounded: call the same function,
   found in libtorch_cpu by the caller, on each block. NULL: the C library's sqrt. */
typedef void (*vml_sqrt_f32)(int n, const float *a, float *r, long long mode);
typedef void (*vml_sqrt_f64)(int n, const double *a, double *r, long long mode);
static vml_sqrt_f32 torch_sqrt_f32 = 0;
static vml_sqrt_f64 torch_sqrt_f64 = 0;
static const long long vml_mode = 0x2 | 0x140000 | 0x100;

void set_sqrt(void *sqrt_f32, void *sqrt_f64) {
    torch_sqrt_f32 = (vml_sqrt_f32)sqrt_f32;
    torch_sqrt_f64 = (vml_sqrt_f64)sqrt_f64;
}

static void sqrt_block_f32(int n, float *x, int use_torch_sqrt) {
    if (use_torch_sqrt && torch_sqrt_f32) torch_sqrt_f32(n, x, x, vml_mode);
    else for (int i = 0; i < n; ++i) x[i] = sqrtf(x[i]);
}

static void sqrt_block_f64(int n, double *x, int use_torch_sqrt) {
    if (use_torch_sqrt && torch_sqrt_f64) torch_sqrt_f64(n, x, x, vml_mode);
    else for (int i = 0; i < n; ++i) x[i] = sqrt(x[i]);
}

/* torch's own thread pool: the OpenMP runtime that torch loaded, whose entry points
   the caller finds in it (set_openmp). After torch's parallel ops its workers spin
   for a while, and threads of our own would compete with them for the cores (a
   16M-element step took 13.7 ms right after a compiled torch step, 9.0 ms
   otherwise); starting threads also costs ~20 us. NULL: threads of our own. */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_fn)(void);
static gomp_parallel_fn gomp_parallel = 0;
static omp_int_fn omp_thread_num = 0, omp_num_threads = 0;

void set_openmp(void *parallel, void *thread_num, void *num_threads) {
    gomp_parallel = (gomp_parallel_fn)parallel;
    omp_thread_num = (omp_int_fn)thread_num;
    omp_num_threads = (omp_int_fn)num_threads;
}

/* A thread's share of the step: `count` elements of the pieces' concatenation,
   from element `offset` of piece `piece` on (it may span many pieces). */
typedef struct {
    const int64_t *table;
    int64_t n_pieces, piece, offset, count;
    int n_shares; /* (in shares[0]: how many there are) */
    void *square_avg, *acc_delta;
    const void *hparams;
    double grad_scale; /* exact in either dtype: it is a value of the state's dtype */
    int has_grad_scale, use_torch_sqrt;
} share_t;

#define DEFINE_UPDATE(T, SUFFIX, FMA, SQRT)                                           \
/* The update of one element, in three parts around its two square roots: the grad \
   (scaled, negated, weight-decayed) and the new square_avg; then, given            \
   d = sqrt(u + eps) / sqrt(square + eps) * g, the new acc_delta and param. */      \
static inline __attribute__((always_inline)) T grad_##SUFFIX(                         \
        T g, const T p, const T grad_scale, const T weight_decay, const int flags) {  \
    if (flags & FLAG_GRAD_SCALE) g = g / grad_scale;                                  \
    if (flags & FLAG_MAXIMIZE) g = -g;                                                \
    if (flags & FLAG_WEIGHT_DECAY) g = FMA(p, weight_decay, g);                       \
    return g;                                                                         \
}                                                                                     \
static inline __attribute__((always_inline)) void apply_##SUFFIX(                     \
        const T d, T *restrict u, T *restrict p, const T rho, const T one_minus_rho,  \
        const T lr, const int flags) {                                                \
    *u = FMA(one_minus_rho * d, d, *u * rho);                                         \
    /* A tensor lr multiplies first, as torch's capturable foreach does. */           \
    if (flags & FLAG_LR_TENSOR) *p = *p - d * lr;                                     \
    else *p = FMA(d, -lr, *p);                                                        \
}                                                                                     \
                                                                                      \
/* n elements of one piece, with the flags of its group as constants. */             \
static inline __attribute__((always_inline)) void update_##SUFFIX(                    \
        T *restrict p, const T *restrict gr, T *restrict v, T *restrict u,            \
        const int64_t n_elements, const T *restrict row, const T grad_scale,          \
        const int use_torch_sqrt, const int flags) {                                  \
    const T lr = row[LR], rho = row[RHO], one_minus_rho = row[ONE_MINUS_RHO];         \
    const T eps = row[EPS], weight_decay = row[WEIGHT_DECAY];                         \
    if (!use_torch_sqrt) {                                                            \
        /* The IEEE sqrt: one pass, which the compiler vectorizes whole. */           \
        for (int64_t i = 0; i < n_elements; ++i) {                                    \
            const T g = grad_##SUFFIX(gr[i], p[i], grad_scale, weight_decay, flags);  \
            const T square = FMA(one_minus_rho * g, g, v[i] * rho);                   \
            v[i] = square;                                                            \
            const T d = SQRT(u[i] + eps) / SQRT(square + eps) * g;                    \
            apply_##SUFFIX(d, &u[i], &p[i], rho, one_minus_rho, lr, flags);           \
        }                                                                             \
        return;                                                                       \
    }                                                                                 \
    /* torch's sqrt works on arrays: blocks of BLOCK elements, in three passes. */   \
    T g_block[BLOCK] __attribute__((aligned(64)));                                    \
    T std[BLOCK] __attribute__((aligned(64)));                                        \
    T delta[BLOCK] __attribute__((aligned(64)));                                      \
    for (int64_t first = 0; first < n_elements; first += BLOCK) {                     \
        const int n = n_elements - first < BLOCK ? (int)(n_elements - first) : BLOCK; \
        T *restrict pb = p + first; const T *restrict gb = gr + first;                \
        T *restrict vb = v + first; T *restrict ub = u + first;                       \
        for (int i = 0; i < n; ++i) {                                                 \
            const T g = grad_##SUFFIX(gb[i], pb[i], grad_scale, weight_decay, flags); \
            const T square = FMA(one_minus_rho * g, g, vb[i] * rho);                  \
            vb[i] = square;                                                           \
            g_block[i] = g;                                                           \
            std[i] = square + eps;                                                    \
            delta[i] = ub[i] + eps;                                                   \
        }                                                                             \
        sqrt_block_##SUFFIX(n, std, use_torch_sqrt);                                  \
        sqrt_block_##SUFFIX(n, delta, use_torch_sqrt);                                \
        for (int i = 0; i < n; ++i)                                                   \
            apply_##SUFFIX(delta[i] / std[i] * g_block[i], &ub[i], &pb[i], rho,       \
                           one_minus_rho, lr, flags);                                 \
    }                                                                                 \
}                                                                                     \
                                                                                      \
/* One loop per flag combination, so that each is vectorized without branches. */   \
static void update_piece_##SUFFIX(T *p, const T *g, T *v, T *u, int64_t n,            \
        const T *row, T grad_scale, int use_torch_sqrt, int flags) {                  \
    switch (flags) {                                                                  \
    case 0: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 0); break;   \
    case 1: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 1); break;   \
    case 2: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 2); break;   \
    case 3: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 3); break;   \
    case 4: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 4); break;   \
    case 5: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 5); break;   \
    case 6: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 6); break;   \
    case 7: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 7); break;   \
    case 8: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 8); break;   \
    case 9: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 9); break;   \
    case 10: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 10); break; \
    case 11: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 11); break; \
    case 12: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 12); break; \
    case 13: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 13); break; \
    case 14: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 14); break; \
    default: update_##SUFFIX(p, g, v, u, n, row, grad_scale, use_torch_sqrt, 15); break; \
    }                                                                                 \
}                                                                                     \
                                                                                      \
/* A share: the pieces it spans, each with its group's hyper-parameters and flags. */ \
static void *run_share_##SUFFIX(void *arg) {                                          \
    const share_t *s = (const share_t *)arg;                                          \
    const int64_t *table = s->table, n_pieces = s->n_pieces;                          \
    const T *hparams = (const T *)s->hparams;                                         \
    T *square_avg = (T *)s->square_avg, *acc_delta = (T *)s->acc_delta;              \
    int64_t offset = s->offset, left = s->count;                                      \
    for (int64_t k = s->piece; k < n_pieces && left > 0; ++k, offset = 0) {           \
        const int64_t numel = table[NUMEL_ROW * n_pieces + k];                        \
        const int64_t n = numel - offset < left ? numel - offset : left;              \
        if (n <= 0) continue;                                                         \
        left -= n;                                                                    \
        const T *row = hparams + table[GROUP_ROW * n_pieces + k] * N_HPARAMS;         \
        /* weight_decay != 0 on the dtype's value: 1e-308 is 0 in fp32, and must */  \
        /* not turn an inf param's grad into NaN through 0 * inf. */                  \
        const int flags = (s->has_grad_scale ? FLAG_GRAD_SCALE : 0)                   \
            | (row[MAXIMIZE] != 0 ? FLAG_MAXIMIZE : 0)                                \
            | (row[WEIGHT_DECAY] != 0 ? FLAG_WEIGHT_DECAY : 0)                        \
            | (row[LR_IS_TENSOR] != 0 ? FLAG_LR_TENSOR : 0);                          \
        const int64_t state = table[STATE_ROW * n_pieces + k] + offset;               \
        update_piece_##SUFFIX(                                                        \
            (T *)(intptr_t)table[PARAM_ROW * n_pieces + k] + offset,                  \
            (const T *)(intptr_t)table[GRAD_ROW * n_pieces + k] + offset,             \
            square_avg + state, acc_delta + state, n, row, (T)s->grad_scale,          \
            s->use_torch_sqrt, flags);                                                \
    }                                                                                 \
    return 0;                                                                         \
}                                                                                     \
                                                                                      \
/* One OpenMP thread's part: shares t, t + team, ... (the team may be smaller than   \
   asked for, inside another parallel region). */                                    \
static void run_team_share_##SUFFIX(void *arg) {                                      \
    share_t *shares = (share_t *)arg;                                                 \
    const int team = omp_num_threads(), n = shares[0].n_shares;                       \
    for (int t = omp_thread_num(); t < n; t += team) run_share_##SUFFIX(&shares[t]);  \
}                                                                                     \
                                                                                      \
/* One step over every piece of the table. grad_scale_ptr, found_inf_ptr: 1-element \
   buffers of T (NULL: not given), read here so that Python never reads a tensor's  \
   value. Work is split across max_threads threads when the pieces hold at least    \
   parallel_min_elements elements in all.                                           \
   Returns 0 when done, 1 when found_inf is set (nothing written), and -1 when the  \
   table does not fit the state or the hyper-parameters (nothing written). */        \
int adadelta_step_##SUFFIX(const int64_t *table, int64_t n_pieces, T *square_avg,     \
        T *acc_delta, int64_t n_state, const T *hparams, int64_t n_groups,            \
        const T *grad_scale_ptr, const T *found_inf_ptr, int max_threads,             \
        int64_t parallel_min_elements, int use_torch_sqrt) {                          \
    if (found_inf_ptr && *found_inf_ptr != 0) return 1;                               \
    /* Check every piece before writing any, so that a bad table changes nothing. */ \
    int64_t total = 0;                                                                \
    for (int64_t k = 0; k < n_pieces; ++k) {                                          \
        const int64_t numel = table[NUMEL_ROW * n_pieces + k];                        \
        const int64_t state = table[STATE_ROW * n_pieces + k];                        \
        const int64_t group = table[GROUP_ROW * n_pieces + k];                        \
        if (numel < 0) return -1;                                                     \
        if (numel > 0 && (state < 0 || state > n_state - numel                        \
                          || group < 0 || group >= n_groups)) return -1;              \
        total += numel;                                                               \
    }                                                                                 \
    int n_threads = total >= parallel_min_elements ? max_threads : 1;                 \
    if (n_threads < 1) n_threads = 1;                                                 \
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;                             \
    /* Equal shares of the pieces' concatenation (a share may start inside a piece   \
       and span many), rounded up to 64 bytes of elements: where the pieces start on \
       a line, as a big param does, no two threads write one line. */                \
    const int64_t line = 64 / (int64_t)sizeof(T);                                     \
    int64_t share = (total + n_threads - 1) / n_threads;                              \
    share = (share + line - 1) / line * line;                                         \
    share_t shares[MAX_THREADS];                                                      \
    int64_t piece = 0, offset = 0, left = total;                                      \
    for (int t = 0; t < n_threads; ++t) {                                             \
        share_t *s = &shares[t];                                                      \
        s->table = table; s->n_pieces = n_pieces;                                     \
        s->square_avg = square_avg; s->acc_delta = acc_delta; s->hparams = hparams;  \
        s->grad_scale = grad_scale_ptr ? (double)*grad_scale_ptr : 1.0;               \
        s->has_grad_scale = grad_scale_ptr != 0;                                      \
        s->use_torch_sqrt = use_torch_sqrt;                                           \
        s->piece = piece; s->offset = offset;                                         \
        s->count = share < left ? share : left;                                       \
        left -= s->count;                                                             \
        /* Where the next share starts: `count` elements further on. */              \
        for (int64_t skip = s->count; skip > 0 && piece < n_pieces;) {                \
            const int64_t rest = table[NUMEL_ROW * n_pieces + piece] - offset;        \
            if (skip < rest) { offset += skip; skip = 0; }                            \
            else { skip -= rest; ++piece; offset = 0; }                               \
        }                                                                             \
    }                                                                                 \
    if (gomp_parallel && n_threads > 1) {                                             \
        shares[0].n_shares = n_threads;                                               \
        gomp_parallel(run_team_share_##SUFFIX, shares, (unsigned)n_threads, 0);       \
        return 0;                                                                     \
    }                                                                                 \
    pthread_t threads[MAX_THREADS];                                                   \
    int started[MAX_THREADS] = {0};                                                   \
    for (int t = 1; t < n_threads; ++t)                                               \
        started[t] = shares[t].count > 0                                              \
            && pthread_create(&threads[t], 0, run_share_##SUFFIX, &shares[t]) == 0;   \
    run_share_##SUFFIX(&shares[0]);                                                   \
    for (int t = 1; t < n_threads; ++t) {                                             \
        if (started[t]) pthread_join(threads[t], 0);                                  \
        else run_share_##SUFFIX(&shares[t]);  /* no thread could be started: here */  \
    }                                                                                 \
    return 0;                                                                         \
}

DEFINE_UPDATE(float, f32, fmaf, sqrtf)
DEFINE_UPDATE(double, f64, fma, sqrt)
