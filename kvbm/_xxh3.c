/*
 * kvbm._xxh3 -- native hot loop for kvbm.hashing.
 *
 * A from-scratch, scalar implementation of XXH3-64 (xxHash v0.8 output format), bit-exact
 * with xxhash.xxh3_64_intdigest for every input length and seed, plus the two loops that
 * kvbm.hashing needs:
 *
 *   local_hashes(buf, step, seed, first_seed) -> list[int]
 *       xxh3_64 of each consecutive `step`-byte slice of `buf`; slice 0 uses `first_seed`.
 *   chain(local, parent) -> list[int]
 *       sequence hashes: seq[i] = xxh3_64(u64le(seq[i-1]) || u64le(local[i]), 1337).
 *
 * and, for the disk tier's writes (storage/disk/runs.py), XXH3-128 of long inputs (bit-exact
 * with xxhash.xxh3_128_digest beyond 240 bytes) inside
 *
 *   seal_pages(payloads, keys, prefix, fingerprint, page_bytes, image, slot_bytes, heads,
 *              align)
 *       each page's digest and header, and its staging copy, with the GIL released.
 *
 * Why it is fast: the Python path pays for a memoryview slice, a call into xxhash and an
 * int object per block, and for the chain a struct.pack too. Here each block costs one
 * hash (~10 ns for 64 bytes) plus the unavoidable int object; the chain's 16-byte hash is
 * inlined down to a handful of multiplies.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t u64;
typedef uint32_t u32;

#define CHAIN_SEED 1337ULL

#define P32_1 0x9E3779B1U
#define P32_2 0x85EBCA77U
#define P32_3 0xC2B2AE3DU
#define P64_1 0x9E3779B185EBCA87ULL
#define P64_2 0xC2B2AE3D27D4EB4FULL
#define P64_3 0x165667B19E3779F9ULL
#define P64_4 0x85EBCA77C2B2AE63ULL
#define P64_5 0x27D4EB2F165667C5ULL
#define PMX_1 0x165667919E3779F9ULL
#define PMX_2 0x9FB21C651E98DF25ULL

#define SECRET_SIZE 192
#define STRIPE_LEN 64
#define SECRET_CONSUME 8                 /* secret advance per stripe */
#define MIDSIZE_MAX 240

/* The default 192-byte XXH3 secret ("kSecret"), checked against xxhash by the tests. */
static const unsigned char kSecret[SECRET_SIZE] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

/* ---- primitives ------------------------------------------------------------------------ */

/* Little-endian loads via memcpy: no alignment assumptions, compiles to a single mov on
 * x86/arm64; big-endian hosts byte-swap. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define HOST_BE 1
#else
#define HOST_BE 0
#endif

static inline u64 swap64(u64 x) {
    return ((x << 56) & 0xff00000000000000ULL) | ((x << 40) & 0x00ff000000000000ULL) |
           ((x << 24) & 0x0000ff0000000000ULL) | ((x << 8) & 0x000000ff00000000ULL) |
           ((x >> 8) & 0x00000000ff000000ULL) | ((x >> 24) & 0x0000000000ff0000ULL) |
           ((x >> 40) & 0x000000000000ff00ULL) | ((x >> 56) & 0x00000000000000ffULL);
}

static inline u32 swap32(u32 x) {
    return ((x << 24) & 0xff000000U) | ((x << 8) & 0x00ff0000U) |
           ((x >> 8) & 0x0000ff00U) | ((x >> 24) & 0x000000ffU);
}

static inline u64 rd64(const unsigned char *p) {
    u64 v;
    memcpy(&v, p, 8);
    return HOST_BE ? swap64(v) : v;
}

static inline u32 rd32(const unsigned char *p) {
    u32 v;
    memcpy(&v, p, 4);
    return HOST_BE ? swap32(v) : v;
}

static inline void wr64(unsigned char *p, u64 v) {
    if (HOST_BE) v = swap64(v);
    memcpy(p, &v, 8);
}

static inline u64 rotl64(u64 x, int r) { return (x << r) | (x >> (64 - r)); }

/* 64x64->128 multiply, folded (lo ^ hi). __int128 where the compiler has it (one mul
 * instruction), otherwise schoolbook on 32-bit halves. */
static inline u64 mul128_fold64(u64 a, u64 b) {
#if defined(__SIZEOF_INT128__)
    __extension__ typedef unsigned __int128 u128;   /* __extension__: quiet under -pedantic */
    u128 p = (u128)a * b;
    return (u64)p ^ (u64)(p >> 64);
#else
    u64 lo_lo = (a & 0xffffffffULL) * (b & 0xffffffffULL);
    u64 hi_lo = (a >> 32) * (b & 0xffffffffULL);
    u64 lo_hi = (a & 0xffffffffULL) * (b >> 32);
    u64 hi_hi = (a >> 32) * (b >> 32);
    u64 cross = (lo_lo >> 32) + (hi_lo & 0xffffffffULL) + lo_hi;
    u64 upper = (hi_lo >> 32) + (cross >> 32) + hi_hi;
    u64 lower = (cross << 32) | (lo_lo & 0xffffffffULL);
    return lower ^ upper;
#endif
}

static inline u64 xxh64_avalanche(u64 h) {
    h ^= h >> 33;
    h *= P64_2;
    h ^= h >> 29;
    h *= P64_3;
    h ^= h >> 32;
    return h;
}

static inline u64 xxh3_avalanche(u64 h) {
    h ^= h >> 37;
    h *= PMX_1;
    h ^= h >> 32;
    return h;
}

static inline u64 rrmxmx(u64 h, u64 len) {
    h ^= rotl64(h, 49) ^ rotl64(h, 24);
    h *= PMX_2;
    h ^= (h >> 35) + len;
    h *= PMX_2;
    h ^= h >> 28;
    return h;
}

static inline u64 mix16(const unsigned char *in, const unsigned char *sec, u64 seed) {
    return mul128_fold64(rd64(in) ^ (rd64(sec) + seed), rd64(in + 8) ^ (rd64(sec + 8) - seed));
}

/* ---- short inputs (0..240 bytes): default secret, seed mixed in on the fly ------------- */

static inline u64 len_0to16(const unsigned char *p, size_t len, u64 seed) {
    const unsigned char *s = kSecret;
    if (len > 8) {                                   /* 9..16 */
        u64 lo = rd64(p) ^ ((rd64(s + 24) ^ rd64(s + 32)) + seed);
        u64 hi = rd64(p + len - 8) ^ ((rd64(s + 40) ^ rd64(s + 48)) - seed);
        u64 acc = (u64)len + swap64(lo) + hi + mul128_fold64(lo, hi);
        return xxh3_avalanche(acc);
    }
    if (len >= 4) {                                  /* 4..8 */
        seed ^= (u64)swap32((u32)seed) << 32;
        u64 in64 = (u64)rd32(p + len - 4) + ((u64)rd32(p) << 32);
        u64 keyed = in64 ^ ((rd64(s + 8) ^ rd64(s + 16)) - seed);
        return rrmxmx(keyed, len);
    }
    if (len > 0) {                                   /* 1..3 */
        u32 combined = ((u32)p[0] << 16) | ((u32)p[len >> 1] << 24) | (u32)p[len - 1] |
                       ((u32)len << 8);
        u64 keyed = (u64)combined ^ ((u64)(rd32(s) ^ rd32(s + 4)) + seed);
        return xxh64_avalanche(keyed);
    }
    return xxh64_avalanche(seed ^ rd64(s + 56) ^ rd64(s + 64));
}

static inline u64 len_17to128(const unsigned char *p, size_t len, u64 seed) {
    const unsigned char *s = kSecret;
    u64 acc = (u64)len * P64_1;
    if (len > 32) {
        if (len > 64) {
            if (len > 96) {
                acc += mix16(p + 48, s + 96, seed);
                acc += mix16(p + len - 64, s + 112, seed);
            }
            acc += mix16(p + 32, s + 64, seed);
            acc += mix16(p + len - 48, s + 80, seed);
        }
        acc += mix16(p + 16, s + 32, seed);
        acc += mix16(p + len - 32, s + 48, seed);
    }
    acc += mix16(p, s, seed);
    acc += mix16(p + len - 16, s + 16, seed);
    return xxh3_avalanche(acc);
}

static u64 len_129to240(const unsigned char *p, size_t len, u64 seed) {
    const unsigned char *s = kSecret;
    u64 acc = (u64)len * P64_1;
    size_t rounds = len / 16, i;
    for (i = 0; i < 8; i++) acc += mix16(p + 16 * i, s + 16 * i, seed);
    acc = xxh3_avalanche(acc);
    /* rounds 8.. reuse the secret from offset 3; the last 16 bytes use offset 136-17 */
    for (i = 8; i < rounds; i++) acc += mix16(p + 16 * i, s + 16 * (i - 8) + 3, seed);
    acc += mix16(p + len - 16, s + 136 - 17, seed);
    return xxh3_avalanche(acc);
}

/* ---- long inputs (> 240 bytes): 8 lanes over 64-byte stripes, custom secret ------------ */

static void derive_secret(unsigned char *out, u64 seed) {
    /* The seeded long hash runs on kSecret with seed added to even / subtracted from odd
     * u64 words; computed once per call, not per block. */
    int i;
    for (i = 0; i < SECRET_SIZE / 16; i++) {
        wr64(out + 16 * i, rd64(kSecret + 16 * i) + seed);
        wr64(out + 16 * i + 8, rd64(kSecret + 16 * i + 8) - seed);
    }
}

static inline void accumulate_512(u64 *acc, const unsigned char *in, const unsigned char *sec) {
    int i;
    for (i = 0; i < 8; i++) {
        u64 v = rd64(in + 8 * i);
        u64 k = v ^ rd64(sec + 8 * i);
        acc[i ^ 1] += v;                             /* swapped lane: keeps input entropy */
        acc[i] += (u64)(u32)k * (k >> 32);
    }
}

static inline void scramble(u64 *acc, const unsigned char *sec) {
    int i;
    for (i = 0; i < 8; i++) {
        u64 a = acc[i];
        a ^= a >> 47;
        a ^= rd64(sec + 8 * i);
        acc[i] = a * P32_1;
    }
}

/* The 8 lanes of the long-input loop over all of p[0:len] (len > 240); shared by the 64- and
 * 128-bit hashes, which differ only in how they merge the lanes. Portable C; see
 * accumulate_long for the AVX2 variant. */
static void accumulate_long_scalar(u64 *acc, const unsigned char *p, size_t len,
                                   const unsigned char *sec) {
    const size_t stripes_per_block = (SECRET_SIZE - STRIPE_LEN) / SECRET_CONSUME; /* 16 */
    const size_t block_len = STRIPE_LEN * stripes_per_block;                      /* 1024 */
    const size_t nb_blocks = (len - 1) / block_len;
    size_t b, s, last_stripes;

    acc[0] = P32_3; acc[1] = P64_1; acc[2] = P64_2; acc[3] = P64_3;
    acc[4] = P64_4; acc[5] = P32_2; acc[6] = P64_5; acc[7] = P32_1;
    for (b = 0; b < nb_blocks; b++) {
        for (s = 0; s < stripes_per_block; s++)
            accumulate_512(acc, p + b * block_len + s * STRIPE_LEN, sec + s * SECRET_CONSUME);
        scramble(acc, sec + SECRET_SIZE - STRIPE_LEN);
    }
    /* the partial last block, then always the final 64 bytes (overlapping if need be) */
    last_stripes = ((len - 1) - block_len * nb_blocks) / STRIPE_LEN;
    for (s = 0; s < last_stripes; s++)
        accumulate_512(acc, p + nb_blocks * block_len + s * STRIPE_LEN, sec + s * SECRET_CONSUME);
    accumulate_512(acc, p + len - STRIPE_LEN, sec + SECRET_SIZE - STRIPE_LEN - 7);
}

/* The same loop with AVX2, four lanes per register: the loop is all of the hash's time for
 * long inputs, and the scalar one runs at about a third of the speed (and of xxhash's), which
 * would make the disk tier's 2 MiB pages slower to seal natively than through xxhash. Same
 * arithmetic: per 64-bit lane, acc += (swapped neighbour of the input) + lo32(k) * hi32(k)
 * with k = input ^ secret; the scramble multiplies by a 32-bit prime in two halves. Chosen
 * at run time (module init) where the CPU has AVX2. */
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

__attribute__((target("avx2")))
static inline void accumulate_512_avx2(__m256i *acc, const unsigned char *in,
                                       const unsigned char *sec) {
    int i;
    for (i = 0; i < 2; i++) {
        __m256i d = _mm256_loadu_si256((const __m256i *)(const void *)(in + 32 * i));
        __m256i k = _mm256_xor_si256(
            d, _mm256_loadu_si256((const __m256i *)(const void *)(sec + 32 * i)));
        __m256i k_hi = _mm256_shuffle_epi32(k, _MM_SHUFFLE(0, 3, 0, 1)); /* hi32 -> lo32 */
        __m256i prod = _mm256_mul_epu32(k, k_hi);
        __m256i swapped = _mm256_shuffle_epi32(d, _MM_SHUFFLE(1, 0, 3, 2)); /* lane i^1 */
        acc[i] = _mm256_add_epi64(acc[i], _mm256_add_epi64(prod, swapped));
    }
}

__attribute__((target("avx2")))
static inline void scramble_avx2(__m256i *acc, const unsigned char *sec) {
    const __m256i prime = _mm256_set1_epi32((int)P32_1);
    int i;
    for (i = 0; i < 2; i++) {
        __m256i a = acc[i];
        a = _mm256_xor_si256(a, _mm256_srli_epi64(a, 47));
        a = _mm256_xor_si256(
            a, _mm256_loadu_si256((const __m256i *)(const void *)(sec + 32 * i)));
        acc[i] = _mm256_add_epi64(
            _mm256_mul_epu32(a, prime),
            _mm256_slli_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), prime), 32));
    }
}

__attribute__((target("avx2")))
static void accumulate_long_avx2(u64 *acc_out, const unsigned char *p, size_t len,
                                 const unsigned char *sec) {
    const size_t stripes_per_block = (SECRET_SIZE - STRIPE_LEN) / SECRET_CONSUME;
    const size_t block_len = STRIPE_LEN * stripes_per_block;
    const size_t nb_blocks = (len - 1) / block_len;
    size_t b, s, last_stripes;
    __m256i acc[2];

    acc[0] = _mm256_set_epi64x((long long)P64_3, (long long)P64_2, (long long)P64_1,
                               (long long)P32_3);
    acc[1] = _mm256_set_epi64x((long long)P32_1, (long long)P64_5, (long long)P32_2,
                               (long long)P64_4);
    for (b = 0; b < nb_blocks; b++) {
        for (s = 0; s < stripes_per_block; s++)
            accumulate_512_avx2(acc, p + b * block_len + s * STRIPE_LEN,
                                sec + s * SECRET_CONSUME);
        scramble_avx2(acc, sec + SECRET_SIZE - STRIPE_LEN);
    }
    last_stripes = ((len - 1) - block_len * nb_blocks) / STRIPE_LEN;
    for (s = 0; s < last_stripes; s++)
        accumulate_512_avx2(acc, p + nb_blocks * block_len + s * STRIPE_LEN,
                            sec + s * SECRET_CONSUME);
    accumulate_512_avx2(acc, p + len - STRIPE_LEN, sec + SECRET_SIZE - STRIPE_LEN - 7);
    _mm256_storeu_si256((__m256i *)(void *)acc_out, acc[0]);
    _mm256_storeu_si256((__m256i *)(void *)(acc_out + 4), acc[1]);
}
#endif

#ifdef HAVE_AVX2_PATH
/* Set by module init: whether accumulate_long may take the AVX2 path. */
static int use_avx2 = 0;
#endif

static void accumulate_long(u64 *acc, const unsigned char *p, size_t len,
                            const unsigned char *sec) {
#ifdef HAVE_AVX2_PATH
    if (use_avx2) {
        accumulate_long_avx2(acc, p, len, sec);
        return;
    }
#endif
    accumulate_long_scalar(acc, p, len, sec);
}

/* The lanes folded into one word, keyed by 64 secret bytes from `key`. */
static inline u64 merge_accs(const u64 *acc, const unsigned char *key, u64 start) {
    u64 result = start;
    int i;
    for (i = 0; i < 4; i++)
        result += mul128_fold64(acc[2 * i] ^ rd64(key + 16 * i),
                                acc[2 * i + 1] ^ rd64(key + 16 * i + 8));
    return xxh3_avalanche(result);
}

static u64 hash_long(const unsigned char *p, size_t len, const unsigned char *sec) {
    u64 acc[8];
    accumulate_long(acc, p, len, sec);
    return merge_accs(acc, sec + 11, (u64)len * P64_1);    /* secret from offset 11 */
}

/* xxh3_128(p[0:len]) with seed 0, len > 240, as its canonical 16 bytes (what
 * xxhash.xxh3_128_digest returns): the high word big-endian, then the low word. The low
 * word is the 64-bit hash's merge; the high one merges the same lanes keyed from the end
 * of the secret, starting from ~(len * P64_2). */
static void xxh3_128_long_digest(const unsigned char *p, size_t len, unsigned char *out) {
    u64 acc[8], lo, hi;
    int i;
    accumulate_long(acc, p, len, kSecret);
    lo = merge_accs(acc, kSecret + 11, (u64)len * P64_1);
    hi = merge_accs(acc, kSecret + SECRET_SIZE - STRIPE_LEN - 11, ~((u64)len * P64_2));
    for (i = 0; i < 8; i++) {
        out[i] = (unsigned char)(hi >> (56 - 8 * i));
        out[8 + i] = (unsigned char)(lo >> (56 - 8 * i));
    }
}

/* xxh3_64(p[0:len], seed); `long_secret` is derive_secret(seed), only read when len > 240. */
static inline u64 xxh3_64(const unsigned char *p, size_t len, u64 seed,
                          const unsigned char *long_secret) {
    if (len <= 16) return len_0to16(p, len, seed);
    if (len <= 128) return len_17to128(p, len, seed);
    if (len <= MIDSIZE_MAX) return len_129to240(p, len, seed);
    return hash_long(p, len, long_secret);
}

/* The chain step, xxh3_64(u64le(a) || u64le(b), 1337): the 9..16-byte path specialised to
 * len 16 with both words already in registers (no buffer round-trip). */
static inline u64 pair_hash(u64 a, u64 b) {
    const unsigned char *s = kSecret;
    u64 lo = a ^ ((rd64(s + 24) ^ rd64(s + 32)) + CHAIN_SEED);
    u64 hi = b ^ ((rd64(s + 40) ^ rd64(s + 48)) - CHAIN_SEED);
    return xxh3_avalanche(16 + swap64(lo) + hi + mul128_fold64(lo, hi));
}

/* ---- Python glue ----------------------------------------------------------------------- */

/* A u64 from any int-like (int, numpy integer, ...), like struct.pack('<Q') accepts:
 * TypeError for non-integers, OverflowError outside [0, 2**64). Returns -1 on error. */
static int as_u64(PyObject *o, const char *what, u64 *out) {
    PyObject *idx = PyNumber_Index(o);
    unsigned long long v;
    if (idx == NULL) {
        PyErr_Format(PyExc_TypeError, "%s must be an int in [0, 2**64), got %.100s", what,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    v = PyLong_AsUnsignedLongLong(idx);
    Py_DECREF(idx);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_OverflowError, "%s must be in [0, 2**64), got %R", what, o);
        return -1;
    }
    *out = (u64)v;
    return 0;
}

static PyObject *py_local_hashes(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t step, n, i;
    PyObject *seed_o, *first_o, *out = NULL;
    u64 seed, first_seed;
    unsigned char sec[SECRET_SIZE], first_sec[SECRET_SIZE];
    (void)self;

    if (!PyArg_ParseTuple(args, "y*nOO:local_hashes", &view, &step, &seed_o, &first_o))
        return NULL;
    if (step <= 0) {
        PyErr_Format(PyExc_ValueError, "step must be positive, got %zd", step);
        goto done;
    }
    if (view.len % step != 0) {
        PyErr_Format(PyExc_ValueError, "buffer length %zd is not a multiple of step %zd",
                     view.len, step);
        goto done;
    }
    if (as_u64(seed_o, "seed", &seed) < 0 || as_u64(first_o, "first_seed", &first_seed) < 0)
        goto done;
    if (step > MIDSIZE_MAX) {
        derive_secret(sec, seed);
        derive_secret(first_sec, first_seed);
    }
    n = view.len / step;
    out = PyList_New(n);
    if (out == NULL) goto done;
    for (i = 0; i < n; i++) {
        const unsigned char *p = (const unsigned char *)view.buf + i * step;
        u64 h = i == 0 ? xxh3_64(p, (size_t)step, first_seed, first_sec)
                       : xxh3_64(p, (size_t)step, seed, sec);
        PyObject *v = PyLong_FromUnsignedLongLong(h);
        if (v == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, v);                  /* steals; the list is brand new */
    }
done:
    PyBuffer_Release(&view);
    return out;
}

static PyObject *py_chain(PyObject *self, PyObject *args) {
    PyObject *local_o, *parent_o, *seq, *out;
    PyObject **items;
    Py_ssize_t n, i;
    u64 prev = 0, loc;
    (void)self;

    if (!PyArg_ParseTuple(args, "OO:chain", &local_o, &parent_o)) return NULL;
    if (parent_o != Py_None && as_u64(parent_o, "parent_hash", &prev) < 0) return NULL;
    /* a list/tuple is used as is, anything else iterable is materialised once */
    seq = PySequence_Fast(local_o, "local hashes must be a sequence of ints");
    if (seq == NULL) return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    items = PySequence_Fast_ITEMS(seq);
    out = PyList_New(n);
    if (out == NULL) goto fail;
    for (i = 0; i < n; i++) {
        PyObject *v;
        /* exact ints (the common case) skip the PyNumber_Index round-trip */
        if (PyLong_CheckExact(items[i])) {
            loc = PyLong_AsUnsignedLongLong(items[i]);
            if (loc == (u64)-1 && PyErr_Occurred()) {
                PyErr_Format(PyExc_OverflowError,
                             "local hash at index %zd must be in [0, 2**64), got %R", i,
                             items[i]);
                goto fail;
            }
        } else {
            char what[48];
            PyOS_snprintf(what, sizeof what, "local hash at index %zd", i);
            if (as_u64(items[i], what, &loc) < 0) goto fail;
        }
        prev = (i == 0 && parent_o == Py_None) ? loc : pair_hash(prev, loc);
        v = PyLong_FromUnsignedLongLong(prev);
        if (v == NULL) goto fail;
        PyList_SET_ITEM(out, i, v);
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

/* The 64-byte page header (storage/page.py) of these fields, at `head`. */
#define HEAD_PREFIX 12
#define HEAD_BODY 52

static void build_header(unsigned char *head, const unsigned char *prefix, u64 fingerprint,
                         u64 key, u64 page_bytes, const unsigned char *digest) {
    memcpy(head, prefix, HEAD_PREFIX);
    wr64(head + 12, fingerprint);
    wr64(head + 20, key);
    wr64(head + 28, page_bytes);
    memcpy(head + 36, digest, 16);
    wr64(head + HEAD_BODY, xxh3_64(head, HEAD_BODY, 0, NULL));
    memset(head + HEAD_BODY + 8, 0, 4);
}

/* seal_pages(payloads, keys, prefix, fingerprint, page_bytes, image, slot_bytes, heads, align)
 *     -> (checksums: list[bytes], zero_copy: bytes)
 *
 * The per-page work of a disk-tier write (storage/disk/runs.py), for a run of pages bound for
 * adjacent slots (format kvbm-disk-v4: payloads back to back, `slot_bytes` apart, headers
 * apart in the slab's header area): for page j, its xxh3-128 digest; its 64-byte header
 * (storage/page.py: `prefix`, the 12 bytes of magic, version and reserved, then fingerprint,
 * key, page_bytes, digest, and xxh3-64 of those 52 bytes) at heads[64*j]; and, unless the
 * page can go to the device zero-copy, its payload copied to image[j*slot_bytes] (the run's
 * staging buffer). A page goes zero-copy when `align` is 0 (buffered I/O: any page), or when
 * it is writable and `align` > 0 divides its address; `align` < 0: none does.
 * zero_copy[j] is 1 for those, 0 for the staged ones.
 *
 * Hashing and copying run without the GIL, so other threads' system calls and Python go on
 * meanwhile (xxhash holds it for inputs this small); per page, Python pays for one bytes
 * object. page_bytes must exceed 240 (the long-input hash; the caller hashes shorter pages
 * itself). */

/* Argument checks shared by seal_pages and check_pages (0, or -1 with an exception set). */
static int check_sizes(const Py_buffer *prefix, Py_ssize_t page_bytes, Py_ssize_t slot_bytes) {
    if (prefix->len != HEAD_PREFIX) {
        PyErr_Format(PyExc_ValueError, "prefix must be %d bytes, got %zd", HEAD_PREFIX,
                     prefix->len);
        return -1;
    }
    if (page_bytes <= MIDSIZE_MAX || slot_bytes < page_bytes) {
        PyErr_Format(PyExc_ValueError, "page_bytes %zd must exceed %d and slot_bytes %zd "
                     "hold it", page_bytes, MIDSIZE_MAX, slot_bytes);
        return -1;
    }
    return 0;
}

static int check_room(const Py_buffer *image, const Py_buffer *heads, Py_ssize_t n,
                      Py_ssize_t slot_bytes) {
    if (image->len / slot_bytes < n || heads->len / 64 < n) {
        PyErr_Format(PyExc_ValueError, "image of %zd bytes or heads of %zd hold fewer than "
                     "%zd slots of %zd, headers of 64", image->len, heads->len, n, slot_bytes);
        return -1;
    }
    return 0;
}

/* Key i of `kseq` and the page buffer i of `bseq` (`flags` as PyObject_GetBuffer's), which
 * must be page_bytes long; on failure nothing is held. `what` names the buffers in errors. */
static int take_page(PyObject *kseq, PyObject *bseq, Py_ssize_t i, int flags,
                     const char *what, Py_ssize_t page_bytes, u64 *key, Py_buffer *view) {
    char name[40];
    PyOS_snprintf(name, sizeof name, "key at index %zd", i);
    if (as_u64(PySequence_Fast_GET_ITEM(kseq, i), name, key) < 0) return -1;
    if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(bseq, i), view, flags) < 0) return -1;
    if (view->len != page_bytes) {
        PyErr_Format(PyExc_ValueError, "%s %zd is %zd bytes, not %zd", what, i, view->len,
                     page_bytes);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *py_seal_pages(PyObject *self, PyObject *args) {
    PyObject *payloads_o, *keys_o, *fp_o, *pseq = NULL, *kseq = NULL, *sums = NULL;
    PyObject *flags = NULL, *out = NULL;
    Py_buffer prefix, image, heads, *views = NULL;
    Py_ssize_t page_bytes, slot_bytes, align, n, i, got = 0;
    u64 fingerprint, *keys = NULL;
    unsigned char *digests = NULL, *zero_copy = NULL;
    (void)self;

    if (!PyArg_ParseTuple(args, "OOy*Onw*nw*n:seal_pages", &payloads_o, &keys_o, &prefix, &fp_o,
                          &page_bytes, &image, &slot_bytes, &heads, &align))
        return NULL;
    if (check_sizes(&prefix, page_bytes, slot_bytes) < 0) goto done;
    if (as_u64(fp_o, "fingerprint", &fingerprint) < 0) goto done;
    pseq = PySequence_Fast(payloads_o, "payloads must be a sequence of buffers");
    if (pseq == NULL) goto done;
    kseq = PySequence_Fast(keys_o, "keys must be a sequence of ints");
    if (kseq == NULL) goto done;
    n = PySequence_Fast_GET_SIZE(pseq);
    if (PySequence_Fast_GET_SIZE(kseq) != n) {
        PyErr_Format(PyExc_ValueError, "%zd payloads but %zd keys", n,
                     PySequence_Fast_GET_SIZE(kseq));
        goto done;
    }
    if (check_room(&image, &heads, n, slot_bytes) < 0) goto done;
    views = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    keys = PyMem_Malloc(((size_t)n + 1) * sizeof(u64));
    digests = PyMem_Malloc(((size_t)n + 1) * 16);
    zero_copy = PyMem_Malloc((size_t)n + 1);
    if (views == NULL || keys == NULL || digests == NULL || zero_copy == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < n; i++) {
        if (take_page(kseq, pseq, i, PyBUF_SIMPLE, "payload", page_bytes, &keys[i],
                      &views[i]) < 0)
            goto done;
        got = i + 1;
        /* read-only memory is staged under O_DIRECT: the Python reference cannot tell
         * where it lies (storage/disk/runs.py), and both must give the same answer */
        zero_copy[i] = align == 0 || (align > 0 && !views[i].readonly &&
                                      (uintptr_t)views[i].buf % (uintptr_t)align == 0);
    }

    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) {
        unsigned char *slot = (unsigned char *)image.buf + i * slot_bytes;
        unsigned char *head = (unsigned char *)heads.buf + 64 * i;
        const unsigned char *payload = (const unsigned char *)views[i].buf;
        if (!zero_copy[i]) {
            /* copy first, then hash the copy while it is still in cache: one pass over
             * the caller's memory instead of two */
            memcpy(slot, payload, (size_t)page_bytes);
            payload = slot;
        }
        xxh3_128_long_digest(payload, (size_t)page_bytes, digests + 16 * i);
        build_header(head, prefix.buf, fingerprint, keys[i], (u64)page_bytes,
                     digests + 16 * i);
    }
    Py_END_ALLOW_THREADS

    sums = PyList_New(n);
    if (sums == NULL) goto done;
    for (i = 0; i < n; i++) {
        PyObject *b = PyBytes_FromStringAndSize((const char *)digests + 16 * i, 16);
        if (b == NULL) goto done;
        PyList_SET_ITEM(sums, i, b);
    }
    flags = PyBytes_FromStringAndSize((const char *)zero_copy, n);
    if (flags == NULL) goto done;
    out = PyTuple_Pack(2, sums, flags);
done:
    for (i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(keys);
    PyMem_Free(digests);
    PyMem_Free(zero_copy);
    Py_XDECREF(sums);
    Py_XDECREF(flags);
    Py_XDECREF(pseq);
    Py_XDECREF(kseq);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&image);
    PyBuffer_Release(&heads);
    return out;
}

/* check_pages(dests, keys, prefix, fingerprint, page_bytes, image, slot_bytes, heads,
 *             checksums, zero_copy, got) -> bytes
 *
 * The per-page work of a disk-tier read (storage/disk/runs.py), the mirror of seal_pages:
 * `image` holds a run of payloads as read, `slot_bytes` apart, and `heads` their headers as
 * read, 64 bytes apart; the payloads of the pages whose zero_copy[j] is 1 were read straight
 * into dests[j] instead. Only the first `got` pages were read whole (payload and header).
 * Per page, one status byte: CHECK_OK (payload verified, and now in dests[j]),
 * CHECK_TRUNCATED (the read ended before the page or its header did), CHECK_HEADER (the
 * stored header is not the one `prefix`, fingerprint, key, page_bytes and checksums[j]
 * make) or CHECK_CHECKSUM (the payload's xxh3-128 is not checksums[j]); dests[j] is
 * unspecified unless CHECK_OK. Hashing, comparing and copying run without the GIL.
 * page_bytes must exceed 240. */
#define CHECK_OK 0
#define CHECK_TRUNCATED 1
#define CHECK_HEADER 2
#define CHECK_CHECKSUM 3

static PyObject *py_check_pages(PyObject *self, PyObject *args) {
    PyObject *dests_o, *keys_o, *fp_o, *sums_o, *dseq = NULL, *kseq = NULL, *sseq = NULL;
    PyObject *out = NULL;
    Py_buffer prefix, image, heads, zc, *views = NULL;
    Py_ssize_t page_bytes, slot_bytes, got_pages, n, i, got = 0;
    u64 fingerprint, *keys = NULL;
    unsigned char *sums = NULL, *status = NULL;
    (void)self;

    if (!PyArg_ParseTuple(args, "OOy*Onw*ny*Oy*n:check_pages", &dests_o, &keys_o, &prefix,
                          &fp_o, &page_bytes, &image, &slot_bytes, &heads, &sums_o, &zc,
                          &got_pages))
        return NULL;
    if (check_sizes(&prefix, page_bytes, slot_bytes) < 0) goto done;
    if (as_u64(fp_o, "fingerprint", &fingerprint) < 0) goto done;
    dseq = PySequence_Fast(dests_o, "dests must be a sequence of buffers");
    if (dseq == NULL) goto done;
    kseq = PySequence_Fast(keys_o, "keys must be a sequence of ints");
    if (kseq == NULL) goto done;
    sseq = PySequence_Fast(sums_o, "checksums must be a sequence of bytes");
    if (sseq == NULL) goto done;
    n = PySequence_Fast_GET_SIZE(dseq);
    if (PySequence_Fast_GET_SIZE(kseq) != n || PySequence_Fast_GET_SIZE(sseq) != n ||
        zc.len != n) {
        PyErr_Format(PyExc_ValueError, "%zd dests but %zd keys, %zd checksums, %zd flags", n,
                     PySequence_Fast_GET_SIZE(kseq), PySequence_Fast_GET_SIZE(sseq), zc.len);
        goto done;
    }
    if (check_room(&image, &heads, n, slot_bytes) < 0) goto done;
    views = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    keys = PyMem_Malloc(((size_t)n + 1) * sizeof(u64));
    sums = PyMem_Malloc(((size_t)n + 1) * 16);
    status = PyMem_Malloc((size_t)n + 1);
    if (views == NULL || keys == NULL || sums == NULL || status == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < n; i++) {
        PyObject *sum = PySequence_Fast_GET_ITEM(sseq, i);
        if (!PyBytes_Check(sum) || PyBytes_GET_SIZE(sum) != 16) {
            PyErr_Format(PyExc_ValueError, "checksum %zd is not 16 bytes", i);
            goto done;
        }
        memcpy(sums + 16 * i, PyBytes_AS_STRING(sum), 16);
        if (take_page(kseq, dseq, i, PyBUF_WRITABLE, "destination", page_bytes, &keys[i],
                      &views[i]) < 0)
            goto done;
        got = i + 1;
    }

    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) {
        unsigned char *slot = (unsigned char *)image.buf + i * slot_bytes;
        unsigned char expected[64], digest[16];
        int direct = ((const unsigned char *)zc.buf)[i] != 0;
        const unsigned char *payload = direct ? (const unsigned char *)views[i].buf : slot;
        if (i >= got_pages) {
            status[i] = CHECK_TRUNCATED;
            continue;
        }
        build_header(expected, prefix.buf, fingerprint, keys[i], (u64)page_bytes,
                     sums + 16 * i);
        if (memcmp(expected, (const unsigned char *)heads.buf + 64 * i, 64) != 0) {
            status[i] = CHECK_HEADER;
            continue;
        }
        xxh3_128_long_digest(payload, (size_t)page_bytes, digest);
        if (memcmp(digest, sums + 16 * i, 16) != 0) {
            status[i] = CHECK_CHECKSUM;
            continue;
        }
        if (!direct) memcpy(views[i].buf, payload, (size_t)page_bytes);
        status[i] = CHECK_OK;
    }
    Py_END_ALLOW_THREADS

    out = PyBytes_FromStringAndSize((const char *)status, n);
done:
    for (i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(keys);
    PyMem_Free(sums);
    PyMem_Free(status);
    Py_XDECREF(dseq);
    Py_XDECREF(kseq);
    Py_XDECREF(sseq);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&image);
    PyBuffer_Release(&heads);
    PyBuffer_Release(&zc);
    return out;
}

/* list_u32(tokens) -> bytearray: a list of ints as little-endian u32, 4 bytes each.
 * Engines hand prompts over as Python lists; array.array("I", ...) took ~12 ns a token,
 * most of match_prefix on a list. Accepts what array("I") accepts (ints, bools, objects
 * with __index__); raises OverflowError / TypeError like it, and kvbm.hashing then takes
 * its slow path, which names the offending index. */
static PyObject *py_list_u32(PyObject *self, PyObject *arg) {
    Py_ssize_t n, i;
    PyObject *out;
    unsigned char *p;
    (void)self;

    if (!PyList_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "list_u32 needs a list, got %R", Py_TYPE(arg));
        return NULL;
    }
    n = PyList_GET_SIZE(arg);
    if (n > PY_SSIZE_T_MAX / 4) return PyErr_NoMemory();
    out = PyByteArray_FromStringAndSize(NULL, 4 * n);
    if (out == NULL) return NULL;
    p = (unsigned char *)PyByteArray_AS_STRING(out);
    /* The list may not change under us: no Python code runs in the loop except
     * __index__ of an odd item, and the size is re-read each step. */
    for (i = 0; i < n && i < PyList_GET_SIZE(arg); i++) {
        PyObject *item = PyList_GET_ITEM(arg, i);
        unsigned long v;
        if (PyLong_Check(item)) {
            v = PyLong_AsUnsignedLong(item);
        } else {
            PyObject *idx;
            Py_INCREF(item);  /* __index__ may drop the list's reference */
            idx = PyNumber_Index(item);
            Py_DECREF(item);
            if (idx == NULL) goto fail;
            v = PyLong_AsUnsignedLong(idx);
            Py_DECREF(idx);
        }
        if (v == (unsigned long)-1 && PyErr_Occurred()) goto fail;
        if (v > 0xFFFFFFFFUL) {
            PyErr_SetString(PyExc_OverflowError, "unsigned int is greater than maximum");
            goto fail;
        }
        p[4 * i] = (unsigned char)v;
        p[4 * i + 1] = (unsigned char)(v >> 8);
        p[4 * i + 2] = (unsigned char)(v >> 16);
        p[4 * i + 3] = (unsigned char)(v >> 24);
    }
    if (i != n) {
        PyErr_SetString(PyExc_RuntimeError, "the token list changed size while converting");
        goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* ---- prompt walks of the router's node table (kvbm/router/probe.py) -------------------
 * The table is an open-addressing array of (key, row id) int64 pairs, linear probing from
 * slot key & mask; row id -1 marks a slot never used (a probe ends there), -2 a deleted key
 * (a probe goes on). A walk looks up a prompt's sequence hashes in order and stops at the
 * first one absent; it returns the runs of equal consecutive row ids, [(row id, blocks)].
 * Keys are looked up WALK_CHUNK at a time, their home slots prefetched first: a million-node
 * table is far larger than the caches, and the misses of one chunk then overlap. */
#define WALK_CHUNK 32
#define SLOT_EMPTY (-1LL)

static inline long long probe_get(const long long *tab, u64 mask, u64 key) {
    u64 s = key & mask, left = mask + 1;
    while (left--) {  /* bounded: a table with no empty slot still ends */
        long long v = tab[2 * s + 1];
        if (v == SLOT_EMPTY) return -1;
        if (v >= 0 && (u64)tab[2 * s] == key) return v;
        s = (s + 1) & mask;
    }
    return -1;
}

static inline void probe_prefetch(const long long *tab, u64 mask, u64 key) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(tab + 2 * (key & mask), 0, 0);
#else
    (void)tab; (void)mask; (void)key;
#endif
}

/* The table argument: a C-contiguous buffer of 16 * (mask + 1) bytes, mask + 1 a power of 2. */
static int walk_table(PyObject *tab_o, PyObject *mask_o, Py_buffer *view, u64 *mask) {
    if (as_u64(mask_o, "mask", mask) < 0) return -1;
    if (PyObject_GetBuffer(tab_o, view, PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (*mask == (u64)-1 || ((*mask + 1) & *mask) != 0
            || (u64)view->len / 16 != *mask + 1 || view->len % 16 != 0) {
        PyErr_Format(PyExc_ValueError, "the table must hold (mask + 1) pairs of int64, mask + 1 "
                     "a power of two (got %zd bytes, mask %llu)", view->len,
                     (unsigned long long)*mask);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* Runs being built: (row id, count) tuples appended to `out` as a row id changes. */
typedef struct { PyObject *out; long long rid; Py_ssize_t n; } runs_t;

static int runs_flush(runs_t *r) {
    PyObject *t;
    int rc;
    if (r->n == 0) return 0;
    t = Py_BuildValue("(Ln)", r->rid, r->n);
    if (t == NULL) return -1;
    rc = PyList_Append(r->out, t);
    Py_DECREF(t);
    r->n = 0;
    return rc;
}

/* Looks up keys[0:n] in order; returns 1 when one was absent (the walk is over), 0 when all
 * were found, -1 on error. */
static int walk_keys(const long long *tab, u64 mask, const u64 *keys, Py_ssize_t n,
                     runs_t *r) {
    Py_ssize_t i;
    for (i = 0; i < n; i++) probe_prefetch(tab, mask, keys[i]);
    for (i = 0; i < n; i++) {
        long long v = probe_get(tab, mask, keys[i]);
        if (v < 0) return 1;
        if (r->n && v != r->rid && runs_flush(r) < 0) return -1;
        r->rid = v;
        r->n++;
    }
    return 0;
}

/* Fills chunk[0:k] with the keys of blocks at..at+k-1 of a walk. */
typedef void (*fill_fn)(void *ctx, Py_ssize_t at, Py_ssize_t k, u64 *chunk);

/* The walk of n keys, WALK_CHUNK at a time: the runs list, NULL on error. */
static PyObject *walk_run(const Py_buffer *tab, u64 mask, Py_ssize_t n, fill_fn fill,
                          void *ctx) {
    runs_t r = {NULL, 0, 0};
    Py_ssize_t at;
    r.out = PyList_New(0);
    if (r.out == NULL) return NULL;
    for (at = 0; at < n; at += WALK_CHUNK) {
        Py_ssize_t k = n - at < WALK_CHUNK ? n - at : WALK_CHUNK;
        u64 chunk[WALK_CHUNK];
        int rc;
        fill(ctx, at, k, chunk);
        rc = walk_keys((const long long *)tab->buf, mask, chunk, k, &r);
        if (rc < 0) goto fail;
        if (rc) break;
    }
    if (runs_flush(&r) == 0) return r.out;
fail:
    Py_DECREF(r.out);
    return NULL;
}

static void fill_keys(void *ctx, Py_ssize_t at, Py_ssize_t k, u64 *chunk) {
    memcpy(chunk, (const unsigned char *)ctx + 8 * at, (size_t)(8 * k));
}

/* walk_hashes(table, mask, keys) -> [(row id, blocks)]: keys a buffer of native u64. */
static PyObject *py_walk_hashes(PyObject *self, PyObject *args) {
    PyObject *tab_o, *mask_o, *keys_o, *out = NULL;
    Py_buffer tab, keys;
    u64 mask;
    (void)self;

    if (!PyArg_ParseTuple(args, "OOO:walk_hashes", &tab_o, &mask_o, &keys_o)) return NULL;
    if (walk_table(tab_o, mask_o, &tab, &mask) < 0) return NULL;
    if (PyObject_GetBuffer(keys_o, &keys, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&tab);
        return NULL;
    }
    if (keys.len % 8 != 0)
        PyErr_Format(PyExc_ValueError, "keys must be u64 words, got %zd bytes", keys.len);
    else
        out = walk_run(&tab, mask, keys.len / 8, fill_keys, keys.buf);
    PyBuffer_Release(&keys);
    PyBuffer_Release(&tab);
    return out;
}

/* The chain being walked from tokens: block i's sequence hash, from the root. */
typedef struct {
    const unsigned char *tok;
    Py_ssize_t step;
    u64 seed, first_seed, prev;
    unsigned char sec[SECRET_SIZE], first_sec[SECRET_SIZE];
} token_chain_t;

static void fill_tokens(void *ctx, Py_ssize_t at, Py_ssize_t k, u64 *chunk) {
    token_chain_t *c = (token_chain_t *)ctx;
    Py_ssize_t j;
    for (j = 0; j < k; j++) {
        Py_ssize_t i = at + j;
        const unsigned char *p = c->tok + i * c->step;
        u64 loc = i == 0 ? xxh3_64(p, (size_t)c->step, c->first_seed, c->first_sec)
                         : xxh3_64(p, (size_t)c->step, c->seed, c->sec);
        c->prev = i == 0 ? loc : pair_hash(c->prev, loc);
        chunk[j] = c->prev;
    }
}

/* walk_tokens(table, mask, tokens, block_size, seed, first_seed) -> [(row id, blocks)]:
 * tokens a buffer of little-endian u32; each full block is hashed (local hash as in
 * local_hashes, the first block with first_seed; sequence hash as in chain, from the root)
 * only when the blocks before it were all found. */
static PyObject *py_walk_tokens(PyObject *self, PyObject *args) {
    PyObject *tab_o, *mask_o, *tok_o, *seed_o, *first_o, *out;
    Py_buffer tab, tok;
    Py_ssize_t bs;
    u64 mask;
    token_chain_t c;
    (void)self;

    if (!PyArg_ParseTuple(args, "OOOnOO:walk_tokens", &tab_o, &mask_o, &tok_o, &bs, &seed_o,
                          &first_o))
        return NULL;
    if (bs <= 0 || bs > PY_SSIZE_T_MAX / 4) {
        PyErr_Format(PyExc_ValueError, "block_size must be positive, got %zd", bs);
        return NULL;
    }
    if (as_u64(seed_o, "seed", &c.seed) < 0 || as_u64(first_o, "first_seed", &c.first_seed) < 0)
        return NULL;
    if (walk_table(tab_o, mask_o, &tab, &mask) < 0) return NULL;
    if (PyObject_GetBuffer(tok_o, &tok, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&tab);
        return NULL;
    }
    c.tok = (const unsigned char *)tok.buf;
    c.step = 4 * bs;
    c.prev = 0;
    if (c.step > MIDSIZE_MAX) {
        derive_secret(c.sec, c.seed);
        derive_secret(c.first_sec, c.first_seed);
    }
    out = walk_run(&tab, mask, tok.len / c.step, fill_tokens, &c);
    PyBuffer_Release(&tok);
    PyBuffer_Release(&tab);
    return out;
}

static PyMethodDef methods[] = {
    {"local_hashes", py_local_hashes, METH_VARARGS,
     "local_hashes(buf, step, seed, first_seed) -> list[int]\n\n"
     "xxh3_64 of each `step`-byte slice of `buf` (slice 0 with `first_seed`)."},
    {"chain", py_chain, METH_VARARGS,
     "chain(local, parent) -> list[int]\n\n"
     "Sequence hashes: seq[i] = xxh3_64(u64le(seq[i-1]) || u64le(local[i]), seed=1337)."},
    {"seal_pages", py_seal_pages, METH_VARARGS,
     "seal_pages(payloads, keys, prefix, fingerprint, page_bytes, image, slot_bytes, heads,\n"
     "           align)\n"
     "-> (checksums, zero_copy)\n\n"
     "Digests and headers of a run of disk-tier pages (storage/disk/runs.py)."},
    {"walk_hashes", py_walk_hashes, METH_VARARGS,
     "walk_hashes(table, mask, keys) -> list[tuple[int, int]]\n\n"
     "Runs (row id, blocks) of the leading u64 keys found in the router's probe table."},
    {"walk_tokens", py_walk_tokens, METH_VARARGS,
     "walk_tokens(table, mask, tokens, block_size, seed, first_seed) -> list[tuple[int, int]]\n\n"
     "walk_hashes of the sequence hashes of the u32 tokens' full blocks, hashed as walked."},
    {"list_u32", py_list_u32, METH_O,
     "list_u32(tokens) -> bytearray\n\n"
     "A list of ints in [0, 2**32) as little-endian u32 (what array('I') accepts)."},
    {"check_pages", py_check_pages, METH_VARARGS,
     "check_pages(dests, keys, prefix, fingerprint, page_bytes, image, slot_bytes, heads,\n"
     "            checksums, zero_copy, got) -> bytes\n\n"
     "Verify a run of disk-tier pages as read (storage/disk/runs.py): a status per page."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvbm._xxh3", "Native XXH3 hashing for kvbm.hashing and the disk tier.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__xxh3(void) {
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    /* KVBM_XXH3_SCALAR=1 forces the portable loop (how the tests cover both) */
    use_avx2 = __builtin_cpu_supports("avx2") && getenv("KVBM_XXH3_SCALAR") == NULL;
#endif
    return PyModule_Create(&module);
}
