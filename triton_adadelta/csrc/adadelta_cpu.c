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
#include <string.h>

/* The build compiles this file as two translation units at once, one per core:
   ADADELTA_PART 0, the entry points and the fp32/fp64, fp32-state and bf16-state
   loops, and 1, the uint8-state loops (their table of functions, which part 0 reads). Without
   ADADELTA_PART, one unit holds both. What the two share across units is hidden from
   the library's users. */
#ifndef ADADELTA_PART
#define ADADELTA_PART -1
#endif
#define IN_MAIN_PART (ADADELTA_PART != 1)
#define IN_CS_PART (ADADELTA_PART != 0)
#define SHARED __attribute__((visibility("hidden")))

/* AVX-512 (with its byte and word instructions): uint8 state's 16-lane loop. */
#if defined(__AVX2__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define HAVE_AVX512 1
#else
#define HAVE_AVX512 0
#endif
/* And AVX512_VBMI: the 16-lane encoder gathers its codes by one byte permute. */
#if HAVE_AVX512 && defined(__AVX512VBMI__)
#define HAVE_AVX512_VBMI 1
#else
#define HAVE_AVX512_VBMI 0
#endif

/* Rows of the segment table and columns of the hyper-parameter table: the same
   numbers as kernels/adadelta.py (checked by the Python loader). */
enum { PARAM_ROW, GRAD_ROW, STATE_ROW, NUMEL_ROW, GROUP_ROW, ALIGNED_ROW, N_TABLE_ROWS };
enum { LR, RHO, ONE_MINUS_RHO, EPS, WEIGHT_DECAY, MAXIMIZE, LR_IS_TENSOR, N_HPARAMS = 8 };

#if IN_MAIN_PART
/* The loader compares these with the Python constants before the first call. */
const int64_t adadelta_layout[] = {
    PARAM_ROW, GRAD_ROW, STATE_ROW, NUMEL_ROW, GROUP_ROW, ALIGNED_ROW, N_TABLE_ROWS,
    LR, RHO, ONE_MINUS_RHO, EPS, WEIGHT_DECAY, MAXIMIZE, LR_IS_TENSOR, N_HPARAMS,
};
/* The lanes of uint8 state's loop in this build (tests and benchmarks read it). */
#if HAVE_AVX512
const int adadelta_u8_lanes = 16;
#elif defined(__AVX2__)
const int adadelta_u8_lanes = 8;
#else
const int adadelta_u8_lanes = 1;
#endif
/* Whether the 16-lane encoder gathers its codes by a byte permute, not by packs
   (tests build both). */
const int adadelta_u8_byte_permute = HAVE_AVX512_VBMI;
#endif

#define FLAG_GRAD_SCALE 1
#define FLAG_MAXIMIZE 2
#define FLAG_WEIGHT_DECAY 4
#define FLAG_LR_TENSOR 8

/* Elements per block: the block's g, sqrt inputs and outputs stay in L1 (256 was
   fastest of 256, 1024 and 4096 in a 16M-element step on this machine). */
#define BLOCK 256

#define MAX_THREADS 64

/* The flags of a piece's group, from its hyper-parameter row (of either dtype).
   weight_decay != 0 on the dtype's value: 1e-308 is 0 in fp32, and must not turn an
   inf param's grad into NaN through 0 * inf. */
#define GROUP_FLAGS(has_grad_scale, row)                                              \
    (((has_grad_scale) ? FLAG_GRAD_SCALE : 0)                                         \
     | ((row)[MAXIMIZE] != 0 ? FLAG_MAXIMIZE : 0)                                     \
     | ((row)[WEIGHT_DECAY] != 0 ? FLAG_WEIGHT_DECAY : 0)                             \
     | ((row)[LR_IS_TENSOR] != 0 ? FLAG_LR_TENSOR : 0))

/* torch's CPU sqrt is MKL VML's vmsSqrt/vmdSqrt (mode HA | FTZDAZ_OFF |
   ERRMODE_IGNORE), which is not always correctly rounded: call the same function,
   found in libtorch_cpu by the caller, on each block. NULL: the C library's sqrt. */
typedef void (*vml_sqrt_f32)(int n, const float *a, float *r, long long mode);
typedef void (*vml_sqrt_f64)(int n, const double *a, double *r, long long mode);
extern SHARED vml_sqrt_f32 torch_sqrt_f32;
extern SHARED vml_sqrt_f64 torch_sqrt_f64;
static const long long vml_mode = 0x2 | 0x140000 | 0x100;

#if IN_MAIN_PART
SHARED vml_sqrt_f32 torch_sqrt_f32 = 0;
SHARED vml_sqrt_f64 torch_sqrt_f64 = 0;

void set_sqrt(void *sqrt_f32, void *sqrt_f64) {
    torch_sqrt_f32 = (vml_sqrt_f32)sqrt_f32;
    torch_sqrt_f64 = (vml_sqrt_f64)sqrt_f64;
}
#endif

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

#if IN_MAIN_PART
void set_openmp(void *parallel, void *thread_num, void *num_threads) {
    gomp_parallel = (gomp_parallel_fn)parallel;
    omp_thread_num = (omp_int_fn)thread_num;
    omp_num_threads = (omp_int_fn)num_threads;
}
#endif

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
    /* Low-precision params only (adadelta_step_lowp): */
    void *master;        /* the fp32 master copy, at the state's offsets (STORE_MASTER) */
    int kind, store;     /* KIND_* of the params, STORE_* of their update */
    const void *variants; /* the kind's update functions: [N_STORES][N_FLAG_VARIANTS] */
    int param_bytes, state_bytes; /* element sizes: params 2 (bf16/fp16) or 4; state 4, 2 (bf16) or 1 (uint8) */
    float *square_avg_scale, *acc_delta_scale; /* uint8 state: one scale per QUANT_BLOCK (else NULL) */
    uint32_t key0; /* the stochastic rounding's seed (mod 2**32): its hash keys the noise */
    void *(*run)(void *); /* what runs a share of this step */
    int64_t total;        /* elements in the whole step */
} share_t;

/* One OpenMP thread's part: shares t, t + team, ... (the team may be smaller than
   asked for, inside another parallel region). */
static void run_team_share(void *arg) {
    share_t *shares = (share_t *)arg;
    const int team = omp_num_threads(), n = shares[0].n_shares;
    for (int t = omp_thread_num(); t < n; t += team) shares[0].run(&shares[t]);
}

/* What every share of a step holds (the part of the table it runs is run_step's). */
static share_t share_proto(const int64_t *table, int64_t n_pieces, void *square_avg, void *acc_delta,
                           const void *hparams, int has_grad_scale, double grad_scale,
                           int use_torch_sqrt, void *(*run)(void *)) {
    share_t proto = {0};
    proto.table = table; proto.n_pieces = n_pieces;
    proto.square_avg = square_avg; proto.acc_delta = acc_delta; proto.hparams = hparams;
    proto.has_grad_scale = has_grad_scale;
    proto.grad_scale = has_grad_scale ? grad_scale : 1.0;
    proto.use_torch_sqrt = use_torch_sqrt;
    proto.run = run;
    return proto;
}

/* Check the table against the state and the hyper-parameters, split it into shares
   (each a copy of `proto` with its own part) and run them, each with proto->run.
   `line` is the elements per share's rounding: where the pieces start on a cache
   line, as a big param does, no two threads write one line. `quant` (uint8 state:
   QUANT_BLOCK, else 0): every piece must start at a multiple of it, and each share
   ends on a multiple of it inside its last piece, so that no two threads encode one
   quant block (a tail shorter than `line` would shift the concatenation's lines).
   Returns 0, or -1 (nothing written) when the table does not fit. */
static int run_step(const share_t *proto, int64_t n_state, int64_t n_groups, int64_t line, int64_t quant,
                    int max_threads, int64_t parallel_min_elements) {
    const int64_t *table = proto->table, n_pieces = proto->n_pieces;
    /* Check every piece before writing any, so that a bad table changes nothing. */
    int64_t total = 0;
    for (int64_t k = 0; k < n_pieces; ++k) {
        const int64_t numel = table[NUMEL_ROW * n_pieces + k];
        const int64_t state = table[STATE_ROW * n_pieces + k];
        const int64_t group = table[GROUP_ROW * n_pieces + k];
        if (numel < 0) return -1;
        if (numel > 0 && (state < 0 || state > n_state - numel
                          || group < 0 || group >= n_groups)) return -1;
        if (numel > 0 && quant && state % quant != 0) return -1;
        total += numel;
    }
    int n_threads = total >= parallel_min_elements ? max_threads : 1;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    /* Equal shares of the pieces' concatenation (a share may start inside a piece
       and span many), rounded up to whole lines. */
    int64_t share = (total + n_threads - 1) / n_threads;
    share = (share + line - 1) / line * line;
    share_t shares[MAX_THREADS];
    int64_t piece = 0, offset = 0, left = total;
    for (int t = 0; t < n_threads; ++t) {
        share_t *s = &shares[t];
        *s = *proto;
        s->total = total;
        s->piece = piece; s->offset = offset;
        s->count = share < left ? share : left;
        left -= s->count;
        /* Where the next share starts: `count` elements further on. */
        for (int64_t skip = s->count; skip > 0 && piece < n_pieces;) {
            const int64_t rest = table[NUMEL_ROW * n_pieces + piece] - offset;
            if (skip < rest) { offset += skip; skip = 0; }
            else { skip -= rest; ++piece; offset = 0; }
        }
        if (quant && offset % quant != 0) {
            /* Inside a quant block: this share takes the rest of it (offset > 0, so
               `piece` is a piece, and its rest is still left). */
            const int64_t rest = table[NUMEL_ROW * n_pieces + piece] - offset;
            const int64_t extra = quant - offset % quant < rest ? quant - offset % quant : rest;
            s->count += extra;
            left -= extra;
            offset += extra;
            if (offset == table[NUMEL_ROW * n_pieces + piece]) { ++piece; offset = 0; }
        }
    }
    if (gomp_parallel && n_threads > 1) {
        shares[0].n_shares = n_threads;
        gomp_parallel(run_team_share, shares, (unsigned)n_threads, 0);
        return 0;
    }
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < n_threads; ++t)
        started[t] = shares[t].count > 0
            && pthread_create(&threads[t], 0, proto->run, &shares[t]) == 0;
    proto->run(&shares[0]);
    for (int t = 1; t < n_threads; ++t) {
        if (started[t]) pthread_join(threads[t], 0);
        else proto->run(&shares[t]);  /* no thread could be started: here */
    }
    return 0;
}

/* The AdaDelta equations, once per backend type T (float, double, and with AVX2 the
   __m256 of 8 floats: each lane rounds as the scalar does). The update of one element,
   in four parts: the grad (scaled, negated, weight-decayed); the new square_avg; d,
   from the square roots; then the new acc_delta and param. */
#define DEFINE_ELEMENT(T, SUFFIX, FMA, SQRT)                                          \
static inline __attribute__((always_inline)) T grad_##SUFFIX(                         \
        T g, const T p, const T grad_scale, const T weight_decay, const int flags) {  \
    if (flags & FLAG_GRAD_SCALE) g = g / grad_scale;                                  \
    if (flags & FLAG_MAXIMIZE) g = -g;                                                \
    if (flags & FLAG_WEIGHT_DECAY) g = FMA(p, weight_decay, g);                       \
    return g;                                                                         \
}                                                                                     \
static inline __attribute__((always_inline)) T square_##SUFFIX(                       \
        const T g, const T v, const T rho, const T one_minus_rho) {                   \
    return FMA(one_minus_rho * g, g, v * rho);                                        \
}                                                                                     \
static inline __attribute__((always_inline)) T delta_##SUFFIX(                        \
        const T g, const T square, const T u, const T eps) {                          \
    return SQRT(u + eps) / SQRT(square + eps) * g;                                    \
}                                                                                     \
static inline __attribute__((always_inline)) void apply_##SUFFIX(                     \
        const T d, T *restrict u, T *restrict p, const T rho, const T one_minus_rho,  \
        const T lr, const int flags) {                                                \
    *u = FMA(one_minus_rho * d, d, *u * rho);                                         \
    /* A tensor lr multiplies first, as torch's capturable foreach does. */           \
    if (flags & FLAG_LR_TENSOR) *p = *p - d * lr;                                     \
    else *p = FMA(d, -lr, *p);                                                        \
}

#define DEFINE_UPDATE(T, SUFFIX, FMA, SQRT)                                           \
DEFINE_ELEMENT(T, SUFFIX, FMA, SQRT)                                                  \
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
            const T square = square_##SUFFIX(g, v[i], rho, one_minus_rho);            \
            v[i] = square;                                                            \
            const T d = delta_##SUFFIX(g, square, u[i], eps);                         \
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
            const T square = square_##SUFFIX(g, vb[i], rho, one_minus_rho);           \
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
        const int flags = GROUP_FLAGS(s->has_grad_scale, row);                        \
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
    const share_t proto = share_proto(table, n_pieces, square_avg, acc_delta, hparams, \
        grad_scale_ptr != 0, grad_scale_ptr ? (double)*grad_scale_ptr : 1.0,          \
        use_torch_sqrt, run_share_##SUFFIX);                                          \
    return run_step(&proto, n_state, n_groups, 64 / (int64_t)sizeof(T), 0, max_threads, \
                    parallel_min_elements);                                           \
}

#if IN_MAIN_PART
DEFINE_UPDATE(float, f32, fmaf, sqrtf)
DEFINE_UPDATE(double, f64, fma, sqrt)
#else
DEFINE_ELEMENT(float, f32, fmaf, sqrtf) /* (the compressed-state loops' equations) */
#endif

/* ------------------------------------------------------------------------------------
   bf16 and fp16 params (fp32 state and math): the kernel's three ways to store them,
   the same arithmetic as the fp32 loop above on the widened values.

       STORE_NEAREST     p = round_to_nearest_even(p + update)
       STORE_MASTER      master = master + update (fp32, at the state's offsets),
                         p = round_to_nearest_even(master)
       STORE_STOCHASTIC  p rounds up or down with probability proportional to the
                         distance, from 16 bits of noise, half of a hash of the
                         element's pair in the flat state keyed by the seed
                         (param_noise): the kernel's noise and rounding, so the
                         same bits. */

enum { KIND_BF16, KIND_F16, N_KINDS };
/* fp32 params, with bf16 state only (adadelta_step_bf16_state). */
enum { KIND_F32 = N_KINDS };

/* Steps of at least this many elements store params written without being read
   (master weights) with non-temporal stores: 2M elements move 56 MB, beyond the
   caches, and a small model's params, stored plainly, stay in cache for the forward. */
#define STREAMING_MIN_ELEMENTS (1 << 21)
enum { STORE_NEAREST, STORE_MASTER, STORE_STOCHASTIC, N_STORES };

/* fp16 needs the compiler's _Float16 (GCC 12, clang 15 on x86-64); without it the
   loader sees adadelta_has_f16 == 0 and fp16 params stay on the chunked path. */
#if defined(__FLT16_MAX__)
#define HAVE_F16 1
#else
#define HAVE_F16 0
#endif
#if IN_MAIN_PART
const int adadelta_has_f16 = HAVE_F16;
#endif

static inline __attribute__((always_inline)) float bits_to_f32(uint32_t bits) {
    union { uint32_t u; float f; } v = {bits}; return v.f;
}
static inline __attribute__((always_inline)) uint32_t f32_to_bits(float x) {
    union { float f; uint32_t u; } v = {x}; return v.u;
}

/* A stored value, exactly: bf16 is the top half of an fp32. */
static inline __attribute__((always_inline)) float widen(uint16_t bits, const int kind) {
#if HAVE_F16
    if (kind == KIND_F16) { union { uint16_t u; _Float16 h; } v = {bits}; return (float)v.h; }
#endif
    return bits_to_f32((uint32_t)bits << 16);
}

/* The top half of x's bits after adding `addend` below it: bf16's rounding, to nearest
   or stochastic by the addend (the kernel's _bf16_add_and_truncate). A NaN stays a
   quiet NaN instead of carrying into the exponent or the sign. */
static inline __attribute__((always_inline)) uint16_t bf16_add_and_truncate(float x, uint32_t addend) {
    const uint32_t bits = f32_to_bits(x);
    return (uint16_t)(x != x ? (bits >> 16) | 0x40u : (bits + addend) >> 16);
}

/* Round to nearest even; bf16 as c10 and the kernel round it. */
static inline __attribute__((always_inline)) uint16_t round_nearest(float x, const int kind) {
#if HAVE_F16
    if (kind == KIND_F16) { union { _Float16 h; uint16_t u; } v = {(_Float16)x}; return v.u; }
#endif
    return bf16_add_and_truncate(x, 0x7FFFu + ((f32_to_bits(x) >> 16) & 1u));
}

#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* x rounded up or down in magnitude, given 16 random bits (the kernel's
   _round_stochastic). bf16: add the 16 dropped bits' worth of noise and truncate, so
   x rounds away from zero with probability (dropped bits) / 2**16, exactly. fp16:
   the neighbour beyond or short of the nearest, with probability (distance to the
   nearest) / (gap), against noise / 2**16. The expectation is x. */
static inline __attribute__((always_inline)) uint16_t round_stochastic(float x, const int kind, uint16_t noise) {
    if (kind == KIND_BF16) return bf16_add_and_truncate(x, noise);
    const uint16_t nearest = round_nearest(x, kind);
    const float nearest_value = widen(nearest, kind);
    const uint16_t other = (uint16_t)(nearest + (fabsf(x) > fabsf(nearest_value) ? 1 : -1));
    /* Exact values give fraction 0 (or NaN for a NaN gap): both keep the nearest. */
    const float fraction = (x - nearest_value) / (widen(other, kind) - nearest_value);
    return (float)noise * (1.0f / 65536.0f) < fraction ? other : nearest;
}

/* bf16 state's noise (the kernel's _hash32 and _state_noise): lowbias32 (C. Wellons'
   hash prospector), a bijection of 32-bit words, of the element's state index (mod
   2**32) plus a key, the hash of the seed. For a uniform key the word is uniform, so
   its halves, square_avg's and acc_delta's 16 bits, are uniform and independent. */
static inline __attribute__((always_inline)) uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

/* A block of new bf16 state (v_new, u_new at state index `index` on), stochastically
   rounded into v and u with one hash per element: one vectorized pass. */
static __attribute__((noinline)) void round_state_bf16(
        const float *restrict v_new, const float *restrict u_new, uint16_t *restrict v, uint16_t *restrict u,
        const int n, const uint64_t index, const uint32_t seed) {
    const uint32_t first = (uint32_t)index + hash32(seed);
    for (int i = 0; i < n; ++i) {
        const uint32_t noise = hash32(first + (uint32_t)i);
        v[i] = bf16_add_and_truncate(v_new[i], noise & 0xFFFFu);
        u[i] = bf16_add_and_truncate(u_new[i], noise >> 16);
    }
}

#if defined(__AVX2__)
/* The equations on 8 lanes (the same operations, so the same bits in each lane). */
DEFINE_ELEMENT(__m256, m256, _mm256_fmadd_ps, _mm256_sqrt_ps)

/* 8 bf16 values widened, and 8 lanes of 16-bit values stored. */
static inline __attribute__((always_inline)) __m256 widen8(const uint16_t *src) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)src)), 16));
}
static inline __attribute__((always_inline)) void store16x8(uint16_t *dst, const __m256i x) {
    _mm_storeu_si128((__m128i *)dst, _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1)));
}
/* bf16_add_and_truncate on 8 lanes (a NaN: its bits | 0x400000, shifted). */
static inline __attribute__((always_inline)) __m256i bf16_add_and_truncate8(const __m256 x, const __m256i addend) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256 is_nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    const __m256i sum = _mm256_add_epi32(bits, addend);
    const __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x400000));
    return _mm256_srli_epi32(_mm256_blendv_epi8(sum, quiet, _mm256_castps_si256(is_nan)), 16);
}
/* round_nearest (bf16) and hash32 on 8 lanes. */
static inline __attribute__((always_inline)) __m256i round_nearest_bf16x8(const __m256 x) {
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(x), 16), _mm256_set1_epi32(1));
    return bf16_add_and_truncate8(x, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
}
/* round_stochastic (bf16) of 8 values by their 8 halves of noise. */
static inline __attribute__((always_inline)) __m256i round_stochastic_bf16x8(const __m256 x, const uint16_t *noise) {
    return bf16_add_and_truncate8(x, _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)noise)));
}
static inline __attribute__((always_inline)) __m256i hash32x8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x7FEB352Du));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846CA68Bu));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

/* A group's hyper-parameters (and the grad scale) in lanes. */
typedef struct {
    __m256 lr, rho, one_minus_rho, eps, weight_decay, grad_scale;
} hparams8_t;

static inline __attribute__((always_inline)) hparams8_t hparams8(const float *restrict row, const float grad_scale) {
    const hparams8_t h = {_mm256_set1_ps(row[LR]), _mm256_set1_ps(row[RHO]), _mm256_set1_ps(row[ONE_MINUS_RHO]),
                          _mm256_set1_ps(row[EPS]), _mm256_set1_ps(row[WEIGHT_DECAY]), _mm256_set1_ps(grad_scale)};
    return h;
}

/* The update of the 8 elements at e in lanes (params of kind KIND_F32 or KIND_BF16,
   or the master copy), from their old state v and *u in fp32: stores the new params
   (with stochastic rounding, into w_slot, for the caller to round), *u becomes the
   new acc_delta, and the new square_avg is returned. */
static inline __attribute__((always_inline)) __m256 update8(
        void *restrict p, const void *restrict gr, float *restrict m, const int64_t e, const __m256 v,
        __m256 *restrict u, const hparams8_t h, const int flags, const int kind, const int store,
        float *restrict w_slot) {
    __m256 w = store == STORE_MASTER ? _mm256_loadu_ps(m + e)
             : kind == KIND_F32      ? _mm256_loadu_ps((const float *)p + e)
                                     : widen8((const uint16_t *)p + e);
    const __m256 grad = kind == KIND_F32 ? _mm256_loadu_ps((const float *)gr + e) : widen8((const uint16_t *)gr + e);
    const __m256 g = grad_m256(grad, w, h.grad_scale, h.weight_decay, flags);
    const __m256 square = square_m256(g, v, h.rho, h.one_minus_rho);
    apply_m256(delta_m256(g, square, *u, h.eps), u, &w, h.rho, h.one_minus_rho, h.lr, flags);
    if (kind == KIND_F32) {
        _mm256_storeu_ps((float *)p + e, w);
    } else {
        if (store == STORE_MASTER) _mm256_storeu_ps(m + e, w);
        if (store == STORE_STOCHASTIC) _mm256_store_ps(w_slot, w);
        else store16x8((uint16_t *)p + e, round_nearest_bf16x8(w));
    }
    return square;
}
#endif

/* The params' noise of n elements from state index `index` on (the kernel's
   _param_noise in kernels/adadelta.py): element i takes half i % 2 (low half first) of
   hash32 of word PARAM_NOISE_WORDS + i / 2 (mod 2**32) plus the key, the hash of the
   seed; one hash per two elements, written to `noise` (n + 2 halves, 8 words more
   with AVX2); returns where the first element's is. */
#define PARAM_NOISE_WORDS 0x80000000u
#if IN_MAIN_PART
const uint32_t adadelta_param_noise_words = PARAM_NOISE_WORDS; /* checked by the loader */
#endif
#define NOISE_HALVES (BLOCK + 18)
static inline __attribute__((always_inline)) const uint16_t *param_noise(
        uint16_t *restrict noise, const int n, const uint64_t index, const uint32_t seed) {
    const int skip = (int)(index & 1), n_words = (skip + n + 1) >> 1;
    const uint32_t first = (uint32_t)(index >> 1) + PARAM_NOISE_WORDS + hash32(seed);
    int w = 0;
#if defined(__AVX2__)
    __m256i words = _mm256_add_epi32(_mm256_set1_epi32((int)first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (; w < n_words; w += 8) {
        _mm256_storeu_si256((__m256i *)(noise + 2 * w), hash32x8(words));
        words = _mm256_add_epi32(words, _mm256_set1_epi32(8));
    }
#endif
    for (; w < n_words; ++w) {
        const uint32_t word = hash32(first + (uint32_t)w);
        noise[2 * w] = (uint16_t)word;
        noise[2 * w + 1] = (uint16_t)(word >> 16);
    }
    return noise + skip;
}

/* A block of new values, stochastically rounded into `p` with the kernel's noise
   (param_noise). Not inlined: one copy per kind. */
static __attribute__((noinline)) void round_block_stochastic(
        const float *restrict w, uint16_t *restrict p, const int n, const int kind,
        const uint64_t index, const uint32_t seed) {
    uint16_t noise[NOISE_HALVES] __attribute__((aligned(64)));
    const uint16_t *restrict mine = param_noise(noise, n, index, seed);
    if (kind == KIND_BF16) {
        int i = 0;
#if defined(__AVX2__)
        for (; i + 8 <= n; i += 8) store16x8(p + i, round_stochastic_bf16x8(_mm256_loadu_ps(w + i), mine + i));
#endif
        for (; i < n; ++i) p[i] = round_stochastic(w[i], KIND_BF16, mine[i]);
    }
#if HAVE_F16
    else {
        for (int i = 0; i < n; ++i) p[i] = round_stochastic(w[i], KIND_F16, mine[i]);
    }
#endif
}

/* n params stored with non-temporal stores. With master weights the step writes the
   params without reading them, and a plain store reads each line first (for
   ownership): 2 B more per param, 7% of the step. Big steps only, whose params would
   not stay in cache anyway. */
static void store_streaming(uint16_t *restrict dst, const uint16_t *restrict src, int n) {
    int i = 0;
#if defined(__AVX2__)
    for (; i < n && ((uintptr_t)(dst + i) & 31) != 0; ++i) dst[i] = src[i];
    for (; i + 16 <= n; i += 16)
        _mm256_stream_si256((__m256i *)(dst + i), _mm256_loadu_si256((const __m256i *)(src + i)));
#endif
    for (; i < n; ++i) dst[i] = src[i];
}

/* n elements of one piece; `index` is the state index of its first element. Blocks
   of BLOCK elements: the new weights of a block wait in L1 for their store. */
static inline __attribute__((always_inline)) void update_lowp(
        uint16_t *restrict p, const uint16_t *restrict gr, float *restrict v, float *restrict u,
        float *restrict m, const int64_t n_elements, const float *restrict row, const float grad_scale,
        const int use_torch_sqrt, const int flags, const int kind, const int store, const int streaming,
        const uint64_t index, const uint32_t k0) {
    const float lr = row[LR], rho = row[RHO], one_minus_rho = row[ONE_MINUS_RHO];
    const float eps = row[EPS], weight_decay = row[WEIGHT_DECAY];
    float g_block[BLOCK] __attribute__((aligned(64)));
    float w_block[BLOCK] __attribute__((aligned(64)));
    float std[BLOCK] __attribute__((aligned(64)));
    float delta[BLOCK] __attribute__((aligned(64)));
    uint16_t p_block[BLOCK] __attribute__((aligned(64)));
    for (int64_t first = 0; first < n_elements; first += BLOCK) {
        const int n = n_elements - first < BLOCK ? (int)(n_elements - first) : BLOCK;
        /* Where the new params go: a block that store_streaming then writes out. */
        uint16_t *restrict pb = streaming ? p_block : p + first;
        const uint16_t *restrict gb = gr + first;
        float *restrict vb = v + first, *restrict ub = u + first, *restrict mb = m + first;
        int rounded = 0; /* stochastic rounding: how many of the block's params are stored */
        if (!use_torch_sqrt) {
            /* The IEEE sqrt: one pass; bf16 params by hand on 8 lanes (update8), each
               new param rounded stochastically in the same pass, its noise drawn for
               the block first. The compiler's own vectors and a second rounding pass
               took longer: perf/ab_native.py against 5753296, 1M params in cache, one
               thread, 0.92x the time to nearest, 0.91x with master weights, 0.88x with
               stochastic rounding (perf/results/ab_native_in_cache/). */
            int i = 0;
#if defined(__AVX2__)
            if (kind == KIND_BF16) {
                const hparams8_t h = hparams8(row, grad_scale);
                uint16_t noise[NOISE_HALVES] __attribute__((aligned(64)));
                const uint16_t *restrict mine = store == STORE_STOCHASTIC
                    ? param_noise(noise, n, index + (uint64_t)first, k0) : noise;
                for (; i + 8 <= n; i += 8) {
                    __m256 acc = _mm256_loadu_ps(ub + i);
                    const __m256 square =
                        update8(pb, gb, mb, i, _mm256_loadu_ps(vb + i), &acc, h, flags, kind, store, w_block + i);
                    _mm256_storeu_ps(vb + i, square);
                    _mm256_storeu_ps(ub + i, acc);
                    if (store == STORE_STOCHASTIC)
                        store16x8(pb + i, round_stochastic_bf16x8(_mm256_load_ps(w_block + i), mine + i));
                }
            }
#endif
            rounded = i;
            for (; i < n; ++i) {
                float w = store == STORE_MASTER ? mb[i] : widen(pb[i], kind);
                const float g = grad_f32(widen(gb[i], kind), w, grad_scale, weight_decay, flags);
                const float square = square_f32(g, vb[i], rho, one_minus_rho);
                vb[i] = square;
                const float d = delta_f32(g, square, ub[i], eps);
                apply_f32(d, &ub[i], &w, rho, one_minus_rho, lr, flags);
                if (store == STORE_MASTER) mb[i] = w;
                if (store == STORE_STOCHASTIC) w_block[i] = w;
                else pb[i] = round_nearest(w, kind);
            }
        } else {
            /* torch's sqrt works on arrays: three passes, as update_f32 makes them. */
            for (int i = 0; i < n; ++i) {
                w_block[i] = store == STORE_MASTER ? mb[i] : widen(pb[i], kind);
                const float g = grad_f32(widen(gb[i], kind), w_block[i], grad_scale, weight_decay, flags);
                const float square = square_f32(g, vb[i], rho, one_minus_rho);
                vb[i] = square;
                g_block[i] = g;
                std[i] = square + eps;
                delta[i] = ub[i] + eps;
            }
            sqrt_block_f32(n, std, use_torch_sqrt);
            sqrt_block_f32(n, delta, use_torch_sqrt);
            for (int i = 0; i < n; ++i) {
                apply_f32(delta[i] / std[i] * g_block[i], &ub[i], &w_block[i], rho, one_minus_rho, lr, flags);
                if (store == STORE_MASTER) mb[i] = w_block[i];
                if (store != STORE_STOCHASTIC) pb[i] = round_nearest(w_block[i], kind);
            }
        }
        if (store == STORE_STOCHASTIC && rounded < n)
            round_block_stochastic(w_block + rounded, pb + rounded, n - rounded, kind,
                                   index + (uint64_t)(first + rounded), k0);
        if (streaming) store_streaming(p + first, p_block, n);
    }
}

/* ------------------------------------------------------------------------------------
   Compressed state: a block of square_avg and acc_delta decoded exactly into fp32,
   the fp32 math above on it, and the block's new values encoded back.
   Params of any kind: fp32 (stored exactly), or bf16/fp16 in the three ways above.

   bf16 state (state_dtype=torch.bfloat16): widened; the new values rounded
   stochastically into bf16, each buffer from its own stream (the kernel's bits).

   uint8 state (state_dtype=torch.uint8): one code per element and one fp32 scale per
   QUANT_BLOCK elements of the flat state (the kernel's format, kernels/adadelta.py): a
   code is an unsigned float8 (4 exponent bits of bias 15, 4 mantissa bits,
   subnormals), its value that times the block's power-of-two scale. Encoding a block
   picks the scale that puts its max at most 1.9375 and rounds each value to nearest
   even on that grid. Every piece starts at a multiple of QUANT_BLOCK (its padding
   beyond numel is neither read into the max nor written). */

enum { STATE_BF16, STATE_U8 };
#define QUANT_BLOCK 256
#if IN_MAIN_PART
const int adadelta_quant_block = QUANT_BLOCK; /* checked by the loader */
#endif
_Static_assert(QUANT_BLOCK <= BLOCK, "a quant block fits one block of the update");
#define U8_NAN_BITS 0x7FC00000u /* the scale of a block with a NaN or an inf */

static inline __attribute__((always_inline)) float load_value(const void *p, int64_t i, const int kind) {
    if (kind == KIND_F32) return ((const float *)p)[i];
    return widen(((const uint16_t *)p)[i], kind);
}

/* Element i of a block of compressed state as fp32, exactly: bf16 widened; uint8
   state arrives decoded (u8_decode), in fp32. */
static inline __attribute__((always_inline)) float load_state(const void *s, const int i, const int state_kind) {
    if (state_kind == STATE_U8) return ((const float *)s)[i];
    return widen(((const uint16_t *)s)[i], KIND_BF16);
}

/* A uint8 code's value before its block's scale, exactly: 2**((c >> 4) - 15) *
   (1 + (c & 15) / 16) for c >= 16 (fp32 bits: the code above the exponent bias
   112), (c & 15) * 2**-18 below (subnormals). A select, not a table: it vectorizes. */
static inline __attribute__((always_inline)) float u8_code_value(const uint8_t code) {
    const uint32_t c = code;
    const float normal = bits_to_f32((c << 19) + (112u << 23));
    const float subnormal = (float)(c & 15u) * 0x1p-18f;
    return c >= 16 ? normal : subnormal;
}

#if defined(__AVX2__)
/* u8_code_value of 8 codes times their block's scale, in 8 lanes. A code is an fp16's
   top bits (the same exponent bias, and subnormals below 2**-14 too): with F16C, the
   fp16 of bits c << 6, widened (exactly, whatever the MXCSR). */
static inline __attribute__((always_inline)) __m256 u8_decode8(const uint8_t *codes, const __m256 scale) {
#if defined(__F16C__)
    const __m128i halves = _mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)codes)), 6);
    return _mm256_mul_ps(scale, _mm256_cvtph_ps(halves));
#else
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)codes));
    const __m256 normal =
        _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(c, 19), _mm256_set1_epi32(112 << 23)));
    const __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(c), _mm256_set1_ps(0x1p-18f));
    const __m256 is_subnormal = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(16), c));
    return _mm256_mul_ps(scale, _mm256_blendv_ps(normal, subnormal, is_subnormal));
#endif
}
#endif

/* n codes of a block of `scale`, decoded (exactly: a power of two times a 5-bit
   value), in a pass of their own (update_block_cs_scalar's; with AVX2, most blocks
   run in update_piece_u8x8's or update_piece_u8x16's one loop instead). */
static __attribute__((noinline)) void u8_decode(const uint8_t *restrict codes, const int n, const float scale,
                                                float *restrict out) {
    int i = 0;
#if defined(__AVX2__)
    const __m256 scales = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, u8_decode8(codes + i, scales));
#endif
    for (; i < n; ++i) out[i] = scale * u8_code_value(codes[i]);
}

/* Encoding a block of n <= QUANT_BLOCK new values w:
   1. its maxima (u8_max_add over every value, in the update's loop): a NaN or an
      inf anywhere makes the scale NaN; else the largest value (a negative one counts
      as 0), its fp32 bits rounded up at 5 significant bits, gives the scale's
      exponent: the scale is the power of two at or below that, so no value rounds
      past code 255; 0 for a max below 2**-126 (an fp32 subnormal), NaN beyond 2**127
      (u8_encoding);
   2. each code (u8_codes): w / scale rounded stochastically on the float8 grid by 16
      bits of noise (the kernel's _quantize); 0 in a block of zero or NaN scale. */
typedef struct {
    uint32_t magnitude_max; /* of the values' bits less the sign: non-finite ones are the largest */
    int32_t max_bits;       /* of the values' bits as int32: a negative value's are below 0's */
} u8_max_t;
typedef struct {
    float inverse; /* 1 / scale (exact: a power of two, 2**-127 a subnormal); 0 for no codes */
    uint32_t mask; /* 0xFF, or 0 where every code is 0 */
} u8_encoding_t;

static inline __attribute__((always_inline)) void u8_max_add(u8_max_t *restrict max, const float w) {
    const uint32_t bits = f32_to_bits(w), magnitude = bits & 0x7FFFFFFFu;
    max->magnitude_max = magnitude > max->magnitude_max ? magnitude : max->magnitude_max;
    max->max_bits = (int32_t)bits > max->max_bits ? (int32_t)bits : max->max_bits;
}

/* A block's scale from its maxima (stored in *scale), and how its codes are made. */
static inline __attribute__((always_inline)) u8_encoding_t u8_encoding(const u8_max_t max, float *restrict scale) {
    const uint32_t m = (uint32_t)max.max_bits;
    const uint32_t exponent = (m + 0x7FFFFu) >> 23; /* rounded up: a carry moves the exponent */
    u8_encoding_t encoding = {0.0f, 0};
    if (max.magnitude_max >= 0x7F800000u) {
        *scale = bits_to_f32(U8_NAN_BITS);
    } else if (m < 0x800000u) {
        *scale = 0.0f; /* a zero or subnormal max, even one that rounds up to 2**-126 */
    } else if (exponent >= 255) {
        *scale = bits_to_f32(U8_NAN_BITS);
    } else {
        *scale = bits_to_f32(exponent << 23);
        encoding.inverse = 1.0f / *scale;
        encoding.mask = 0xFF;
    }
    return encoding;
}

/* square_avg's codes below 2**-14 (the subnormal ones) round up, as if by noise
   0xFFFF: rounded stochastically on their coarse grid, a small square_avg would often
   read back as 0 (or far below its value), and AdaDelta divides by its square root, so
   the steps of an element whose grads stay small, where acc_delta feeds on them, would
   grow without bound (under constant grads, acc_delta reached 352 in 60 steps where
   fp32 state's stays below 2e-5: tests/test_quantized_state.py).
   Rounded up, square_avg never reads back below the value the step computed, so no
   step is larger than that value gives. (acc_delta, a numerator, keeps the noise.) */
#define U8_ROUND_UP 0xFFFFu

/* The code of w, rounded by 16 bits of noise: x = w / scale; from 2**-14 on, the
   float8's exponent and 4 mantissa bits from x's, plus the noise at the top of the 19
   dropped bits, truncated; below, x in 16ths of 2**-18 (truncated), plus the noise
   (U8_ROUND_UP where round_up: square_avg's), over 2**16. (The select is maxps's: a
   NaN or negative w gives 0; an inf, in a block whose codes are all 0, anything.) */
static inline __attribute__((always_inline)) uint8_t u8_code(const float w, const u8_encoding_t encoding,
                                                             const uint32_t noise, const int round_up) {
    const float x = (w > 0.0f ? w : 0.0f) * encoding.inverse;
    const uint32_t xb = f32_to_bits(x);
    const uint32_t normal = (xb - (112u << 23) + (noise << 3)) >> 19;
    const uint32_t subnormal =
        ((uint32_t)((x < 0x1p-14f ? x : 0x1p-14f) * 0x1p34f) + (round_up ? U8_ROUND_UP : noise)) >> 16;
    return (uint8_t)((xb >= (113u << 23) ? normal : subnormal) & encoding.mask);
}

#if defined(__AVX2__)
/* u8_code of 8 values of a block that has codes, in 32-bit lanes (noise: 16 bits a lane). */
static inline __attribute__((always_inline)) __m256i u8_codes8(const __m256 w, const __m256 inverse,
                                                               const __m256i noise, const int round_up) {
    const __m256 x = _mm256_mul_ps(_mm256_max_ps(w, _mm256_setzero_ps()), inverse);
    const __m256i xb = _mm256_castps_si256(x);
    const __m256i normal = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_sub_epi32(xb, _mm256_set1_epi32((int)(112u << 23))), _mm256_slli_epi32(noise, 3)), 19);
    const __m256 fixed = _mm256_mul_ps(_mm256_min_ps(x, _mm256_set1_ps(0x1p-14f)), _mm256_set1_ps(0x1p34f));
    const __m256i subnormal = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_cvttps_epi32(fixed), round_up ? _mm256_set1_epi32(U8_ROUND_UP) : noise), 16);
    const __m256i is_normal = _mm256_cmpgt_epi32(xb, _mm256_set1_epi32((int)(113u << 23) - 1));
    return _mm256_blendv_epi8(subnormal, normal, is_normal);
}

/* The codes of 32 values w of a block that has codes (1 / its scale: inverse), stored:
   noise[k] holds the noise of w[8k..8k+7] in its lanes' low 16 bits (above them,
   anything for square_avg, the low half's owner, whose small codes round up as
   u8_code's round_up; 0 for acc_delta). */
static inline __attribute__((always_inline)) void u8_codes32(const float *restrict w, const __m256 inverse,
                                                             const __m256i noise[4], const int square_avg,
                                                             uint8_t *restrict codes) {
    const __m256i mask = _mm256_set1_epi32(0xFFFF);
    __m256i c[4];
    for (int k = 0; k < 4; ++k)
        c[k] = u8_codes8(_mm256_loadu_ps(w + 8 * k), inverse,
                         square_avg ? _mm256_and_si256(noise[k], mask) : noise[k], square_avg);
    /* (Each pack interleaves the two 128-bit lanes: one permute puts them back.) */
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3]));
    _mm256_storeu_si256((__m256i *)codes, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}
#endif

/* The codes of n values w of a block, noise[i] >> shift its noise: square_avg's
   (shift 0, rounded up below 2**-14) or acc_delta's (16). With AVX2, 32 at a time by
   hand: the compiler's own vectors narrow to bytes and widen back (the pass took twice
   as long). */
static __attribute__((noinline)) void u8_codes(const float *restrict w, const int n, const u8_encoding_t encoding,
                                               uint8_t *restrict codes, const uint32_t *restrict noise,
                                               const int shift) {
    int i = 0;
#if defined(__AVX2__)
    if (encoding.mask) {
        const __m256 inverse = _mm256_set1_ps(encoding.inverse);
        const __m128i count = _mm_cvtsi32_si128(shift);
        for (; i + 32 <= n; i += 32) {
            __m256i bits[4];
            for (int k = 0; k < 4; ++k)
                bits[k] = _mm256_srl_epi32(_mm256_loadu_si256((const __m256i *)(noise + i + 8 * k)), count);
            u8_codes32(w + i, inverse, bits, shift == 0, codes + i);
        }
    }
#endif
    for (; i < n; ++i) codes[i] = u8_code(w[i], encoding, (noise[i] >> shift) & 0xFFFFu, shift == 0);
}

/* One block of n <= BLOCK elements of the fp32 update with compressed state, from
   element `first` of the piece: reads the params (or the master copy), the grads and
   the old state (v, u: the block's; see load_state), stores the new params, and
   leaves the new state values in v_block and u_block for the caller to encode (uint8
   state: with their maxima). `at`: the block's first state index. */
static inline __attribute__((always_inline)) void update_block_cs(
        void *restrict p, const void *restrict gr, const void *restrict v, const void *restrict u,
        float *restrict m, const int64_t first, const int n, const float *restrict row, const float grad_scale,
        const int use_torch_sqrt, const int flags, const int kind, const int store, const int state_kind,
        const uint64_t at, const uint32_t k0, float *restrict v_block, float *restrict u_block,
        u8_max_t *restrict v_max, u8_max_t *restrict u_max) {
    const float lr = row[LR], rho = row[RHO], one_minus_rho = row[ONE_MINUS_RHO];
    const float eps = row[EPS], weight_decay = row[WEIGHT_DECAY];
    float w_block[BLOCK] __attribute__((aligned(64)));
    float *restrict mb = m + first;
    u8_max_t v_top = {0, 0}, u_top = {0, 0};
    /* fp16 params convert element by element (no vectorized _Float16 here): three
       passes, so that the sqrt pass still vectorizes. With AVX2, bf16 state's one pass
       is update_block_cs8's (here only a piece's last block off 8 elements comes: three
       passes, with the same IEEE sqrt, so the same bits, and a shorter build). */
#if defined(__AVX2__)
    if (!use_torch_sqrt && kind != KIND_F16 && state_kind == STATE_U8) {
#else
    if (!use_torch_sqrt && kind != KIND_F16) {
#endif
        /* The IEEE sqrt: one pass, in which the rest overlaps the divider's work. */
        for (int i = 0; i < n; ++i) {
            float w = store == STORE_MASTER ? mb[i] : load_value(p, first + i, kind);
            const float g = grad_f32(load_value(gr, first + i, kind), w, grad_scale, weight_decay, flags);
            const float square = square_f32(g, load_state(v, i, state_kind), rho, one_minus_rho);
            float acc = load_state(u, i, state_kind);
            const float d = delta_f32(g, square, acc, eps);
            apply_f32(d, &acc, &w, rho, one_minus_rho, lr, flags);
            v_block[i] = square;
            u_block[i] = acc;
            if (kind == KIND_F32) ((float *)p)[first + i] = w;
            else w_block[i] = w;
            if (state_kind == STATE_U8) {
                u8_max_add(&v_top, square);
                u8_max_add(&u_top, acc);
            }
        }
    } else {
        /* torch's sqrt works on arrays, as update_f32's three passes. */
        float g_block[BLOCK] __attribute__((aligned(64)));
        float std[BLOCK] __attribute__((aligned(64)));
        float delta[BLOCK] __attribute__((aligned(64)));
        for (int i = 0; i < n; ++i) {
            w_block[i] = store == STORE_MASTER ? mb[i] : load_value(p, first + i, kind);
            const float g = grad_f32(load_value(gr, first + i, kind), w_block[i], grad_scale, weight_decay, flags);
            const float square = square_f32(g, load_state(v, i, state_kind), rho, one_minus_rho);
            v_block[i] = square;
            g_block[i] = g;
            std[i] = square + eps;
            u_block[i] = load_state(u, i, state_kind);
            delta[i] = u_block[i] + eps;
        }
        sqrt_block_f32(n, std, use_torch_sqrt);
        sqrt_block_f32(n, delta, use_torch_sqrt);
        for (int i = 0; i < n; ++i) {
            apply_f32(delta[i] / std[i] * g_block[i], &u_block[i], &w_block[i], rho, one_minus_rho, lr, flags);
            if (state_kind == STATE_U8) {
                u8_max_add(&v_top, v_block[i]);
                u8_max_add(&u_top, u_block[i]);
            }
        }
        if (kind == KIND_F32) {
            float *restrict pb = (float *)p + first;
            for (int i = 0; i < n; ++i) pb[i] = w_block[i];
        }
    }
    if (state_kind == STATE_U8) { *v_max = v_top; *u_max = u_top; }
    if (kind != KIND_F32) {
        uint16_t *restrict pb = (uint16_t *)p + first;
        if (store == STORE_MASTER)
            for (int i = 0; i < n; ++i) mb[i] = w_block[i];
        if (store == STORE_STOCHASTIC)
            round_block_stochastic(w_block, pb, n, kind, at, k0);
        else
            for (int i = 0; i < n; ++i) pb[i] = round_nearest(w_block[i], kind);
    }
}

/* One block of compressed state the scalar way (any kind, either sqrt): the old state
   decoded (uint8), updated by update_block_cs, and the new encoded. `b`: its quant
   block in v_scale, u_scale. */
static inline __attribute__((always_inline)) void update_block_cs_scalar(
        void *restrict p, const void *restrict gr, void *restrict v, void *restrict u,
        float *restrict v_scale, float *restrict u_scale, float *restrict m, const int64_t first, const int64_t b,
        const int n, const float *restrict row, const float grad_scale, const int use_torch_sqrt, const int flags,
        const int kind, const int store, const int state_kind, const uint64_t at, const uint32_t k0) {
    float v_block[BLOCK] __attribute__((aligned(64)));
    float u_block[BLOCK] __attribute__((aligned(64)));
    if (state_kind == STATE_U8) {
        float v_old[BLOCK] __attribute__((aligned(64)));
        float u_old[BLOCK] __attribute__((aligned(64)));
        uint8_t *restrict vb = (uint8_t *)v + first, *restrict ub = (uint8_t *)u + first;
        u8_max_t v_max, u_max;
        u8_decode(vb, n, v_scale[b], v_old);
        u8_decode(ub, n, u_scale[b], u_old);
        update_block_cs(p, gr, v_old, u_old, m, first, n, row, grad_scale, use_torch_sqrt, flags, kind,
                        store, STATE_U8, at, k0, v_block, u_block, &v_max, &u_max);
        /* bf16 state's noise: one hash per element, its low half for v, its high half for u. */
        uint32_t noise[BLOCK] __attribute__((aligned(64)));
        const uint32_t noise_first = (uint32_t)at + hash32(k0);
        for (int i = 0; i < n; ++i) noise[i] = hash32(noise_first + (uint32_t)i);
        u8_codes(v_block, n, u8_encoding(v_max, &v_scale[b]), vb, noise, 0);
        u8_codes(u_block, n, u8_encoding(u_max, &u_scale[b]), ub, noise, 16);
    } else {
        uint16_t *restrict vb = (uint16_t *)v + first, *restrict ub = (uint16_t *)u + first;
        update_block_cs(p, gr, vb, ub, m, first, n, row, grad_scale, use_torch_sqrt, flags, kind, store,
                        STATE_BF16, at, k0, v_block, u_block, 0, 0);
        round_state_bf16(v_block, u_block, vb, ub, n, at, k0);
    }
}

#if defined(__AVX2__)
/* bf16 state: a block of n (a multiple of 8) elements of update_block_cs's one pass
   and round_state_bf16, by hand on 8 lanes in one loop (params of kind KIND_F32 or
   KIND_BF16, the IEEE sqrt): the noise's hash and the rounding overlap the divider's
   work instead of taking a pass of their own (16M fp32 params, one thread: 1.4 times
   the fp32-state step's time instead of 2.0). v, u: the block's state, rounded in
   place. */
static inline __attribute__((always_inline)) void update_block_cs8(
        void *restrict p, const void *restrict gr, uint16_t *restrict v, uint16_t *restrict u, float *restrict m,
        const int64_t first, const int n, const float *restrict row, const float grad_scale, const int flags,
        const int kind, const int store, const uint64_t at, const uint32_t k0) {
    const hparams8_t h = hparams8(row, grad_scale);
    /* The hash's inputs: the state index (mod 2**32) plus the seed's hash. */
    __m256i index = _mm256_add_epi32(_mm256_set1_epi32((int)((uint32_t)at + hash32(k0))),
                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    float w_block[BLOCK] __attribute__((aligned(64)));
    for (int i = 0; i < n; i += 8) {
        __m256 acc = widen8(u + i);
        const __m256 square = update8(p, gr, m, first + i, widen8(v + i), &acc, h, flags, kind, store, w_block + i);
        const __m256i noise = hash32x8(index);
        index = _mm256_add_epi32(index, _mm256_set1_epi32(8));
        store16x8(v + i, bf16_add_and_truncate8(square, _mm256_and_si256(noise, _mm256_set1_epi32(0xFFFF))));
        store16x8(u + i, bf16_add_and_truncate8(acc, _mm256_srli_epi32(noise, 16)));
    }
    if (kind != KIND_F32 && store == STORE_STOCHASTIC)
        round_block_stochastic(w_block, (uint16_t *)p + first, n, kind, at, k0);
}
#endif

#if defined(__AVX2__)
/* uint8 state, one software-pipelined loop per piece (params of kind KIND_F32 or
   KIND_BF16, the IEEE sqrt): each quant block's codes are decoded and updated in lanes,
   32 elements at a time, and its new values wait in a buffer to be encoded during the
   next block's update. The update is bound by the divider, the decoding and encoding
   by the vector units' multiplies and shifts; in passes of their own (update_cs's
   blocks) their times add up, in one loop they partly overlap. Where a block's new scale is
   2**(E - 127) with E in [37, 254] and its values are all finite and >= 0 (the largest
   one's bits below 0x7F800000), which most blocks are, its codes take fewer
   multiplies and shifts than u8_codes8's, with the same bits: a value w >=
   2**(E - 141) (x = w / scale >= 2**-14) has the code
   (bits(w) - ((E - 15) << 23) + 8 * noise) >> 19, u8_code's normal one; a smaller one
   (floor(w * 2**(164 - E)) + 8 * noise) >> 19, which is (floor(x * 2**34) + noise)
   >> 16: floor(x * 2**37) is 8 * floor(x * 2**34) + t, t < 8, and
   8 * (floor(x * 2**34) + noise) + t crosses no multiple of 2**19 that the sum
   without t does not. Decoding is u8_decode8's (F16C's). */
/* exponent << 23 as an int, where exponent - 127 is a power of two's (any int: the
   constants of a block that does not encode the fast way are computed, not used). */
static inline __attribute__((always_inline)) __m256i u8_exponent8(const int exponent) {
    return _mm256_set1_epi32((int)((uint32_t)exponent << 23));
}

/* E of a scale that u8_encoding made (2**(E - 127), 0 or NaN) where E is in
   [lowest, highest], else 0. */
static inline __attribute__((always_inline)) int u8_scale_exponent(const float scale, const int lowest,
                                                                   const int highest) {
    const int exponent = (int)(f32_to_bits(scale) >> 23);
    return exponent >= lowest && exponent <= highest ? exponent : 0;
}

/* How a block's values encode the fast way (see above): by a scale 2**(E - 127). */
typedef struct {
    __m256i offset; /* (E - 15) << 23 */
    __m256i below;  /* the bits of 2**(E - 141), less 1 */
    __m256 small;   /* 2**(164 - E) */
} u8_fast_encoding_t;

static inline __attribute__((always_inline)) u8_fast_encoding_t u8_fast_encoding(const int exponent) {
    const u8_fast_encoding_t e = {u8_exponent8(exponent - 15),
                                  _mm256_sub_epi32(u8_exponent8(exponent - 14), _mm256_set1_epi32(1)),
                                  _mm256_castsi256_ps(u8_exponent8(164 + 127 - exponent))};
    return e;
}

/* Codes of 32 values of both states the general way (u8_codes32), stored: noise[k]
   holds the hash of the elements 8k..8k+7, whose low half is square_avg's noise and
   high half acc_delta's. (A block of zero or NaN scale has only zero codes: its mask
   is 0.) */
static inline __attribute__((always_inline)) void u8_general_codes32(
        const float *restrict v, const float *restrict u, const u8_encoding_t v_encoding,
        const u8_encoding_t u_encoding, const __m256i noise[4], uint8_t *restrict v_codes,
        uint8_t *restrict u_codes) {
    __m256i high[4];
    for (int k = 0; k < 4; ++k) high[k] = _mm256_srli_epi32(noise[k], 16);
    if (v_encoding.mask) u8_codes32(v, _mm256_set1_ps(v_encoding.inverse), noise, 1, v_codes);
    else memset(v_codes, 0, 32);
    if (u_encoding.mask) u8_codes32(u, _mm256_set1_ps(u_encoding.inverse), high, 0, u_codes);
    else memset(u_codes, 0, 32);
}

/* A quant block's new values, waiting for their codes. */
typedef struct {
    float v[QUANT_BLOCK] __attribute__((aligned(64)));
    float u[QUANT_BLOCK] __attribute__((aligned(64)));
    u8_encoding_t v_encoding, u_encoding;
    u8_fast_encoding_t v_fast, u_fast;
    int fast; /* both encode the fast way */
    uint8_t *v_codes, *u_codes;
    __m256i index; /* the hash's inputs at the next 8 elements to encode */
    int n;
} u8_pending_t;

/* The codes of 32 values of a block encoded the fast way (see above), stored;
   noise8[k]: 8 * the noise of w[8k..8k+7]. round_up: u8_code's. */
static inline __attribute__((always_inline)) void u8_fast_codes32(const float *restrict w, const u8_fast_encoding_t e,
                                                                  const __m256i noise8[4], const int round_up,
                                                                  uint8_t *restrict codes) {
    const __m256i offset = e.offset, below = e.below;
    const __m256 small = e.small;
    __m256i c[4];
    for (int k = 0; k < 4; ++k) {
        const __m256 x = _mm256_loadu_ps(w + 8 * k);
        const __m256i bits = _mm256_castps_si256(x);
        const __m256i fixed = _mm256_cvttps_epi32(_mm256_mul_ps(x, small));
        const __m256i is_normal = _mm256_cmpgt_epi32(bits, below);
        const __m256i y = _mm256_blendv_epi8(fixed, _mm256_sub_epi32(bits, offset), is_normal);
        const __m256i noise = round_up ? _mm256_blendv_epi8(_mm256_set1_epi32(8 * U8_ROUND_UP), noise8[k], is_normal)
                                       : noise8[k];
        c[k] = _mm256_srli_epi32(_mm256_add_epi32(y, noise), 19);
    }
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3]));
    _mm256_storeu_si256((__m256i *)codes, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

/* Codes [from, from + 32) of a pending block, stored (the fast way where it can);
   called for from = 0, 32, ... in turn. */
static inline __attribute__((always_inline)) void u8_encode_pending32(u8_pending_t *restrict b, const int from) {
    __m256i noise[4];
    for (int k = 0; k < 4; ++k) noise[k] = hash32x8(_mm256_add_epi32(b->index, _mm256_set1_epi32(8 * k)));
    b->index = _mm256_add_epi32(b->index, _mm256_set1_epi32(32));
    __m256i low[4], high[4];
    if (b->fast) {
        for (int k = 0; k < 4; ++k) {
            /* 8 * each half: a shift and a mask (the shift units are the busier ones) */
            low[k] = _mm256_and_si256(_mm256_slli_epi32(noise[k], 3), _mm256_set1_epi32(0xFFFF << 3));
            high[k] = _mm256_and_si256(_mm256_srli_epi32(noise[k], 13), _mm256_set1_epi32(~7));
        }
        u8_fast_codes32(b->v + from, b->v_fast, low, 1, b->v_codes + from);
        u8_fast_codes32(b->u + from, b->u_fast, high, 0, b->u_codes + from);
        return;
    }
    u8_general_codes32(b->v + from, b->u + from, b->v_encoding, b->u_encoding, noise, b->v_codes + from,
                       b->u_codes + from);
}

/* A block's encoding from its values' largest bits (as unsigned: a negative value's
   or a NaN's are above every finite non-negative one's, and then its maxima are
   u8_max_add's over the values). *exponent: E of its scale 2**(E - 127) where its
   values are all finite and >= 0 and E is in [lowest, highest] (it encodes the fast
   way), else 0. */
static inline __attribute__((always_inline)) u8_encoding_t u8_encoding_of(const __m256i top, const float *restrict w,
                                                                          const int n, float *restrict scale,
                                                                          int *restrict exponent, const int lowest,
                                                                          const int highest) {
    uint32_t lanes[8] __attribute__((aligned(32)));
    _mm256_store_si256((__m256i *)lanes, top);
    uint32_t largest = 0;
    for (int k = 0; k < 8; ++k) largest = lanes[k] > largest ? lanes[k] : largest;
    u8_max_t max = {largest, (int32_t)largest};
    const int plain = largest < 0x7F800000u;
    if (!plain) {
        max.magnitude_max = 0; max.max_bits = 0;
        for (int i = 0; i < n; ++i) u8_max_add(&max, w[i]);
    }
    const u8_encoding_t encoding = u8_encoding(max, scale);
    *exponent = plain && encoding.mask ? u8_scale_exponent(*scale, lowest, highest) : 0;
    return encoding;
}

/* n_elements (a multiple of 32) of one piece: the loop described above. */
static inline __attribute__((always_inline)) void update_piece_u8x8(
        void *restrict p, const void *restrict gr, uint8_t *restrict v, uint8_t *restrict u,
        float *restrict v_scale, float *restrict u_scale, float *restrict m, const int64_t n_elements,
        const float *restrict row, const float grad_scale, const int flags, const int kind, const int store,
        const uint64_t index, const uint32_t k0) {
    const hparams8_t h = hparams8(row, grad_scale);
    const uint32_t key = hash32(k0);
    u8_pending_t pending[2];
    float w_block[QUANT_BLOCK] __attribute__((aligned(64)));
    u8_pending_t *last = 0; /* the pending block to encode, if any */
    for (int64_t first = 0, b = 0; first < n_elements; first += QUANT_BLOCK, ++b) {
        const int n = n_elements - first < QUANT_BLOCK ? (int)(n_elements - first) : QUANT_BLOCK;
        u8_pending_t *restrict next = &pending[b & 1];
        const int n_last = last ? last->n : 0;
        const __m256 v_old_scale = _mm256_set1_ps(v_scale[b]), u_old_scale = _mm256_set1_ps(u_scale[b]);
        __m256i v_top = _mm256_setzero_si256(), u_top = _mm256_setzero_si256();
        for (int i = 0; i < n; i += 32) {
            for (int k = i; k < i + 32; k += 8) {
                const int64_t e = first + k;
                const __m256 v_old = u8_decode8(v + e, v_old_scale);
                __m256 acc = u8_decode8(u + e, u_old_scale);
                const __m256 square = update8(p, gr, m, e, v_old, &acc, h, flags, kind, store, w_block + k);
                _mm256_store_ps(next->v + k, square);
                _mm256_store_ps(next->u + k, acc);
                v_top = _mm256_max_epu32(v_top, _mm256_castps_si256(square));
                u_top = _mm256_max_epu32(u_top, _mm256_castps_si256(acc));
            }
            if (i < n_last) u8_encode_pending32(last, i);
        }
        for (int i = n; i < n_last; i += 32) u8_encode_pending32(last, i);
        if (kind != KIND_F32 && store == STORE_STOCHASTIC)
            round_block_stochastic(w_block, (uint16_t *)p + first, n, kind, index + (uint64_t)first, k0);
        int v_new_exponent, u_new_exponent;
        next->v_encoding = u8_encoding_of(v_top, next->v, n, &v_scale[b], &v_new_exponent, 37, 254);
        next->u_encoding = u8_encoding_of(u_top, next->u, n, &u_scale[b], &u_new_exponent, 37, 254);
        next->fast = v_new_exponent && u_new_exponent;
        next->v_fast = u8_fast_encoding(v_new_exponent);
        next->u_fast = u8_fast_encoding(u_new_exponent);
        next->v_codes = v + first;
        next->u_codes = u + first;
        next->index = _mm256_add_epi32(_mm256_set1_epi32((int)((uint32_t)(index + (uint64_t)first) + key)),
                                       _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        next->n = n;
        last = next;
    }
    if (last)
        for (int i = 0; i < last->n; i += 32) u8_encode_pending32(last, i);
}
#endif

#if HAVE_AVX512
/* uint8 state with AVX-512: update_piece_u8x8's loop on 16 lanes. This CPU's
   (Zen 4's) 512-bit operations take a 256-bit unit twice, so the gain is in the
   instructions issued: half of them for the update, decoding and hashing, and fewer
   still for the codes, whose truncating multiply (an AVX-512 rounding override) makes
   both of u8_code's branches at once: where a block's scale is 2**(E - 127) with E
   <= 141 and its values are finite and >= 0, w * 2**(15 - E) rounded toward zero is
   x * 2**-112 (x = w / scale), exact from 2**-126 on, where its bits are
   bits(x) - (112 << 23) (u8_code's normal code before the noise), and below, a
   subnormal whose bits are floor(x * 2**37) = 8 * floor(x * 2**34) + t, t < 8:
   u8_code's subnormal one, as in update_piece_u8x8's fast way. So the code is
   (bits(t) + 8 * noise) >> 19 either way. (Subnormal results need flush-to-zero off:
   update_cs checks.) On a CPU without AVX-512 the 8-lane loop runs; in a test, the
   library built without it (tests/test_u8_state_cpu.py). */
DEFINE_ELEMENT(__m512, m512, _mm512_fmadd_ps, _mm512_sqrt_ps)

typedef struct {
    __m512 lr, rho, one_minus_rho, eps, weight_decay, grad_scale;
} hparams16_t;

static inline __attribute__((always_inline)) hparams16_t hparams16(const float *restrict row, const float grad_scale) {
    const hparams16_t h = {_mm512_set1_ps(row[LR]), _mm512_set1_ps(row[RHO]), _mm512_set1_ps(row[ONE_MINUS_RHO]),
                           _mm512_set1_ps(row[EPS]), _mm512_set1_ps(row[WEIGHT_DECAY]), _mm512_set1_ps(grad_scale)};
    return h;
}

/* widen8, round_nearest_bf16x8, store16x8 and hash32x8 on 16 lanes. */
static inline __attribute__((always_inline)) __m512 widen16(const uint16_t *src) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src)), 16));
}
static inline __attribute__((always_inline)) __m512i bf16_add_and_truncate16(const __m512 x, const __m512i addend) {
    const __m512i bits = _mm512_castps_si512(x);
    const __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_srli_epi32(_mm512_mask_or_epi32(_mm512_add_epi32(bits, addend), is_nan, bits,
                                                  _mm512_set1_epi32(0x400000)), 16);
}
static inline __attribute__((always_inline)) __m512i round_nearest_bf16x16(const __m512 x) {
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(x), 16), _mm512_set1_epi32(1));
    return bf16_add_and_truncate16(x, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
}
static inline __attribute__((always_inline)) void store16x16(uint16_t *dst, const __m512i x) {
    _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(x)); /* (each lane below 2**16) */
}
/* round_nearest_bf16x16 of 16 values, stored. With AVX512_BF16, vcvtneps2bf16 rounds
   the same way (to nearest even; a NaN quieted, its bits | 0x400000, truncated) but
   for zeros and subnormals, whose result it flushes to a signed zero: lanes whose
   exponent is 0 take the bits' way. */
static inline __attribute__((always_inline)) void store_nearest_bf16x16(uint16_t *dst, const __m512 x) {
#if defined(__AVX512BF16__)
    const __mmask16 tiny = _mm512_testn_epi32_mask(_mm512_castps_si512(x), _mm512_set1_epi32(0x7F800000));
    if (__builtin_expect(tiny == 0, 1)) {
        _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(x));
        return;
    }
#endif
    store16x16(dst, round_nearest_bf16x16(x));
}
static inline __attribute__((always_inline)) __m512i hash32x16(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x7FEB352Du));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846CA68Bu));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

/* u8_decode8 of 16 codes. */
static inline __attribute__((always_inline)) __m512 u8_decode16(const uint8_t *codes, const __m512 scale) {
    const __m256i halves = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)codes)), 6);
    return _mm512_mul_ps(scale, _mm512_cvtph_ps(halves));
}

/* update8 on 16 lanes. */
static inline __attribute__((always_inline)) __m512 update16(
        void *restrict p, const void *restrict gr, float *restrict m, const int64_t e, const __m512 v,
        __m512 *restrict u, const hparams16_t h, const int flags, const int kind, const int store,
        float *restrict w_slot) {
    __m512 w = store == STORE_MASTER ? _mm512_loadu_ps(m + e)
             : kind == KIND_F32      ? _mm512_loadu_ps((const float *)p + e)
                                     : widen16((const uint16_t *)p + e);
    const __m512 grad = kind == KIND_F32 ? _mm512_loadu_ps((const float *)gr + e) : widen16((const uint16_t *)gr + e);
    const __m512 g = grad_m512(grad, w, h.grad_scale, h.weight_decay, flags);
    const __m512 square = square_m512(g, v, h.rho, h.one_minus_rho);
    apply_m512(delta_m512(g, square, *u, h.eps), u, &w, h.rho, h.one_minus_rho, h.lr, flags);
    if (kind == KIND_F32) {
        _mm512_storeu_ps((float *)p + e, w);
    } else {
        if (store == STORE_MASTER) _mm512_storeu_ps(m + e, w);
        if (store == STORE_STOCHASTIC) _mm512_store_ps(w_slot, w);
        else store_nearest_bf16x16((uint16_t *)p + e, w);
    }
    return square;
}

/* update_block_cs8 on 16 lanes (n: a multiple of 16). */
static inline __attribute__((always_inline)) void update_block_cs16(
        void *restrict p, const void *restrict gr, uint16_t *restrict v, uint16_t *restrict u, float *restrict m,
        const int64_t first, const int n, const float *restrict row, const float grad_scale, const int flags,
        const int kind, const int store, const uint64_t at, const uint32_t k0) {
    const hparams16_t h = hparams16(row, grad_scale);
    __m512i index = _mm512_add_epi32(_mm512_set1_epi32((int)((uint32_t)at + hash32(k0))),
                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    float w_block[BLOCK] __attribute__((aligned(64)));
    for (int i = 0; i < n; i += 16) {
        __m512 acc = widen16(u + i);
        const __m512 square = update16(p, gr, m, first + i, widen16(v + i), &acc, h, flags, kind, store, w_block + i);
        const __m512i noise = hash32x16(index);
        index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
        store16x16(v + i, bf16_add_and_truncate16(square, _mm512_and_si512(noise, _mm512_set1_epi32(0xFFFF))));
        store16x16(u + i, bf16_add_and_truncate16(acc, _mm512_srli_epi32(noise, 16)));
    }
    if (kind != KIND_F32 && store == STORE_STOCHASTIC)
        round_block_stochastic(w_block, (uint16_t *)p + first, n, kind, at, k0);
}

/* A quant block's new values, waiting for their codes (u8_pending_t's, for 16 lanes). */
typedef struct {
    float v[QUANT_BLOCK] __attribute__((aligned(64)));
    float u[QUANT_BLOCK] __attribute__((aligned(64)));
    u8_encoding_t v_encoding, u_encoding;
    __m512 v_factor, u_factor; /* 2**(15 - E) of each scale 2**(E - 127), where fast */
    int fast;                  /* both encode by the truncating multiply */
    uint8_t *v_codes, *u_codes;
    __m512i index;             /* the hash's inputs at the next 16 elements to encode */
    int n;
} u8_pending16_t;

/* 2**(15 - E) where E is in [1, 141], a normal fp32 (else anything: not used). A
   block of a larger scale, rare, encodes the general way (u8_codes32). */
static inline __attribute__((always_inline)) __m512 u8_truncating_factor(const int exponent) {
    return _mm512_castsi512_ps(_mm512_set1_epi32((int)((uint32_t)(142 - exponent) << 23)));
}

/* The codes of 32 values of a block encoded by the truncating multiply (see above),
   stored; noise8[k]: 8 * the noise of w[16k..16k+15]. round_up: u8_code's (below
   2**-14, the product is a subnormal: its bits below 1 << 23).
   On Zen 4 a multiply whose product in any lane is subnormal, or at 2**-126, costs
   about 3 ns more (scratch probe: a block with one subnormal code in each 16 lanes
   encodes in 1.8x the time), and it is why bench_step's constant grads, which leave
   ~1% of square_avg's codes subnormal, take longer than fresh ones. Lanes below
   2**-125 taken the integer way (a variable shift of the mantissa) behind a branch
   cost more than that, both with and without such codes. Whole blocks with such
   values taken the integer way (e488d4b, reverted) gave 0.92-0.95x the time in cache
   but 1.03-1.05x at 16M params on 2 threads, where the target is measured. Masking
   such lanes out of the multiply, behind a branch per 32 values, and converting
   w * 2**(164 - E) to an integer for them instead (the same bits; the patch is in
   perf/results/ab_native_u8_masked_small_lanes): 0.98-1.00x under bench_step's fixed
   grads but 1.00-1.03x under fresh ones (perf/ab_native.py --grads, 16M params, 2
   threads), where few lanes are small and the branch is overhead; not taken. */
static inline __attribute__((always_inline)) void u8_truncated_codes32(const float *restrict w, const __m512 factor,
                                                                       const __m512i noise8[2], const int round_up,
                                                                       uint8_t *restrict codes) {
    __m512i c[2];
    for (int k = 0; k < 2; ++k) {
        const __m512i t = _mm512_castps_si512(_mm512_mul_round_ps(_mm512_loadu_ps(w + 16 * k), factor,
                                                                  _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));
        const __m512i noise = round_up ? _mm512_mask_mov_epi32(noise8[k],
                                                               _mm512_cmplt_epu32_mask(t, _mm512_set1_epi32(1 << 23)),
                                                               _mm512_set1_epi32(8 * U8_ROUND_UP))
                                       : noise8[k];
        c[k] = _mm512_srli_epi32(_mm512_add_epi32(t, noise), 19);
    }
    /* Each code is below 256, its lane's low byte. With AVX512_VBMI one two-source byte
       permute gathers those of c[0] and c[1]: perf/ab_native.py
       (perf/results/ab_native_u8_byte_permute*). Else packs, each within 128-bit lanes
       (lane l ends with the bytes of c[0]'s and c[1]'s lane l, twice over), and a
       permute that gathers the first copy of each. */
#if HAVE_AVX512_VBMI
    const __m512i low_bytes = _mm512_set_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        124, 120, 116, 112, 108, 104, 100, 96, 92, 88, 84, 80, 76, 72, 68, 64,
        60, 56, 52, 48, 44, 40, 36, 32, 28, 24, 20, 16, 12, 8, 4, 0);
    _mm256_storeu_si256((__m256i *)codes, _mm512_castsi512_si256(_mm512_permutex2var_epi8(c[0], low_bytes, c[1])));
#else
    const __m512i words = _mm512_packus_epi32(c[0], c[1]);
    const __m512i bytes = _mm512_packus_epi16(words, words);
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm256_storeu_si256((__m256i *)codes, _mm512_castsi512_si256(_mm512_permutexvar_epi32(order, bytes)));
#endif
}

/* Codes [from, from + 32) of a pending block, stored; called for from = 0, 32, ... in turn. */
static inline __attribute__((always_inline)) void u8_encode_pending16(u8_pending16_t *restrict b, const int from) {
    const __m512i noise[2] = {hash32x16(b->index), hash32x16(_mm512_add_epi32(b->index, _mm512_set1_epi32(16)))};
    b->index = _mm512_add_epi32(b->index, _mm512_set1_epi32(32));
    if (b->fast) {
        __m512i low[2], high[2];
        for (int k = 0; k < 2; ++k) {
            low[k] = _mm512_and_si512(_mm512_slli_epi32(noise[k], 3), _mm512_set1_epi32(0xFFFF << 3));
            high[k] = _mm512_and_si512(_mm512_srli_epi32(noise[k], 13), _mm512_set1_epi32(~7));
        }
        u8_truncated_codes32(b->v + from, b->v_factor, low, 1, b->v_codes + from);
        u8_truncated_codes32(b->u + from, b->u_factor, high, 0, b->u_codes + from);
        return;
    }
    __m256i quarters[4]; /* (the general way is on 8 lanes) */
    for (int k = 0; k < 4; ++k)
        quarters[k] = k & 1 ? _mm512_extracti64x4_epi64(noise[k >> 1], 1) : _mm512_castsi512_si256(noise[k >> 1]);
    u8_general_codes32(b->v + from, b->u + from, b->v_encoding, b->u_encoding, quarters, b->v_codes + from,
                       b->u_codes + from);
}

/* The largest of 16 lanes' bits, in 8 lanes (u8_encoding_of's input). */
static inline __attribute__((always_inline)) __m256i u8_top8(const __m512i top) {
    return _mm256_max_epu32(_mm512_castsi512_si256(top), _mm512_extracti64x4_epi64(top, 1));
}

/* Prefetch of the lines that the 16-lane loop reads U8_PREFETCH_AHEAD elements on
   (params or master copy, grads, and each 64th element's codes): the loop is bound by
   its instructions, whose queue fills with the divider's work, so its loads issue late
   and the hardware prefetcher alone leaves it waiting on memory, though it moves far
   less than the bandwidth. perf/ab_native.py (perf/results/ab_native_u8_prefetch*):
   0.97x with it at 16M params on 2 threads and 0.97-0.98x at 1M on one (8-bit state,
   fp32 or bf16 params; 1.01x with stochastic rounding). 1024 ahead was no better,
   prefetchw no different.
   (Lines past a piece's end are only hints: a prefetch never faults.) */
#define U8_PREFETCH_AHEAD 512
static inline __attribute__((always_inline)) void u8_prefetch(const void *p, const void *gr, const float *m,
                                                              const uint8_t *v, const uint8_t *u, const int64_t e,
                                                              const int kind, const int store) {
    if (store == STORE_MASTER) {
        _mm_prefetch((const char *)(m + e), _MM_HINT_T0);
        _mm_prefetch((const char *)(m + e + 16), _MM_HINT_T0);
    }
    if (kind == KIND_F32) {
        _mm_prefetch((const char *)((const float *)p + e), _MM_HINT_T0);
        _mm_prefetch((const char *)((const float *)p + e + 16), _MM_HINT_T0);
        _mm_prefetch((const char *)((const float *)gr + e), _MM_HINT_T0);
        _mm_prefetch((const char *)((const float *)gr + e + 16), _MM_HINT_T0);
    } else {
        _mm_prefetch((const char *)((const uint16_t *)p + e), _MM_HINT_T0);
        _mm_prefetch((const char *)((const uint16_t *)gr + e), _MM_HINT_T0);
    }
    if ((e & 63) == 0) {
        _mm_prefetch((const char *)(v + e), _MM_HINT_T0);
        _mm_prefetch((const char *)(u + e), _MM_HINT_T0);
    }
}

/* n_elements (a multiple of 32) of one piece: update_piece_u8x8's loop on 16 lanes. */
static inline __attribute__((always_inline)) void update_piece_u8x16(
        void *restrict p, const void *restrict gr, uint8_t *restrict v, uint8_t *restrict u,
        float *restrict v_scale, float *restrict u_scale, float *restrict m, const int64_t n_elements,
        const float *restrict row, const float grad_scale, const int flags, const int kind, const int store,
        const uint64_t index, const uint32_t k0) {
    const hparams16_t h = hparams16(row, grad_scale);
    const uint32_t key = hash32(k0);
    u8_pending16_t pending[2];
    float w_block[QUANT_BLOCK] __attribute__((aligned(64)));
    u8_pending16_t *last = 0; /* the pending block to encode, if any */
    for (int64_t first = 0, b = 0; first < n_elements; first += QUANT_BLOCK, ++b) {
        const int n = n_elements - first < QUANT_BLOCK ? (int)(n_elements - first) : QUANT_BLOCK;
        u8_pending16_t *restrict next = &pending[b & 1];
        const int n_last = last ? last->n : 0;
        const __m512 v_old_scale = _mm512_set1_ps(v_scale[b]), u_old_scale = _mm512_set1_ps(u_scale[b]);
        __m512i v_top = _mm512_setzero_si512(), u_top = _mm512_setzero_si512();
        for (int i = 0; i < n; i += 32) {
            u8_prefetch(p, gr, m, v, u, first + i + U8_PREFETCH_AHEAD, kind, store);
            for (int k = i; k < i + 32; k += 16) {
                const int64_t e = first + k;
                const __m512 v_old = u8_decode16(v + e, v_old_scale);
                __m512 acc = u8_decode16(u + e, u_old_scale);
                const __m512 square = update16(p, gr, m, e, v_old, &acc, h, flags, kind, store, w_block + k);
                _mm512_store_ps(next->v + k, square);
                _mm512_store_ps(next->u + k, acc);
                v_top = _mm512_max_epu32(v_top, _mm512_castps_si512(square));
                u_top = _mm512_max_epu32(u_top, _mm512_castps_si512(acc));
            }
            if (i < n_last) u8_encode_pending16(last, i);
        }
        for (int i = n; i < n_last; i += 32) u8_encode_pending16(last, i);
        if (kind != KIND_F32 && store == STORE_STOCHASTIC)
            round_block_stochastic(w_block, (uint16_t *)p + first, n, kind, index + (uint64_t)first, k0);
        int v_new_exponent, u_new_exponent;
        next->v_encoding = u8_encoding_of(u8_top8(v_top), next->v, n, &v_scale[b], &v_new_exponent, 1, 141);
        next->u_encoding = u8_encoding_of(u8_top8(u_top), next->u, n, &u_scale[b], &u_new_exponent, 1, 141);
        next->fast = v_new_exponent && u_new_exponent;
        next->v_factor = u8_truncating_factor(v_new_exponent);
        next->u_factor = u8_truncating_factor(u_new_exponent);
        next->v_codes = v + first;
        next->u_codes = u + first;
        next->index = _mm512_add_epi32(_mm512_set1_epi32((int)((uint32_t)(index + (uint64_t)first) + key)),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        next->n = n;
        last = next;
    }
    if (last)
        for (int i = 0; i < last->n; i += 32) u8_encode_pending16(last, i);
}

/* Whether uint8 state's 16-lane loop runs on the calling thread: its truncating
   multiply needs subnormal results, so not under flush-to-zero or
   denormals-are-zero, where the 8-lane loop gives the same bits. */
static inline int u8_wide_loop_now(void) {
    return (_mm_getcsr() & (_MM_FLUSH_ZERO_ON | _MM_DENORMALS_ZERO_ON)) == 0;
}
#endif

#if IN_MAIN_PART
/* The lanes that uint8 state's loop takes on the calling thread now (tests read it). */
int adadelta_u8_lanes_now(void) {
#if HAVE_AVX512
    if (!u8_wide_loop_now()) return 8;
#endif
    return adadelta_u8_lanes;
}
#endif

/* n elements of one piece with compressed state (v, u: at the piece's state; uint8:
   v_scale, u_scale at its first quant block, which starts the piece): block by
   block, the old state decoded, updated, and the new encoded (bf16: its blocks of
   BLOCK; uint8: of QUANT_BLOCK, whose scales are the blocks' maxima's). */
static inline __attribute__((always_inline)) void update_cs(
        void *restrict p, const void *restrict gr, void *restrict v, void *restrict u,
        float *restrict v_scale, float *restrict u_scale, float *restrict m, const int64_t n_elements,
        const float *restrict row, const float grad_scale, const int use_torch_sqrt, const int flags,
        const int kind, const int store, const int state_kind, const uint64_t index, const uint32_t k0) {
    const int64_t step = state_kind == STATE_U8 ? QUANT_BLOCK : BLOCK;
    int64_t first = 0, b = 0;
#if defined(__AVX2__)
    if (state_kind == STATE_U8 && !use_torch_sqrt && (kind == KIND_F32 || kind == KIND_BF16)) {
        /* Every quant block of a piece but its last is whole: the loop takes them all,
           or all but a last block of a length off 32. */
        const int64_t tail = n_elements % QUANT_BLOCK;
        first = tail % 32 == 0 ? n_elements : n_elements - tail;
        b = first / QUANT_BLOCK;
#if HAVE_AVX512
        if (u8_wide_loop_now())
            update_piece_u8x16(p, gr, (uint8_t *)v, (uint8_t *)u, v_scale, u_scale, m, first, row, grad_scale,
                               flags, kind, store, index, k0);
        else
#endif
        update_piece_u8x8(p, gr, (uint8_t *)v, (uint8_t *)u, v_scale, u_scale, m, first, row, grad_scale, flags,
                          kind, store, index, k0);
    }
#endif
    for (; first < n_elements; first += step, ++b) {
        const int n = n_elements - first < step ? (int)(n_elements - first) : (int)step;
#if defined(__AVX2__)
        /* (Only a piece's last block is off 8 elements.) uint8 state's decoding and
           encoding in this loop, block by block, made the step slower (its 50-odd more
           instructions per 8 elements outweigh the divider): update_piece_u8x8 above
           encodes each block during the next one's update instead. */
        if (state_kind == STATE_BF16 && !use_torch_sqrt && (kind == KIND_F32 || kind == KIND_BF16) && n % 8 == 0) {
#if HAVE_AVX512
            if (n % 16 == 0) {
                update_block_cs16(p, gr, (uint16_t *)v + first, (uint16_t *)u + first, m, first, n, row, grad_scale,
                                  flags, kind, store, index + (uint64_t)first, k0);
                continue;
            }
#endif
            update_block_cs8(p, gr, (uint16_t *)v + first, (uint16_t *)u + first, m, first, n, row, grad_scale,
                             flags, kind, store, index + (uint64_t)first, k0);
            continue;
        }
#endif
        update_block_cs_scalar(p, gr, v, u, v_scale, u_scale, m, first, b, n, row, grad_scale, use_torch_sqrt,
                               flags, kind, store, state_kind, index + (uint64_t)first, k0);
    }
}

/* One function per (kind, store) for the flags most runs have: none, and weight
   decay alone, each vectorized without branches; one more takes any flags at run
   time. Functions of their own: one switch over all of them took the compiler
   minutes (its PRE pass grows faster than the function), and a variant per flag
   combination, as the fp32 loop has, 8 s more per build. Every variant takes its
   buffers untyped, so that one share runner serves fp32, bf16 and uint8 state
   (v_scale, u_scale: uint8 state's, at the piece's first quant block; else NULL). */
#define N_FLAG_VARIANTS 3
typedef void (*update_lowp_fn)(void *, const void *, void *, void *, float *, float *, float *, int64_t,
                               const float *, float, int, int, int, uint64_t, uint32_t);
#define LOWP_VARIANT(KIND, STORE, NAME, FLAGS)                                        \
    static __attribute__((noinline)) void update_lowp_##KIND##_##STORE##_##NAME(      \
            void *p, const void *g, void *v, void *u, float *v_scale, float *u_scale, \
            float *m, int64_t n, const float *row, float grad_scale,                  \
            int use_torch_sqrt, int flags, int streaming, uint64_t index,             \
            uint32_t k0) {                                                            \
        (void)flags; (void)v_scale; (void)u_scale;                                    \
        update_lowp((uint16_t *)p, (const uint16_t *)g, (float *)v, (float *)u, m, n, \
                    row, grad_scale, use_torch_sqrt, FLAGS, KIND, STORE,              \
                    STORE == STORE_MASTER && streaming, index, k0);                   \
    }
#define LOWP_STORE_VARIANTS(KIND, STORE)                                              \
    LOWP_VARIANT(KIND, STORE, plain, 0)                                               \
    LOWP_VARIANT(KIND, STORE, decay, FLAG_WEIGHT_DECAY)                               \
    LOWP_VARIANT(KIND, STORE, any, flags)
#define LOWP_KIND(KIND)                                                               \
    LOWP_STORE_VARIANTS(KIND, STORE_NEAREST) LOWP_STORE_VARIANTS(KIND, STORE_MASTER)  \
    LOWP_STORE_VARIANTS(KIND, STORE_STOCHASTIC)
#define LOWP_STORE_NAMES(KIND, STORE)                                                 \
    { update_lowp_##KIND##_##STORE##_plain, update_lowp_##KIND##_##STORE##_decay,     \
      update_lowp_##KIND##_##STORE##_any }
#define LOWP_KIND_NAMES(KIND)                                                         \
    { LOWP_STORE_NAMES(KIND, STORE_NEAREST), LOWP_STORE_NAMES(KIND, STORE_MASTER),    \
      LOWP_STORE_NAMES(KIND, STORE_STOCHASTIC) }

#if IN_MAIN_PART
LOWP_KIND(KIND_BF16)
#if HAVE_F16
LOWP_KIND(KIND_F16)
#endif
/* [kind][store][0: no flags, 1: weight decay alone, 2: any] */
static const update_lowp_fn update_lowp_variants[N_KINDS][N_STORES][N_FLAG_VARIANTS] = {
    LOWP_KIND_NAMES(KIND_BF16),
#if HAVE_F16
    LOWP_KIND_NAMES(KIND_F16),
#endif
};
#endif

/* Compressed state: one function per (state, kind, store) taking any flags at run
   time, and for uint8 state, as for fp32 state, one without flags and one with
   weight decay alone. bf16 state's fused vector loop takes the flags as selects (a
   variant without flags made the build 0.6 s longer for little, with Philox noise); uint8
   state's update is one vectorized loop, in which runtime flags cost selects and
   blends (16M fp32 params, 2 threads: 9.8 ms instead of 12.1 with weight decay, the
   two variants 1.5 s of the build). fp32 params store only one way. */
#define CS_VARIANT(STATE, KIND, STORE, NAME, FLAGS)                                   \
    static __attribute__((noinline)) void update_cs_##STATE##_##KIND##_##STORE##_##NAME( \
            void *p, const void *g, void *v, void *u, float *v_scale, float *u_scale, \
            float *m, int64_t n, const float *row, float grad_scale,                  \
            int use_torch_sqrt, int flags, int streaming, uint64_t index,             \
            uint32_t k0) {                                                            \
        (void)flags; (void)streaming;                                                 \
        update_cs(p, g, v, u, v_scale, u_scale, m, n, row, grad_scale,                \
                  use_torch_sqrt, FLAGS, KIND, STORE, STATE, index, k0);              \
    }
/* The variants of a (state, kind, store), and their names in a variants table:
   [0: no flags, 1: weight decay alone, 2: any]. */
#define CS_STORE_STATE_BF16(KIND, STORE) CS_VARIANT(STATE_BF16, KIND, STORE, any, flags)
#define CS_NAMES_STATE_BF16(KIND, STORE)                                              \
    { update_cs_STATE_BF16_##KIND##_##STORE##_any, update_cs_STATE_BF16_##KIND##_##STORE##_any, \
      update_cs_STATE_BF16_##KIND##_##STORE##_any }
#define CS_STORE_STATE_U8(KIND, STORE)                                                \
    CS_VARIANT(STATE_U8, KIND, STORE, plain, 0) CS_VARIANT(STATE_U8, KIND, STORE, decay, FLAG_WEIGHT_DECAY) \
    CS_VARIANT(STATE_U8, KIND, STORE, any, flags)
#define CS_NAMES_STATE_U8(KIND, STORE)                                                \
    { update_cs_STATE_U8_##KIND##_##STORE##_plain, update_cs_STATE_U8_##KIND##_##STORE##_decay, \
      update_cs_STATE_U8_##KIND##_##STORE##_any }
#define CS_KIND(STATE, KIND)                                                          \
    CS_STORE_##STATE(KIND, STORE_NEAREST) CS_STORE_##STATE(KIND, STORE_MASTER)        \
    CS_STORE_##STATE(KIND, STORE_STOCHASTIC)
#define CS_KIND_NAMES(STATE, KIND)                                                    \
    { CS_NAMES_##STATE(KIND, STORE_NEAREST), CS_NAMES_##STATE(KIND, STORE_MASTER),    \
      CS_NAMES_##STATE(KIND, STORE_STOCHASTIC) }
/* Every kind's variants of one state; KIND_F32 runs STORE_NEAREST only (the entry
   points refuse the rest). [kind][store][flags variant] */
#if HAVE_F16
#define CS_STATE(STATE)                                                               \
    CS_KIND(STATE, KIND_BF16) CS_KIND(STATE, KIND_F16) CS_STORE_##STATE(KIND_F32, STORE_NEAREST) \
    SHARED const update_lowp_fn update_cs_variants_##STATE[N_KINDS + 1][N_STORES][N_FLAG_VARIANTS] = { \
        CS_KIND_NAMES(STATE, KIND_BF16), CS_KIND_NAMES(STATE, KIND_F16),            \
        { CS_NAMES_##STATE(KIND_F32, STORE_NEAREST) } };
#else
#define CS_STATE(STATE)                                                               \
    CS_KIND(STATE, KIND_BF16) CS_STORE_##STATE(KIND_F32, STORE_NEAREST)               \
    SHARED const update_lowp_fn update_cs_variants_##STATE[N_KINDS + 1][N_STORES][N_FLAG_VARIANTS] = { \
        CS_KIND_NAMES(STATE, KIND_BF16), {{0}},                                       \
        { CS_NAMES_##STATE(KIND_F32, STORE_NEAREST) } };
#endif

extern SHARED const update_lowp_fn update_cs_variants_STATE_BF16[N_KINDS + 1][N_STORES][N_FLAG_VARIANTS];
extern SHARED const update_lowp_fn update_cs_variants_STATE_U8[N_KINDS + 1][N_STORES][N_FLAG_VARIANTS];
/* (bf16 state's loops in the main part: the two parts take about as long to build.) */
#if IN_MAIN_PART
CS_STATE(STATE_BF16)
#endif
#if IN_CS_PART
CS_STATE(STATE_U8)
#endif

#if IN_MAIN_PART

/* A share (see run_share_f32): the pieces it spans, each through the variant of its
   group's flags in the share's table. */
static void *run_share_lowp(void *arg) {
    const share_t *s = (const share_t *)arg;
    const int64_t *table = s->table, n_pieces = s->n_pieces;
    const float *hparams = (const float *)s->hparams;
    const update_lowp_fn (*variants)[N_FLAG_VARIANTS] = (const update_lowp_fn (*)[N_FLAG_VARIANTS])s->variants;
    char *square_avg = (char *)s->square_avg, *acc_delta = (char *)s->acc_delta;
    float *master = (float *)s->master;
    int64_t offset = s->offset, left = s->count;
    for (int64_t k = s->piece; k < n_pieces && left > 0; ++k, offset = 0) {
        const int64_t numel = table[NUMEL_ROW * n_pieces + k];
        const int64_t n = numel - offset < left ? numel - offset : left;
        if (n <= 0) continue;
        left -= n;
        const float *row = hparams + table[GROUP_ROW * n_pieces + k] * N_HPARAMS;
        const int flags = GROUP_FLAGS(s->has_grad_scale, row);
        const int64_t state = table[STATE_ROW * n_pieces + k] + offset;
        const int variant = flags == 0 ? 0 : flags == FLAG_WEIGHT_DECAY ? 1 : 2;
        /* (uint8 state: `state` starts a quant block, as run_step splits the table.) */
        float *v_scale = s->square_avg_scale ? s->square_avg_scale + state / QUANT_BLOCK : 0;
        float *u_scale = s->acc_delta_scale ? s->acc_delta_scale + state / QUANT_BLOCK : 0;
        variants[s->store][variant](
            (char *)(intptr_t)table[PARAM_ROW * n_pieces + k] + offset * s->param_bytes,
            (const char *)(intptr_t)table[GRAD_ROW * n_pieces + k] + offset * s->param_bytes,
            square_avg + state * s->state_bytes, acc_delta + state * s->state_bytes, v_scale, u_scale,
            master ? master + state : 0, n, row, (float)s->grad_scale, s->use_torch_sqrt, flags,
            s->total >= STREAMING_MIN_ELEMENTS, (uint64_t)state, s->key0);
    }
#if defined(__AVX2__)
    _mm_sfence();  /* the streaming stores are seen before the step returns */
#endif
    return 0;
}

/* One step over a table of bf16 (kind 0) or fp16 (kind 1) params with fp32 state,
   as adadelta_step_f32 (the same arguments and returns), plus: master, the fp32
   master copy (NULL unless store is STORE_MASTER), store (STORE_*) and the seed of
   the stochastic rounding. Returns -2, writing nothing, for a kind or store this
   library cannot run. */
int adadelta_step_lowp(const int64_t *table, int64_t n_pieces, float *square_avg,
        float *acc_delta, float *master, int64_t n_state, const float *hparams, int64_t n_groups,
        const float *grad_scale_ptr, const float *found_inf_ptr, int max_threads,
        int64_t parallel_min_elements, int use_torch_sqrt, int kind, int store, int64_t seed) {
    if (kind < 0 || kind >= N_KINDS || (kind == KIND_F16 && !HAVE_F16)) return -2;
    if (store < 0 || store >= N_STORES || (store == STORE_MASTER) != (master != 0)) return -2;
    if (found_inf_ptr && *found_inf_ptr != 0) return 1;
    share_t proto = share_proto(table, n_pieces, square_avg, acc_delta, hparams, grad_scale_ptr != 0,
        grad_scale_ptr ? (double)*grad_scale_ptr : 1.0, use_torch_sqrt, run_share_lowp);
    proto.master = master; proto.kind = kind; proto.store = store;
    proto.key0 = (uint32_t)(uint64_t)seed;
    proto.variants = update_lowp_variants[kind];
    proto.param_bytes = 2; proto.state_bytes = 4;
    /* 32 elements: a 64-byte line of params, two of state. */
    return run_step(&proto, n_state, n_groups, 32, 0, max_threads, parallel_min_elements);
}

/* A compressed-state step's checks and share prototype (bf16 or uint8 state). */
static int cs_proto(share_t *proto, const int64_t *table, int64_t n_pieces, void *square_avg, void *acc_delta,
        float *master, const float *hparams, const float *grad_scale_ptr, int use_torch_sqrt, int kind, int store,
        int64_t seed) {
    if (kind < 0 || kind > KIND_F32 || (kind == KIND_F16 && !HAVE_F16)) return -2;
    if (store < 0 || store >= N_STORES || (store == STORE_MASTER) != (master != 0)) return -2;
    if (kind == KIND_F32 && store != STORE_NEAREST) return -2;
    *proto = share_proto(table, n_pieces, square_avg, acc_delta, hparams, grad_scale_ptr != 0,
        grad_scale_ptr ? (double)*grad_scale_ptr : 1.0, use_torch_sqrt, run_share_lowp);
    proto->master = master; proto->kind = kind; proto->store = store;
    proto->key0 = (uint32_t)(uint64_t)seed;
    proto->param_bytes = kind == KIND_F32 ? 4 : 2;
    return 0;
}

/* One step with bf16 state (square_avg, acc_delta: bf16 bits), as adadelta_step_lowp
   (the same arguments and returns), for params of kind KIND_BF16, KIND_F16 or
   KIND_F32 (fp32 params: store STORE_NEAREST, which stores them exactly). */
int adadelta_step_bf16_state(const int64_t *table, int64_t n_pieces, uint16_t *square_avg,
        uint16_t *acc_delta, float *master, int64_t n_state, const float *hparams, int64_t n_groups,
        const float *grad_scale_ptr, const float *found_inf_ptr, int max_threads,
        int64_t parallel_min_elements, int use_torch_sqrt, int kind, int store, int64_t seed) {
    share_t proto;
    const int refused = cs_proto(&proto, table, n_pieces, square_avg, acc_delta, master, hparams,
                                 grad_scale_ptr, use_torch_sqrt, kind, store, seed);
    if (refused) return refused;
    if (found_inf_ptr && *found_inf_ptr != 0) return 1;
    proto.variants = update_cs_variants_STATE_BF16[kind];
    proto.state_bytes = 2;
    /* 32 elements: a 64-byte line of bf16 state (and of 16-bit params). */
    return run_step(&proto, n_state, n_groups, 32, 0, max_threads, parallel_min_elements);
}

/* One step with uint8 state (square_avg, acc_delta: codes; square_avg_scale,
   acc_delta_scale: n_state / QUANT_BLOCK fp32 scales), as adadelta_step_bf16_state
   (the same arguments, kinds, stores and returns). n_state must be a multiple of
   QUANT_BLOCK and every piece must start at one, else -1 (nothing written). */
int adadelta_step_u8_state(const int64_t *table, int64_t n_pieces, uint8_t *square_avg,
        uint8_t *acc_delta, float *square_avg_scale, float *acc_delta_scale, float *master, int64_t n_state,
        const float *hparams, int64_t n_groups, const float *grad_scale_ptr, const float *found_inf_ptr,
        int max_threads, int64_t parallel_min_elements, int use_torch_sqrt, int kind, int store, int64_t seed) {
    share_t proto;
    const int refused = cs_proto(&proto, table, n_pieces, square_avg, acc_delta, master, hparams,
                                 grad_scale_ptr, use_torch_sqrt, kind, store, seed);
    if (refused) return refused;
    if (!square_avg_scale || !acc_delta_scale) return -2;
    if (found_inf_ptr && *found_inf_ptr != 0) return 1;
    if (n_state % QUANT_BLOCK != 0) return -1;
    proto.variants = update_cs_variants_STATE_U8[kind];
    proto.state_bytes = 1;
    proto.square_avg_scale = square_avg_scale; proto.acc_delta_scale = acc_delta_scale;
    /* Shares of whole quant blocks (see run_step). */
    return run_step(&proto, n_state, n_groups, QUANT_BLOCK, QUANT_BLOCK, max_threads, parallel_min_elements);
}
#endif
