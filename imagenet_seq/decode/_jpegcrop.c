/* Decode only a rectangle of a JPEG, optionally DCT-scaled: imagenet_seq._jpegcrop.
 *
 * A RandomResizedCrop keeps less than half of the image on average, and cv2.imdecode always
 * decodes all of it. libjpeg-turbo can do less: jpeg_crop_scanline() narrows decoding to the
 * iMCU columns that cover the box, jpeg_skip_scanlines() skips the rows above it without the
 * IDCT/upsampling/colour work, and the rows below it are never decoded (the object is destroyed
 * after the last row of the box). Used by imagenet_seq.decode; see decode_crop's docstring.
 *
 * Pixels equal cv2.imdecode's for the same scale (then sliced), because
 *   - the decoder settings are OpenCV's (libjpeg defaults: JDCT_ISLOW, fancy upsampling, block
 *     smoothing; output JCS_EXT_BGR, which OpenCV also asks for);
 *   - the decoded columns are widened by EDGE pixels on each side before cropping: libjpeg
 *     treats the cropped region's edges as image edges when it upsamples subsampled chroma (at
 *     scale 1/1, and at reduced scales for some layouts), which would change the box's
 *     first/last column by up to ~30 levels.
 * OpenCV bundles its own libjpeg-turbo, so "equal" is up to differences between the two
 * libjpeg-turbo versions (measured in tests/test_cropdecode.py).
 *
 * All libjpeg work runs without the GIL. libjpeg errors longjmp back here and become
 * JpegError (a ValueError) with libjpeg's message; warnings (corrupt entropy data that libjpeg
 * repairs, as cv2 does) are not printed and do not fail the decode.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h> /* jpeglib.h needs FILE and size_t declared first */
#include <string.h>

#include <jpeglib.h>

/* columns decoded beyond each side of the box so chroma upsampling sees real neighbours */
#define EDGE 2
/* rows per jpeg_read_scanlines call: one call per row costs ~7% more for a whole image */
#define ROWS 16

static PyObject *JpegError;        /* libjpeg failed: corrupt / truncated / not a JPEG */
static PyObject *UnsupportedError; /* a valid JPEG this module does not decode (CMYK, ...) */

enum { OK = 0, ERR_JPEG, ERR_UNSUPPORTED, ERR_BOX };

struct error_mgr {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
};

/* Everything one decode reads and writes; no Python objects (runs without the GIL). */
struct job {
    const unsigned char *data;
    size_t len;
    int denom, x, y, w, h;
    unsigned char *out;
    char msg[JMSG_LENGTH_MAX + 64];
};

static void on_error(j_common_ptr cinfo)
{
    longjmp(((struct error_mgr *)cinfo->err)->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level)
{
    /* Warnings (level < 0) are counted, never printed: cv2 also decodes such images. Trace
     * messages (level >= 0) are dropped. */
    if (level < 0)
        cinfo->err->num_warnings++;
}

/* 1 when an end-of-image marker follows `from`; scans from the end (EOI is normally the last
 * two bytes, possibly followed by padding). 0xFF in entropy-coded data is always followed by
 * 0x00 or a restart marker, so FF D9 after the first scan header can only be EOI. */
static int has_eoi(const unsigned char *from, const unsigned char *end)
{
    const unsigned char *p;
    for (p = end - 2; p >= from; p--)
        if (p[0] == 0xFF && p[1] == 0xD9)
            return 1;
    return 0;
}

static int run(struct job *j)
{
    struct jpeg_decompress_struct cinfo;
    struct error_mgr err;
    JSAMPARRAY rows;
    JDIMENSION xoff, width, i;
    int status = OK, xs, xe;

    memset(&cinfo, 0, sizeof cinfo); /* jpeg_destroy_decompress is safe on a zeroed struct */
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    if (setjmp(err.jump)) {
        err.pub.format_message((j_common_ptr)&cinfo, j->msg);
        jpeg_destroy_decompress(&cinfo);
        return ERR_JPEG;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, j->data, (unsigned long)j->len);
    jpeg_read_header(&cinfo, TRUE);
    /* cv2 rejects a file without EOI (a cut-off record); the rows below the box are never
     * read here, so check for it explicitly rather than decode a truncated file. */
    if (!has_eoi(cinfo.src->next_input_byte, j->data + j->len)) {
        snprintf(j->msg, sizeof j->msg, "truncated JPEG (no end-of-image marker)");
        status = ERR_JPEG;
        goto done;
    }
    if (cinfo.num_components != 1 && cinfo.num_components != 3) {
        snprintf(j->msg, sizeof j->msg, "%d colour components (CMYK/YCCK?) not supported",
                 cinfo.num_components);
        status = ERR_UNSUPPORTED;
        goto done;
    }
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)j->denom;
    cinfo.out_color_space = JCS_EXT_BGR;
    /* OpenCV's settings are libjpeg's defaults; stated so a change of default shows here */
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    cinfo.do_block_smoothing = TRUE;
    jpeg_calc_output_dimensions(&cinfo);
    if (j->x < 0 || j->y < 0 || j->w <= 0 || j->h <= 0 ||
        (long long)j->x + j->w > (long long)cinfo.output_width ||
        (long long)j->y + j->h > (long long)cinfo.output_height) {
        snprintf(j->msg, sizeof j->msg,
                 "box x=%d y=%d w=%d h=%d is not inside the %ux%u image at scale 1/%d",
                 j->x, j->y, j->w, j->h, (unsigned)cinfo.output_width,
                 (unsigned)cinfo.output_height, j->denom);
        status = ERR_BOX;
        goto done;
    }
    jpeg_start_decompress(&cinfo);
    xs = j->x > EDGE ? j->x - EDGE : 0;
    xe = j->x + j->w + EDGE;
    if (xe > (int)cinfo.output_width)
        xe = (int)cinfo.output_width;
    xoff = (JDIMENSION)xs;
    width = (JDIMENSION)(xe - xs);
    jpeg_crop_scanline(&cinfo, &xoff, &width); /* moves xoff left to an iMCU boundary */
    if (j->y > 0)
        jpeg_skip_scanlines(&cinfo, (JDIMENSION)j->y);
    /* freed with the decompress object, also on the error path */
    rows = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE,
                                      width * (JDIMENSION)cinfo.output_components, ROWS);
    for (i = 0; i < (JDIMENSION)j->h;) {
        JDIMENSION want = (JDIMENSION)j->h - i, got, k;
        got = jpeg_read_scanlines(&cinfo, rows, want < ROWS ? want : ROWS);
        if (got == 0) {
            snprintf(j->msg, sizeof j->msg, "libjpeg returned no row %u", (unsigned)i);
            status = ERR_JPEG;
            goto done;
        }
        for (k = 0; k < got; k++, i++)
            memcpy(j->out + (size_t)i * (size_t)j->w * 3, rows[k] + ((size_t)j->x - xoff) * 3,
                   (size_t)j->w * 3);
    }
done:
    /* the rows below the box are never decoded: destroying also aborts the decompression */
    jpeg_destroy_decompress(&cinfo);
    return status;
}

PyDoc_STRVAR(decode_crop_doc,
"decode_crop(data, x, y, w, h, denom=1, out=None)\n"
"--\n\n"
"Decode the box (x, y, w, h) of a JPEG at DCT scale 1/denom into h rows of w BGR pixels.\n\n"
"The box is in the pixels of the scaled image (ceil(width / denom) x ceil(height / denom)).\n"
"Only the iMCU columns covering the box and the rows down to its bottom are decoded.\n"
"data: a bytes-like JPEG. denom: 1, 2, 4 or 8. out: a writable contiguous buffer of at least\n"
"w * h * 3 bytes (written from its start), or None for a new bytearray. Returns out.\n"
"Raises JpegError (ValueError) when libjpeg cannot decode the data or it has no end-of-image\n"
"marker; UnsupportedError (ValueError) for JPEGs this module does not decode (CMYK/YCCK);\n"
"ValueError for a bad denom, a box outside the image or a small out buffer.\n"
"Warnings (corrupt data libjpeg works around) are ignored, as cv2.imdecode does.\n"
"The GIL is released while decoding.");

static PyObject *decode_crop(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"data", "x", "y", "w", "h", "denom", "out", NULL};
    Py_buffer data, out;
    PyObject *out_obj = Py_None, *result = NULL;
    struct job j;
    int status;

    memset(&j, 0, sizeof j);
    j.denom = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*iiii|iO:decode_crop", kwlist, &data,
                                     &j.x, &j.y, &j.w, &j.h, &j.denom, &out_obj))
        return NULL;
    if (j.denom != 1 && j.denom != 2 && j.denom != 4 && j.denom != 8) {
        PyErr_Format(PyExc_ValueError, "denom=%d; expected 1, 2, 4 or 8", j.denom);
        goto release_data;
    }
    if (j.w <= 0 || j.h <= 0) {
        PyErr_Format(PyExc_ValueError, "box of %dx%d pixels; expected w, h > 0", j.w, j.h);
        goto release_data;
    }
    if (out_obj == Py_None) {
        out_obj = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)j.w * j.h * 3);
        if (out_obj == NULL)
            goto release_data;
    } else {
        Py_INCREF(out_obj);
    }
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        goto release_out_obj;
    if (out.len < (Py_ssize_t)j.w * j.h * 3) {
        PyErr_Format(PyExc_ValueError, "out holds %zd bytes; the %dx%d box needs %zd",
                     out.len, j.w, j.h, (Py_ssize_t)j.w * j.h * 3);
        goto release_out;
    }
    j.data = data.buf;
    j.len = (size_t)data.len;
    j.out = out.buf;
    Py_BEGIN_ALLOW_THREADS
    status = run(&j);
    Py_END_ALLOW_THREADS
    if (status == OK) {
        Py_INCREF(out_obj);
        result = out_obj;
    } else {
        PyErr_SetString(status == ERR_UNSUPPORTED ? UnsupportedError
                        : status == ERR_BOX ? PyExc_ValueError : JpegError, j.msg);
    }
release_out:
    PyBuffer_Release(&out);
release_out_obj:
    Py_DECREF(out_obj);
release_data:
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_crop", (PyCFunction)(void (*)(void))decode_crop, METH_VARARGS | METH_KEYWORDS,
     decode_crop_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpegcrop",
    "Partial JPEG decoding (a box, DCT-scaled) with libjpeg-turbo; see decode_crop.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__jpegcrop(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    JpegError = PyErr_NewExceptionWithDoc(
        "imagenet_seq._jpegcrop.JpegError",
        "libjpeg cannot decode the data (corrupt, truncated, not a JPEG); libjpeg's message.",
        PyExc_ValueError, NULL);
    UnsupportedError = PyErr_NewExceptionWithDoc(
        "imagenet_seq._jpegcrop.UnsupportedError",
        "A JPEG this module does not decode (CMYK/YCCK); decode it another way.",
        PyExc_ValueError, NULL);
    /* the module keeps one reference of each (PyModule_AddObject steals it on success) */
    if (JpegError == NULL || UnsupportedError == NULL) {
        Py_XDECREF(JpegError);
        Py_XDECREF(UnsupportedError);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(JpegError);
    Py_INCREF(UnsupportedError);
    if (PyModule_AddObject(m, "JpegError", JpegError) < 0) {
        Py_DECREF(JpegError);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObject(m, "UnsupportedError", UnsupportedError) < 0) {
        Py_DECREF(UnsupportedError);
        Py_DECREF(m);
        return NULL;
    }
#ifdef LIBJPEG_TURBO_VERSION_NUMBER
    if (PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER",
                                LIBJPEG_TURBO_VERSION_NUMBER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#endif
    return m;
}
