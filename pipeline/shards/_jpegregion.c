/* Decode only a region of a JPEG, optionally at 1/2, 1/4 or 1/8 scale, with libjpeg-turbo; and re-encode a JPEG
 * losslessly so that any region of it can be decoded alone.
 *
 * Why C: a RandomResizedCrop keeps on average about half of an image, and libjpeg-turbo can skip what lies outside
 * it: rows below the region are never entropy-decoded (the decode stops there), rows above are skipped without the
 * inverse DCT and colour conversion (jpeg_skip_scanlines), and columns outside get no inverse DCT or colour
 * conversion (jpeg_crop_scanline, to the iMCU grid). No maintained Python binding exposes these calls (Pillow,
 * simplejpeg and OpenCV decode whole images; PyTurboJPEG's cropping is the lossless transform, which re-encodes);
 * pipeline/shards/jpeg.py keeps a Pillow fallback with the same output geometry.
 *
 * The entropy (Huffman) decoding is most of a decode of a photo, and it is sequential: libjpeg must read every
 * block above the region, and every column of the rows it keeps, to find where the next block starts. A restart
 * marker after every MCU (the JPEG standard's resynchronisation points; the DC predictors restart there) lets us
 * find where any MCU starts by scanning for markers instead, so recode() writes one after every MCU, and
 * decode_region() of such a file builds a small JPEG of just the region's MCUs (the same headers, with the region's
 * size, and the region's MCU data with the markers renumbered) and decodes that: only the region is
 * entropy-decoded. recode() is lossless: it copies the DCT coefficients and only re-packs them
 * (baseline, optimized Huffman tables), so every decoder gives the same pixels as from the original file.
 *
 * decode_region(data, x, y, w, h, denom, channels=3) -> (pixels: bytes, x0, y0, width, height) | None
 *   (x, y, w, h): the region in the scaled image's pixels; denom: 1, 2, 4 or 8. The returned rows (uint8, RGB or,
 *   with channels=4, RGBX: a padding byte a pixel, the layout Pillow maps without a copy) cover at least the
 *   region: x0 <= x, y0 <= y, x0 + width >= x + w, y0 + height >= y + h, since the region is widened to the iMCU
 *   grid. None for CMYK/YCCK images, which libjpeg cannot convert to RGB:
 *   the caller decodes those with Pillow. ValueError for bytes libjpeg cannot decode, with its message.
 * recode(data) -> bytes | None: the same image, baseline, with a restart marker after every MCU; None for CMYK/YCCK.
 * region_jpeg(data, x, y, w, h, denom) -> (jpeg: bytes, x0, y0) | None: for a recoded file, the JPEG that
 *   decode_region decodes (the region's MCUs), whose scaled image starts at (x0, y0) of the whole one; else None.
 * size(data) -> (width, height, components, restart_every_mcu) | None: read from the markers (no libjpeg), None
 *   when the bytes are not a JPEG whose header this can read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>
#include <jerror.h>

struct error_manager {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int truncated;
    char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo) {
    struct error_manager *err = (struct error_manager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    /* Warnings such as extraneous bytes are not errors (Pillow decodes such files too); data that ends before the
     * region does is one, as it is for Pillow. */
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF)
        ((struct error_manager *)cinfo->err)->truncated = 1;
}

/* The region (x, y, w, h) of `buf` decoded at 1/denom scale into rows of `channels` bytes a pixel (3: RGB, 4:
 * RGBX); x0 and y0 of the result are offset by (dx, dy). */
static PyObject *decode_buffer(const unsigned char *buf, size_t len, int x, int y, int w, int h, int denom,
                               int channels, int dx, int dy) {
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    PyObject *pixels = NULL;
    JSAMPROW row;
    int rows = 0;
    JDIMENSION x0 = 0, width = 0;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.message[0] = '\0';
    err.truncated = 0;
    jpeg_create_decompress(&cinfo);
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return PyErr_Format(PyExc_ValueError, "%s", err.message);
    }
    jpeg_mem_src(&cinfo, buf, (unsigned long)len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        jpeg_destroy_decompress(&cinfo);
        Py_RETURN_NONE;
    }
    cinfo.out_color_space = channels == 4 ? JCS_EXT_RGBX : JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)denom;
    jpeg_start_decompress(&cinfo);
    if (x < 0) x = 0;
    if (y < 0) y = 0;
    if ((JDIMENSION)x >= cinfo.output_width || (JDIMENSION)y >= cinfo.output_height || w <= 0 || h <= 0) {
        jpeg_destroy_decompress(&cinfo);
        return PyErr_Format(PyExc_ValueError, "region (%d, %d, %d, %d) outside the %ux%u image", x + dx, y + dy, w,
                            h, cinfo.output_width, cinfo.output_height);
    }
    if ((JDIMENSION)(x + w) > cinfo.output_width) w = (int)cinfo.output_width - x;
    if ((JDIMENSION)(y + h) > cinfo.output_height) h = (int)cinfo.output_height - y;
    x0 = (JDIMENSION)x;
    width = (JDIMENSION)w;
    if (x0 > 0 || width < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &x0, &width);  /* widens to the iMCU grid: x0 <= x, width >= w */
    pixels = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)width * channels * h);
    if (pixels == NULL) {
        jpeg_destroy_decompress(&cinfo);
        return NULL;
    }
    {
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(pixels);
        PyThreadState *ts = PyEval_SaveThread();  /* libjpeg's work runs without the GIL */
        if (setjmp(err.jump)) {
            PyEval_RestoreThread(ts);
            jpeg_destroy_decompress(&cinfo);
            Py_DECREF(pixels);
            return PyErr_Format(PyExc_ValueError, "%s", err.message);
        }
        if (y > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)y);
        while (rows < h) {
            row = out + (size_t)rows * width * channels;
            if (jpeg_read_scanlines(&cinfo, &row, 1) != 1) break;
            rows++;
        }
        jpeg_abort_decompress(&cinfo);  /* the rows below the region are never decoded */
        jpeg_destroy_decompress(&cinfo);
        PyEval_RestoreThread(ts);
    }
    if (rows < h || err.truncated) {
        Py_DECREF(pixels);
        return PyErr_Format(PyExc_ValueError, "image file is truncated (%d of the region's %d rows)", rows, h);
    }
    return Py_BuildValue("(Niiii)", pixels, (int)x0 + dx, y + dy, (int)width, h);
}

/* What the markers before the first scan say. Sizes are in pixels; an MCU is mcu_w x mcu_h pixels. */
struct layout {
    size_t sof;       /* offset of the SOF marker (its height and width fields are at +5 and +7) */
    size_t scan;      /* offset of the first byte of entropy-coded data (just past the SOS segment) */
    int sof_type;     /* 0xC0...0xCF */
    int width, height, components, scan_components, restart_interval, mcu_w, mcu_h;
};

static int read_layout(const unsigned char *b, size_t n, struct layout *L) {
    size_t p = 2;
    memset(L, 0, sizeof *L);
    if (n < 4 || b[0] != 0xFF || b[1] != 0xD8)
        return -1;
    while (p + 4 <= n) {
        unsigned marker = b[p + 1];
        size_t length;
        if (b[p] != 0xFF) return -1;
        if (marker == 0xFF) { p++; continue; }  /* fill byte */
        length = ((size_t)b[p + 2] << 8) | b[p + 3];
        if (length < 2 || p + 2 + length > n) return -1;
        if (marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC) {
            int hmax = 1, vmax = 1;
            if (length < 8) return -1;
            L->sof = p;
            L->sof_type = (int)marker;
            L->height = (b[p + 5] << 8) | b[p + 6];
            L->width = (b[p + 7] << 8) | b[p + 8];
            L->components = b[p + 9];
            if (length < 8 + 3 * (size_t)L->components) return -1;
            for (int i = 0; i < L->components; i++) {
                int sampling = b[p + 11 + 3 * i];
                if ((sampling >> 4) > hmax) hmax = sampling >> 4;
                if ((sampling & 15) > vmax) vmax = sampling & 15;
            }
            /* A scan of one component has one block per MCU; an interleaved scan, the largest sampling factors. */
            L->mcu_w = L->components == 1 ? 8 : 8 * hmax;
            L->mcu_h = L->components == 1 ? 8 : 8 * vmax;
        } else if (marker == 0xDD && length >= 4) {
            L->restart_interval = (b[p + 4] << 8) | b[p + 5];
        } else if (marker == 0xDA) {
            L->scan_components = b[p + 4];
            L->scan = p + 2 + length;
            return L->sof ? 0 : -1;
        }
        p += 2 + length;
    }
    return -1;
}

/* recode()'s files: baseline or extended Huffman, one scan of every component, a restart marker after every MCU. */
static int restart_every_mcu(const struct layout *L) {
    return (L->sof_type == 0xC0 || L->sof_type == 0xC1) && L->restart_interval == 1 &&
           L->scan_components == L->components && (L->components == 1 || L->components == 3) && L->width > 0 &&
           L->height > 0;
}

/* A JPEG of the MCU columns [c0, c1) and rows [r0, r1) of `b` (restart_every_mcu), malloc'd into *out; -1 when the
 * data ends before the last of them (the caller then decodes the file itself, which reports the damage). */
static int cut_mcus(const unsigned char *b, size_t n, const struct layout *L, int c0, int r0, int c1, int r1,
                    unsigned char **out, size_t *out_len) {
    size_t cols = (size_t)((L->width + L->mcu_w - 1) / L->mcu_w);
    size_t last = (size_t)(r1 - 1) * cols + (size_t)c1;  /* the intervals needed are < last */
    size_t *starts = malloc(sizeof(size_t) * (last + 1)), found = 0, p = L->scan, size;
    unsigned char *o;
    int width, height;
    unsigned number = 0;
    if (starts == NULL) return -1;
    /* Interval i is the bytes from starts[i] to the marker that ends it (starts[i + 1] - 2); the last one in the
     * file ends at EOI. In entropy-coded data 0xFF is followed by 0x00 (a stuffed byte), a fill 0xFF or a marker. */
    starts[found++] = p;
    while (found <= last && p + 1 < n) {
        const unsigned char *ff = memchr(b + p, 0xFF, n - p - 1);
        unsigned marker;
        if (ff == NULL) break;
        p = (size_t)(ff - b);
        marker = b[p + 1];
        if (marker >= 0xD0 && marker <= 0xD7) {
            if (marker != 0xD0 + ((found - 1) & 7)) break;  /* a marker lost or added: let libjpeg resync */
            starts[found++] = p + 2;
            p += 2;
        } else if (marker == 0x00 || marker == 0xFF) {
            p += marker == 0x00 ? 2 : 1;
        } else {  /* EOI (or another marker): the end of the scan */
            if (found == last) starts[found++] = p + 2;
            break;
        }
    }
    if (found <= last) {
        free(starts);
        return -1;
    }
    size = L->scan + 2;
    for (int r = r0; r < r1; r++)
        size += starts[(size_t)r * cols + (size_t)c1] - starts[(size_t)r * cols + (size_t)c0];
    o = malloc(size);
    if (o == NULL) {
        free(starts);
        return -1;
    }
    memcpy(o, b, L->scan);
    width = (c1 * L->mcu_w < L->width ? c1 * L->mcu_w : L->width) - c0 * L->mcu_w;
    height = (r1 * L->mcu_h < L->height ? r1 * L->mcu_h : L->height) - r0 * L->mcu_h;
    o[L->sof + 5] = (unsigned char)(height >> 8);
    o[L->sof + 6] = (unsigned char)(height & 255);
    o[L->sof + 7] = (unsigned char)(width >> 8);
    o[L->sof + 8] = (unsigned char)(width & 255);
    p = L->scan;
    for (int r = r0; r < r1; r++) {
        for (int c = c0; c < c1; c++) {
            size_t i = (size_t)r * cols + (size_t)c, bytes = starts[i + 1] - 2 - starts[i];
            if (r > r0 || c > c0) {  /* the markers must count 0..7 from the first interval */
                o[p++] = 0xFF;
                o[p++] = (unsigned char)(0xD0 + (number++ & 7));
            }
            memcpy(o + p, b + starts[i], bytes);
            p += bytes;
        }
    }
    o[p++] = 0xFF;
    o[p++] = 0xD9;
    free(starts);
    *out = o;
    *out_len = p;
    return 0;
}

/* The MCUs of `data` that cover the region (x, y, w, h) of its 1/denom-scaled image, as a JPEG of their own, and
 * where that JPEG's scaled image starts in the whole one; -1 when the file has no marker after every MCU (or the
 * markers end early). */
static int cut_region(const unsigned char *b, size_t n, int x, int y, int w, int h, int denom, unsigned char **out,
                      size_t *out_len, int *dx, int *dy) {
    struct layout L;
    int mw, mh, cols, rows, c0, r0, c1, r1;
    if (read_layout(b, n, &L) != 0 || !restart_every_mcu(&L) || x < 0 || y < 0 || w <= 0 || h <= 0)
        return -1;
    mw = L.mcu_w / denom;  /* MCU sides are multiples of 8, so of denom: the scaled MCU grid is whole pixels */
    mh = L.mcu_h / denom;
    cols = (L.width + L.mcu_w - 1) / L.mcu_w;
    rows = (L.height + L.mcu_h - 1) / L.mcu_h;
    c0 = x / mw;
    r0 = y / mh;
    c1 = (x + w + mw - 1) / mw;
    r1 = (y + h + mh - 1) / mh;
    if (c1 > cols) c1 = cols;
    if (r1 > rows) r1 = rows;
    if (c0 >= c1 || r0 >= r1 || cut_mcus(b, n, &L, c0, r0, c1, r1, out, out_len) != 0)
        return -1;
    *dx = c0 * mw;
    *dy = r0 * mh;
    return 0;
}

/* The arguments of decode_region, (data, x, y, w, h, denom[, channels]), and of region_jpeg (channels NULL: no
 * such argument); -1 with the error set. */
static int parse_region(PyObject *args, Py_buffer *data, int *x, int *y, int *w, int *h, int *denom, int *channels) {
    int ok = channels ? PyArg_ParseTuple(args, "y*iiiii|i", data, x, y, w, h, denom, channels)
                      : PyArg_ParseTuple(args, "y*iiiii", data, x, y, w, h, denom);
    if (!ok)
        return -1;
    if (*denom != 1 && *denom != 2 && *denom != 4 && *denom != 8) {
        PyBuffer_Release(data);
        PyErr_Format(PyExc_ValueError, "denom must be 1, 2, 4 or 8, got %d", *denom);
        return -1;
    }
    if (channels && *channels != 3 && *channels != 4) {
        PyBuffer_Release(data);
        PyErr_Format(PyExc_ValueError, "channels must be 3 or 4, got %d", *channels);
        return -1;
    }
    return 0;
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data;
    int x, y, w, h, denom, dx, dy, channels = 3;
    unsigned char *cut;
    size_t cut_len;
    PyObject *result;
    (void)self;
    if (parse_region(args, &data, &x, &y, &w, &h, &denom, &channels) != 0)
        return NULL;
    if (cut_region(data.buf, (size_t)data.len, x, y, w, h, denom, &cut, &cut_len, &dx, &dy) == 0) {
        result = decode_buffer(cut, cut_len, x - dx, y - dy, w, h, denom, channels, dx, dy);
        free(cut);
    } else {
        result = decode_buffer(data.buf, (size_t)data.len, x, y, w, h, denom, channels, 0, 0);
    }
    PyBuffer_Release(&data);
    return result;
}

static PyObject *region_jpeg(PyObject *self, PyObject *args) {
    Py_buffer data;
    int x, y, w, h, denom, dx, dy;
    unsigned char *cut;
    size_t cut_len;
    PyObject *result;
    (void)self;
    if (parse_region(args, &data, &x, &y, &w, &h, &denom, NULL) != 0)
        return NULL;
    if (cut_region(data.buf, (size_t)data.len, x, y, w, h, denom, &cut, &cut_len, &dx, &dy) != 0) {
        PyBuffer_Release(&data);
        Py_RETURN_NONE;
    }
    result = Py_BuildValue("(y#ii)", (const char *)cut, (Py_ssize_t)cut_len, dx, dy);
    free(cut);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *recode(PyObject *self, PyObject *args) {
    Py_buffer data;
    struct jpeg_decompress_struct src;
    struct jpeg_compress_struct dst;
    struct error_manager err;
    jvirt_barray_ptr *coefficients;
    unsigned char *out = NULL;
    unsigned long out_len = 0;
    PyObject *result;
    PyThreadState *ts;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*", &data))
        return NULL;
    src.err = dst.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.message[0] = '\0';
    err.truncated = 0;
    jpeg_create_decompress(&src);
    jpeg_create_compress(&dst);
    ts = PyEval_SaveThread();
    if (setjmp(err.jump)) {
        PyEval_RestoreThread(ts);
        jpeg_destroy_decompress(&src);
        jpeg_destroy_compress(&dst);
        free(out);
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "%s", err.message);
    }
    jpeg_mem_src(&src, data.buf, (unsigned long)data.len);
    jpeg_read_header(&src, TRUE);
    if (src.jpeg_color_space == JCS_CMYK || src.jpeg_color_space == JCS_YCCK) {
        PyEval_RestoreThread(ts);
        jpeg_destroy_decompress(&src);
        jpeg_destroy_compress(&dst);
        PyBuffer_Release(&data);
        Py_RETURN_NONE;
    }
    coefficients = jpeg_read_coefficients(&src);
    if (err.truncated) {
        strcpy(err.message, "image file is truncated");
        longjmp(err.jump, 1);
    }
    jpeg_copy_critical_parameters(&src, &dst);  /* quantization tables, sampling, size: the same coefficients */
    dst.optimize_coding = TRUE;  /* Huffman tables fitted to the image: about as small as the original */
    dst.restart_interval = 1;
    jpeg_mem_dest(&dst, &out, &out_len);
    jpeg_write_coefficients(&dst, coefficients);
    jpeg_finish_compress(&dst);
    jpeg_finish_decompress(&src);
    jpeg_destroy_decompress(&src);
    jpeg_destroy_compress(&dst);
    PyEval_RestoreThread(ts);
    PyBuffer_Release(&data);
    result = PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)out_len);
    free(out);
    return result;
}

static PyObject *size(PyObject *self, PyObject *args) {
    Py_buffer data;
    struct layout L;
    int ok;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*", &data))
        return NULL;
    ok = read_layout(data.buf, (size_t)data.len, &L) == 0;
    PyBuffer_Release(&data);
    if (!ok) Py_RETURN_NONE;
    return Py_BuildValue("(iiiO)", L.width, L.height, L.components, restart_every_mcu(&L) ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, x, y, w, h, denom, channels=3) -> (bytes, x0, y0, width, height) | None: RGB (or RGBX) "
     "rows covering the region (x, y, w, h) of the image decoded at 1/denom scale; None for CMYK/YCCK images."},
    {"recode", recode, METH_VARARGS,
     "recode(data) -> bytes | None: the same DCT coefficients, baseline, a restart marker after every MCU; None for "
     "CMYK/YCCK images."},
    {"region_jpeg", region_jpeg, METH_VARARGS,
     "region_jpeg(data, x, y, w, h, denom) -> (jpeg, x0, y0) | None: what decode_region decodes for a recoded file: "
     "the MCUs covering the region as a JPEG, whose 1/denom-scaled image starts at (x0, y0); None for other files."},
    {"size", size, METH_VARARGS,
     "size(data) -> (width, height, components, restart_every_mcu) | None: from the JPEG's markers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegregion", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jpegregion(void) {
    return PyModule_Create(&module);
}
