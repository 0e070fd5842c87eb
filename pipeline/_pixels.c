/*
 * The CPU side of pipeline/contract.py's to_model_input: a batch of uint8 RGB rows (N, H, W, 3) becomes the model's
 * input in one pass over it. torch takes three (a converting, transposing copy, then the subtraction, then the
 * multiplication), each over a float batch four times the size of the pixels (docs/pipeline.md, "Measured figures").
 *
 * normalize(src, dst, pixels, mean, inv_std, planar) -> None
 *     dst[...] = (float(src) - mean[c]) * inv_std[c]: the same float32 operations in the same order as torch's
 *     chain, so the same bits. src: C-contiguous uint8, N * pixels * 3 bytes (RGB, row by row); dst: C-contiguous
 *     float32 of as many elements, planar (N, 3, H, W) or, planar False, interleaved like src (channels_last).
 * planar(src, dst, pixels) -> None
 *     The uint8 pixels in (N, 3, H, W) order.
 * ValueError for buffers of the wrong type or size, BufferError for a read-only dst.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* AVX2 where the CPU has it, picked at load time (GCC/Clang function multiversioning, an ifunc: glibc only). No FMA:
 * the same products and sums as the baseline x86-64 clone, and as torch. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__GLIBC__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

MULTIVERSION static void to_planar_float(const uint8_t *restrict src, float *restrict dst, Py_ssize_t images,
                                         Py_ssize_t pixels, const float *m, const float *s) {
    for (Py_ssize_t i = 0; i < images; i++) {
        const uint8_t *restrict in = src + i * pixels * 3;
        float *restrict r = dst + i * pixels * 3, *restrict g = r + pixels, *restrict b = g + pixels;
        for (Py_ssize_t p = 0; p < pixels; p++) {
            r[p] = ((float)in[3 * p] - m[0]) * s[0];
            g[p] = ((float)in[3 * p + 1] - m[1]) * s[1];
            b[p] = ((float)in[3 * p + 2] - m[2]) * s[2];
        }
    }
}

MULTIVERSION static void to_interleaved_float(const uint8_t *restrict src, float *restrict dst, Py_ssize_t pixels,
                                              const float *m, const float *s) {
    for (Py_ssize_t p = 0; p < pixels; p++) {
        dst[3 * p] = ((float)src[3 * p] - m[0]) * s[0];
        dst[3 * p + 1] = ((float)src[3 * p + 1] - m[1]) * s[1];
        dst[3 * p + 2] = ((float)src[3 * p + 2] - m[2]) * s[2];
    }
}

MULTIVERSION static void to_planar_u8(const uint8_t *restrict src, uint8_t *restrict dst, Py_ssize_t images,
                                      Py_ssize_t pixels) {
    for (Py_ssize_t i = 0; i < images; i++) {
        const uint8_t *restrict in = src + i * pixels * 3;
        uint8_t *restrict r = dst + i * pixels * 3, *restrict g = r + pixels, *restrict b = g + pixels;
        for (Py_ssize_t p = 0; p < pixels; p++) {
            r[p] = in[3 * p];
            g[p] = in[3 * p + 1];
            b[p] = in[3 * p + 2];
        }
    }
}

/* src and dst as C-contiguous buffers of the given element formats and equal element counts, a whole number of
 * images of `pixels` RGB pixels; 0, or -1 with ValueError set and nothing held. */
static int get_buffers(PyObject *src_obj, PyObject *dst_obj, Py_ssize_t pixels, const char *dst_format,
                       Py_buffer *src, Py_buffer *dst, Py_ssize_t *images) {
    if (pixels <= 0) {
        PyErr_SetString(PyExc_ValueError, "pixels must be > 0");
        return -1;
    }
    if (PyObject_GetBuffer(src_obj, src, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0)
        return -1;
    if (PyObject_GetBuffer(dst_obj, dst, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) != 0) {
        PyBuffer_Release(src);
        return -1;
    }
    const char *sf = src->format ? src->format : "B", *df = dst->format ? dst->format : "B";
    Py_ssize_t count = src->len / (pixels * 3);
    if (src->itemsize != 1 || strcmp(sf, "B") != 0 || dst->itemsize != (Py_ssize_t)(dst_format[0] == 'f' ? 4 : 1) ||
        strcmp(df, dst_format) != 0) {
        PyErr_Format(PyExc_ValueError, "want uint8 pixels into a '%s' buffer, got '%s' into '%s'", dst_format, sf,
                     df);
    } else if (src->len != count * pixels * 3 || dst->len / dst->itemsize != src->len) {
        PyErr_Format(PyExc_ValueError, "want N x %zd x 3 pixels and as many outputs, got %zd bytes and %zd outputs",
                     pixels, src->len, dst->len / dst->itemsize);
    } else {
        *images = count;
        return 0;
    }
    PyBuffer_Release(src);
    PyBuffer_Release(dst);
    return -1;
}

static PyObject *normalize(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    Py_ssize_t pixels, images;
    float m[3], s[3];
    int planar;
    if (!PyArg_ParseTuple(args, "OOn(fff)(fff)p", &src_obj, &dst_obj, &pixels, &m[0], &m[1], &m[2], &s[0], &s[1],
                          &s[2], &planar))
        return NULL;
    Py_buffer src, dst;
    if (get_buffers(src_obj, dst_obj, pixels, "f", &src, &dst, &images) != 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (planar)
        to_planar_float(src.buf, dst.buf, images, pixels, m, s);
    else
        to_interleaved_float(src.buf, dst.buf, images * pixels, m, s);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyObject *planar(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    Py_ssize_t pixels, images;
    if (!PyArg_ParseTuple(args, "OOn", &src_obj, &dst_obj, &pixels))
        return NULL;
    Py_buffer src, dst;
    if (get_buffers(src_obj, dst_obj, pixels, "B", &src, &dst, &images) != 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    to_planar_u8(src.buf, dst.buf, images, pixels);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"normalize", normalize, METH_VARARGS,
     "normalize(src, dst, pixels, mean, inv_std, planar): uint8 RGB rows -> (x - mean[c]) * inv_std[c] as float32, "
     "planar (N, 3, H, W) or interleaved."},
    {"planar", planar, METH_VARARGS, "planar(src, dst, pixels): uint8 RGB rows -> uint8 (N, 3, H, W)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pixels", "One-pass pixel layout kernels.", -1, methods};

PyMODINIT_FUNC PyInit__pixels(void) { return PyModule_Create(&module); }
