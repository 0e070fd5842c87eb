/*
 * The per-sample augmentation ops of pipeline/augment.py on a uint8 RGB tile, (H, W, 3) C-contiguous, in one pass
 * each. They compute what Pillow computes for timm's ops (the same formulas, truncations and clippings as Pillow's
 * Geometry.c, Blend.c and Filter.c), without building an Image per op and without Pillow's per-pixel callbacks: its
 * generic affine transform calls a filter function per pixel, several times slower than this loop.
 *
 * lut(img, table) -> None                 img[y, x, c] = table[256 * c + img[y, x, c]], in place; table: 768 bytes
 * histogram(img, counts) -> None          counts (768 int64) = each channel's 256-bin histogram
 * gray_mean(img) -> float                 the mean of Pillow's "L" conversion of the tile
 * blend_gray(img, factor) -> None         Pillow's blend(L(img), img, factor), in place (ImageEnhance.Color)
 * sharpen(src, dst, factor) -> None       blend(SMOOTH(src), src, factor) into dst (ImageEnhance.Sharpness)
 * affine(src, dst, matrix, fill, bilinear) -> None
 *     dst pixel (x, y) samples src at (a x' + b y' + c, d x' + e y' + f), x' = x + 0.5, y' = y + 0.5: Pillow's
 *     Image.transform(AFFINE) with fillcolor, bilinear (Pillow's edge rule) or nearest.
 * ValueError for buffers of the wrong shape, type or size.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    Py_buffer view;
    uint8_t *px;
    Py_ssize_t h, w;
} Tile;

/* An (H, W, 3) uint8 C-contiguous buffer; 0, or -1 with ValueError set and nothing held. */
static int get_tile(PyObject *obj, Tile *t, int writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &t->view, flags) != 0)
        return -1;
    const char *f = t->view.format ? t->view.format : "B";
    if (t->view.ndim != 3 || t->view.shape[2] != 3 || t->view.itemsize != 1 || strcmp(f, "B") != 0 ||
        t->view.shape[0] < 1 || t->view.shape[1] < 1) {
        PyErr_SetString(PyExc_ValueError, "want an (H, W, 3) uint8 C-contiguous tile");
        PyBuffer_Release(&t->view);
        return -1;
    }
    t->px = t->view.buf;
    t->h = t->view.shape[0];
    t->w = t->view.shape[1];
    return 0;
}

static inline uint8_t clip_trunc(float v) {  /* Pillow's blend: clip, then truncate */
    if (v <= 0.0f)
        return 0;
    if (v >= 255.0f)
        return 255;
    return (uint8_t)v;
}

static inline uint8_t blend(int degenerate, int x, float alpha) {
    /* Pillow's ImagingBlend, both branches: inside [0, 1] nothing leaves 0..255, and truncation is the same */
    return clip_trunc((float)degenerate + alpha * (float)(x - degenerate));
}

static inline int luma(const uint8_t *p) {  /* Pillow's RGB -> L: L24 >> 16 */
    return (p[0] * 19595 + p[1] * 38470 + p[2] * 7471 + 0x8000) >> 16;
}

static PyObject *lut(PyObject *self, PyObject *args) {
    PyObject *obj;
    Py_buffer table;
    if (!PyArg_ParseTuple(args, "Oy*", &obj, &table))
        return NULL;
    Tile t;
    if (table.len != 768) {
        PyBuffer_Release(&table);
        PyErr_SetString(PyExc_ValueError, "want a 768-byte table (256 per channel)");
        return NULL;
    }
    if (get_tile(obj, &t, 1) != 0) {
        PyBuffer_Release(&table);
        return NULL;
    }
    const uint8_t *lt = table.buf;
    Py_ssize_t n = t.h * t.w;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t *p = t.px + 3 * i;
        p[0] = lt[p[0]];
        p[1] = lt[256 + p[1]];
        p[2] = lt[512 + p[2]];
    }
    PyBuffer_Release(&t.view);
    PyBuffer_Release(&table);
    Py_RETURN_NONE;
}

static PyObject *histogram(PyObject *self, PyObject *args) {
    PyObject *obj, *counts_obj;
    if (!PyArg_ParseTuple(args, "OO", &obj, &counts_obj))
        return NULL;
    Tile t;
    if (get_tile(obj, &t, 0) != 0)
        return NULL;
    Py_buffer counts;
    if (PyObject_GetBuffer(counts_obj, &counts, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) != 0) {
        PyBuffer_Release(&t.view);
        return NULL;
    }
    if (counts.len != 768 * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "want 768 int64 counts");
        PyBuffer_Release(&t.view);
        PyBuffer_Release(&counts);
        return NULL;
    }
    int64_t *c = counts.buf;
    memset(c, 0, 768 * sizeof(int64_t));
    Py_ssize_t n = t.h * t.w;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *p = t.px + 3 * i;
        c[p[0]]++;
        c[256 + p[1]]++;
        c[512 + p[2]]++;
    }
    PyBuffer_Release(&t.view);
    PyBuffer_Release(&counts);
    Py_RETURN_NONE;
}

static PyObject *gray_mean(PyObject *self, PyObject *args) {
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "O", &obj))
        return NULL;
    Tile t;
    if (get_tile(obj, &t, 0) != 0)
        return NULL;
    Py_ssize_t n = t.h * t.w;
    int64_t sum = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        sum += luma(t.px + 3 * i);
    PyBuffer_Release(&t.view);
    return PyFloat_FromDouble((double)sum / (double)n);
}

static PyObject *blend_gray(PyObject *self, PyObject *args) {
    PyObject *obj;
    float alpha;
    if (!PyArg_ParseTuple(args, "Of", &obj, &alpha))
        return NULL;
    Tile t;
    if (get_tile(obj, &t, 1) != 0)
        return NULL;
    Py_ssize_t n = t.h * t.w;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t *p = t.px + 3 * i;
        int g = luma(p);
        p[0] = blend(g, p[0], alpha);
        p[1] = blend(g, p[1], alpha);
        p[2] = blend(g, p[2], alpha);
    }
    PyBuffer_Release(&t.view);
    Py_RETURN_NONE;
}

/* Two tiles of one shape, src read, dst written; 0 or -1 with an error set and nothing held. */
static int get_pair(PyObject *src_obj, PyObject *dst_obj, Tile *src, Tile *dst) {
    if (get_tile(src_obj, src, 0) != 0)
        return -1;
    if (get_tile(dst_obj, dst, 1) != 0) {
        PyBuffer_Release(&src->view);
        return -1;
    }
    if (src->h != dst->h || src->w != dst->w || src->px == dst->px) {
        PyErr_SetString(PyExc_ValueError, "want two distinct tiles of one shape");
        PyBuffer_Release(&src->view);
        PyBuffer_Release(&dst->view);
        return -1;
    }
    return 0;
}

static PyObject *sharpen(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    float alpha;
    if (!PyArg_ParseTuple(args, "OOf", &src_obj, &dst_obj, &alpha))
        return NULL;
    Tile s, d;
    if (get_pair(src_obj, dst_obj, &s, &d) != 0)
        return NULL;
    Py_ssize_t w = s.w, h = s.h, row = 3 * w;
    /* Pillow's SMOOTH (3x3, weights 1 around a centre of 5, / 13) leaves the outermost rows and columns as they
     * are, so there the blend returns the pixel itself. */
    memcpy(d.px, s.px, (size_t)(row * h));
    for (Py_ssize_t y = 1; y + 1 < h; y++) {
        const uint8_t *up = s.px + (y - 1) * row, *mid = s.px + y * row, *down = s.px + (y + 1) * row;
        uint8_t *out = d.px + y * row;
        for (Py_ssize_t x = 3; x < row - 3; x++) {
            int ring = up[x - 3] + up[x] + up[x + 3] + mid[x - 3] + mid[x + 3] + down[x - 3] + down[x] + down[x + 3];
            int smooth = (ring + 5 * mid[x] + 6) / 13;  /* rounded, as Pillow's 8-bit filter rounds */
            out[x] = blend(smooth, mid[x], alpha);
        }
    }
    PyBuffer_Release(&s.view);
    PyBuffer_Release(&d.view);
    Py_RETURN_NONE;
}

static inline Py_ssize_t clamp(Py_ssize_t v, Py_ssize_t hi) { return v < 0 ? 0 : v > hi ? hi : v; }

static PyObject *affine(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    double a[6];
    int fill[3], bilinear;
    if (!PyArg_ParseTuple(args, "OO(dddddd)(iii)p", &src_obj, &dst_obj, &a[0], &a[1], &a[2], &a[3], &a[4], &a[5],
                          &fill[0], &fill[1], &fill[2], &bilinear))
        return NULL;
    Tile s, d;
    if (get_pair(src_obj, dst_obj, &s, &d) != 0)
        return NULL;
    Py_ssize_t w = s.w, h = s.h, row = 3 * w;
    /* Source coordinates in fixed point (16 fractional bits), stepped along each row as Pillow's own fixed-point
     * affine path steps them, and shifted by half a pixel to the sample grid (Pillow's BILINEAR_HEAD): a pixel is
     * inside where -0.5 <= coordinate < size - 0.5. The drift over a row stays under 1/256 of a pixel. */
    const int64_t one = 1 << 16, half = one / 2, step_x = llround(a[0] * one), step_y = llround(a[3] * one);
    const int64_t x_end = w * one - half, y_end = h * one - half;
    for (Py_ssize_t y = 0; y < h; y++) {
        uint8_t *out = d.px + y * row;
        int64_t xx = llround((a[0] * 0.5 + a[1] * (y + 0.5) + a[2] - 0.5) * one);
        int64_t yy = llround((a[3] * 0.5 + a[4] * (y + 0.5) + a[5] - 0.5) * one);
        for (Py_ssize_t x = 0; x < w; x++, out += 3, xx += step_x, yy += step_y) {
            if (xx < -half || xx >= x_end || yy < -half || yy >= y_end) {  /* outside the source: the fill */
                out[0] = fill[0], out[1] = fill[1], out[2] = fill[2];
                continue;
            }
            if (!bilinear) {  /* Pillow's nearest_filter32: the pixel the unshifted coordinate falls in */
                memcpy(out, s.px + ((yy + half) >> 16) * row + ((xx + half) >> 16) * 3, 3);
                continue;
            }
            /* Pillow's BILINEAR_BODY, where the missing neighbours at an edge are the edge pixels; weights of
             * 1/2048, truncated as Pillow truncates its doubles: within a grey level of it. */
            Py_ssize_t xf = xx >> 16, yf = yy >> 16;  /* floor */
            int wx = (int)((xx & 0xFFFF) >> 5), wy = (int)((yy & 0xFFFF) >> 5);
            const uint8_t *p0, *p1, *q0, *q1;  /* top-left, top-right, bottom-left, bottom-right */
            if (xf >= 0 && yf >= 0 && xf + 1 < w && yf + 1 < h) {
                p0 = s.px + yf * row + xf * 3, p1 = p0 + 3, q0 = p0 + row, q1 = q0 + 3;
            } else {
                const uint8_t *r0 = s.px + clamp(yf, h - 1) * row;
                const uint8_t *r1 = yf + 1 >= 0 && yf + 1 < h ? s.px + (yf + 1) * row : r0;
                Py_ssize_t x0 = clamp(xf, w - 1) * 3, x1 = clamp(xf + 1, w - 1) * 3;
                p0 = r0 + x0, p1 = r0 + x1, q0 = r1 + x0, q1 = r1 + x1;
            }
            for (int c = 0; c < 3; c++) {
                int v1 = p0[c] * 2048 + (p1[c] - p0[c]) * wx;
                int v2 = q0[c] * 2048 + (q1[c] - q0[c]) * wx;
                out[c] = (uint8_t)((v1 * 2048 + (v2 - v1) * wy) >> 22);
            }
        }
    }
    PyBuffer_Release(&s.view);
    PyBuffer_Release(&d.view);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"lut", lut, METH_VARARGS, "lut(img, table): img[..., c] = table[256 * c + img[..., c]], in place."},
    {"histogram", histogram, METH_VARARGS, "histogram(img, counts): counts (768 int64) = per-channel histograms."},
    {"gray_mean", gray_mean, METH_VARARGS, "gray_mean(img) -> float: the mean of Pillow's L conversion."},
    {"blend_gray", blend_gray, METH_VARARGS, "blend_gray(img, factor): Pillow's ImageEnhance.Color, in place."},
    {"sharpen", sharpen, METH_VARARGS, "sharpen(src, dst, factor): Pillow's ImageEnhance.Sharpness into dst."},
    {"affine", affine, METH_VARARGS,
     "affine(src, dst, matrix, fill, bilinear): Pillow's Image.transform(AFFINE, fillcolor=fill) into dst."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_augment", "Augmentation ops on a uint8 RGB tile.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__augment(void) { return PyModule_Create(&module); }
