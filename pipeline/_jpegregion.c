/* Decode only a region of a JPEG, optionally at 1/2, 1/4 or 1/8 scale, with libjpeg-turbo.
 *
 * Why C: a RandomResizedCrop keeps on average about half of an image, and libjpeg-turbo can skip what lies outside
 * it: rows below the region are never entropy-decoded (the decode stops there), rows above are skipped without the
 * inverse DCT and colour conversion (jpeg_skip_scanlines), and columns outside get no inverse DCT or colour
 * conversion (jpeg_crop_scanline, to the iMCU grid). No maintained Python binding exposes these calls (Pillow,
 * simplejpeg and OpenCV decode whole images; PyTurboJPEG's cropping is the lossless transform, which re-encodes);
 * pipeline/jpeg.py keeps a Pillow fallback with the same output geometry.
 *
 * decode_region(data, x, y, w, h, denom) -> (pixels: bytes, x0, y0, width, height) | None
 *   (x, y, w, h): the region in the scaled image's pixels; denom: 1, 2, 4 or 8. The returned RGB rows (uint8,
 *   width*3 bytes each) cover at least the region: x0 <= x and width >= w, since columns are cut at iMCU bounds.
 *   None for CMYK/YCCK images, which libjpeg cannot convert to RGB: the caller decodes those with Pillow.
 *   ValueError for bytes libjpeg cannot decode, with its message.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
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

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data;
    int x, y, w, h, denom;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iiiii", &data, &x, &y, &w, &h, &denom))
        return NULL;
    if (denom != 1 && denom != 2 && denom != 4 && denom != 8) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "denom must be 1, 2, 4 or 8, got %d", denom);
    }
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
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "%s", err.message);
    }
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        Py_RETURN_NONE;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)denom;
    jpeg_start_decompress(&cinfo);
    if (x < 0) x = 0;
    if (y < 0) y = 0;
    if ((JDIMENSION)x >= cinfo.output_width || (JDIMENSION)y >= cinfo.output_height || w <= 0 || h <= 0) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "region (%d, %d, %d, %d) outside the %ux%u image", x, y, w, h,
                            cinfo.output_width, cinfo.output_height);
    }
    if ((JDIMENSION)(x + w) > cinfo.output_width) w = (int)cinfo.output_width - x;
    if ((JDIMENSION)(y + h) > cinfo.output_height) h = (int)cinfo.output_height - y;
    x0 = (JDIMENSION)x;
    width = (JDIMENSION)w;
    if (x0 > 0 || width < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &x0, &width);  /* widens to the iMCU grid: x0 <= x, width >= w */
    pixels = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)width * 3 * h);
    if (pixels == NULL) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    {
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(pixels);
        PyThreadState *ts = PyEval_SaveThread();  /* libjpeg's work runs without the GIL */
        if (setjmp(err.jump)) {
            PyEval_RestoreThread(ts);
            jpeg_destroy_decompress(&cinfo);
            PyBuffer_Release(&data);
            Py_DECREF(pixels);
            return PyErr_Format(PyExc_ValueError, "%s", err.message);
        }
        if (y > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)y);
        while (rows < h) {
            row = out + (size_t)rows * width * 3;
            if (jpeg_read_scanlines(&cinfo, &row, 1) != 1) break;
            rows++;
        }
        jpeg_abort_decompress(&cinfo);  /* the rows below the region are never decoded */
        jpeg_destroy_decompress(&cinfo);
        PyEval_RestoreThread(ts);
    }
    PyBuffer_Release(&data);
    if (rows < h || err.truncated) {
        Py_DECREF(pixels);
        return PyErr_Format(PyExc_ValueError, "image file is truncated (%d of the region's %d rows)", rows, h);
    }
    return Py_BuildValue("(Niiii)", pixels, (int)x0, y, (int)width, h);
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, x, y, w, h, denom) -> (bytes, x0, y0, width, height) | None: RGB rows covering the "
     "region (x, y, w, h) of the image decoded at 1/denom scale; None for CMYK/YCCK images."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegregion", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jpegregion(void) {
    return PyModule_Create(&module);
}
