/*
 * kvbm._xxh3 -- native hot loop for kvbm.hashing (DESIGN.md section 4).
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
 * Why it is fast: the Python path pays for a memoryview slice, a call into xxhash and an
 * int object per block, and for the chain a struct.pack too. Here each block costs one
 * hash (~10 ns for 64 bytes) plus the unavoidable int object; the chain's 16-byte hash is
 * inlined down to a handful of multiplies.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
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

static u64 hash_long(const unsigned char *p, size_t len, const unsigned char *sec) {
    u64 acc[8] = {P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1};
    const size_t stripes_per_block = (SECRET_SIZE - STRIPE_LEN) / SECRET_CONSUME; /* 16 */
    const size_t block_len = STRIPE_LEN * stripes_per_block;                      /* 1024 */
    const size_t nb_blocks = (len - 1) / block_len;
    size_t b, s, last_stripes;
    u64 result;
    int i;

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

    /* merge the 8 lanes, with the secret from offset 11 */
    result = (u64)len * P64_1;
    for (i = 0; i < 4; i++)
        result += mul128_fold64(acc[2 * i] ^ rd64(sec + 11 + 16 * i),
                                acc[2 * i + 1] ^ rd64(sec + 11 + 16 * i + 8));
    return xxh3_avalanche(result);
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

static PyMethodDef methods[] = {
    {"local_hashes", py_local_hashes, METH_VARARGS,
     "local_hashes(buf, step, seed, first_seed) -> list[int]\n\n"
     "xxh3_64 of each `step`-byte slice of `buf` (slice 0 with `first_seed`)."},
    {"chain", py_chain, METH_VARARGS,
     "chain(local, parent) -> list[int]\n\n"
     "Sequence hashes: seq[i] = xxh3_64(u64le(seq[i-1]) || u64le(local[i]), seed=1337)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvbm._xxh3", "Native XXH3-64 block hashing for kvbm.hashing.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__xxh3(void) { return PyModule_Create(&module); }
