/*
 * The per-sample augmentation ops of pipeline/augment.py on a uint8 RGB tile, (H, W, 3) C-contiguous, in one pass
 * each. They compute what Pillow computes for timm's ops (the formulas, truncations and clippings of Pillow's
 * Geometry.c, Blend.c and Filter.c), without building an Image per op and without Pillow's per-pixel callbacks.
 * Where an op is the same arithmetic on every byte, the loop runs over the bytes so that the compiler vectorizes it.
 *
 * point(img, kind, a, b, factor) -> None   one of the byte-wise ops below, in place:
 *     INVERT 255 - v; POSTERIZE v & a; SOLARIZE v < a ? v : 255 - v; SOLARIZE_ADD v < a ? min(255, v + b) : v;
 *     BLEND Pillow's blend(constant a, img, factor) = clip(trunc(a + factor * (v - a))) in float32
 * autocontrast(img), equalize(img) -> None   ImageOps' two, in place
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

/* AVX2 where the CPU has it, picked at load time (as in _pixels.c); the byte-wise loops vectorize either way. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__GLIBC__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

enum { INVERT, POSTERIZE, SOLARIZE, SOLARIZE_ADD, BLEND };

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

/* The one tile a function takes as its only argument. */
static int one_tile(PyObject *args, Tile *t, int writable) {
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "O", &obj))
        return -1;
    return get_tile(obj, t, writable);
}

/* Two tiles of one shape, src read, dst written (the kernels take them as not overlapping: augment.py passes a fresh
 * dst); 0 or -1 with an error set and nothing held. */
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

/* Pillow's ImagingBlend, both branches at once: float arithmetic, clipped, truncated (inside [0, 1] nothing leaves
 * 0..255 and the truncation is the same). */
static inline uint8_t blend(int degenerate, int v, float alpha) {
    float out = (float)degenerate + alpha * (float)(v - degenerate);
    return out <= 0.0f ? 0 : out >= 255.0f ? 255 : (uint8_t)out;
}

static inline int luma(const uint8_t *p) {  /* Pillow's RGB -> L: L24 >> 16 */
    return (p[0] * 19595 + p[1] * 38470 + p[2] * 7471 + 0x8000) >> 16;
}

MULTIVERSION static void point_bytes(uint8_t *restrict p, Py_ssize_t n, int kind, int a, int b, float alpha) {
    switch (kind) {
    case INVERT:
        for (Py_ssize_t i = 0; i < n; i++)
            p[i] = 255 - p[i];
        break;
    case POSTERIZE:
        for (Py_ssize_t i = 0; i < n; i++)
            p[i] &= (uint8_t)a;
        break;
    case SOLARIZE:
        for (Py_ssize_t i = 0; i < n; i++)
            p[i] = p[i] < a ? p[i] : 255 - p[i];
        break;
    case SOLARIZE_ADD:
        for (Py_ssize_t i = 0; i < n; i++) {
            int v = p[i], added = v + b > 255 ? 255 : v + b;
            p[i] = v < a ? added : v;
        }
        break;
    default:
        for (Py_ssize_t i = 0; i < n; i++)
            p[i] = blend(a, p[i], alpha);
    }
}

static PyObject *point(PyObject *self, PyObject *args) {
    PyObject *obj;
    int kind, a, b;
    float alpha;
    if (!PyArg_ParseTuple(args, "Oiiif", &obj, &kind, &a, &b, &alpha))
        return NULL;
    if (kind < INVERT || kind > BLEND) {
        PyErr_Format(PyExc_ValueError, "unknown point op %d", kind);
        return NULL;
    }
    Tile t;
    if (get_tile(obj, &t, 1) != 0)
        return NULL;
    point_bytes(t.px, t.h * t.w * 3, kind, a, b, alpha);
    PyBuffer_Release(&t.view);
    Py_RETURN_NONE;
}

static void apply_lut(Tile *t, const uint8_t *lt) {
    Py_ssize_t n = t->h * t->w;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t *p = t->px + 3 * i;
        p[0] = lt[p[0]];
        p[1] = lt[256 + p[1]];
        p[2] = lt[512 + p[2]];
    }
}

static void count(const Tile *t, int64_t *c) {
    memset(c, 0, 768 * sizeof(int64_t));
    Py_ssize_t n = t->h * t->w;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *p = t->px + 3 * i;
        c[p[0]]++;
        c[256 + p[1]]++;
        c[512 + p[2]]++;
    }
}

/* Per-byte minima and maxima over blocks of 16 pixels (48 bytes: channel = offset % 3), then per channel. */
MULTIVERSION static void extremes_bytes(const uint8_t *restrict p, Py_ssize_t n, uint8_t lo[3], uint8_t hi[3]) {
    uint8_t bl[48], bh[48];
    memset(bl, 255, sizeof bl);
    memset(bh, 0, sizeof bh);
    Py_ssize_t blocks = n / 48;
    for (Py_ssize_t k = 0; k < blocks; k++)
        for (int j = 0; j < 48; j++) {
            uint8_t v = p[48 * k + j];
            bl[j] = v < bl[j] ? v : bl[j];
            bh[j] = v > bh[j] ? v : bh[j];
        }
    lo[0] = lo[1] = lo[2] = 255;
    hi[0] = hi[1] = hi[2] = 0;
    for (int j = 0; j < 48; j++) {
        lo[j % 3] = bl[j] < lo[j % 3] ? bl[j] : lo[j % 3];
        hi[j % 3] = bh[j] > hi[j % 3] ? bh[j] : hi[j % 3];
    }
    for (Py_ssize_t i = 48 * blocks; i < n; i++) {
        lo[i % 3] = p[i] < lo[i % 3] ? p[i] : lo[i % 3];
        hi[i % 3] = p[i] > hi[i % 3] ? p[i] : hi[i % 3];
    }
}

/* ImageOps.autocontrast(cutoff=0): each channel's lowest and highest values stretched to 0 and 255, the table in
 * Python's doubles and int() (toward zero). */
static PyObject *autocontrast(PyObject *self, PyObject *args) {
    Tile t;
    if (one_tile(args, &t, 1) != 0)
        return NULL;
    uint8_t lo[3], hi[3], table[768];
    extremes_bytes(t.px, t.h * t.w * 3, lo, hi);
    for (int c = 0; c < 3; c++) {
        double scale = hi[c] > lo[c] ? 255.0 / (hi[c] - lo[c]) : 0.0, offset = -lo[c] * scale;
        for (int v = 0; v < 256; v++) {
            int out = (int)(v * scale + offset);
            table[256 * c + v] = hi[c] <= lo[c] ? v : out < 0 ? 0 : out > 255 ? 255 : out;
        }
    }
    apply_lut(&t, table);
    PyBuffer_Release(&t.view);
    Py_RETURN_NONE;
}

/* ImageOps.equalize (Pillow 12): per channel, the cumulative histogram in steps of (pixels - the count of the
 * highest value present) // 255; a channel of one value, or a step of 0, stays as it is. */
static PyObject *equalize(PyObject *self, PyObject *args) {
    Tile t;
    if (one_tile(args, &t, 1) != 0)
        return NULL;
    int64_t h[768];
    uint8_t table[768];
    count(&t, h);
    for (int c = 0; c < 3; c++) {
        const int64_t *hc = h + 256 * c;
        int64_t total = 0, last = 0, present = 0;
        for (int v = 0; v < 256; v++)
            if (hc[v]) {
                total += hc[v], last = hc[v], present++;
            }
        int64_t step = present > 1 ? (total - last) / 255 : 0, n = step / 2;
        for (int v = 0; v < 256; v++) {
            int64_t out = step ? n / step : v;
            table[256 * c + v] = (uint8_t)(out > 255 ? 255 : out);
            n += hc[v];
        }
    }
    apply_lut(&t, table);
    PyBuffer_Release(&t.view);
    Py_RETURN_NONE;
}

static PyObject *gray_mean(PyObject *self, PyObject *args) {
    Tile t;
    if (one_tile(args, &t, 0) != 0)
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
    /* Pillow's trunc(g + alpha (v - g)) for an integer g is g + floor(alpha (v - g)) wherever the sum is positive
     * (and clipped to 0 where it is not): the floors of every difference -255..255 once, then per pixel a luma and
     * three lookups in integers. (Only a product within 2^-17 of an integer could round otherwise in Pillow's
     * float32 sum.) */
    int moved[511];
    for (int d = -255; d <= 255; d++)
        moved[d + 255] = (int)floorf(alpha * (float)d);
    Py_ssize_t n = t.h * t.w;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t *p = t.px + 3 * i;
        int g = luma(p);
        for (int c = 0; c < 3; c++) {
            int out = g + moved[p[c] - g + 255];
            p[c] = out <= 0 ? 0 : out >= 255 ? 255 : (uint8_t)out;
        }
    }
    PyBuffer_Release(&t.view);
    Py_RETURN_NONE;
}

MULTIVERSION static void sharpen_row(const uint8_t *restrict up, const uint8_t *restrict mid,
                                     const uint8_t *restrict down, uint8_t *restrict out, Py_ssize_t n,
                                     float alpha) {
    for (Py_ssize_t x = 3; x < n - 3; x++) {
        int ring = up[x - 3] + up[x] + up[x + 3] + mid[x - 3] + mid[x + 3] + down[x - 3] + down[x] + down[x + 3];
        int smooth = (ring + 5 * mid[x] + 6) / 13;  /* rounded, as Pillow's 8-bit filter rounds */
        out[x] = blend(smooth, mid[x], alpha);
    }
}

static PyObject *sharpen(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    float alpha;
    if (!PyArg_ParseTuple(args, "OOf", &src_obj, &dst_obj, &alpha))
        return NULL;
    Tile s, d;
    if (get_pair(src_obj, dst_obj, &s, &d) != 0)
        return NULL;
    Py_ssize_t h = s.h, row = 3 * s.w;
    /* Pillow's SMOOTH (3x3, weights 1 around a centre of 5, / 13) leaves the outermost rows and columns as they
     * are, so there the blend returns the pixel itself. */
    memcpy(d.px, s.px, (size_t)(row * h));
    for (Py_ssize_t y = 1; y + 1 < h; y++)
        sharpen_row(s.px + (y - 1) * row, s.px + y * row, s.px + (y + 1) * row, d.px + y * row, row, alpha);
    PyBuffer_Release(&s.view);
    PyBuffer_Release(&d.view);
    Py_RETURN_NONE;
}

static inline Py_ssize_t clamp(Py_ssize_t v, Py_ssize_t hi) { return v < 0 ? 0 : v > hi ? hi : v; }

/* Source coordinates in fixed point (16 fractional bits), shifted by half a pixel to the sample grid (Pillow's
 * BILINEAR_HEAD): a pixel is inside where -0.5 <= coordinate < size - 0.5. Bilinear weights of 1/2048, truncated as
 * Pillow truncates its doubles: within a grey level of it. */
#define ONE ((int64_t)1 << 16)
#define HALF (ONE / 2)

static inline uint8_t lerp2(int p0, int p1, int q0, int q1, int wx, int wy) {
    int v1 = p0 * 2048 + (p1 - p0) * wx, v2 = q0 * 2048 + (q1 - q0) * wx;
    return (uint8_t)((v1 * 2048 + (v2 - v1) * wy) >> 22);
}

/* One output pixel at source (xx, yy), fixed point, inside the source: Pillow's BILINEAR_BODY, where the missing
 * neighbours at an edge are the edge pixels. */
static inline void sample(const Tile *s, int64_t xx, int64_t yy, uint8_t *out) {
    Py_ssize_t w = s->w, h = s->h, row = 3 * w, xf = xx >> 16, yf = yy >> 16;  /* floor */
    int wx = (int)((xx & 0xFFFF) >> 5), wy = (int)((yy & 0xFFFF) >> 5);
    const uint8_t *r0 = s->px + clamp(yf, h - 1) * row, *r1 = yf + 1 >= 0 && yf + 1 < h ? r0 + (yf >= 0) * row : r0;
    Py_ssize_t x0 = clamp(xf, w - 1) * 3, x1 = clamp(xf + 1, w - 1) * 3;
    for (int c = 0; c < 3; c++)
        out[c] = lerp2(r0[x0 + c], r0[x1 + c], r1[x0 + c], r1[x1 + c], wx, wy);
}

/* The rows of a transform that moves whole rows (a = 1, d = 0: shears along x, translations): every pixel of a row
 * has the same weights, so the inside of a row is one loop over its bytes. */
MULTIVERSION static void shift_row(const uint8_t *restrict r0, const uint8_t *restrict r1, uint8_t *restrict out,
                                   Py_ssize_t n, int wx, int wy) {
    if (wy == 0 || wx == 0) {
        /* One direction only (shears along x and translations by whole rows or columns): floor(a + (b - a) w) in
         * 16-bit lanes, twice the lanes of the 2-D case, with the weight to 1/256 */
        const uint8_t *restrict b = wy == 0 ? r0 + 3 : r1;
        uint16_t w = (uint16_t)((wy == 0 ? wx : wy) >> 3), v = 256 - w;
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = (uint8_t)((r0[i] * v + b[i] * w) >> 8);
        return;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = lerp2(r0[i], r0[i + 3], r1[i], r1[i + 3], wx, wy);
}

static void affine_rows(const Tile *s, const Tile *d, const double *a, const int *fill) {
    Py_ssize_t w = s->w, h = s->h, row = 3 * w;
    for (Py_ssize_t y = 0; y < h; y++) {
        uint8_t *out = d->px + y * row;
        int64_t xx0 = llround((0.5 + a[1] * (y + 0.5) + a[2] - 0.5) * ONE);
        int64_t yy = llround((a[4] * (y + 0.5) + a[5] - 0.5) * ONE);
        Py_ssize_t lo = 0, hi = 0;  /* the inside pixels of this row: x in [lo, hi) */
        if (yy >= -HALF && yy < h * ONE - HALF) {
            /* xx0 + x ONE >= -HALF and < w ONE - HALF */
            int64_t first = -HALF - xx0, end = w * ONE - HALF - xx0;
            lo = first <= 0 ? 0 : (Py_ssize_t)((first + ONE - 1) / ONE);
            hi = end <= 0 ? 0 : (Py_ssize_t)((end + ONE - 1) / ONE);
            lo = lo > w ? w : lo, hi = hi > w ? w : hi;
        }
        for (Py_ssize_t x = 0; x < w; x++) {
            if (x >= lo && x < hi)
                continue;
            out[3 * x] = fill[0], out[3 * x + 1] = fill[1], out[3 * x + 2] = fill[2];
        }
        if (lo >= hi)
            continue;
        Py_ssize_t shift = xx0 >> 16, yf = yy >> 16;  /* source x = x + shift (+ the weight), source row yf */
        int wx = (int)((xx0 & 0xFFFF) >> 5), wy = (int)((yy & 0xFFFF) >> 5);
        /* where both neighbours lie inside: x + shift >= 0 and x + shift + 1 < w, and rows inside too */
        Py_ssize_t a_lo = -shift > lo ? -shift : lo, a_hi = w - 1 - shift < hi ? w - 1 - shift : hi;
        if (yf < 0 || yf + 1 >= h || a_lo >= a_hi) {
            a_lo = a_hi = lo;
        } else {
            const uint8_t *r0 = s->px + yf * row + (shift + a_lo) * 3;  /* source pixel of output pixel a_lo */
            shift_row(r0, r0 + row, out + a_lo * 3, (a_hi - a_lo) * 3, wx, wy);
        }
        for (Py_ssize_t x = lo; x < hi; x++)
            if (x < a_lo || x >= a_hi)
                sample(s, xx0 + x * ONE, yy, out + 3 * x);
    }
}

/* A transform that moves whole columns by whole and fractional rows (a = 1, b = c = 0, e = 1: shears along y):
 * every pixel of a column has the same vertical weight and none horizontally, so a column is a 1-D blend of two
 * source pixels. The row coordinate steps along x as the general path steps it. */
static void affine_columns(const Tile *s, const Tile *d, const double *a, const int *fill) {
    Py_ssize_t w = s->w, h = s->h, row = 3 * w;
    const int64_t step_y = llround(a[3] * ONE), first = llround((a[3] * 0.5 + a[5]) * ONE);
    for (Py_ssize_t x = 0; x < w; x++) {
        int64_t off = first + x * step_y;  /* the row coordinate of output row y is y ONE + off */
        int64_t from = -HALF - off, end = h * ONE - HALF - off;  /* inside: from <= y ONE < end */
        Py_ssize_t lo = from <= 0 ? 0 : (Py_ssize_t)((from + ONE - 1) / ONE);
        Py_ssize_t hi = end <= 0 ? 0 : (Py_ssize_t)((end + ONE - 1) / ONE);
        lo = lo > h ? h : lo, hi = hi > h ? h : hi;
        Py_ssize_t shift = off >> 16;  /* source row of output row y: y + shift, and the next, weight wy */
        int wy = (int)((off & 0xFFFF) >> 5), wv = 2048 - wy;  /* scalar: the 2-D path's precision */
        const uint8_t *col = s->px + 3 * x;
        uint8_t *out = d->px + 3 * x;
        for (Py_ssize_t y = 0; y < h; y++, out += row) {
            if (y < lo || y >= hi) {
                out[0] = fill[0], out[1] = fill[1], out[2] = fill[2];
                continue;
            }
            Py_ssize_t yf = y + shift;  /* at the edges both neighbours are the edge row (Pillow's clamp) */
            const uint8_t *p = col + clamp(yf, h - 1) * row, *q = yf + 1 >= 0 && yf + 1 < h ? p + (yf >= 0) * row : p;
            for (int c = 0; c < 3; c++)
                out[c] = (uint8_t)((p[c] * wv + q[c] * wy) >> 11);
        }
    }
}

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
    if (bilinear && a[0] == 1.0 && a[3] == 0.0) {
        affine_rows(&s, &d, a, fill);
    } else if (bilinear && a[0] == 1.0 && a[1] == 0.0 && a[2] == 0.0 && a[4] == 1.0) {
        affine_columns(&s, &d, a, fill);
    } else {
        Py_ssize_t w = s.w, h = s.h, row = 3 * w;
        /* stepped along each row as Pillow's own fixed-point affine path steps; the drift over a row stays under
         * 1/256 of a pixel */
        const int64_t step_x = llround(a[0] * ONE), step_y = llround(a[3] * ONE);
        for (Py_ssize_t y = 0; y < h; y++) {
            uint8_t *out = d.px + y * row;
            int64_t xx = llround((a[0] * 0.5 + a[1] * (y + 0.5) + a[2] - 0.5) * ONE);
            int64_t yy = llround((a[3] * 0.5 + a[4] * (y + 0.5) + a[5] - 0.5) * ONE);
            for (Py_ssize_t x = 0; x < w; x++, out += 3, xx += step_x, yy += step_y) {
                if (xx < -HALF || xx >= w * ONE - HALF || yy < -HALF || yy >= h * ONE - HALF) {
                    out[0] = fill[0], out[1] = fill[1], out[2] = fill[2];  /* outside the source: the fill */
                } else if (!bilinear) {  /* Pillow's nearest_filter32: the pixel the unshifted coordinate is in */
                    memcpy(out, s.px + ((yy + HALF) >> 16) * row + ((xx + HALF) >> 16) * 3, 3);
                } else {
                    Py_ssize_t xf = xx >> 16, yf = yy >> 16;
                    if (xf >= 0 && yf >= 0 && xf + 1 < w && yf + 1 < h) {  /* all four neighbours inside */
                        const uint8_t *p = s.px + yf * row + xf * 3, *q = p + row;
                        int wx = (int)((xx & 0xFFFF) >> 5), wy = (int)((yy & 0xFFFF) >> 5);
                        out[0] = lerp2(p[0], p[3], q[0], q[3], wx, wy);
                        out[1] = lerp2(p[1], p[4], q[1], q[4], wx, wy);
                        out[2] = lerp2(p[2], p[5], q[2], q[5], wx, wy);
                    } else {
                        sample(&s, xx, yy, out);
                    }
                }
            }
        }
    }
    PyBuffer_Release(&s.view);
    PyBuffer_Release(&d.view);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"point", point, METH_VARARGS, "point(img, kind, a, b, factor): one byte-wise op in place (see the source)."},
    {"autocontrast", autocontrast, METH_VARARGS, "autocontrast(img): ImageOps.autocontrast, in place."},
    {"equalize", equalize, METH_VARARGS, "equalize(img): ImageOps.equalize (Pillow 12), in place."},
    {"gray_mean", gray_mean, METH_VARARGS, "gray_mean(img) -> float: the mean of Pillow's L conversion."},
    {"blend_gray", blend_gray, METH_VARARGS, "blend_gray(img, factor): Pillow's ImageEnhance.Color, in place."},
    {"sharpen", sharpen, METH_VARARGS, "sharpen(src, dst, factor): Pillow's ImageEnhance.Sharpness into dst."},
    {"affine", affine, METH_VARARGS,
     "affine(src, dst, matrix, fill, bilinear): Pillow's Image.transform(AFFINE, fillcolor=fill) into dst."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_augment", "Augmentation ops on a uint8 RGB tile.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__augment(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "INVERT", INVERT) || PyModule_AddIntConstant(m, "POSTERIZE", POSTERIZE) ||
              PyModule_AddIntConstant(m, "SOLARIZE", SOLARIZE) ||
              PyModule_AddIntConstant(m, "SOLARIZE_ADD", SOLARIZE_ADD) || PyModule_AddIntConstant(m, "BLEND", BLEND))) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
