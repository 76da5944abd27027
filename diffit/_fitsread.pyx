"""Compiled window reader of :mod:`diffit.fitsio`: one GIL-free call per window.

Reading a window through Python file objects and numpy takes half a dozen calls that
each release and retake the GIL (open, two fstats, seek, read, close, the byte swap).
With several worker threads every one of those is a point where a thread may have to
wait for another's Python code, so here the whole read -- open, size check, one
positioned read of the rows the window spans, close, and the conversion of the
window's big-endian raw values to physical values -- happens in a single call without
the GIL.

The conversion is :func:`diffit.fitsio._to_physical`'s, value for value: unscaled
floating-point pixels keep their precision (float32 stays float32), everything else
becomes ``double(raw) * BSCALE + BZERO`` (the scaling only when it is not the identity,
two roundings as in numpy, never a fused multiply-add), and integer pixels equal to
``BLANK`` become NaN. Floating-point pixels are screened as CFITSIO screens them when
Montage reads an image (with a null value): a NaN or infinity becomes NaN, and a zero of
either sign or a subnormal value (exponent bits all zero) becomes +0.0, or BZERO when
the image is scaled.
"""
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.math cimport NAN
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import os

import numpy as np

cdef extern from *:
    """
    #include <errno.h>
    #ifdef _WIN32
    #include <fcntl.h>
    #include <io.h>
    #include <sys/stat.h>
    #ifndef S_ISDIR
    #define S_ISDIR(m) (((m) & _S_IFMT) == _S_IFDIR)
    #endif
    #ifndef S_ISREG
    #define S_ISREG(m) (((m) & _S_IFMT) == _S_IFREG)
    #endif
    #else
    #include <fcntl.h>
    #include <sys/stat.h>
    #include <unistd.h>
    #endif

    /* Open a file for reading (non-blocking: a FIFO put in a file's place must not hang
       the worker). Returns the descriptor, or -1 with errno set. */
    static int diffit_open(const char *path)
    {
    #ifdef _WIN32
        return _open(path, _O_RDONLY | _O_BINARY);
    #else
        int fd;
        do { fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); } while (fd < 0 && errno == EINTR);
        return fd;
    #endif
    }

    /* Read nbytes at offset into buffer, up to the end of the file: *done is the number of
       bytes read (fewer than nbytes only at the end of the file). Returns 0 or an errno. */
    static int diffit_read_full(int fd, char *buffer, long long nbytes, long long offset,
                                long long *done)
    {
        *done = 0;
    #ifdef _WIN32
        if (_lseeki64(fd, offset, SEEK_SET) < 0) return errno;
        while (*done < nbytes) {
            long long part = nbytes - *done;
            int got;
            if (part > (1 << 30)) part = 1 << 30;
            got = _read(fd, buffer + *done, (unsigned int)part);
            if (got < 0) { if (errno == EINTR) continue; return errno; }
            if (got == 0) break;
            *done += got;
        }
    #else
        while (*done < nbytes) {
            ssize_t got = pread(fd, buffer + *done, (size_t)(nbytes - *done),
                                (off_t)(offset + *done));
            if (got < 0) { if (errno == EINTR) continue; return errno; }
            if (got == 0) break;
            *done += got;
        }
    #endif
        return 0;
    }

    /* Read nrows rows of row_bytes bytes, row_stride bytes apart from offset on, of a
       file at least min_size bytes long, into buffer (row after row). Rows that are
       contiguous in the file are read in one go. Returns 0, an errno value, or -1 when
       the file is shorter than that (also when it shrinks while being read). */
    static int diffit_read_rows(const char *path, long long offset, long long min_size,
                                char *buffer, long long row_bytes, long long row_stride,
                                long long nrows)
    {
        long long chunk_bytes = row_bytes, nchunks = nrows, k, done;
        int status = 0;
    #ifdef _WIN32
        struct _stati64 info;
    #else
        struct stat info;
    #endif
        int fd = diffit_open(path);
        if (row_stride == row_bytes) { chunk_bytes = row_bytes * nrows; nchunks = 1; }
        if (fd < 0) return errno;
    #ifdef _WIN32
        if (_fstati64(fd, &info) != 0) { status = errno; goto finish; }
    #else
        if (fstat(fd, &info) != 0) { status = errno; goto finish; }
        if (!S_ISREG(info.st_mode)) { status = EINVAL; goto finish; }
    #endif
        if ((long long)info.st_size < min_size) { status = -1; goto finish; }
        for (k = 0; k < nchunks; k++) {
            status = diffit_read_full(fd, buffer + k * chunk_bytes, chunk_bytes,
                                      offset + k * row_stride, &done);
            if (status != 0) goto finish;
            if (done < chunk_bytes) { status = -1; goto finish; }
        }
    finish:
    #ifdef _WIN32
        _close(fd);
    #else
        close(fd);
    #endif
        return status;
    }

    /* The first max_bytes bytes of a regular file (fewer if it is shorter) and its size.
       kind is 0 for a regular file, 1 for a directory and 2 for anything else (a FIFO,
       device or socket: not opened, so that nothing blocks). Returns 0 or an errno. */
    static int diffit_read_head(const char *path, char *buffer, long long max_bytes,
                                long long *got, long long *size, int *kind)
    {
        int status = 0, fd;
    #ifdef _WIN32
        struct _stati64 info;
        *got = 0; *size = 0; *kind = 0;
        if (_stati64(path, &info) != 0) return errno;
    #else
        struct stat info;
        *got = 0; *size = 0; *kind = 0;
        while (stat(path, &info) != 0) { if (errno != EINTR) return errno; }
    #endif
        if (S_ISDIR(info.st_mode)) { *kind = 1; return 0; }
        if (!S_ISREG(info.st_mode)) { *kind = 2; return 0; }
        fd = diffit_open(path);  /* a FIFO put in the file's place since the stat: no hang */
        if (fd < 0) return errno;
    #ifdef _WIN32
        if (_fstati64(fd, &info) != 0) { status = errno; goto finish; }
    #else
        if (fstat(fd, &info) != 0) { status = errno; goto finish; }
    #endif
        if (!S_ISREG(info.st_mode)) { *kind = S_ISDIR(info.st_mode) ? 1 : 2; goto finish; }
        *size = (long long)info.st_size;
        status = diffit_read_full(fd, buffer, max_bytes, 0, got);
    finish:
    #ifdef _WIN32
        _close(fd);
    #else
        close(fd);
    #endif
        return status;
    }
    """
    int diffit_read_rows(const char *path, long long offset, long long min_size,
                         char *buffer, long long row_bytes, long long row_stride,
                         long long nrows) nogil
    int diffit_read_head(const char *path, char *buffer, long long max_bytes,
                         long long *got, long long *size, int *kind)


cdef extern from *:
    """
    #include <errno.h>
    #include <sys/stat.h>

    /* Device, inode, size and modification and change times (ns) of a file, or an
       errno value. */
    static int diffit_stat(const char *path, long long out[5])
    {
    #ifdef _WIN32
        struct _stati64 info;
        if (_stati64(path, &info) != 0) return errno;
        out[3] = (long long)info.st_mtime * 1000000000LL;
        out[4] = (long long)info.st_ctime * 1000000000LL;
    #else
        struct stat info;
        if (stat(path, &info) != 0) return errno;
    #if defined(__APPLE__)
        out[3] = (long long)info.st_mtimespec.tv_sec * 1000000000LL + info.st_mtimespec.tv_nsec;
        out[4] = (long long)info.st_ctimespec.tv_sec * 1000000000LL + info.st_ctimespec.tv_nsec;
    #else
        out[3] = (long long)info.st_mtim.tv_sec * 1000000000LL + info.st_mtim.tv_nsec;
        out[4] = (long long)info.st_ctim.tv_sec * 1000000000LL + info.st_ctim.tv_nsec;
    #endif
    #endif
        out[0] = (long long)info.st_dev;
        out[1] = (long long)info.st_ino;
        out[2] = (long long)info.st_size;
        return 0;
    }
    """
    int diffit_stat(const char *path, long long out[5])


def signature(path):
    """What identifies a file's current content cheaply, or None when it cannot be stat-ed.

    ``(device, inode, size, mtime_ns, ctime_ns)``. Unlike :func:`os.stat` this keeps the
    GIL through the system call (a few microseconds on a local file): worker threads
    call it for every pair, and releasing the GIL would make each call a point where
    a thread may have to wait for another's Python code.
    """
    cdef long long values[5]
    try:
        encoded = os.fsencode(path)
    except (TypeError, ValueError):
        return None
    if b"\0" in encoded:
        return None
    if diffit_stat(encoded, values) != 0:
        return None
    return (values[0], values[1], values[2], values[3], values[4])


#: What :func:`read_head` reports for a file that is not a regular file.
HEAD_KINDS = ("file", "directory", "other")


def read_head(path, Py_ssize_t max_bytes):
    """The start of a file, its size and its kind, in one call that keeps the GIL.

    Opening a header through a Python file object (open, fstat, isatty, tell, read,
    close, plus a stat first) releases and retakes the GIL about nine times; with worker
    threads each of those is a hand-off to another thread's Python code. On a small
    image, where the kernels are quick, those hand-offs made two threads slower than
    one. This makes the few system calls with the GIL held.

    Parameters
    ----------
    path : str
        The file.
    max_bytes : int
        How much of its start to read.

    Returns
    -------
    kind : str
        ``"file"``, ``"directory"`` or ``"other"`` (a FIFO, device or socket, which is
        not opened).
    size : int
        The file's size (0 unless it is a regular file).
    head : bytes
        Its first ``max_bytes`` bytes, or all of it when it is shorter.

    Raises
    ------
    OSError
        The file cannot be stat-ed, opened or read (``FileNotFoundError`` when missing).
    ValueError
        The name holds a NUL character.
    """
    encoded = os.fsencode(path)
    if b"\0" in encoded:
        raise ValueError("embedded null byte")
    cdef const char *c_path = encoded
    head = bytearray(max(max_bytes, 0))
    cdef char *buffer = head
    cdef long long got = 0, size = 0
    cdef int kind = 0
    cdef int status = diffit_read_head(c_path, buffer, max(max_bytes, 0), &got, &size, &kind)
    if status != 0:
        raise OSError(status, os.strerror(status), path)
    del head[got:]
    return HEAD_KINDS[kind], size, bytes(head)


class TruncatedFile(Exception):
    """The file ends before the image's data do."""


cdef inline uint16_t _load16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t _load32(const uint8_t *p) noexcept nogil:
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16)
            | (<uint32_t>p[2] << 8) | p[3])


cdef inline uint64_t _load64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>_load32(p) << 32) | _load32(p + 4)


cdef inline double _raw_value(const uint8_t *p, int bitpix) noexcept nogil:
    """The big-endian raw value at ``p`` as a double (integers exactly as numpy casts)."""
    cdef uint32_t u32
    cdef uint64_t u64
    cdef float f
    cdef double d
    if bitpix == 8:
        return <double>p[0]
    if bitpix == 16:
        return <double>(<int16_t>_load16(p))
    if bitpix == 32:
        return <double>(<int32_t>_load32(p))
    if bitpix == 64:
        return <double>(<int64_t>_load64(p))
    if bitpix == -32:
        u32 = _load32(p)
        memcpy(&f, &u32, 4)
        return <double>f
    u64 = _load64(p)
    memcpy(&d, &u64, 8)
    return d


cdef inline int64_t _raw_integer(const uint8_t *p, int bitpix) noexcept nogil:
    if bitpix == 8:
        return p[0]
    if bitpix == 16:
        return <int16_t>_load16(p)
    if bitpix == 32:
        return <int32_t>_load32(p)
    return <int64_t>_load64(p)


# CFITSIO's screen of a big-endian float's most significant 16 bits (its ``fnan`` and
# ``dnan``): 1 when the exponent bits are all ones (NaN, infinity), 2 when they are all
# zero (a zero or a subnormal value), else 0.
cdef inline int _float_class(const uint8_t *p, int bitpix) noexcept nogil:
    cdef uint16_t mask = 0x7F80 if bitpix == -32 else 0x7FF0
    cdef uint16_t bits = _load16(p) & mask
    if bits == mask:
        return 1
    if bits == 0:
        return 2
    return 0


cdef extern from *:
    """
    #include <stdint.h>
    #if defined(_MSC_VER)
    #define DIFFIT_RESTRICT __restrict
    #else
    #define DIFFIT_RESTRICT __restrict__
    #endif
    /* CFITSIO's screen of n floats already in native order: exponent bits all ones
       (NaN, infinity) -> NaN, all zero (zeros, subnormals) -> +0.0. Bits are moved,
       never values; branch-free, so that the loop is vectorised. */
    static void diffit_screen_float32(uint32_t *values, Py_ssize_t n) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) {
            uint32_t u = values[i];
            uint32_t exponent = u & 0x7F800000u;
            uint32_t underflow = 0u - (uint32_t)(exponent == 0u);
            uint32_t special = 0u - (uint32_t)(exponent == 0x7F800000u);
            values[i] = (u & ~(underflow | special)) | (0x7FC00000u & special);
        }
    }
    /* n big-endian doubles to native order, screened the same way (the usual value
       costs one predictable test). */
    static void diffit_screen_float64(const uint8_t *DIFFIT_RESTRICT src,
                                      uint64_t *DIFFIT_RESTRICT dst, Py_ssize_t n) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) {
            const uint8_t *p = src + 8 * i;
            uint64_t u = ((uint64_t)p[0] << 56) | ((uint64_t)p[1] << 48)
                         | ((uint64_t)p[2] << 40) | ((uint64_t)p[3] << 32)
                         | ((uint64_t)p[4] << 24) | ((uint64_t)p[5] << 16)
                         | ((uint64_t)p[6] << 8) | (uint64_t)p[7];
            uint64_t exponent = u & 0x7FF0000000000000u;
            if (exponent - 0x0010000000000000u >= 0x7FE0000000000000u)
                u = exponent ? 0x7FF8000000000000u : 0u;
            dst[i] = u;
        }
    }
    """
    void diffit_screen_float32(uint32_t *values, Py_ssize_t n) noexcept nogil
    void diffit_screen_float64(const uint8_t *src, uint64_t *dst, Py_ssize_t n) noexcept nogil


cdef void _convert_float32(const uint8_t *band, Py_ssize_t row_bytes, Py_ssize_t col0,
                           float[:, ::1] out) noexcept nogil:
    cdef Py_ssize_t r, c
    cdef const uint8_t *p
    cdef uint32_t u32
    if out.shape[1] == 0:
        return
    for r in range(out.shape[0]):
        p = band + r * row_bytes + col0 * 4
        for c in range(out.shape[1]):
            u32 = _load32(p + 4 * c)
            memcpy(&out[r, c], &u32, 4)
        diffit_screen_float32(<uint32_t*>&out[r, 0], out.shape[1])


cdef void _convert_float64(const uint8_t *band, Py_ssize_t row_bytes, Py_ssize_t col0,
                           double[:, ::1] out) noexcept nogil:
    cdef Py_ssize_t r
    if out.shape[1] == 0:
        return
    for r in range(out.shape[0]):
        diffit_screen_float64(band + r * row_bytes + col0 * 8, <uint64_t*>&out[r, 0],
                              out.shape[1])


cdef void _convert_double(const uint8_t *band, Py_ssize_t row_bytes, Py_ssize_t col0,
                          int bitpix, bint scaled, double scale, double zero,
                          bint has_blank, int64_t blank, double[:, ::1] out) noexcept nogil:
    cdef Py_ssize_t r, c
    cdef Py_ssize_t size = bitpix // 8 if bitpix > 0 else -bitpix // 8
    cdef const uint8_t *p
    cdef double value
    cdef int special
    for r in range(out.shape[0]):
        p = band + r * row_bytes + col0 * size
        for c in range(out.shape[1]):
            special = _float_class(p, bitpix) if bitpix < 0 else 0
            if special == 1:
                value = NAN
            elif special == 2:
                value = zero if scaled else 0.0
            else:
                value = _raw_value(p, bitpix)
                if scaled:
                    value = value * scale
                    value = value + zero
                if has_blank and _raw_integer(p, bitpix) == blank:
                    value = NAN
            out[r, c] = value
            p += size


#: Rows a window spans are read whole when they hold at most this many times the
#: window's bytes, or at most :data:`BAND_BYTES`; else only the window's part of each.
BAND_FACTOR = 8
BAND_BYTES = 4 << 20

#: Windows of fewer bytes are read without releasing the GIL. Releasing and retaking it
#: costs two thread hand-offs whenever another worker thread is waiting for it (tens of
#: microseconds on a busy machine); a small window is read faster than that, so for small
#: images releasing it only made two threads slower than one.
NOGIL_MIN_BYTES = 64 * 1024


_NO_FLOATS = np.empty((0, 0), dtype=np.float32)  # the unused one of the two outputs
_NO_DOUBLES = np.empty((0, 0))


cdef int _read_converted(const char *c_path, long long offset, long long min_size,
                         uint8_t *band, Py_ssize_t row_bytes, Py_ssize_t row_stride,
                         Py_ssize_t rows, Py_ssize_t first_col, int bitpix, bint as_float32,
                         bint scaled, double scale, double zero, bint has_blank,
                         int64_t blank_value, float[:, ::1] out32,
                         double[:, ::1] out64) noexcept nogil:
    """Read the rows and convert the window (see :func:`read_window`); 0 or an error."""
    cdef int status = diffit_read_rows(c_path, offset, min_size, <char*>band, row_bytes,
                                       row_stride, rows)
    if status == 0:
        if as_float32:
            _convert_float32(band, row_bytes, first_col, out32)
        elif bitpix == -64 and not scaled:
            _convert_float64(band, row_bytes, first_col, out64)
        else:
            _convert_double(band, row_bytes, first_col, bitpix, scaled, scale, zero,
                            has_blank, blank_value, out64)
    return status


def read_window(path, Py_ssize_t data_offset, int bitpix, Py_ssize_t naxis1,
                Py_ssize_t data_bytes, Py_ssize_t row0, Py_ssize_t row1, Py_ssize_t col0,
                Py_ssize_t col1, double scale, double zero, blank):
    """Physical values of a window of a plain (uncompressed) image's first plane.

    The rows the window spans are read whole, in one positioned read, unless they hold
    much more than the window (more than :data:`BAND_FACTOR` times its bytes and more
    than :data:`BAND_BYTES`): then each row's part of the window is read on its own.
    Nothing is mapped, so a file that shrinks while it is read is reported as truncated.

    Parameters
    ----------
    path : str
        The FITS file.
    data_offset : int
        Byte offset of the image data in the file.
    bitpix : int
        BITPIX (8, 16, 32, 64, -32 or -64).
    naxis1 : int
        Row length in pixels.
    data_bytes : int
        Size of the whole data array: a shorter file is truncated.
    row0, row1, col0, col1 : int
        The window, 0-based, ends exclusive, inside the first plane.
    scale, zero : float
        BSCALE and BZERO.
    blank : int or None
        BLANK of an integer image.

    Returns
    -------
    numpy.ndarray
        float32 for unscaled single-precision images, float64 otherwise.

    Raises
    ------
    OSError
        The file cannot be opened or read.
    TruncatedFile
        The file is shorter than its header says.
    """
    if bitpix not in (8, 16, 32, 64, -32, -64):
        raise ValueError(f"BITPIX {bitpix} is not a FITS pixel type")
    if not (0 <= row0 <= row1 and 0 <= col0 <= col1 <= naxis1):
        raise ValueError("the window is not inside the image")
    cdef Py_ssize_t size = bitpix // 8 if bitpix > 0 else -bitpix // 8
    cdef Py_ssize_t rows = row1 - row0
    cdef Py_ssize_t window_bytes = (col1 - col0) * size
    cdef Py_ssize_t row_stride = naxis1 * size  # bytes between rows in the file
    cdef bint whole_rows = rows * row_stride <= max(BAND_FACTOR * rows * window_bytes, BAND_BYTES)
    # each row of the buffer: the whole file row, or only the window's part of it
    cdef Py_ssize_t row_bytes = row_stride if whole_rows else window_bytes
    cdef Py_ssize_t first_col = col0 if whole_rows else 0
    cdef Py_ssize_t nbytes = rows * row_bytes
    cdef bint scaled = scale != 1.0 or zero != 0.0
    cdef bint has_blank = False
    cdef int64_t blank_value = 0
    if blank is not None and bitpix > 0 and -(1 << 63) <= blank < (1 << 63):
        has_blank = True
        blank_value = blank
    cdef bytes encoded = os.fsencode(path)
    cdef const char *c_path = encoded
    cdef long long offset = data_offset + row0 * row_stride + (0 if whole_rows else col0 * size)
    cdef long long min_size = data_offset + data_bytes
    cdef bint as_float32 = bitpix == -32 and not scaled
    out = np.empty((rows, col1 - col0), dtype=np.float32 if as_float32 else np.float64)
    cdef float[:, ::1] out32 = out if as_float32 else _NO_FLOATS
    cdef double[:, ::1] out64 = _NO_DOUBLES if as_float32 else out
    cdef uint8_t *band = <uint8_t*>malloc(nbytes if nbytes > 0 else 1)
    if band == NULL:
        raise MemoryError(f"cannot allocate {nbytes} bytes to read {path}")
    cdef int status
    try:
        if nbytes >= NOGIL_MIN_BYTES:
            with nogil:
                status = _read_converted(c_path, offset, min_size, band, row_bytes, row_stride,
                                         rows, first_col, bitpix, as_float32, scaled, scale,
                                         zero, has_blank, blank_value, out32, out64)
        else:
            status = _read_converted(c_path, offset, min_size, band, row_bytes, row_stride,
                                     rows, first_col, bitpix, as_float32, scaled, scale, zero,
                                     has_blank, blank_value, out32, out64)
    finally:
        free(band)
    if status == -1:
        raise TruncatedFile(path)
    if status != 0:
        raise OSError(status, os.strerror(status), path)
    return out
