"""Compiled kernel of :mod:`diffit.fitplane`: Montage's iterative clipped plane fit.

The fit runs over the compacted finite pixels of a difference image (coordinates and
values in scan order) and reproduces mFitplane's doubles bit for bit: every floating-point
operation below is the one Montage performs, in the same order, or provably gives the
same double (an exact zero added to a sum, a sum that is exact in any order). The
extension is compiled without FMA contraction or fast-math (see setup.py), so the C
compiler keeps these operations as written.

The passes over the pixels take them two at a time (``pair``, below): the per-pixel
arithmetic of both is one SIMD instruction each, while every order-dependent sum still
adds the first pixel's term and then the second's. Everything after the arguments are
checked and the scratch arrays allocated runs without the GIL, so worker threads fit
pairs concurrently.
"""
from libc.math cimport INFINITY, fabs, ldexp, signbit, sqrt
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

import numpy as np


# ---------------------------------------------------------------------------------------
# Pairs of doubles
#
# Each operation is the IEEE operation on each of the two lanes, so it gives exactly the
# doubles of two scalar operations: SSE2 on x86-64 (which every x86-64 CPU has), a plain
# struct elsewhere (and when built with -DDIFFIT_PORTABLE_PAIRS, as a test does to check
# it). "Keep" weights are 1.0 for a pixel whose residual is not above the limit (NaN is
# never above it) and 0.0 otherwise; a masked value is the value or +0.
# ---------------------------------------------------------------------------------------

cdef extern from *:
    """
    #if (defined(__SSE2__) || defined(_M_X64) || defined(_M_AMD64)) \
        && !defined(DIFFIT_PORTABLE_PAIRS)
    #include <emmintrin.h>
    typedef __m128d diffit_pair;
    static inline diffit_pair diffit_pair_load(const double *p) {
        return _mm_loadu_pd(p);
    }
    static inline diffit_pair diffit_pair_load_first(const double *p) {
        return _mm_load_sd(p);
    }
    static inline void diffit_pair_store(double *p, diffit_pair a) { _mm_storeu_pd(p, a); }
    static inline void diffit_pair_store_first(double *p, diffit_pair a) { _mm_store_sd(p, a); }
    static inline diffit_pair diffit_pair_set(double v) { return _mm_set1_pd(v); }
    static inline diffit_pair diffit_pair_weights(int both) {
        return _mm_set_pd(both ? 1.0 : 0.0, 1.0);
    }
    static inline double diffit_pair_first(diffit_pair a) { return _mm_cvtsd_f64(a); }
    static inline double diffit_pair_second(diffit_pair a) {
        return _mm_cvtsd_f64(_mm_unpackhi_pd(a, a));
    }
    static inline diffit_pair diffit_pair_add(diffit_pair a, diffit_pair b) {
        return _mm_add_pd(a, b);
    }
    static inline diffit_pair diffit_pair_sub(diffit_pair a, diffit_pair b) {
        return _mm_sub_pd(a, b);
    }
    static inline diffit_pair diffit_pair_mul(diffit_pair a, diffit_pair b) {
        return _mm_mul_pd(a, b);
    }
    static inline diffit_pair diffit_pair_abs(diffit_pair a) {
        return _mm_andnot_pd(_mm_set1_pd(-0.0), a);
    }
    static inline diffit_pair diffit_pair_keep(diffit_pair residual, diffit_pair limit,
                                               diffit_pair weights) {
        return _mm_andnot_pd(_mm_cmpgt_pd(residual, limit), weights);
    }
    static inline diffit_pair diffit_pair_mask(diffit_pair value, diffit_pair residual,
                                               diffit_pair limit) {
        return _mm_andnot_pd(_mm_cmpgt_pd(residual, limit), value);
    }
    #else
    #include <math.h>
    typedef struct { double first, second; } diffit_pair;
    static inline diffit_pair diffit_pair_make(double first, double second) {
        diffit_pair a;
        a.first = first;
        a.second = second;
        return a;
    }
    static inline diffit_pair diffit_pair_load(const double *p) {
        return diffit_pair_make(p[0], p[1]);
    }
    static inline diffit_pair diffit_pair_load_first(const double *p) {
        return diffit_pair_make(p[0], 0.0);
    }
    static inline void diffit_pair_store(double *p, diffit_pair a) {
        p[0] = a.first;
        p[1] = a.second;
    }
    static inline void diffit_pair_store_first(double *p, diffit_pair a) { p[0] = a.first; }
    static inline diffit_pair diffit_pair_set(double v) { return diffit_pair_make(v, v); }
    static inline diffit_pair diffit_pair_weights(int both) {
        return diffit_pair_make(1.0, both ? 1.0 : 0.0);
    }
    static inline double diffit_pair_first(diffit_pair a) { return a.first; }
    static inline double diffit_pair_second(diffit_pair a) { return a.second; }
    static inline diffit_pair diffit_pair_add(diffit_pair a, diffit_pair b) {
        return diffit_pair_make(a.first + b.first, a.second + b.second);
    }
    static inline diffit_pair diffit_pair_sub(diffit_pair a, diffit_pair b) {
        return diffit_pair_make(a.first - b.first, a.second - b.second);
    }
    static inline diffit_pair diffit_pair_mul(diffit_pair a, diffit_pair b) {
        return diffit_pair_make(a.first * b.first, a.second * b.second);
    }
    static inline diffit_pair diffit_pair_abs(diffit_pair a) {
        return diffit_pair_make(fabs(a.first), fabs(a.second));
    }
    static inline diffit_pair diffit_pair_keep(diffit_pair residual, diffit_pair limit,
                                               diffit_pair weights) {
        return diffit_pair_make(residual.first > limit.first ? 0.0 : weights.first,
                                residual.second > limit.second ? 0.0 : weights.second);
    }
    static inline diffit_pair diffit_pair_mask(diffit_pair value, diffit_pair residual,
                                               diffit_pair limit) {
        return diffit_pair_make(residual.first > limit.first ? 0.0 : value.first,
                                residual.second > limit.second ? 0.0 : value.second);
    }
    #endif
    """
    ctypedef struct pair "diffit_pair":
        pass
    # both lanes from p[0], p[1]; only the first from p[0] (the second is 0.0)
    pair pair_load "diffit_pair_load"(const double *p) noexcept nogil
    pair pair_load_first "diffit_pair_load_first"(const double *p) noexcept nogil
    void pair_store "diffit_pair_store"(double *p, pair a) noexcept nogil
    void pair_store_first "diffit_pair_store_first"(double *p, pair a) noexcept nogil
    pair pair_set "diffit_pair_set"(double v) noexcept nogil
    # (1.0, 1.0), or (1.0, 0.0) when only the first lane holds a pixel
    pair pair_weights "diffit_pair_weights"(bint both) noexcept nogil
    double pair_first "diffit_pair_first"(pair a) noexcept nogil
    double pair_second "diffit_pair_second"(pair a) noexcept nogil
    pair pair_add "diffit_pair_add"(pair a, pair b) noexcept nogil
    pair pair_sub "diffit_pair_sub"(pair a, pair b) noexcept nogil
    pair pair_mul "diffit_pair_mul"(pair a, pair b) noexcept nogil
    pair pair_abs "diffit_pair_abs"(pair a) noexcept nogil
    # weights where not (residual > limit), else 0.0
    pair pair_keep "diffit_pair_keep"(pair residual, pair limit, pair weights) noexcept nogil
    # value where not (residual > limit), else +0.0
    pair pair_mask "diffit_pair_mask"(pair value, pair residual, pair limit) noexcept nogil


cdef inline pair _load(const double *p, bint both) noexcept nogil:
    """Two doubles from ``p``, or only ``p[0]`` (and 0.0)."""
    return pair_load(p) if both else pair_load_first(p)


cdef inline void _add_in_order(double *total, pair terms, bint both) noexcept nogil:
    """``total += first; total += second`` (the pixels' scan order)."""
    total[0] += pair_first(terms)
    if both:
        total[0] += pair_second(terms)


cdef inline double _lane_sum(pair a) noexcept nogil:
    return pair_first(a) + pair_second(a)


# ---------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------


cdef enum:
    _FRACTION_BITS = 26  # coordinates must be multiples of 2**-26 for the exact path


cdef enum Mode:
    ANY = 0     # some input is non-finite: the plain skipping loop
    LEVEL = 1   # level-only fit (finite inputs): only x, y, z sums
    FINITE = 2  # finite inputs, every sum in scan order
    EXACT = 3   # finite inputs, exact coordinate sums (see _exact_scale_bits)


cdef struct Sums:
    # The normal-equation sums of one fit pass and the number of pixels in them.
    double sxx
    double syy
    double sxy
    double sx
    double sy
    double sxz
    double syz
    double sz
    int64_t count


cdef struct RmsSums:
    # The sum of squared residuals within the limit and the number of such pixels.
    double szz
    int64_t count


cdef struct FitResult:
    int status
    double a
    double b
    double c
    double xmin
    double xmax
    double ymin
    double ymax
    double xcenter
    double ycenter
    double npixel
    double rms


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


cdef inline bint _same(double x, double y) noexcept nogil:
    """True when two doubles are identical, including the sign of zero."""
    # signbit may return any nonzero int for "set": normalise before comparing
    return x == y and (signbit(x) != 0) == (signbit(y) != 0)


cdef inline int64_t _bits(double value) noexcept nogil:
    """The bit pattern of a double (compiles to a register move)."""
    cdef int64_t bits
    memcpy(&bits, &value, sizeof(bits))
    return bits


cdef int _solve3(double (*m)[3], double *v) noexcept nogil:
    """Gauss-Jordan elimination with full pivoting on a 3x3 system, in place.

    Returns 0 on success (``v`` holds the solution), 1 when a pivot is chosen twice
    ("Singular Matrix-1") and 2 on an exactly zero pivot ("Singular Matrix-2").
    """
    cdef int n = 3
    cdef int64_t used[3]
    cdef int row = 0  # row and col keep their values from step to step, as Montage's
    cdef int col = 0
    cdef int step, r, c
    cdef double largest, tmp, inverse, factor
    used[0] = used[1] = used[2] = 0
    for step in range(n):
        largest = 0.0
        for r in range(n):
            if used[r] == 1:
                continue
            for c in range(n):
                if used[c] == 0:
                    if fabs(m[r][c]) >= largest:
                        largest = fabs(m[r][c])
                        row = r
                        col = c
                elif used[c] > 1:
                    return 1
        used[col] += 1
        if row != col:
            for c in range(n):
                tmp = m[row][c]
                m[row][c] = m[col][c]
                m[col][c] = tmp
            tmp = v[row]
            v[row] = v[col]
            v[col] = tmp
        if m[col][col] == 0.0:
            return 2
        inverse = 1.0 / m[col][col]
        m[col][col] = 1.0
        for c in range(n):
            m[col][c] *= inverse
        v[col] *= inverse
        for r in range(n):
            if r != col:
                factor = m[r][col]
                m[r][col] = 0.0
                for c in range(n):
                    m[r][c] -= m[col][c] * factor
                v[r] -= v[col] * factor
    return 0


# ---------------------------------------------------------------------------------------
# Choosing the path: finite inputs, exact coordinate sums
#
# These checks run once per fit. Their reductions select a double flag instead of
# or-ing an integer one, which lets the C compiler vectorise the loops.
# ---------------------------------------------------------------------------------------


cdef bint _all_finite(const double[::1] xs, const double[::1] ys,
                      const double[::1] zs) noexcept nogil:
    """True when every coordinate and value is finite."""
    cdef double bad = 0.0
    cdef Py_ssize_t k
    for k in range(xs.shape[0]):
        # v - v is +0 for finite v and NaN otherwise
        bad = bad if (xs[k] - xs[k]) + (ys[k] - ys[k]) + (zs[k] - zs[k]) == 0.0 else 1.0
    return bad == 0.0


cdef bint _all_small_multiples(const double[::1] values, double scale) noexcept nogil:
    """True when every ``value * scale`` is an integer of magnitude below ``2**63``.

    ``scale`` is a power of two, so ``w = |value * scale|`` is exact. Every double of
    at least ``2**52`` is an integer; below that, ``(w + 2**52) - 2**52`` is ``w``
    rounded to an integer (doubles in ``[2**52, 2**53)`` are spaced by 1), which
    equals ``w`` exactly when ``w`` is one.
    """
    cdef double two52 = ldexp(1.0, 52)
    cdef double two63 = ldexp(1.0, 63)
    cdef double bad = 0.0
    cdef double w
    cdef Py_ssize_t k
    for k in range(values.shape[0]):
        w = fabs(values[k] * scale)
        bad = bad if (w < two63) & ((w >= two52) | ((w + two52) - two52 == w)) else 1.0
    return bad == 0.0


cdef uint64_t _or_of_scaled(const double[::1] xs, const double[::1] ys,
                            double scale) noexcept nogil:
    """Bitwise OR of the integers ``x * scale`` and ``y * scale`` (each exact and below
    ``2**63``)."""
    cdef uint64_t bits = 0
    cdef Py_ssize_t k
    for k in range(xs.shape[0]):
        bits |= <uint64_t><int64_t>(xs[k] * scale) | <uint64_t><int64_t>(ys[k] * scale)
    return bits


cdef double _sum_of_squares(const double[::1] xs, const double[::1] ys) noexcept nogil:
    """``sum(x*x + y*y)`` in any order: only used as a bound, with a safety margin."""
    cdef pair total = pair_set(0.0)  # two partial sums: half the dependent additions
    cdef pair xv, yv
    cdef Py_ssize_t n = xs.shape[0]
    cdef Py_ssize_t k = 0
    while k + 1 < n:
        xv = pair_load(&xs[k])
        yv = pair_load(&ys[k])
        total = pair_add(total, pair_add(pair_mul(xv, xv), pair_mul(yv, yv)))
        k += 2
    if k < n:
        xv = pair_load_first(&xs[k])
        yv = pair_load_first(&ys[k])
        total = pair_add(total, pair_add(pair_mul(xv, xv), pair_mul(yv, yv)))
    return _lane_sum(total)


cdef int _exact_scale_bits(const double[::1] xs, const double[::1] ys) noexcept nogil:
    """``q`` such that all sums of x, y, x*x, y*y, x*y are exact, or -1.

    Requires finite ``xs``, ``ys``. Let ``X = x*2**q`` and ``Y = y*2**q`` be integers.
    If ``S = sum(X*X + Y*Y) < 2**53`` over *all* pixels then, as ``|X| <= X*X`` for
    integers, ``sum|X|`` and ``sum|Y|`` are below ``2**53`` too, and
    ``sum|X*Y| <= S/2``. So every term x, y, x*x, y*y, x*y and every partial sum over
    any subset of the pixels, in any order, is an integer multiple of ``2**-2q`` below
    ``2**53 * 2**-2q`` in magnitude: an exactly representable double. None of
    Montage's sequential additions rounds, and its sums equal the exact ones. ``S`` is
    computed in floating point with relative error below ``(n+1) * 2**-53``, which the
    test ``S <= 2**52`` leaves room for.

    ``q`` is the smallest power with ``X``, ``Y`` integers, and at most 26: the integers
    ``x*2**26``, ``y*2**26`` must exist (else -1), and ``q`` is 26 minus the number of
    trailing zero bits they all share (at most 26). A value of ``2**37`` or more fails
    the bound for every ``q`` and is rejected on the way. (The numba kernel this
    replaces guessed ``q`` from ``v - floor(v)`` and verified the guess; a verified
    guess is this ``q``, and a wrong one always failed, so the result is the same.)
    """
    cdef double unit = ldexp(1.0, _FRACTION_BITS)
    cdef uint64_t bits
    cdef int q = _FRACTION_BITS
    cdef double scale
    if not (_all_small_multiples(xs, unit) and _all_small_multiples(ys, unit)):
        return -1
    # bit 26 set: at most 26 trailing zeros, so q >= 0
    bits = _or_of_scaled(xs, ys, unit) | (<uint64_t>1 << _FRACTION_BITS)
    while bits % 2 == 0:
        bits //= 2
        q -= 1
    scale = ldexp(1.0, q)
    if not _sum_of_squares(xs, ys) * (scale * scale) <= ldexp(1.0, 52):  # NaN/inf fail too
        return -1
    return q


cdef Py_ssize_t _count_rows(const double[::1] ys) noexcept nogil:
    """Number of runs of bit-identical ``ys`` (image rows)."""
    cdef Py_ssize_t n = ys.shape[0]
    cdef Py_ssize_t count = 1 if n > 0 else 0
    cdef Py_ssize_t k
    for k in range(1, n):
        count += _bits(ys[k]) != _bits(ys[k - 1])
    return count


cdef void _row_starts(const double[::1] ys, int64_t[::1] starts) noexcept nogil:
    """Start of each run of bit-identical ``ys`` (one image row), then ``len(ys)``."""
    cdef Py_ssize_t n = ys.shape[0]
    cdef Py_ssize_t count = 0
    cdef Py_ssize_t k
    if n > 0:
        starts[0] = 0
        count = 1
    for k in range(1, n):
        starts[count] = k  # kept (overwritten) only where a new run starts
        count += _bits(ys[k]) != _bits(ys[k - 1])
    starts[count] = n


# ---------------------------------------------------------------------------------------
# The passes of one iteration
#
# The passes are branch-free: a rejected pixel (residual above the limit) adds an exact
# zero, which leaves a running sum unchanged (a sum that starts at +0 never becomes -0),
# so the sums equal Montage's skip-the-pixel sums bit for bit. Nothing exceeds an
# infinite limit, not even NaN. Pixel counts are sums of 0.0/1.0 weights: exact.
#
# A fit pass clips on each pixel's residual from the previous plane, which the rms pass
# before it stored: one array, overwritten by each rms pass (the extremes at the end
# evaluate the residuals of the last fit pass again). With x, y and z that makes 32
# bytes a pixel, which keeps most overlaps in the core's own cache.
#
# Each pass works on two pixels at a time (a ``*_step`` function), then on a last
# single pixel, if any, with the same function (``both`` false: only the first lane is
# loaded, added or stored, and the second lane's weight is 0).
# ---------------------------------------------------------------------------------------


cdef struct Plane:
    # The plane a pass measures residuals from, and the residual limit, in both lanes.
    pair a
    pair b
    pair c
    pair limit


cdef Plane _plane(double a, double b, double c, double limit) noexcept nogil:
    return Plane(pair_set(a), pair_set(b), pair_set(c), pair_set(limit))


cdef inline pair _signed_residual(const Plane *p, pair x, pair by, pair z) noexcept nogil:
    """``z - ((a*x + b*y) + c)``, as Montage evaluates the plane (``by`` is ``b*y``)."""
    return pair_sub(z, pair_add(pair_add(pair_mul(p.a, x), by), p.c))


cdef inline double _residual(double a, double b, double c, double x, double y,
                             double z) noexcept nogil:
    """``|z - ((a*x + b*y) + c)|`` for one pixel (the same double as a lane of a pair)."""
    return fabs(z - ((a * x + b * y) + c))


cdef struct ExactSums:
    # The z sums of the pass so far, in scan order, and the current row's pixel count
    # and x sums, per lane (exact).
    double sxz
    double syz
    double sz
    pair n
    pair x
    pair xx


cdef inline void _exact_step(ExactSums *s, const double *x, const double *z, const double *r,
                             pair y, pair limit, bint both) noexcept nogil:
    cdef pair keep = pair_keep(_load(r, both), limit, pair_weights(both))
    cdef pair xv = _load(x, both)
    cdef pair zk = pair_mul(_load(z, both), keep)  # z or a zero: x, y, z finite
    cdef pair xk = pair_mul(xv, keep)
    _add_in_order(&s.sxz, pair_mul(xv, zk), both)
    _add_in_order(&s.syz, pair_mul(y, zk), both)
    _add_in_order(&s.sz, zk, both)
    s.n = pair_add(s.n, keep)
    s.x = pair_add(s.x, xk)
    s.xx = pair_add(s.xx, pair_mul(xk, xk))


cdef Sums _fit_pass_exact(const double[::1] xs, const double[::1] ys, const double[::1] zs,
                          const int64_t[::1] starts, const double[::1] residual,
                          double limit) noexcept nogil:
    """Fit-pass sums when the coordinate sums are exact (see ``_exact_scale_bits``).

    Only the ``z`` sums need Montage's scan order; they are accumulated in sequence.
    The coordinate sums are exact in any order and grouping, so they are gathered per
    row (``starts``), where ``y`` is constant, and per lane; a row's ``y`` sums are
    products of ``y`` with the row's count and ``x`` sums, which equal sums over the
    row's pixels and so are exact too.
    """
    cdef Sums sums
    cdef ExactSums s
    cdef pair limits = pair_set(limit)
    cdef pair yp
    cdef double y, n, x
    cdef double count = 0.0
    cdef Py_ssize_t r, k, end
    sums.sxx = sums.syy = sums.sxy = sums.sx = sums.sy = 0.0
    s.sxz = s.syz = s.sz = 0.0
    for r in range(starts.shape[0] - 1):
        k = starts[r]
        end = starts[r + 1]
        y = ys[k]
        yp = pair_set(y)
        s.n = s.x = s.xx = pair_set(0.0)
        while k + 1 < end:
            _exact_step(&s, &xs[k], &zs[k], &residual[k], yp, limits, True)
            k += 2
        if k < end:
            _exact_step(&s, &xs[k], &zs[k], &residual[k], yp, limits, False)
        n = _lane_sum(s.n)
        x = _lane_sum(s.x)
        sums.sxx += _lane_sum(s.xx)
        sums.syy += (y * y) * n
        sums.sxy += y * x
        sums.sx += x
        sums.sy += y * n
        count += n
    sums.sxz = s.sxz
    sums.syz = s.syz
    sums.sz = s.sz
    sums.count = <int64_t>count
    return sums


cdef struct FiniteSums:
    # The eight sums of a fit pass, all in scan order, and the per-lane pixel count.
    double sxx
    double syy
    double sxy
    double sx
    double sy
    double sxz
    double syz
    double sz
    pair n


cdef inline void _finite_step(FiniteSums *s, const double *x, const double *y, const double *z,
                              const double *r, pair limit, bint both) noexcept nogil:
    cdef pair keep = pair_keep(_load(r, both), limit, pair_weights(both))
    cdef pair xv = _load(x, both)
    cdef pair yv = _load(y, both)
    cdef pair x_keep = pair_mul(xv, keep)
    cdef pair y_keep = pair_mul(yv, keep)
    cdef pair z_keep = pair_mul(_load(z, both), keep)
    _add_in_order(&s.sxx, pair_mul(xv, x_keep), both)
    _add_in_order(&s.syy, pair_mul(yv, y_keep), both)
    _add_in_order(&s.sxy, pair_mul(xv, y_keep), both)
    _add_in_order(&s.sx, x_keep, both)
    _add_in_order(&s.sy, y_keep, both)
    _add_in_order(&s.sxz, pair_mul(xv, z_keep), both)
    _add_in_order(&s.syz, pair_mul(yv, z_keep), both)
    _add_in_order(&s.sz, z_keep, both)
    s.n = pair_add(s.n, keep)


cdef Sums _fit_pass_finite(const double[::1] xs, const double[::1] ys, const double[::1] zs,
                           const double[::1] residual, double limit) noexcept nogil:
    """Fit-pass sums, all accumulated in scan order (finite x, y, z)."""
    cdef FiniteSums s
    cdef pair limits = pair_set(limit)
    cdef Py_ssize_t n = xs.shape[0]
    cdef Py_ssize_t k = 0
    s.sxx = s.syy = s.sxy = s.sx = s.sy = s.sxz = s.syz = s.sz = 0.0
    s.n = pair_set(0.0)
    while k + 1 < n:
        _finite_step(&s, &xs[k], &ys[k], &zs[k], &residual[k], limits, True)
        k += 2
    if k < n:
        _finite_step(&s, &xs[k], &ys[k], &zs[k], &residual[k], limits, False)
    return Sums(s.sxx, s.syy, s.sxy, s.sx, s.sy, s.sxz, s.syz, s.sz,
                <int64_t>_lane_sum(s.n))


cdef struct LevelSums:
    double sx
    double sy
    double sz
    pair n


cdef inline void _level_step(LevelSums *s, const double *x, const double *y, const double *z,
                             const double *r, pair limit, bint both) noexcept nogil:
    cdef pair keep = pair_keep(_load(r, both), limit, pair_weights(both))
    _add_in_order(&s.sx, pair_mul(_load(x, both), keep), both)
    _add_in_order(&s.sy, pair_mul(_load(y, both), keep), both)
    _add_in_order(&s.sz, pair_mul(_load(z, both), keep), both)
    s.n = pair_add(s.n, keep)


cdef Sums _fit_pass_level(const double[::1] xs, const double[::1] ys, const double[::1] zs,
                          const double[::1] residual, double limit) noexcept nogil:
    """The fit-pass sums a level-only fit uses (finite x, y, z); the others are zero."""
    cdef LevelSums s
    cdef pair limits = pair_set(limit)
    cdef Py_ssize_t n = xs.shape[0]
    cdef Py_ssize_t k = 0
    s.sx = s.sy = s.sz = 0.0
    s.n = pair_set(0.0)
    while k + 1 < n:
        _level_step(&s, &xs[k], &ys[k], &zs[k], &residual[k], limits, True)
        k += 2
    if k < n:
        _level_step(&s, &xs[k], &ys[k], &zs[k], &residual[k], limits, False)
    return Sums(0.0, 0.0, 0.0, s.sx, s.sy, 0.0, 0.0, s.sz, <int64_t>_lane_sum(s.n))


cdef Sums _fit_pass_any(const double[::1] xs, const double[::1] ys, const double[::1] zs,
                        const double[::1] residual, double limit) noexcept nogil:
    """Fit-pass sums for any values, non-finite ones included (skips, as Montage).

    Here a rejected pixel is skipped: ``inf * 0`` is NaN, not an exact zero.
    """
    cdef double sxx = 0.0, syy = 0.0, sxy = 0.0, sx = 0.0, sy = 0.0
    cdef double sxz = 0.0, syz = 0.0, sz = 0.0
    cdef int64_t count = 0
    cdef double x, y, z
    cdef Py_ssize_t k
    for k in range(xs.shape[0]):
        if residual[k] > limit:
            continue
        x = xs[k]
        y = ys[k]
        z = zs[k]
        sxx += x * x
        syy += y * y
        sxy += x * y
        sx += x
        sy += y
        sxz += x * z
        syz += y * z
        sz += z
        count += 1
    return Sums(sxx, syy, sxy, sx, sy, sxz, syz, sz, count)


cdef struct RmsState:
    double szz
    pair n


cdef inline void _rms_step(RmsState *s, const Plane *p, const double *x, pair by,
                           const double *z, double *r, bint both) noexcept nogil:
    cdef pair d = _signed_residual(p, _load(x, both), by, _load(z, both))
    cdef pair dz = pair_abs(d)
    if both:
        pair_store(r, dz)
    else:
        pair_store_first(r, dz)
    # dz*dz within the limit, else +0 (exact even for an infinite dz, unlike a weight).
    # d*d is the same double as dz*dz; for a NaN it keeps d's sign, as in the numba
    # kernel and in Montage: LLVM and gcc (-O1 and up) both fold |d|*|d| into d*d.
    _add_in_order(&s.szz, pair_mask(pair_mul(d, d), dz, p.limit), both)
    s.n = pair_add(s.n, pair_keep(dz, p.limit, pair_weights(both)))


cdef RmsSums _rms_pass(const double[::1] xs, const double[::1] ys, const double[::1] zs,
                       const Plane *p, double[::1] residual) noexcept nogil:
    """Store every ``|z - plane|``; return the sum of squares and count within limit."""
    cdef RmsState s
    cdef Py_ssize_t n = xs.shape[0]
    cdef Py_ssize_t k = 0
    s.szz = 0.0
    s.n = pair_set(0.0)
    while k + 1 < n:
        _rms_step(&s, p, &xs[k], pair_mul(p.b, pair_load(&ys[k])), &zs[k], &residual[k], True)
        k += 2
    if k < n:
        _rms_step(&s, p, &xs[k], pair_mul(p.b, pair_load_first(&ys[k])), &zs[k], &residual[k],
                  False)
    return RmsSums(s.szz, <int64_t>_lane_sum(s.n))


# ---------------------------------------------------------------------------------------
# The fit
# ---------------------------------------------------------------------------------------


cdef FitResult _failed(int status) noexcept nogil:
    """The result of a fit whose normal equations were singular."""
    return FitResult(status, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


cdef void _extremes(const double[::1] xs, const double[::1] ys, const double[::1] zs,
                    double a, double b, double c, double limit,
                    FitResult *result) noexcept nogil:
    """``xmin``..``ymax`` of the pixels whose residual from the plane ``a, b, c`` is
    within ``limit`` (Montage's start values ``+-1e6`` when there are none)."""
    cdef double xmin = 1000000.0, xmax = -1000000.0
    cdef double ymin = 1000000.0, ymax = -1000000.0
    cdef double x, y
    cdef Py_ssize_t k
    for k in range(xs.shape[0]):
        x = xs[k]
        y = ys[k]
        if limit != INFINITY and _residual(a, b, c, x, y, zs[k]) > limit:
            continue
        if x < xmin:
            xmin = x
        if x > xmax:
            xmax = x
        if y < ymin:
            ymin = y
        if y > ymax:
            ymax = y
    result.xmin = xmin
    result.xmax = xmax
    result.ymin = ymin
    result.ymax = ymax


cdef FitResult _fit(const double[::1] xs, const double[::1] ys, const double[::1] zs,
                    Mode mode, bint level_only, int n_iterations, bint stop_early,
                    const int64_t[::1] starts, double[::1] residual) noexcept nogil:
    """The iterations of :func:`fit_kernel` (see there); ``mode`` picks the fit pass.

    ``starts`` are the row starts of the ``EXACT`` mode (unused otherwise).
    ``residual`` is a scratch array of ``len(xs)`` doubles: each rms pass stores the
    residuals from its plane there, and the next fit pass clips on them. Its contents
    before the first rms pass do not matter: the first fit pass has an infinite limit,
    which no double exceeds, not even a NaN.
    """
    cdef FitResult result
    cdef Sums sums
    cdef RmsSums rms_sums
    cdef Plane plane
    cdef double m[3][3]
    cdef double v[3]
    cdef double a = 0.0, b = 0.0, c = 0.0, rms = 0.0
    cdef double used_a = 0.0, used_b = 0.0, used_c = 0.0, used_limit = INFINITY
    cdef double xcenter = 0.0, ycenter = 0.0, npixel = 0.0
    cdef double limit, fit_limit, rms_limit, sn, new_a, new_b, new_c, new_rms
    cdef bint converged
    cdef int iteration, status
    v[0] = v[1] = v[2] = 0.0
    for iteration in range(n_iterations):
        limit = 2.0 * rms
        fit_limit = limit if rms > 0.0 else INFINITY  # nothing exceeds inf, not even NaN
        if mode == ANY:
            sums = _fit_pass_any(xs, ys, zs, residual, fit_limit)
        elif mode == LEVEL:
            sums = _fit_pass_level(xs, ys, zs, residual, fit_limit)
        elif mode == EXACT:
            sums = _fit_pass_exact(xs, ys, zs, starts, residual, fit_limit)
        else:
            sums = _fit_pass_finite(xs, ys, zs, residual, fit_limit)
        sn = <double>sums.count
        # the plane and limit just clipped on (the extremes evaluate them again)
        used_a = a
        used_b = b
        used_c = c
        used_limit = fit_limit
        xcenter = sums.sx / sn
        ycenter = sums.sy / sn
        if level_only:
            new_a = 0.0
            new_b = 0.0
            new_c = sums.sz / sn
        else:
            m[0][0] = sums.sxx
            m[0][1] = sums.sxy
            m[0][2] = sums.sx
            m[1][0] = sums.sxy
            m[1][1] = sums.syy
            m[1][2] = sums.sy
            m[2][0] = sums.sx
            m[2][1] = sums.sy
            m[2][2] = sn
            v[0] = sums.sxz
            v[1] = sums.syz
            v[2] = sums.sz
            status = _solve3(m, v)
            if status != 0:
                return _failed(status)
            new_a = v[0]
            new_b = v[1]
            new_c = v[2]
        rms_limit = limit if iteration > 0 else INFINITY
        plane = _plane(new_a, new_b, new_c, rms_limit)
        rms_sums = _rms_pass(xs, ys, zs, &plane, residual)
        new_rms = sqrt(rms_sums.szz / <double>rms_sums.count)
        converged = (
            iteration >= 1
            and _same(new_a, a) and _same(new_b, b) and _same(new_c, c) and _same(new_rms, rms)
        )
        a = new_a
        b = new_b
        c = new_c
        rms = new_rms
        npixel = <double>rms_sums.count
        if converged and stop_early:
            break
    result.status = 0
    result.a = a
    result.b = b
    result.c = c
    _extremes(xs, ys, zs, used_a, used_b, used_c, used_limit, &result)
    result.xcenter = xcenter
    result.ycenter = ycenter
    result.npixel = npixel
    result.rms = rms
    return result


#: Fits of fewer pixels run without releasing the GIL: releasing and retaking it costs
#: two thread hand-offs whenever another worker thread waits for it (tens of
#: microseconds on a busy machine), about the time 20 iterations over this many pixels
#: take; below it, releasing only made two threads slower than one.
NOGIL_MIN_PIXELS = 1024


cdef void _survey(const double[::1] xs, const double[::1] ys, const double[::1] zs,
                  bint level_only, bint *finite, int *scale_bits,
                  Py_ssize_t *rows) noexcept nogil:
    """What decides the fit's path: all finite, the exact path's scale, its row count."""
    finite[0] = _all_finite(xs, ys, zs)
    if finite[0] and not level_only:
        scale_bits[0] = _exact_scale_bits(xs, ys)
    if scale_bits[0] >= 0:
        rows[0] = _count_rows(ys)


cdef FitResult _fit_in_mode(const double[::1] xs, const double[::1] ys, const double[::1] zs,
                            Mode mode, bint level_only, int n_iterations, bint stop_early,
                            int64_t[::1] starts, double[::1] residual) noexcept nogil:
    if mode == EXACT:
        _row_starts(ys, starts)
    return _fit(xs, ys, zs, mode, level_only, n_iterations, stop_early, starts, residual)


def fit_kernel(const double[::1] xs, const double[::1] ys, const double[::1] zs,
               bint level_only, int n_iterations, bint stop_early):
    """Montage's iterative clipped plane fit over compacted pixels.

    Each iteration is a fit pass (sums over the pixels within ``2*rms`` of the previous
    plane) and an rms pass (residuals from the new plane). The rms pass stores each
    pixel's residual, which is exactly what the next fit pass clips on, so the plane is
    evaluated once per pixel and iteration. ``xmin``..``ymax`` of the last fit pass are
    found in one pass at the end, from the plane that pass clipped on. With ``stop_early`` the loop ends once the state
    ``(a, b, c, rms)`` repeats (every later iteration would reproduce it).

    The passes are branch-free: a rejected pixel adds an exact zero, which leaves a
    running sum unchanged (a sum that starts at +0 never becomes -0), so the sums equal
    Montage's skip-the-pixel sums bit for bit. When every coordinate is a small multiple
    of a power of two (a dyadic CRPIX: the usual case), the coordinate sums
    ``x, y, x*x, y*y, x*y`` are exact in any order (``_exact_scale_bits``) and are
    gathered per row and lane; only the sums with ``z`` keep Montage's scan order.
    Inputs with non-finite values take the plain skipping loop.

    The fit runs with the GIL released.

    Parameters
    ----------
    xs, ys, zs : numpy.ndarray
        Contiguous float64 coordinates and values of the pixels, in scan order, all of
        the same length (read-only arrays are fine).
    level_only : bool
        Fit only the level ``c`` (``a = b = 0``).
    n_iterations : int
        Number of iterations (Montage: 20).
    stop_early : bool
        Stop once the state repeats exactly (identical result).

    Returns
    -------
    tuple
        ``(status, a, b, c, xmin, xmax, ymin, ymax, xcenter, ycenter, npixel, rms)``:
        ``status`` is 0, or 1/2 for "Singular Matrix-1"/"-2" (then all else is 0.0).

    Raises
    ------
    ValueError
        When the arrays differ in length, are not contiguous or not float64.
    """
    cdef Py_ssize_t n = xs.shape[0]
    cdef bint finite
    cdef int scale_bits = -1
    cdef Py_ssize_t rows = 0
    cdef Mode mode
    cdef FitResult result
    if ys.shape[0] != n or zs.shape[0] != n:
        raise ValueError("xs, ys and zs must have the same length")
    # Small fits keep the GIL (see NOGIL_MIN_PIXELS); the two blocks are one choice.
    cdef bint release = n >= NOGIL_MIN_PIXELS
    if release:
        with nogil:
            _survey(xs, ys, zs, level_only, &finite, &scale_bits, &rows)
    else:
        _survey(xs, ys, zs, level_only, &finite, &scale_bits, &rows)
    if not finite:
        mode = ANY
    elif level_only:
        mode = LEVEL
    elif scale_bits >= 0:
        mode = EXACT
    else:
        mode = FINITE
    cdef double[::1] residual = np.empty(n)  # contents unused until written (see _fit)
    cdef int64_t[::1] starts = np.empty(rows + 1, dtype=np.int64)  # the exact path's rows
    if release:
        with nogil:
            result = _fit_in_mode(xs, ys, zs, mode, level_only, n_iterations, stop_early,
                                  starts, residual)
    else:
        result = _fit_in_mode(xs, ys, zs, mode, level_only, n_iterations, stop_early, starts,
                              residual)
    return (result.status, result.a, result.b, result.c, result.xmin, result.xmax,
            result.ymin, result.ymax, result.xcenter, result.ycenter, result.npixel,
            result.rms)


def exact_scale_bits(const double[::1] xs, const double[::1] ys):
    """The ``q`` of the exact path for finite coordinates, or -1 (exposed for tests).

    See ``_exact_scale_bits``; the choice of path never changes a fit's result, so the
    tests check it directly.
    """
    cdef int q
    if ys.shape[0] != xs.shape[0]:
        raise ValueError("xs and ys must have the same length")
    with nogil:
        q = _exact_scale_bits(xs, ys)
    return q
