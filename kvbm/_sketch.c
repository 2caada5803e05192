/* Native hot loop of kvbm.policies.admission.FrequencyAdmission: one sighting (or one
 * look-up) of a key in a count-min sketch of one-byte counters with conservative update.
 *
 * In Python the four multiply-shift hashes and four counter reads cost ~2.3 us per key
 * (big-int products, one interpreter round trip per counter); the predictive policy asks
 * the sketch on every insertion, so this was most of its per-block cost. Same counters,
 * same answers as the Python path (tests/test_policies.py compares them).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 8

/* sight(counts, key, rows, shift, cap) -> the key's minimum before this sighting.
 *
 * counts: writable buffer of one-byte counters; rows: bytes of little-endian u64 pairs
 * (odd multiplier, first counter of the row), one pair per row; the row index of a key is
 * ((key * multiplier) mod 2**64) >> shift. Counters equal to the minimum are raised by one
 * unless it is already >= cap (cap 0: a pure look-up, nothing changes). The key is taken
 * mod 2**64, as Python's ``(key * m) & (2**64 - 1)`` does. */
static PyObject *py_sight(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer counts, rows;
    uint64_t key;
    long shift, cap;
    size_t idx[MAX_DEPTH];
    unsigned char val[MAX_DEPTH];
    Py_ssize_t depth, d;
    unsigned low = 256;
    PyObject *out = NULL;
    (void)self;

    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "sight expects 5 arguments, got %zd", nargs);
        return NULL;
    }
    if (!PyLong_Check(args[1])) {
        PyErr_Format(PyExc_TypeError, "key must be an int, got %R", args[1]);
        return NULL;
    }
    key = (uint64_t)PyLong_AsUnsignedLongLongMask(args[1]);
    if (key == (uint64_t)-1 && PyErr_Occurred()) return NULL;
    shift = PyLong_AsLong(args[3]);
    if (shift == -1 && PyErr_Occurred()) return NULL;
    cap = PyLong_AsLong(args[4]);
    if (cap == -1 && PyErr_Occurred()) return NULL;
    if (shift < 1 || shift > 63) {
        PyErr_Format(PyExc_ValueError, "shift must be in [1, 63], got %ld", shift);
        return NULL;
    }
    if (cap < 0 || cap > 255) {
        PyErr_Format(PyExc_ValueError, "cap must be in [0, 255], got %ld", cap);
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &counts, PyBUF_WRITABLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[2], &rows, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&counts);
        return NULL;
    }
    depth = rows.len / 16;
    if (rows.len % 16 != 0 || depth < 1 || depth > MAX_DEPTH) {
        PyErr_Format(PyExc_ValueError, "rows must hold 1 to %d (multiplier, base) pairs, got "
                     "%zd bytes", MAX_DEPTH, rows.len);
        goto done;
    }
    for (d = 0; d < depth; d++) {
        uint64_t mult, base;
        memcpy(&mult, (const char *)rows.buf + 16 * d, 8);
        memcpy(&base, (const char *)rows.buf + 16 * d + 8, 8);
        idx[d] = (size_t)((key * mult) >> shift) + (size_t)base;
        if (idx[d] >= (size_t)counts.len) {
            PyErr_Format(PyExc_IndexError, "row %zd maps the key past the %zd counters", d,
                         counts.len);
            goto done;
        }
    }
    /* All reads before any write: the rows' counters are independent loads. */
    for (d = 0; d < depth; d++) {
        val[d] = ((const unsigned char *)counts.buf)[idx[d]];
        if (val[d] < low) low = val[d];
    }
    if (low < (unsigned)cap) {
        for (d = 0; d < depth; d++)
            if (val[d] == low) ((unsigned char *)counts.buf)[idx[d]] = (unsigned char)(low + 1);
    }
    out = PyLong_FromUnsignedLong(low);
done:
    PyBuffer_Release(&rows);
    PyBuffer_Release(&counts);
    return out;
}

static PyMethodDef methods[] = {
    {"sight", (PyCFunction)(void (*)(void))py_sight, METH_FASTCALL,
     "sight(counts, key, rows, shift, cap) -> int\n\n"
     "One sighting of `key` in a count-min sketch (conservative update, counters capped\n"
     "at `cap`; 0 only looks): its minimum count before the sighting."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvbm._sketch", "Native count-min sketch step for kvbm.policies.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sketch(void) { return PyModule_Create(&module); }
