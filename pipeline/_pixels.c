/*
 * Pixels in one pass, where Pillow and torch take several (docs/pipeline.md, "The host backend"):
 *   - a host worker's resized image into its batch slot (pipeline/transforms.py's rgb_into): Pillow's 4-byte rows to
 *     packed RGB, mirrored for a flip;
 *   - the CPU side of pipeline/transforms.py's to_model_input: a batch of uint8 RGB rows (N, H, W, 3) to the model's
 *     input. torch takes three passes (a converting, transposing copy, then the subtraction, then the
 *     multiplication), each over a float batch four times the size of the pixels.
 *
 * rgb_rows(src, dst, width, flip) -> None
 *     src: rows of `width` RGBX pixels (4 bytes each); dst: as many rows of packed RGB, each mirrored when flip.
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

/* RGBX rows (a padding byte after each pixel, what Pillow-SIMD's images hold) -> packed RGB rows, each mirrored
 * when `flip`: the host workers' last step into a batch slot (pipeline/transforms.py). */
static void rgbx_to_rgb_scalar(const uint8_t *restrict src, uint8_t *restrict dst, Py_ssize_t width,
                               Py_ssize_t rows, int flip, Py_ssize_t from) {
    for (Py_ssize_t y = 0; y < rows; y++) {
        const uint8_t *restrict s = src + y * width * 4;
        uint8_t *restrict d = dst + y * width * 3;
        for (Py_ssize_t x = from; x < width; x++) {
            const uint8_t *p = s + (flip ? width - 1 - x : x) * 4;
            d[3 * x] = p[0];
            d[3 * x + 1] = p[1];
            d[3 * x + 2] = p[2];
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* Four pixels a shuffle. Each 16-byte store runs 4 bytes past the 12 it means, into the next pixels, which the next
 * store (or the next row's first) overwrites; the last 6 pixels of the last row go scalar, so no store leaves dst. */
__attribute__((target("ssse3"))) static void rgbx_to_rgb_ssse3(const uint8_t *restrict src, uint8_t *restrict dst,
                                                                Py_ssize_t width, Py_ssize_t rows, int flip) {
    const __m128i keep = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
    const __m128i mirror = _mm_setr_epi8(12, 13, 14, 8, 9, 10, 4, 5, 6, 0, 1, 2, -1, -1, -1, -1);
    const __m128i shuffle = flip ? mirror : keep;
    Py_ssize_t x = 0;
    for (Py_ssize_t y = 0; y < rows; y++) {
        const uint8_t *s = src + y * width * 4;
        uint8_t *d = dst + y * width * 3;
        Py_ssize_t end = y + 1 < rows ? width - 3 : width - 6;  /* blocks of 4 starting below `end` */
        for (x = 0; x < end; x += 4) {
            const uint8_t *block = flip ? s + (width - 4 - x) * 4 : s + x * 4;
            _mm_storeu_si128((__m128i *)(d + 3 * x), _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)block),
                                                                       shuffle));
        }
        if (x < width)
            rgbx_to_rgb_scalar(s, d, width, 1, flip, x);
    }
}
#endif

static void rgbx_to_rgb(const uint8_t *src, uint8_t *dst, Py_ssize_t width, Py_ssize_t rows, int flip) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("ssse3")) {
        rgbx_to_rgb_ssse3(src, dst, width, rows, flip);
        return;
    }
#endif
    rgbx_to_rgb_scalar(src, dst, width, rows, flip, 0);
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

static PyObject *rgb_rows(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    Py_ssize_t width;
    int flip;
    if (!PyArg_ParseTuple(args, "OOnp", &src_obj, &dst_obj, &width, &flip))
        return NULL;
    if (width <= 0) {
        PyErr_SetString(PyExc_ValueError, "width must be > 0");
        return NULL;
    }
    Py_buffer src, dst;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) != 0)
        return NULL;
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) != 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    Py_ssize_t rows = src.len / (width * 4);
    if (src.len != rows * width * 4 || dst.len != rows * width * 3) {
        PyErr_Format(PyExc_ValueError, "want rows of %zd RGBX pixels into as many RGB ones, got %zd and %zd bytes",
                     width, src.len, dst.len);
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rgbx_to_rgb(src.buf, dst.buf, width, rows, flip);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rgb_rows", rgb_rows, METH_VARARGS,
     "rgb_rows(src, dst, width, flip): RGBX rows of `width` pixels -> packed RGB rows, each mirrored when flip."},
    {"normalize", normalize, METH_VARARGS,
     "normalize(src, dst, pixels, mean, inv_std, planar): uint8 RGB rows -> (x - mean[c]) * inv_std[c] as float32, "
     "planar (N, 3, H, W) or interleaved."},
    {"planar", planar, METH_VARARGS, "planar(src, dst, pixels): uint8 RGB rows -> uint8 (N, 3, H, W)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pixels", "One-pass pixel layout kernels.", -1, methods};

PyMODINIT_FUNC PyInit__pixels(void) { return PyModule_Create(&module); }
