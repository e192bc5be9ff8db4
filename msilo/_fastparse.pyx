# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""C implementation of msilo's SIP parser.

The twin of ``msilo/sip/_parse_py.py``: same functions, same results, same
exceptions.  The rules (and the RFC 3261 grammar) are documented there; this file
follows them step by step on a ``const unsigned char*`` cursor over the received
bytes.  Value types and exceptions are imported from the pure-Python modules, so
both implementations return identical classes; instances are allocated with the
type's ``tp_alloc`` and their slots written at offsets read once at import.

The usual forms (a plain request line, known header names, a Via or name-addr whose
parameters are plain ``name[=value]``, a Content-Type without spaces) are scanned in
one pass, sixteen bytes at a time where SSE2 allows; anything else is handed to the
general checks, which accept or reject it exactly as they did before the fast paths
existed (tests/sip/test_fast_paths.py walks that border).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize
from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.list cimport PyList_Append
from cpython.dict cimport PyDict_SetItem
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.ref cimport Py_INCREF
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_Check
from libc.string cimport memchr, memcmp, memcpy
from libc.stdint cimport int64_t, uint64_t

from msilo.errors import (
    IncompleteURI,
    InvalidURI,
    MessageTooLarge,
    ParseError,
    UnsupportedURIScheme,
)
from msilo.sip.headers import COMPACT_FORMS
from msilo.sip.message import (
    Contact,
    ContentType,
    CSeq,
    PENDING,
    PENDING_FROM,
    PENDING_TO,
    NameAddr,
    SipRequest,
    SipResponse,
    SipURI,
    Via,
)

__all__ = ("MAX_MESSAGE_SIZE", "normalize_aor", "parse_message", "parse_uri")

MAX_MESSAGE_SIZE = 65536


cimport cython

cdef extern from "Python.h":
    object PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object o)
    object PyUnicode_DecodeASCII(const char* s, Py_ssize_t size, const char* errors)
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL
    object PyFloat_FromString(object s)


from cpython.object cimport PyObject

cdef extern from *:
    """
    #include <structmember.h>
    #include <stdint.h>
    #include <string.h>
    /* object.__new__(cls) without the call: what object_new does for a class
       with no __init__ arguments and no abstract methods. */
    static PyObject* msilo_alloc(PyObject* cls) {
        PyTypeObject* t = (PyTypeObject*)cls;
        return t->tp_alloc(t, 0);
    }
    /* Offset of a __slots__ member in instances, or -1 if descr is no slot. */
    static Py_ssize_t msilo_slot_offset(PyObject* descr) {
        PyMemberDef* m;
        if (Py_TYPE(descr) != &PyMemberDescr_Type) return -1;
        m = ((PyMemberDescrObject*)descr)->d_member;
        if (m->type != T_OBJECT_EX) return -1;
        return m->offset;
    }
    static inline void msilo_put(PyObject* obj, Py_ssize_t off, PyObject* v) {
        PyObject** slot = (PyObject**)((char*)obj + off);
        PyObject* old = *slot;
        Py_INCREF(v);
        *slot = v;
        Py_XDECREF(old);
    }

    /* Byte searches sixteen bytes at a time where SSE2 is there (every x86-64): the
       line and colon searches were a fifth of a parse done a byte (or a memchr call)
       at a time.  A load never reaches past ``limit``, the end of the buffer. */
    #if defined(__SSE2__) && defined(__GNUC__)
    #include <emmintrin.h>
    #define MSILO_SSE2 1
    static inline int msilo_eq16(const unsigned char* p, unsigned char c) {
        return _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i*)p),
                                                _mm_set1_epi8((char)c)));
    }
    /* Bit k set when p[k] is one of the bytes the parameter scanner stops at: flags
       as in the P_* enum of _fastparse.pyx (1 "=", 2 ";", 4 ",", 8 DQUOTE "<" SP HTAB). */
    static inline int msilo_param_mask16(const unsigned char* p, int stop) {
        __m128i x = _mm_loadu_si128((const __m128i*)p);
        __m128i m = _mm_setzero_si128();
        if (stop & 1) m = _mm_or_si128(m, _mm_cmpeq_epi8(x, _mm_set1_epi8('=')));
        if (stop & 2) m = _mm_or_si128(m, _mm_cmpeq_epi8(x, _mm_set1_epi8(';')));
        if (stop & 4) m = _mm_or_si128(m, _mm_cmpeq_epi8(x, _mm_set1_epi8(',')));
        if (stop & 8) {
            m = _mm_or_si128(m, _mm_cmpeq_epi8(x, _mm_set1_epi8('"')));
            m = _mm_or_si128(m, _mm_cmpeq_epi8(x, _mm_set1_epi8('<')));
            m = _mm_or_si128(m, _mm_cmpeq_epi8(x, _mm_set1_epi8(' ')));
            m = _mm_or_si128(m, _mm_cmpeq_epi8(x, _mm_set1_epi8('\t')));
        }
        return _mm_movemask_epi8(m);
    }
    /* Bit k set when p[k] may not appear in a URI: CTL, SP, DEL, "<", ">", DQUOTE
       (C_URIBAD of _fastparse.pyx). */
    static inline int msilo_uribad_mask16(const unsigned char* p) {
        __m128i x = _mm_loadu_si128((const __m128i*)p);
        __m128i m = _mm_cmpeq_epi8(_mm_min_epu8(x, _mm_set1_epi8(0x20)), x);
        m = _mm_or_si128(m, _mm_cmpeq_epi8(x, _mm_set1_epi8(0x7f)));
        m = _mm_or_si128(m, _mm_cmpeq_epi8(x, _mm_set1_epi8('<')));
        m = _mm_or_si128(m, _mm_cmpeq_epi8(x, _mm_set1_epi8('>')));
        m = _mm_or_si128(m, _mm_cmpeq_epi8(x, _mm_set1_epi8('"')));
        return _mm_movemask_epi8(m);
    }
    /* ... and the bytes the Request-URI scan notes: ":", "@", "?" (RQ_MARK). */
    static inline int msilo_rq_mask16(const unsigned char* p) {
        __m128i x = _mm_loadu_si128((const __m128i*)p);
        __m128i m = _mm_cmpeq_epi8(x, _mm_set1_epi8(':'));
        m = _mm_or_si128(m, _mm_cmpeq_epi8(x, _mm_set1_epi8('@')));
        m = _mm_or_si128(m, _mm_cmpeq_epi8(x, _mm_set1_epi8('?')));
        return msilo_uribad_mask16(p) | _mm_movemask_epi8(m);
    }
    #define MSILO_HAVE_SSE2 1
    #define msilo_ctz(m) __builtin_ctz((unsigned)(m))
    #else
    #define MSILO_HAVE_SSE2 0
    static inline int msilo_param_mask16(const unsigned char* p, int stop) { return 0; }
    static inline int msilo_uribad_mask16(const unsigned char* p) { return 0; }
    static inline int msilo_rq_mask16(const unsigned char* p) { return 0; }
    #define msilo_ctz(m) 0
    #endif

    /* Recently decoded ASCII strs, found by their bytes: a server sees the same few
       hosts and addresses again and again (Via sent-by, From, To, Request-URI), and a
       str is immutable, so one object serves them all.  Direct-mapped: a collision
       only replaces the entry.  The slot's entry is read again after any allocation,
       so a parse re-entered from a finalizer only costs a miss. */
    #define MSILO_STR_SLOTS 256
    #define MSILO_STR_MAX 64
    static PyObject* msilo_str_cache[MSILO_STR_SLOTS];
    static inline unsigned msilo_str_slot(const unsigned char* p, Py_ssize_t n) {
        uint64_t a, m, z, h;
        /* n >= 8: the first, middle and last eight bytes, which is where addresses differ */
        memcpy(&a, p, 8);
        memcpy(&m, p + (n >> 1) - 4, 8);
        memcpy(&z, p + n - 8, 8);
        h = (a * 0x9E3779B97F4A7C15ULL) ^ (m * 0xC2B2AE3D27D4EB4FULL)
            ^ (z * 0x165667B19E3779F9ULL) ^ (uint64_t)n;
        h ^= h >> 31;
        h *= 0xBF58476D1CE4E5B9ULL;
        return (unsigned)(h >> 56) & (MSILO_STR_SLOTS - 1);
    }
    /* The cached str equal to p[0:n] (borrowed), or NULL. */
    static inline PyObject* msilo_str_lookup(unsigned slot, const unsigned char* p, Py_ssize_t n) {
        PyObject* s = msilo_str_cache[slot];
        if (s != NULL && PyUnicode_GET_LENGTH(s) == n && memcmp(PyUnicode_DATA(s), p, n) == 0)
            return s;
        return NULL;
    }
    static inline void msilo_str_store(unsigned slot, PyObject* s) {
        PyObject* old = msilo_str_cache[slot];
        Py_INCREF(s);
        msilo_str_cache[slot] = s;
        Py_XDECREF(old);
    }

    /* Index of the first c in b[i:j], or -1; b[i:limit] may be read (j <= limit). */
    static inline Py_ssize_t msilo_find(const unsigned char* b, Py_ssize_t i, Py_ssize_t j,
                                        Py_ssize_t limit, unsigned char c) {
    #ifdef MSILO_SSE2
        while (i < j && i + 16 <= limit) {
            int m = msilo_eq16(b + i, c);
            if (m) {
                Py_ssize_t r = i + __builtin_ctz((unsigned)m);
                return r < j ? r : -1;
            }
            i += 16;
        }
    #endif
        for (; i < j; i++)
            if (b[i] == c) return i;
        return -1;
    }

    /* The LF ending each line of the head, from ``start`` up to the empty line: the
       first ``max`` of them go into ``lines`` (their count into *count).  *head_end is
       the LF before the empty line, *body_start the byte after it; -1 if there is none. */
    static int msilo_scan_head(const unsigned char* b, Py_ssize_t start, Py_ssize_t n,
                               Py_ssize_t* lines, int max, int* count,
                               Py_ssize_t* head_end, Py_ssize_t* body_start) {
        Py_ssize_t k = start, nl;
        int c = 0;
        for (;;) {
            nl = msilo_find(b, k, n, n, 10);
            if (nl < 0) return -1;
            if (c < max) lines[c++] = nl;
            if (nl + 1 < n && b[nl + 1] == 10) {
                *head_end = nl;
                *body_start = nl + 2;
                break;
            }
            if (nl + 2 < n && b[nl + 1] == 13 && b[nl + 2] == 10) {
                *head_end = nl;
                *body_start = nl + 3;
                break;
            }
            k = nl + 1;
        }
        *count = c;
        return 0;
    }
    """
    object msilo_alloc(object cls)
    Py_ssize_t msilo_slot_offset(object descr)
    void msilo_put(object obj, Py_ssize_t off, object v)
    Py_ssize_t msilo_find(const unsigned char* b, Py_ssize_t i, Py_ssize_t j, Py_ssize_t limit,
                          unsigned char c) noexcept nogil
    const bint MSILO_HAVE_SSE2
    const Py_ssize_t MSILO_STR_MAX
    unsigned msilo_str_slot(const unsigned char* p, Py_ssize_t n) noexcept nogil
    PyObject* msilo_str_lookup(unsigned slot, const unsigned char* p, Py_ssize_t n) noexcept nogil
    void msilo_str_store(unsigned slot, object s) noexcept
    bint PyUnicode_IS_ASCII(object o) noexcept
    int msilo_param_mask16(const unsigned char* p, int stop) noexcept nogil
    int msilo_uribad_mask16(const unsigned char* p) noexcept nogil
    int msilo_rq_mask16(const unsigned char* p) noexcept nogil
    int msilo_ctz(int m) noexcept nogil
    int msilo_scan_head(const unsigned char* b, Py_ssize_t start, Py_ssize_t n, Py_ssize_t* lines, int max,
                        int* count, Py_ssize_t* head_end, Py_ssize_t* body_start) noexcept nogil


ctypedef const unsigned char* cp

# --- character classes ------------------------------------------------------------------

cdef enum:
    C_TOKEN = 1     # token (RFC 3261 §25.1)
    C_HOST = 2      # hostname / IPv4 characters (and "_")
    C_DIGIT = 4
    C_SCHEME = 8    # ALPHA / DIGIT / "+" / "-" / "."
    C_URIBAD = 16   # controls, SP, DEL, < > "
    C_IPV6 = 32     # inside [...]: alphanum ":" "." "%"
    C_SWS = 64      # SP / HTAB
    C_ALPHA = 128

cdef unsigned char CT[256]
cdef unsigned char SEP[256]   # what _next_sep stops at: " < , ;

# What the one-pass parameter scanner (_params_fast) stops at.
cdef enum:
    P_EQ = 1        # "="
    P_SEMI = 2      # ";"
    P_COMMA = 4     # ","
    P_ODD = 8       # DQUOTE, "<", SP, HTAB: left to the general scanner
cdef unsigned char PT[256]
# What the one-pass Request-URI scan stops at: an invalid byte, or ":" "@" "?".
cdef enum:
    RQ_BAD = 1
    RQ_MARK = 2
cdef unsigned char RQ[256]


cdef void _init_table():
    cdef int c
    for c in range(256):
        CT[c] = 0
    for c in range(26):
        CT[97 + c] |= C_TOKEN | C_HOST | C_SCHEME | C_IPV6 | C_ALPHA
        CT[65 + c] |= C_TOKEN | C_HOST | C_SCHEME | C_IPV6 | C_ALPHA
    for c in range(48, 58):
        CT[c] |= C_TOKEN | C_HOST | C_DIGIT | C_SCHEME | C_IPV6
    for c in b"-.!%*_+`'~":
        CT[c] |= C_TOKEN
    for c in b"-._":
        CT[c] |= C_HOST
    for c in b"+-.":
        CT[c] |= C_SCHEME
    for c in b":.%":
        CT[c] |= C_IPV6
    for c in range(0x21):
        CT[c] |= C_URIBAD
    for c in b'\x7f<>"':
        CT[c] |= C_URIBAD
    CT[32] |= C_SWS
    CT[9] |= C_SWS
    for c in range(256):
        SEP[c] = 0
    for c in b'"<,;':
        SEP[c] = 1
    for c in range(256):
        PT[c] = 0
    PT[61] = P_EQ
    PT[59] = P_SEMI
    PT[44] = P_COMMA
    for c in b'"< \t':
        PT[c] = P_ODD
    for c in range(256):
        RQ[c] = RQ_BAD if CT[c] & C_URIBAD else 0
    for c in b":@?":
        RQ[c] = RQ_MARK


_init_table()

# --- slot offsets -------------------------------------------------------------------------


cdef Py_ssize_t _off(object cls, str name) except -1:
    cdef Py_ssize_t off = msilo_slot_offset(getattr(cls, name))
    if off < 0:
        raise ImportError(f"msilo._fastparse: {cls.__name__}.{name} is not a __slots__ member")
    return off


cdef object _SipRequest = SipRequest
cdef object _SipResponse = SipResponse
cdef object _Via = Via
cdef object _NameAddr = NameAddr
cdef object _Contact = Contact
cdef object _CSeq = CSeq
cdef object _ContentType = ContentType
cdef object _SipURI = SipURI
cdef object _ParseError = ParseError


cdef int _raise_missing(object to, object from_, object call_id, object cseq,
                        object via) except -1:
    # 400 naming every missing mandatory header, in the reason phrase too (twin: _missing)
    labels = [
        label
        for field, label in (
            (to, "To"), (from_, "From"), (call_id, "Call-ID"), (cseq, "CSeq"), (via, "Via")
        )
        if field is None
    ]
    names = ", ".join(labels)
    plural = "s" if len(labels) > 1 else ""
    raise _ParseError(f"missing {names} header{plural}", reason=f"Missing {names}")
cdef object _InvalidURI = InvalidURI
cdef object _COMPACT = COMPACT_FORMS
cdef object _PENDING = PENDING
cdef tuple _LAZY_MARKS = (PENDING, PENDING_FROM, PENDING_TO)   # Via, From, To

cdef Py_ssize_t M_HEADERS = _off(SipRequest, "_headers")
cdef Py_ssize_t M_BODY = _off(SipRequest, "body")
cdef Py_ssize_t M_VIA = _off(SipRequest, "via")
cdef Py_ssize_t M_FROM = _off(SipRequest, "from_")
cdef Py_ssize_t M_TO = _off(SipRequest, "to")
cdef Py_ssize_t M_CALL_ID = _off(SipRequest, "call_id")
cdef Py_ssize_t M_CSEQ = _off(SipRequest, "cseq")
cdef Py_ssize_t M_MAX_FORWARDS = _off(SipRequest, "max_forwards")
cdef Py_ssize_t M_EXPIRES = _off(SipRequest, "expires")
cdef Py_ssize_t M_CONTENT_TYPE = _off(SipRequest, "_content_type")
cdef Py_ssize_t M_CONTENT_LENGTH = _off(SipRequest, "content_length")
cdef Py_ssize_t M_CONTACTS = _off(SipRequest, "_contacts")
cdef Py_ssize_t M_CONTACT_STAR = _off(SipRequest, "contact_star")
cdef Py_ssize_t M_ALLOW = _off(SipRequest, "_allow")
cdef Py_ssize_t M_SOURCE = _off(SipRequest, "_source")
cdef Py_ssize_t RQ_METHOD = _off(SipRequest, "method")
cdef Py_ssize_t RQ_URI = _off(SipRequest, "uri")
cdef Py_ssize_t RQ_VERSION = _off(SipRequest, "version")
cdef Py_ssize_t RS_STATUS = _off(SipResponse, "status")
cdef Py_ssize_t RS_REASON = _off(SipResponse, "reason")
cdef Py_ssize_t RS_VERSION = _off(SipResponse, "version")
cdef Py_ssize_t V_PROTOCOL = _off(Via, "protocol")
cdef Py_ssize_t V_TRANSPORT = _off(Via, "transport")
cdef Py_ssize_t V_HOST = _off(Via, "host")
cdef Py_ssize_t V_PORT = _off(Via, "port")
cdef Py_ssize_t V_BRANCH = _off(Via, "branch")
cdef Py_ssize_t V_RECEIVED = _off(Via, "received")
cdef Py_ssize_t V_RPORT = _off(Via, "rport")
cdef Py_ssize_t V_PARAMS = _off(Via, "_params")
cdef Py_ssize_t V_SOURCE = _off(Via, "_source")
cdef Py_ssize_t V_RAW = _off(Via, "_raw")
cdef Py_ssize_t NA_DISPLAY = _off(NameAddr, "_display")
cdef Py_ssize_t NA_URI = _off(NameAddr, "uri")
cdef Py_ssize_t NA_TAG = _off(NameAddr, "tag")
cdef Py_ssize_t NA_PARAMS = _off(NameAddr, "_params")
cdef Py_ssize_t NA_SOURCE = _off(NameAddr, "_source")
cdef Py_ssize_t CT_DISPLAY = _off(Contact, "display")
cdef Py_ssize_t CT_URI = _off(Contact, "uri")
cdef Py_ssize_t CT_EXPIRES = _off(Contact, "expires")
cdef Py_ssize_t CT_Q = _off(Contact, "q")
cdef Py_ssize_t CT_METHODS = _off(Contact, "methods")
cdef Py_ssize_t CT_INSTANCE = _off(Contact, "instance")
cdef Py_ssize_t CT_PARAMS = _off(Contact, "params")
cdef Py_ssize_t CS_NUMBER = _off(CSeq, "number")
cdef Py_ssize_t CS_METHOD = _off(CSeq, "method")
cdef Py_ssize_t MT_TYPE = _off(ContentType, "type")
cdef Py_ssize_t MT_SUBTYPE = _off(ContentType, "subtype")
cdef Py_ssize_t MT_PARAMS = _off(ContentType, "params")
cdef Py_ssize_t MT_RAW = _off(ContentType, "raw")
cdef Py_ssize_t U_SCHEME = _off(SipURI, "scheme")
cdef Py_ssize_t U_USER = _off(SipURI, "user")
cdef Py_ssize_t U_PASSWORD = _off(SipURI, "password")
cdef Py_ssize_t U_HOST = _off(SipURI, "host")
cdef Py_ssize_t U_PORT = _off(SipURI, "port")
cdef Py_ssize_t U_PARAMS = _off(SipURI, "params")
cdef Py_ssize_t U_HEADERS = _off(SipURI, "headers")
cdef Py_ssize_t U_RAW = _off(SipURI, "raw")

DEF CSEQ_MAX = 2147483647
DEF EXPIRES_MAX = 4294967295
DEF PORT_MAX = 65535
DEF MAX_FORWARDS_MAX = 255

# Strings the hot path would otherwise decode again and again.
cdef str S_SIP20 = "SIP/2.0"
cdef str S_EMPTY = ""
cdef tuple _TRANSPORTS = ("UDP", "TCP", "TLS", "SCTP", "WS", "WSS")
cdef tuple _TRANSPORTS_LOWER = (b"udp", b"tcp", b"tls", b"sctp", b"ws", b"wss")
cdef tuple _SCHEMES = ("sip", "sips", "tel")

# --- small helpers on byte ranges --------------------------------------------------------


cdef inline object _s(cp b, Py_ssize_t i, Py_ssize_t j):
    """Decode b[i:j] (UTF-8, surrogateescape); ASCII is copied straight into a new str."""
    cdef Py_ssize_t k = i
    cdef uint64_t word
    if j <= i:
        return S_EMPTY
    # ASCII check a word at a time: the check dominated header decoding
    while k + 8 <= j:
        memcpy(&word, b + k, 8)
        if word & 0x8080808080808080ULL:
            return PyUnicode_DecodeUTF8(<const char*>(b + i), j - i, "surrogateescape")
        k += 8
    while k < j:
        if b[k] >= 0x80:
            return PyUnicode_DecodeUTF8(<const char*>(b + i), j - i, "surrogateescape")
        k += 1
    text = PyUnicode_New(j - i, 127)
    memcpy(PyUnicode_DATA(text), b + i, j - i)
    return text


cdef inline object _s_shared(cp b, Py_ssize_t i, Py_ssize_t j):
    """``_s(b, i, j)``, the same object as the last time these bytes were decoded."""
    cdef Py_ssize_t n = j - i
    cdef unsigned slot
    cdef PyObject* hit
    if n < 8 or n > MSILO_STR_MAX:
        return _s(b, i, j)
    slot = msilo_str_slot(b + i, n)
    hit = msilo_str_lookup(slot, b + i, n)
    if hit != NULL:
        return <object>hit
    text = _s(b, i, j)
    if PyUnicode_IS_ASCII(text):
        msilo_str_store(slot, text)
    return text


cdef inline bint _eq_bytes(cp p, cp q, Py_ssize_t n) noexcept nogil:
    """p[:n] == q[:n]; for the short strings here a loop beats a call to memcmp."""
    cdef Py_ssize_t k
    for k in range(n):
        if p[k] != q[k]:
            return False
    return True


@cython.final
cdef class _Strings:
    """A small table of str objects found by their bytes, so hot values are shared."""
    cdef int n
    cdef bint fold
    cdef Py_ssize_t lens[48]
    cdef const char* chars[48]
    cdef list strs
    cdef list keep

    def __cinit__(self, names, bint fold):
        self.n = 0
        self.fold = fold
        self.strs = []
        self.keep = []
        for name in names[:48]:
            encoded = name.encode("ascii")
            self.keep.append(encoded)
            self.strs.append(name)
            self.chars[self.n] = PyBytes_AS_STRING(encoded)
            self.lens[self.n] = len(encoded)
            self.n += 1

    cdef inline object find(self, cp b, Py_ssize_t i, Py_ssize_t j):
        """The shared str for b[i:j] (ASCII case folded when ``fold``), or None."""
        cdef Py_ssize_t n = j - i
        cdef int idx
        if n <= 0:
            return None
        for idx in range(self.n):
            # first-byte pre-filter: bytes equal (or equal but for ASCII case) are still
            # equal after "| 0x20", so this never rejects a match
            if self.lens[idx] != n or (b[i] | 0x20) != (<unsigned char>self.chars[idx][0] | 0x20):
                continue
            if self.fold:
                if _ieq(b, i, j, self.chars[idx]):
                    return self.strs[idx]
            elif _eq_bytes(b + i, <cp>self.chars[idx], n):
                return self.strs[idx]
        return None


cdef _Strings _METHODS = _Strings((
    "MESSAGE", "REGISTER", "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "SUBSCRIBE",
    "NOTIFY", "PUBLISH", "INFO", "REFER", "UPDATE", "PRACK"), False)
cdef _Strings _PARAM_NAMES = _Strings((
    "tag", "branch", "rport", "received", "lr", "transport", "user", "maddr", "ttl",
    "method", "expires", "q", "charset", "methods", "+sip.instance", "reg-id", "ob",
    "boundary", "alias", "gr"), True)
cdef _Strings _MEDIA = _Strings((
    "text", "plain", "application", "sdp", "html", "message", "cpim", "multipart",
    "mixed", "related", "im-iscomposing+xml", "json", "xml", "pidf+xml",
    "sipfrag"), True)


cdef inline Py_ssize_t _lskip(cp b, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    while i < j and (b[i] == 32 or b[i] == 9):
        i += 1
    return i


cdef inline Py_ssize_t _rskip(cp b, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    while j > i and (b[j - 1] == 32 or b[j - 1] == 9):
        j -= 1
    return j


cdef inline bint _all(cp b, Py_ssize_t i, Py_ssize_t j, unsigned char cls) noexcept nogil:
    """b[i:j] is non-empty and every byte is in ``cls``."""
    if i >= j:
        return False
    while i < j:
        if not (CT[b[i]] & cls):
            return False
        i += 1
    return True


cdef inline bint _any(cp b, Py_ssize_t i, Py_ssize_t j, unsigned char cls) noexcept nogil:
    while i < j:
        if CT[b[i]] & cls:
            return True
        i += 1
    return False


cdef inline Py_ssize_t _find(cp b, Py_ssize_t i, Py_ssize_t j, unsigned char c) noexcept nogil:
    cdef const void* r
    if j - i < 24:
        # most ranges are short: a call to memchr costs more than the loop
        while i < j:
            if b[i] == c:
                return i
            i += 1
        return -1
    r = memchr(b + i, c, <size_t>(j - i))
    if r == NULL:
        return -1
    return <Py_ssize_t>(<cp>r - b)


cdef inline bint _ieq(cp b, Py_ssize_t i, Py_ssize_t j, const char* lower) noexcept nogil:
    """b[i:j] equals the lower-case ASCII ``lower``, ignoring ASCII case."""
    cdef Py_ssize_t k = 0
    cdef unsigned char c
    while i < j:
        if lower[k] == 0:
            return False
        c = b[i]
        if 65 <= c <= 90:
            c += 32
        if c != <unsigned char>lower[k]:
            return False
        i += 1
        k += 1
    return lower[k] == 0


cdef object _case_s(cp b, Py_ssize_t i, Py_ssize_t j, bint upper):
    """ASCII-only case mapping of b[i:j], then decode."""
    cdef Py_ssize_t k
    cdef unsigned char c
    cdef unsigned char lo = 97 if upper else 65
    cdef bytes tmp
    cdef unsigned char* t
    for k in range(i, j):
        c = b[k]
        if lo <= c <= lo + 25:
            break
    else:
        return _s(b, i, j)
    # A fresh buffer (NULL source): CPython shares one object per 1-byte bytes value, and
    # writing into that shared object would change b"A" for the whole interpreter.
    tmp = PyBytes_FromStringAndSize(NULL, j - i)
    t = <unsigned char*>PyBytes_AS_STRING(tmp)
    memcpy(t, b + i, j - i)
    for k in range(j - i):
        c = t[k]
        if lo <= c <= lo + 25:
            t[k] = c - 32 if upper else c + 32
    return _s(t, 0, j - i)


cdef inline int64_t _number(cp b, Py_ssize_t i, Py_ssize_t j, int64_t limit, bint clamp,
                            str what) except -2:
    """1*DIGIT as an integer; over ``limit`` is clamped or a 400."""
    cdef int64_t v = 0
    cdef Py_ssize_t k
    # up to 9 digits cannot overflow: the usual number in one loop, the rest below
    if 0 < j - i <= 9:
        for k in range(i, j):
            if not (48 <= b[k] <= 57):
                return _number_general(b, i, j, limit, clamp, what)
            v = v * 10 + (b[k] - 48)
        if v <= limit:
            return v
    return _number_general(b, i, j, limit, clamp, what)


cdef int64_t _number_general(cp b, Py_ssize_t i, Py_ssize_t j, int64_t limit, bint clamp,
                             str what) except -2:
    cdef Py_ssize_t k
    cdef int64_t v = 0
    if not _all(b, i, j, C_DIGIT):
        raise _ParseError(f"{what} is not a number: {_s(b, i, j)!r}")
    k = i
    while k < j and b[k] == 48:
        k += 1
    if j - k > 10:
        if clamp:
            return limit
        raise _ParseError(f"{what} is too large: {_s(b, i, j)!r}")
    while k < j:
        v = v * 10 + (b[k] - 48)
        k += 1
    if v > limit:
        if clamp:
            return limit
        raise _ParseError(f"{what} is too large: {_s(b, i, j)!r}")
    return v


cdef Py_ssize_t _quoted_end(cp b, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    """Index just after the quoted string opening at ``i``; -1 if unterminated."""
    i += 1
    while i < j:
        if b[i] == 92:
            i += 2
            continue
        if b[i] == 34:
            return i + 1
        i += 1
    return -1


cdef Py_ssize_t _next_sep(cp b, Py_ssize_t i, Py_ssize_t j, unsigned char sep) except -2:
    """Next ``sep`` outside quoted strings and <...>, or ``j``."""
    cdef Py_ssize_t e
    cdef unsigned char c
    while i < j:
        c = b[i]
        if not SEP[c]:
            # most bytes are none of " < , ; (one table load instead of three compares)
            i += 1
            continue
        if c == 34:
            e = _quoted_end(b, i, j)
            if e < 0:
                raise _ParseError("unterminated quoted string")
            i = e
            continue
        if c == 60:
            e = _find(b, i + 1, j, 62)
            if e < 0:
                raise _ParseError("unterminated <")
            i = e + 1
            continue
        if c == sep:
            return i
        i += 1
    return j


cdef str _unquote_str(str text):
    """Content of a quoted string with quoted-pairs resolved; other text unchanged."""
    cdef Py_ssize_t i, n
    cdef list out
    cdef str inner
    if len(text) >= 2 and text[0] == '"' and text[len(text) - 1] == '"':
        inner = text[1:len(text) - 1]
        if "\\" not in inner:
            return inner
        out = []
        n = len(inner)
        i = 0
        while i < n:
            c = inner[i]
            if c == "\\" and i + 1 < n:
                i += 1
                c = inner[i]
            out.append(c)
            i += 1
        return "".join(out)
    return text


cdef inline Py_ssize_t _param_value(cp b, Py_ssize_t ns, Py_ssize_t ne, Py_ssize_t eq,
                                    Py_ssize_t e, Py_ssize_t* end) except -2:
    """The value of the parameter named b[ns:ne] with "=" at ``eq``, ending by ``e``:
    its start, its end in ``*end``; an empty value, a bad quoted string or a token
    value with SP, HTAB or DQUOTE is a ParseError."""
    cdef Py_ssize_t vs = _lskip(b, eq + 1, e)
    cdef Py_ssize_t ve = _rskip(b, vs, e)
    cdef Py_ssize_t k
    cdef unsigned char c
    if vs >= ve:
        raise _ParseError(f"parameter {_case_s(b, ns, ne, False)!r} has an empty value")
    if b[vs] == 34:
        if _quoted_end(b, vs, ve) != ve:
            raise _ParseError(f"parameter {_case_s(b, ns, ne, False)!r}: bad quoted string")
    else:
        for k in range(vs, ve):
            c = b[k]
            if c == 32 or c == 9 or c == 34:
                raise _ParseError(f"parameter {_case_s(b, ns, ne, False)!r}: bad value")
    end[0] = ve
    return vs


cdef dict _params(cp b, Py_ssize_t i, Py_ssize_t j, bint build=True):
    """``generic-param *( SEMI generic-param )`` over b[i:j]; see the twin.

    With ``build`` false only the checks run (same errors, nothing allocated) and the
    result is None: what a deferred header needs at parse time.
    """
    cdef dict params = {} if build else None
    cdef Py_ssize_t s = i, e, eq, ns, ne, vs, ve
    cdef object name = None
    while True:
        e = _next_sep(b, s, j, 59)
        eq = _find(b, s, e, 61)
        ne = e if eq < 0 else eq
        ns = _lskip(b, s, ne)
        ne = _rskip(b, ns, ne)
        if ns >= ne:
            raise _ParseError(f"empty parameter in {_s(b, i, j)!r}")
        if build:
            name = _PARAM_NAMES.find(b, ns, ne)
            if name is None:
                name = _case_s(b, ns, ne, False)
        if eq < 0:
            if build:
                PyDict_SetItem(params, name, None)
        else:
            vs = _param_value(b, ns, ne, eq, e, &ve)
            if build:
                PyDict_SetItem(params, name, _s(b, vs, ve))
        if e >= j:
            break
        s = e + 1
    return params


cdef struct ParamCap:
    # value spans of the wanted parameters: s = -1 absent, -2 a flag (no value);
    # the last occurrence wins, as in the dict _params builds
    Py_ssize_t s[3]
    Py_ssize_t e[3]


cdef int _params_cap(cp b, Py_ssize_t i, Py_ssize_t j, bint via, ParamCap* cap) except -1:
    """The checks of ``_params(b, i, j, False)``, capturing the values the hot path reads.

    Name-addr (``via`` false): tag in slot 0.  Via: branch, received, rport in 0, 1, 2.
    """
    cdef Py_ssize_t s = i, e, eq, ns, ne, vs, ve
    cdef int slot
    while True:
        e = _next_sep(b, s, j, 59)
        eq = _find(b, s, e, 61)
        ne = e if eq < 0 else eq
        ns = _lskip(b, s, ne)
        ne = _rskip(b, ns, ne)
        if ns >= ne:
            raise _ParseError(f"empty parameter in {_s(b, i, j)!r}")
        slot = -1
        if via:
            if ne - ns == 6 and _ieq(b, ns, ne, b"branch"):
                slot = 0
            elif ne - ns == 8 and _ieq(b, ns, ne, b"received"):
                slot = 1
            elif ne - ns == 5 and _ieq(b, ns, ne, b"rport"):
                slot = 2
        elif ne - ns == 3 and _ieq(b, ns, ne, b"tag"):
            slot = 0
        if eq < 0:
            if slot >= 0:
                cap.s[slot] = -2
        else:
            vs = _param_value(b, ns, ne, eq, e, &ve)
            if slot >= 0:
                cap.s[slot] = vs
                cap.e[slot] = ve
        if e >= j:
            break
        s = e + 1
    return 0


cdef inline bint _ieq_letters(cp b, Py_ssize_t i, const char* lower, int n) noexcept nogil:
    """b[i:i+n] equals ``lower``, n lower-case ASCII letters, ignoring case.

    For a letter, "| 0x20" maps only its two cases onto it: no table, no range test.
    """
    cdef int k
    for k in range(n):
        if (b[i + k] | 0x20) != <unsigned char>lower[k]:
            return False
    return True


cdef inline int _cap_slot(cp b, Py_ssize_t ns, Py_ssize_t ne, bint via) noexcept nogil:
    """The ParamCap slot of the parameter named b[ns:ne], or -1 (see _params_cap)."""
    cdef Py_ssize_t n = ne - ns
    if via:
        if n == 6 and _ieq_letters(b, ns, b"branch", 6):
            return 0
        if n == 8 and _ieq_letters(b, ns, b"received", 8):
            return 1
        if n == 5 and _ieq_letters(b, ns, b"rport", 5):
            return 2
    elif n == 3 and _ieq_letters(b, ns, b"tag", 3):
        return 0
    return -1


cdef inline Py_ssize_t _span_plain(cp b, Py_ssize_t k, Py_ssize_t j, Py_ssize_t limit,
                                   unsigned char stop) noexcept nogil:
    """The first byte of b[k:j] in the P_* classes ``stop``, or ``j``."""
    cdef int m
    if MSILO_HAVE_SSE2:
        while k < j and k + 16 <= limit:
            m = msilo_param_mask16(b + k, stop)
            if m:
                k += msilo_ctz(m)
                return k if k < j else j
            k += 16
        if k >= j:
            return j
    while k < j and not (PT[b[k]] & stop):
        k += 1
    return k


cdef Py_ssize_t _params_fast(cp b, Py_ssize_t i, Py_ssize_t j, Py_ssize_t limit, bint via,
                             ParamCap* cap) noexcept nogil:
    """``_params_cap`` in one pass for the usual parameters: ``name[=value]`` of plain
    bytes or a value that is one quoted string, no whitespace, no "<".

    For a Via the list ends at a "," too; the result is where the list ends (the ","
    or ``j``), or -1 when the list has anything else: the caller then runs the general
    scanners, which accept or reject it exactly as before.  ``cap`` is then partly
    filled and must be reset.
    """
    cdef unsigned char stop_value = P_SEMI | P_ODD | (P_COMMA if via else 0)
    cdef unsigned char stop_name = stop_value | P_EQ
    cdef Py_ssize_t k = i, ns, vs
    cdef int slot
    cdef unsigned char c
    while True:
        ns = k
        k = _span_plain(b, k, j, limit, stop_name)
        if k == ns:
            return -1
        slot = _cap_slot(b, ns, k, via)
        if k < j and b[k] == 61:
            k += 1
            vs = k
            if k < j and b[k] == 34:
                # a quoted value must end the parameter (checked below)
                k = _quoted_end(b, k, j)
                if k < 0:
                    return -1
            else:
                k = _span_plain(b, k, j, limit, stop_value)
                if k == vs:
                    return -1
            if slot >= 0:
                cap.s[slot] = vs
                cap.e[slot] = k
        elif slot >= 0:
            cap.s[slot] = -2
        if k >= j:
            return j
        c = b[k]
        if c == 59:
            k += 1
        elif c == 44 and via:
            return k
        else:
            return -1


cdef inline object _cap_str(cp b, ParamCap* cap, int slot):
    if cap.s[slot] < 0:
        return None
    return _s(b, cap.s[slot], cap.e[slot])


# Port numbers as int objects, built once: a Via port (and rport) is most often one of
# a few values, and an int allocation per parse was measurable.
DEF PORT_CACHE_LO = 5000
DEF PORT_CACHE_N = 128
cdef list _PORT_INTS = [PORT_CACHE_LO + k for k in range(PORT_CACHE_N)]


cdef inline object _port_int(int64_t v):
    if PORT_CACHE_LO <= v < PORT_CACHE_LO + PORT_CACHE_N:
        return _PORT_INTS[v - PORT_CACHE_LO]
    return v


cdef int _check_uri_chars(cp b, Py_ssize_t i, Py_ssize_t j) except -1:
    if i >= j:
        raise _ParseError("empty URI")
    if _any(b, i, j, C_URIBAD):
        raise _ParseError(f"invalid character in URI {_s(b, i, j)!r}")
    return 0


cdef bint _valid_host(cp b, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    # hostname / IPv4address characters, or IPv6reference = "[" IPv6address "]"
    if i < j and b[i] == 91:
        return j - i >= 3 and b[j - 1] == 93 and _all(b, i + 1, j - 1, C_IPV6)
    return _all(b, i, j, C_HOST)


# --- header values ---------------------------------------------------------------------

cdef struct NameAddrSpan:
    Py_ssize_t ds, de      # display name; ds = -1 when absent
    bint quoted
    Py_ssize_t us, ue      # the URI
    Py_ssize_t ps, pe      # parameters after the first ";"; ps = -1 when none


cdef inline Py_ssize_t _uri_end(cp b, Py_ssize_t k, Py_ssize_t j, Py_ssize_t limit) noexcept nogil:
    """The first byte of b[k:j] a URI may not hold (C_URIBAD), or ``j``."""
    cdef int m
    if MSILO_HAVE_SSE2:
        while k < j and k + 16 <= limit:
            m = msilo_uribad_mask16(b + k)
            if m:
                k += msilo_ctz(m)
                return k if k < j else j
            k += 16
        if k >= j:
            return j
    while k < j and not (CT[b[k]] & C_URIBAD):
        k += 1
    return k


cdef int _scan_name_addr(cp b, Py_ssize_t i, Py_ssize_t j, NameAddrSpan* out,
                         Py_ssize_t limit=-1) except -1:
    # name-addr = [ display-name ] LAQUOT addr-spec RAQUOT ; addr-spec ends at ";"
    cdef Py_ssize_t lt = -1, end, k, gt, de
    cdef unsigned char c
    cdef bint checked = False
    out.ds = -1
    out.quoted = False
    out.ps = -1
    if i < j and b[i] == 34:
        end = _quoted_end(b, i, j)
        if end < 0:
            raise _ParseError("unterminated quoted display name")
        out.ds = i
        out.de = end
        out.quoted = True
        lt = _lskip(b, end, j)
        if lt >= j or b[lt] != 60:
            raise _ParseError("quoted display name not followed by <")
    else:
        k = i
        while k < j:
            c = b[k]
            if c == 60 or c == 59 or c == 34:
                if c == 60:
                    lt = k
                break
            k += 1
        if lt >= 0:
            de = _rskip(b, i, lt)
            for k in range(i, de):
                if not (CT[b[k]] & (C_TOKEN | C_SWS)):
                    raise _ParseError(f"invalid display name {_s(b, i, de)!r}")
            if de > i:
                out.ds = i
                out.de = de
    if lt >= 0:
        # the URI ends at ">", which is one of its invalid characters: one scan finds
        # the end and checks the URI (the general path only for its error message)
        gt = _uri_end(b, lt + 1, j, limit if limit >= 0 else j)
        if gt < j and b[gt] == 62:
            checked = gt > lt + 1
        else:
            gt = _find(b, lt + 1, j, 62)
            if gt < 0:
                raise _ParseError("unterminated <")
        out.us = lt + 1
        out.ue = gt
        k = _lskip(b, gt + 1, j)
        if k < j:
            if b[k] != 59:
                raise _ParseError(f"unexpected text after >: {_s(b, k, j)!r}")
            out.ps = k + 1
            out.pe = j
    else:
        k = _find(b, i, j, 59)
        if k >= 0:
            out.ps = k + 1
            out.pe = j
            end = k
        else:
            end = j
        end = _rskip(b, i, end)
        out.us = i
        out.ue = end
        if _find(b, i, end, 63) >= 0 or _find(b, i, end, 44) >= 0:
            raise _ParseError(f"URI with ? or , must be enclosed in <>: {_s(b, i, end)!r}")
    if not checked:
        _check_uri_chars(b, out.us, out.ue)
    return 0


cdef inline object _display(cp b, NameAddrSpan* na):
    if na.ds < 0:
        return None
    if na.quoted:
        if _find(b, na.ds + 1, na.de - 1, 92) < 0:
            return _s(b, na.ds + 1, na.de - 1)
        return _unquote_str(_s(b, na.ds, na.de))
    return _s(b, na.ds, na.de)


cdef object _from_to(cp b, Py_ssize_t i, Py_ssize_t j, Py_ssize_t limit, _Source f, _Source src,
                     int which):
    cdef NameAddrSpan na
    cdef ParamCap cap
    _scan_name_addr(b, i, j, &na, limit)
    cap.s[0] = -1
    if na.ps >= 0 and _params_fast(b, na.ps, na.pe, limit, False, &cap) < 0:
        cap.s[0] = -1
        _params_cap(b, na.ps, na.pe, False, &cap)
    obj = msilo_alloc(_NameAddr)
    src.lazy(which, na.ps, na.pe)
    if na.ds < 0:
        msilo_put(obj, NA_DISPLAY, None)
    else:
        src.lz_ds[which] = na.ds
        src.lz_de[which] = na.de
        src.lz_q[which] = na.quoted
        msilo_put(obj, NA_DISPLAY, <object>_LAZY_MARKS[which])
    if f.request_uri is not None and na.ue - na.us == f.ru_len \
            and memcmp(b + na.us, f.ru, f.ru_len) == 0:
        uri = f.request_uri      # str is immutable: one object for both is the same value
    else:
        uri = _s_shared(b, na.us, na.ue)
    msilo_put(obj, NA_URI, uri)
    msilo_put(obj, NA_PARAMS, <object>_LAZY_MARKS[which])
    msilo_put(obj, NA_TAG, _cap_str(b, &cap, 0))
    return obj


cdef bint _is_digits(str text):
    if not text:
        return False
    for ch in text:
        if not ("0" <= ch <= "9"):
            return False
    return True


cdef bint _is_qvalue(str text):
    # DIGITS [ "." DIGITS ]
    cdef Py_ssize_t i, n = len(text), dot = -1
    if n == 0:
        return False
    for i in range(n):
        ch = text[i]
        if ch == ".":
            if dot >= 0 or i == 0 or i == n - 1:
                return False
            dot = i
        elif not ("0" <= ch <= "9"):
            return False
    return True


cdef object _upper_str(str text):
    return text.upper() if text.isascii() else text.translate(_UPPER_TABLE)


cdef dict _UPPER_TABLE = {c: c - 32 for c in range(97, 123)}


cdef tuple _method_list_str(str text):
    cdef list out = []
    for item in text.split(","):
        item = item.strip(" \t")
        if item:
            out.append(_upper_str(item))
    return tuple(out)


cdef int _contact_list(cp b, Py_ssize_t i, Py_ssize_t j, list out) except -1:
    """Check the contact-params of one Contact value b[i:j]; with ``out``, build them too."""
    # Contact = ("*" / (contact-param *(COMMA contact-param)))
    cdef Py_ssize_t s = i, e, k, e2
    cdef NameAddrSpan na
    cdef ParamCap unused
    while True:
        e = _next_sep(b, s, j, 44)
        k = _lskip(b, s, e)
        e2 = _rskip(b, k, e)
        if k >= e2 or (e2 - k == 1 and b[k] == 42):
            raise _ParseError(f"bad Contact list {_s(b, i, j)!r}")
        if out is not None:
            out.append(_contact(b, k, e2))
        else:
            _scan_name_addr(b, k, e2, &na)
            if na.ps >= 0 and _params_fast(b, na.ps, na.pe, na.pe, False, &unused) < 0:
                _params(b, na.ps, na.pe, False)
        if e >= j:
            return 0
        s = e + 1


cdef object _contact(cp b, Py_ssize_t i, Py_ssize_t j):
    cdef NameAddrSpan na
    cdef bytes digits
    _scan_name_addr(b, i, j, &na)
    params = _params(b, na.ps, na.pe) if na.ps >= 0 else {}
    obj = msilo_alloc(_Contact)
    msilo_put(obj, CT_DISPLAY, _display(b, &na))
    msilo_put(obj, CT_URI, _s(b, na.us, na.ue))
    msilo_put(obj, CT_PARAMS, params)
    expires = params.get("expires")
    if expires is not None and _is_digits(expires):
        digits = (<str>expires).encode("ascii")
        expires = _number(<cp>PyBytes_AS_STRING(digits), 0, len(digits), EXPIRES_MAX, True,
                          "expires")
    else:
        expires = None
    msilo_put(obj, CT_EXPIRES, expires)
    q = params.get("q")
    msilo_put(obj, CT_Q, PyFloat_FromString(q) if q is not None and _is_qvalue(q) else None)
    if "methods" not in params:
        methods = None
    else:
        methods = params["methods"]
        methods = () if methods is None else _method_list_str(_unquote_str(methods))
    msilo_put(obj, CT_METHODS, methods)
    instance = params.get("+sip.instance")
    msilo_put(obj, CT_INSTANCE, _unquote_str(instance) if instance is not None else None)
    return obj


cdef object _via(cp b, Py_ssize_t i, Py_ssize_t j, Py_ssize_t limit, _Source src):
    # via-parm = sent-protocol LWS sent-by *( SEMI via-params ); see the twin.
    # One pass: sent-protocol and sent-by (which hold no quote, "<", "," or ";" when
    # they are valid), then the parameters up to the "," that ends this via-parm.
    cdef ParamCap cap
    cdef int64_t rp
    cdef Py_ssize_t e, rs, re_, semi, k, t1s, t1e, t2s, t2e, t3s, t3e, hs, hend, ps, pe
    cdef unsigned char c
    cdef bint sip20
    rs = _lskip(b, i, j)
    k = rs
    sip20 = j - k >= 8 and memcmp(b + k, b"SIP/2.0/", 8) == 0
    if sip20:
        t1s = k
        t1e = k + 3
        t2s = k + 4
        t2e = k + 7
        k = _lskip(b, k + 8, j)
    else:
        t1s = k
        while k < j and CT[b[k]] & C_TOKEN:
            k += 1
        t1e = k
        k = _lskip(b, k, j)
        if t1e == t1s or k >= j or b[k] != 47:
            raise _ParseError(f"malformed Via {_s(b, rs, _via_end(b, rs, j))!r}")
        k = _lskip(b, k + 1, j)
        t2s = k
        while k < j and CT[b[k]] & C_TOKEN:
            k += 1
        t2e = k
        k = _lskip(b, k, j)
        if t2e == t2s or k >= j or b[k] != 47:
            raise _ParseError(f"malformed Via {_s(b, rs, _via_end(b, rs, j))!r}")
        k = _lskip(b, k + 1, j)
    t3s = k
    while k < j and CT[b[k]] & C_TOKEN:
        k += 1
    t3e = k
    if t3e == t3s or k >= j or not (CT[b[k]] & C_SWS):
        raise _ParseError(f"malformed Via {_s(b, rs, _via_end(b, rs, j))!r}")
    k = _lskip(b, k, j)
    hs = k
    if k < j and b[k] == 91:
        k = _find(b, k + 1, j, 93)
        if k < 0:
            raise _ParseError(f"malformed Via {_s(b, rs, _via_end(b, rs, j))!r}")
        k += 1
        hend = k
        if not _valid_host(b, hs, hend):
            raise _ParseError(f"bad Via host {_s(b, hs, _via_end(b, hs, j))!r}")
    else:
        # hostname / IPv4address: the scan keeps only the characters _valid_host allows
        while k < j and CT[b[k]] & C_HOST:
            k += 1
        hend = k
        if hend == hs:
            raise _ParseError(f"bad Via host {_s(b, hs, _via_end(b, hs, j))!r}")
    k = _lskip(b, k, j)
    port = None
    if k < j and b[k] == 58:
        ps = _lskip(b, k + 1, j)
        pe = ps
        while pe < j and CT[b[pe]] & C_DIGIT:
            pe += 1
        if pe == ps:
            raise _ParseError(f"malformed Via {_s(b, rs, _via_end(b, rs, j))!r}")
        port = _port_int(_number(b, ps, pe, PORT_MAX, False, "Via port"))
        k = _lskip(b, pe, j)
    # what may follow sent-by: the parameters, the next via-parm, or nothing
    cap.s[0] = cap.s[1] = cap.s[2] = -1
    semi = -1
    if k >= j:
        re_ = _rskip(b, rs, j)
    else:
        c = b[k]
        if c == 44:
            re_ = _rskip(b, rs, k)
        elif c != 59:
            raise _ParseError(f"malformed Via {_s(b, rs, _via_end(b, rs, j))!r}")
        else:
            semi = k
            re_ = _params_fast(b, semi + 1, j, limit, True, &cap)
            if re_ < 0:
                # quoted strings, "<...>" or whitespace: the general scanners
                e = _next_sep(b, rs, j, 44)
                re_ = _rskip(b, rs, e)
                cap.s[0] = cap.s[1] = cap.s[2] = -1
                _params_cap(b, semi + 1, re_, True, &cap)
    obj = msilo_alloc(_Via)
    src.lazy(0, semi + 1 if semi >= 0 else -1, re_)
    src.lz_ds[0] = rs
    src.lz_de[0] = re_
    if sip20 or t1e - t1s == 3 and _ieq(b, t1s, t1e, b"sip") and t2e - t2s == 3 \
            and b[t2s] == 50 and b[t2s + 1] == 46 and b[t2s + 2] == 48:
        protocol = S_SIP20
    else:
        protocol = _case_s(b, t1s, t1e, True) + "/" + _s(b, t2s, t2e)
    msilo_put(obj, V_PROTOCOL, protocol)
    msilo_put(obj, V_TRANSPORT, _transport(b, t3s, t3e))
    msilo_put(obj, V_HOST, _s_shared(b, hs, hend))
    msilo_put(obj, V_PORT, port)
    msilo_put(obj, V_PARAMS, _PENDING)
    msilo_put(obj, V_BRANCH, _cap_str(b, &cap, 0))
    msilo_put(obj, V_RECEIVED, _cap_str(b, &cap, 1))
    rport = None
    if cap.s[2] >= 0 and cap.e[2] - cap.s[2] <= 5 and _all(b, cap.s[2], cap.e[2], C_DIGIT):
        rp = 0
        for k in range(cap.s[2], cap.e[2]):
            rp = rp * 10 + (b[k] - 48)
        if rp <= PORT_MAX:
            rport = _port_int(rp)
    msilo_put(obj, V_RPORT, rport)
    msilo_put(obj, V_RAW, _PENDING)
    return obj


cdef Py_ssize_t _via_end(cp b, Py_ssize_t i, Py_ssize_t j):
    """Where the via-parm at ``i`` ends, for an error message (never raises)."""
    cdef Py_ssize_t k = i
    while k < j and b[k] != 44:
        k += 1
    return k


cdef object _transport(cp b, Py_ssize_t i, Py_ssize_t j):
    """The transport token upper-cased, the usual ones shared."""
    cdef Py_ssize_t k
    if j - i == 3 and b[i] == 85 and b[i + 1] == 68 and b[i + 2] == 80:
        return _TRANSPORTS[0]   # "UDP", as sent by nearly everyone
    for k in range(len(_TRANSPORTS)):
        if _ieq(b, i, j, <bytes>_TRANSPORTS_LOWER[k]):
            return _TRANSPORTS[k]
    return _case_s(b, i, j, True)


cdef object _cseq(cp b, Py_ssize_t i, Py_ssize_t j, _Source f):
    # CSeq = "CSeq" HCOLON 1*DIGIT LWS Method
    cdef Py_ssize_t k = i, ms
    while k < j and b[k] != 32 and b[k] != 9:
        k += 1
    ms = _lskip(b, k, j)
    if k >= j or not _all(b, ms, j, C_TOKEN):
        raise _ParseError(f"malformed CSeq {_s(b, i, j)!r}")
    number = _number(b, i, k, CSEQ_MAX, False, "CSeq number")
    if f.method is not None and j - ms == f.rm_len and _eq_bytes(b + ms, f.rm, f.rm_len):
        method = f.method       # the usual CSeq: the request's own method
    else:
        method = _METHODS.find(b, ms, j)
        if method is None:
            method = _s(b, ms, j)
    f.cseq_method = method
    obj = msilo_alloc(_CSeq)
    msilo_put(obj, CS_NUMBER, number)
    msilo_put(obj, CS_METHOD, method)
    return obj


cdef int _scan_content_type(cp b, Py_ssize_t i, Py_ssize_t j, Py_ssize_t* spans) except -1:
    # media-type = m-type SLASH m-subtype *(SEMI m-parameter)
    # spans: type start/end, subtype start/end, parameters start (-1 when none)
    cdef Py_ssize_t semi, he, slash, k = i, t
    # the usual "type/subtype[;...]" without spaces in one scan
    while k < j and CT[b[k]] & C_TOKEN:
        k += 1
    if k > i and k < j and b[k] == 47:
        t = k + 1
        k = t
        while k < j and CT[b[k]] & C_TOKEN:
            k += 1
        if k > t and (k == j or b[k] == 59):
            spans[0] = i
            spans[1] = t - 1
            spans[2] = t
            spans[3] = k
            spans[4] = k + 1 if k < j else -1
            return 0
    semi = _find(b, i, j, 59)
    he = semi if semi >= 0 else j
    slash = _find(b, i, he, 47)
    if slash < 0:
        raise _ParseError(f"malformed Content-Type {_s(b, i, j)!r}")
    spans[0] = _lskip(b, i, slash)
    spans[1] = _rskip(b, spans[0], slash)
    spans[2] = _lskip(b, slash + 1, he)
    spans[3] = _rskip(b, spans[2], he)
    if not _all(b, spans[0], spans[1], C_TOKEN) or not _all(b, spans[2], spans[3], C_TOKEN):
        raise _ParseError(f"malformed Content-Type {_s(b, i, j)!r}")
    spans[4] = semi + 1 if semi >= 0 else -1
    return 0


cdef int _check_content_type(cp b, Py_ssize_t i, Py_ssize_t j, Py_ssize_t limit) except -1:
    cdef Py_ssize_t spans[5]
    cdef ParamCap unused
    _scan_content_type(b, i, j, spans)
    if spans[4] >= 0 and _params_fast(b, spans[4], j, limit, False, &unused) < 0:
        _params(b, spans[4], j, False)
    return 0


cdef object _content_type(cp b, Py_ssize_t i, Py_ssize_t j):
    cdef Py_ssize_t spans[5]
    cdef dict params
    _scan_content_type(b, i, j, spans)
    obj = msilo_alloc(_ContentType)
    mtype = _MEDIA.find(b, spans[0], spans[1])
    msilo_put(obj, MT_TYPE, mtype if mtype is not None else _case_s(b, spans[0], spans[1], False))
    mtype = _MEDIA.find(b, spans[2], spans[3])
    if mtype is None:
        mtype = _case_s(b, spans[2], spans[3], False)
    msilo_put(obj, MT_SUBTYPE, mtype)
    if spans[4] >= 0:
        params = _params(b, spans[4], j)
        # m-value = token / quoted-string: keep what the sender means
        for k, v in params.items():
            if v is None:
                params[k] = S_EMPTY
            elif (<str>v).startswith('"'):
                params[k] = _unquote_str(v)
    else:
        params = {}
    msilo_put(obj, MT_PARAMS, params)
    msilo_put(obj, MT_RAW, _s(b, i, j))
    return obj


# --- header names ------------------------------------------------------------------------

cdef enum:
    H_OTHER = 0
    H_VIA
    H_FROM
    H_TO
    H_CALL_ID
    H_CSEQ
    H_MAX_FORWARDS
    H_EXPIRES
    H_CONTENT_LENGTH
    H_CONTENT_TYPE
    H_CONTACT
    H_ALLOW
    H_DATE

# Canonical names we know, the typed ones with their id; the others are only interned.
cdef tuple _KNOWN = (
    ("via", H_VIA), ("from", H_FROM), ("to", H_TO), ("call-id", H_CALL_ID),
    ("cseq", H_CSEQ), ("max-forwards", H_MAX_FORWARDS), ("expires", H_EXPIRES),
    ("content-length", H_CONTENT_LENGTH), ("content-type", H_CONTENT_TYPE),
    ("contact", H_CONTACT), ("allow", H_ALLOW), ("date", H_DATE),
    ("route", H_OTHER), ("record-route", H_OTHER), ("user-agent", H_OTHER),
    ("server", H_OTHER), ("supported", H_OTHER), ("require", H_OTHER),
    ("proxy-require", H_OTHER), ("unsupported", H_OTHER), ("accept", H_OTHER),
    ("accept-encoding", H_OTHER), ("accept-language", H_OTHER), ("subject", H_OTHER),
    ("authorization", H_OTHER), ("proxy-authorization", H_OTHER),
    ("www-authenticate", H_OTHER), ("proxy-authenticate", H_OTHER),
    ("content-encoding", H_OTHER), ("content-disposition", H_OTHER),
    ("content-language", H_OTHER), ("mime-version", H_OTHER), ("min-expires", H_OTHER),
    ("organization", H_OTHER), ("priority", H_OTHER), ("timestamp", H_OTHER),
    ("warning", H_OTHER), ("retry-after", H_OTHER), ("event", H_OTHER),
    ("allow-events", H_OTHER), ("p-asserted-identity", H_OTHER), ("path", H_OTHER),
    ("privacy", H_OTHER), ("reply-to", H_OTHER), ("in-reply-to", H_OTHER),
)

DEF MAX_KNOWN = 96
DEF NAME_WORDS = 3              # known names are at most 24 bytes
cdef int _n_known = 0
cdef int _known_id[MAX_KNOWN]
cdef Py_ssize_t _known_len[MAX_KNOWN]
cdef const char* _known_chars[MAX_KNOWN]
# A known name as words: its bytes, 0x20 where it has a letter (so "| fold" matches
# either case of that letter and nothing else), and 0xff over its length.  A match
# is exact, so a known name needs no token check: it is one.
cdef uint64_t _known_word[MAX_KNOWN][NAME_WORDS]
cdef uint64_t _known_fold[MAX_KNOWN][NAME_WORDS]
cdef uint64_t _known_mask[MAX_KNOWN][NAME_WORDS]
cdef list _known_strs = []
cdef list _known_bytes = []     # keeps _known_chars alive
cdef int _compact_idx[256]
# Known names chained by bucket (length and last letter): a lookup compares one or two
# candidates instead of scanning the whole table (that scan was ~10% of a parse).
DEF NAME_BUCKETS = 1024
cdef int _bucket_head[NAME_BUCKETS]
cdef int _bucket_next[MAX_KNOWN]


cdef inline int _bucket(Py_ssize_t n, unsigned char last) noexcept nogil:
    return <int>(((n & 31) << 5) | (last & 31))


cdef int _known_index(str name, int hid) except -1:
    global _n_known
    cdef int idx, k
    cdef unsigned char word[8 * NAME_WORDS]
    cdef unsigned char fold[8 * NAME_WORDS]
    cdef unsigned char mask[8 * NAME_WORDS]
    for idx in range(_n_known):
        if _known_strs[idx] == name:
            return idx
    encoded = name.encode("ascii")
    if _n_known >= MAX_KNOWN or len(encoded) > 8 * NAME_WORDS:
        return -1
    idx = _n_known
    _known_bytes.append(encoded)
    _known_strs.append(name)
    _known_chars[idx] = PyBytes_AS_STRING(encoded)
    _known_len[idx] = len(encoded)
    _known_id[idx] = hid
    for k in range(8 * NAME_WORDS):
        word[k] = encoded[k] if k < len(encoded) else 0
        fold[k] = 0x20 if 97 <= word[k] <= 122 else 0
        mask[k] = 0xff if k < len(encoded) else 0
    memcpy(_known_word[idx], word, sizeof(word))
    memcpy(_known_fold[idx], fold, sizeof(fold))
    memcpy(_known_mask[idx], mask, sizeof(mask))
    # appended: the names listed first (the common ones) are compared first
    h = _bucket(len(encoded), (<bytes>encoded)[len(encoded) - 1] | 0x20)
    _bucket_next[idx] = -1
    if _bucket_head[h] < 0:
        _bucket_head[h] = idx
    else:
        k = _bucket_head[h]
        while _bucket_next[k] >= 0:
            k = _bucket_next[k]
        _bucket_next[k] = idx
    _n_known += 1
    return idx


cdef void _init_names() except *:
    cdef int c
    for c in range(NAME_BUCKETS):
        _bucket_head[c] = -1
    for name, hid in _KNOWN:
        _known_index(name, hid)
    for c in range(256):
        _compact_idx[c] = -1
    for short, full in _COMPACT.items():
        hid = H_OTHER
        for name, known_hid in _KNOWN:
            if name == full:
                hid = known_hid
        idx = _known_index(full, hid)
        if idx >= 0 and len(short) == 1:
            c = ord(short)
            if c < 128:
                _compact_idx[c] = idx
                if 97 <= c <= 122:
                    _compact_idx[c - 32] = idx


_init_names()


cdef inline bint _is_known(cp b, Py_ssize_t i, Py_ssize_t n, Py_ssize_t limit,
                           int idx) noexcept nogil:
    """b[i:i+n] is the known name ``idx`` (any case); b[i:limit] may be read."""
    cdef uint64_t w, diff = 0
    cdef Py_ssize_t k
    cdef unsigned char c, t
    if i + 8 * NAME_WORDS <= limit:
        # unrolled: the masks are zero past the name, so a whole word costs nothing extra
        memcpy(&w, b + i, 8)
        diff = ((w | _known_fold[idx][0]) ^ _known_word[idx][0]) & _known_mask[idx][0]
        if n > 8:
            memcpy(&w, b + i + 8, 8)
            diff |= ((w | _known_fold[idx][1]) ^ _known_word[idx][1]) & _known_mask[idx][1]
            if n > 16:
                memcpy(&w, b + i + 16, 8)
                diff |= ((w | _known_fold[idx][2]) ^ _known_word[idx][2]) & _known_mask[idx][2]
        return diff == 0
    for k in range(n):
        t = <unsigned char>_known_chars[idx][k]
        c = b[i + k]
        if 97 <= t <= 122:
            c |= 0x20
        if c != t:
            return False
    return True


cdef inline int _lookup_name(cp b, Py_ssize_t i, Py_ssize_t j, Py_ssize_t limit) noexcept nogil:
    """Index of the known canonical name b[i:j] (case-insensitive, compact forms), or -1.

    b[i:j] need not be a token: a match proves it is one.
    """
    cdef Py_ssize_t n = j - i
    cdef int idx
    if n == 1:
        return _compact_idx[b[i]]
    if n > 8 * NAME_WORDS:
        return -1
    idx = _bucket_head[_bucket(n, b[j - 1] | 0x20)]
    while idx >= 0:
        if _known_len[idx] == n and _is_known(b, i, n, limit, idx):
            return idx
        idx = _bucket_next[idx]
    return -1


# --- the message -----------------------------------------------------------------------


cdef int _check_version(cp b, Py_ssize_t i, Py_ssize_t j) except -1:
    # SIP-Version = "SIP" "/" 1*DIGIT "." 1*DIGIT  (case-insensitive, §7.1)
    if _ieq(b, i, j, b"sip/2.0"):
        return 0
    if j - i >= 4 and _ieq(b, i, i + 4, b"sip/"):
        raise _ParseError(f"unsupported version {_s(b, i, j)!r}", status=505,
                          reason="Version Not Supported")
    raise _ParseError(f"bad SIP version {_s(b, i, j)!r}")


cdef inline Py_ssize_t _rq_next(cp b, Py_ssize_t k, Py_ssize_t j, Py_ssize_t limit) noexcept nogil:
    """The first byte of b[k:j] that is not a plain URI byte (RQ), or ``j``."""
    cdef int m
    if MSILO_HAVE_SSE2:
        while k < j and k + 16 <= limit:
            m = msilo_rq_mask16(b + k)
            if m:
                k += msilo_ctz(m)
                return k if k < j else j
            k += 16
        if k >= j:
            return j
    while k < j and not RQ[b[k]]:
        k += 1
    return k


cdef object _request_line(cp b, Py_ssize_t i, Py_ssize_t j, Py_ssize_t limit, _Source f):
    # Request-Line = Method SP Request-URI SP SIP-Version CRLF
    cdef Py_ssize_t sp1, sp2, colon = -1, at = -1, lastq = -1, start, k
    cdef unsigned char c
    # the usual line in one pass: a token, SP, a URI of valid bytes (noting its first
    # ":", the first "@" after it and the last "?"), SP, exactly "SIP/2.0"; anything
    # else takes the general checks below, one at a time
    k = i
    while k < j and CT[b[k]] & C_TOKEN:
        k += 1
    sp1 = k
    sp2 = -1
    if sp1 > i and k < j and b[k] == 32:
        k += 1
        while True:
            k = _rq_next(b, k, j, limit)
            if k >= j:
                break
            c = b[k]
            if RQ[c] == RQ_BAD:
                break
            if c == 58:
                if colon < 0:
                    colon = k
            elif c == 64:
                if at < 0 and colon >= 0:
                    at = k
            else:
                lastq = k
            k += 1
        if k > sp1 + 1 and k < j and b[k] == 32 and j - k == 8 \
                and memcmp(b + k + 1, b"SIP/2.0", 7) == 0:
            sp2 = k
    if sp2 < 0:
        sp1 = _find(b, i, j, 32)
        sp2 = _find(b, sp1 + 1, j, 32) if sp1 >= 0 else -1
        if sp2 < 0 or _find(b, sp2 + 1, j, 32) >= 0 or sp1 == i or sp2 == sp1 + 1 \
                or sp2 + 1 == j:
            raise _ParseError(f"malformed request line {_s(b, i, j)!r}")
        if not _all(b, i, sp1, C_TOKEN):
            raise _ParseError(f"bad method {_s(b, i, sp1)!r}")
        _check_version(b, sp2 + 1, j)
        _check_uri_chars(b, sp1 + 1, sp2)
        colon = _find(b, sp1 + 1, sp2, 58)
        at = _find(b, colon + 1, sp2, 64) if colon >= 0 else -1
        lastq = -1
        k = sp2 - 1
        while k > sp1:
            if b[k] == 63:
                lastq = k
                break
            k -= 1
    if colon < 0 or not (CT[b[sp1 + 1]] & C_ALPHA) or not _all(b, sp1 + 1, colon, C_SCHEME):
        raise _ParseError(f"bad Request-URI {_s(b, sp1 + 1, sp2)!r}")
    if colon - sp1 == 4 and _ieq_letters(b, sp1 + 1, b"sip", 3) \
            or colon - sp1 == 5 and _ieq_letters(b, sp1 + 1, b"sips", 4):
        # §19.1.1: no headers in a Request-URI; the user part may hold "?"
        start = at + 1 if at >= 0 else colon + 1
        if lastq >= start:
            raise _ParseError(f"headers in Request-URI {_s(b, sp1 + 1, sp2)!r}")
    elif not _ieq(b, sp1 + 1, colon, b"tel"):
        raise UnsupportedURIScheme(
            f"unsupported Request-URI scheme {_case_s(b, sp1 + 1, colon, False)!r}")
    msg = msilo_alloc(_SipRequest)
    method = _METHODS.find(b, i, sp1)
    if method is None:
        method = _s(b, i, sp1)
    f.method = method
    f.request_uri = _s_shared(b, sp1 + 1, sp2)
    f.ru = b + sp1 + 1
    f.ru_len = sp2 - sp1 - 1
    f.rm = b + i
    f.rm_len = sp1 - i
    msilo_put(msg, RQ_METHOD, method)
    msilo_put(msg, RQ_URI, f.request_uri)
    msilo_put(msg, RQ_VERSION, S_SIP20 if b[sp2 + 1] == 83 and b[sp2 + 2] == 73 and b[sp2 + 3] == 80
              else _s(b, sp2 + 1, j))
    return msg


cdef object _status_line(cp b, Py_ssize_t i, Py_ssize_t j):
    # Status-Line = SIP-Version SP Status-Code SP Reason-Phrase CRLF
    cdef Py_ssize_t sp1, ve, cs, ce, sp2
    sp1 = _find(b, i, j, 32)
    ve = sp1 if sp1 >= 0 else j
    _check_version(b, i, ve)
    cs = sp1 + 1 if sp1 >= 0 else j
    sp2 = _find(b, cs, j, 32)
    ce = sp2 if sp2 >= 0 else j
    # Status-Code = 3DIGIT, 1xx to 6xx
    if ce - cs != 3 or not _all(b, cs, ce, C_DIGIT) or b[cs] < 49 or b[cs] > 54:
        raise _ParseError(f"bad status code {_s(b, cs, ce)!r}")
    msg = msilo_alloc(_SipResponse)
    msilo_put(msg, RS_VERSION, S_SIP20 if b[i] == 83 and b[i + 1] == 73 and b[i + 2] == 80
              else _s(b, i, ve))
    msilo_put(msg, RS_STATUS, (b[cs] - 48) * 100 + (b[cs + 1] - 48) * 10 + (b[cs + 2] - 48))
    msilo_put(msg, RS_REASON, _s(b, sp2 + 1, j) if sp2 >= 0 else S_EMPTY)
    return msg


# The typed fields gathered while the headers are read live in the _Source (one object
# per parse instead of two).  Via, From and To point back at the _Source (their lazy
# fields), so that link is made only at the end of a successful parse, after the
# _Source has dropped them: no reference cycle, even when the parse fails half-way.
# The other fields (strs, ints, the CSeq) point nowhere and are left to the _Source.


# --- deferred fields ---------------------------------------------------------------------
#
# STYLE habit 3: parse what the hot path needs, lazily the rest.  Measured on the
# 457-byte MESSAGE of bench/bench_parse.py, allocating and freeing ~40 objects per
# message was most of the parse; the (name, value) list alone is 21 of them, and
# Content-Type 4 more.  So the parse records where each header is (a HeaderSpan, no
# object) and the message's ``headers``, ``content_type``, ``contacts`` and ``allow``
# are built from the spans on first read (message.py's properties call the _Source
# methods below).  Every header those fields come from is still checked during the
# parse, with the code that builds it, so a bad one is the same ParseError, raised
# by parse_message, as in the twin.  Via, From, To, Call-ID, CSeq, Max-Forwards,
# Expires and Content-Length are built eagerly: every request reads them.  Within
# Via, From and To, the parameter dicts, Via ``raw`` and the display names are deferred
# the same way (three dicts and two strings per MESSAGE, ~10% of the C parse); the
# parameters are still checked during the parse, by _params_cap, which also captures
# what the hot path reads (branch, received, rport, tag) as it scans.
#
# Why not cdef classes for the values (style-anchors "Open questions")?  Measured:
# allocating + filling + freeing a 9-field value costs the same either way (~37 ns,
# a freelist saves ~1 ns), but reading attributes from Python is 2.6x slower on a
# cdef class (getset descriptors; 3.11 specializes __slots__ reads, not those), and
# consumers read far more than the parser writes.  message.py's classes stay.

cdef struct HeaderSpan:
    Py_ssize_t ns, ne      # the name as received (only used when idx < 0)
    Py_ssize_t vs, ve      # the value, unfolded and stripped
    int idx                # index of the canonical name in _known_strs, or -1
    int fold               # value in _Source.folded[fold]; -1: in the message itself

DEF INLINE_SPANS = 16


@cython.freelist(8)
@cython.final
cdef class _Source:
    """The received bytes and where each header is: what deferred fields are built from."""
    cdef bytes buf
    cdef list folded               # bytes of the folded values (rare), or None
    cdef HeaderSpan* spans         # inline_spans, or a heap block past INLINE_SPANS
    cdef int count, cap
    cdef int ctype                 # the span of Content-Type, or -1
    cdef bint any_contact, any_allow
    cdef object via, from_, to, call_id, cseq, max_forwards, expires
    cdef object content_length
    cdef bint star
    cdef object method, cseq_method, request_uri
    cdef cp ru                      # the Request-URI bytes, to share its str with To
    cdef Py_ssize_t ru_len
    cdef cp rm                      # the method bytes, to share its str with CSeq
    cdef Py_ssize_t rm_len
    # Via, From and To (0, 1, 2), built on first read of their deferred fields: where
    # their parameters are and in which buffer
    cdef Py_ssize_t lz_s[3]
    cdef Py_ssize_t lz_e[3]
    cdef int lz_fold[3]
    cdef Py_ssize_t lz_ds[3]        # Via: the raw value; From, To: the display name
    cdef Py_ssize_t lz_de[3]
    cdef bint lz_q[3]               # the display name is quoted
    cdef bint lz_set[3]
    cdef HeaderSpan inline_spans[INLINE_SPANS]

    def __cinit__(self):
        self.spans = self.inline_spans
        self.cap = INLINE_SPANS
        self.ctype = -1

    def __dealloc__(self):
        if self.spans != self.inline_spans:
            PyMem_Free(self.spans)

    cdef int grow(self) except -1:
        """Double the room for spans (past INLINE_SPANS headers: rare)."""
        cdef HeaderSpan* grown
        if self.spans == self.inline_spans:
            grown = <HeaderSpan*>PyMem_Malloc(2 * self.cap * sizeof(HeaderSpan))
            if grown != NULL:
                memcpy(grown, self.spans, self.cap * sizeof(HeaderSpan))
        else:
            grown = <HeaderSpan*>PyMem_Realloc(self.spans, 2 * self.cap * sizeof(HeaderSpan))
        if grown == NULL:
            raise MemoryError()
        self.spans = grown
        self.cap *= 2
        return 0

    cdef inline void lazy(self, int which, Py_ssize_t ps, Py_ssize_t pe) noexcept:
        """Record where the parameters of Via, From or To (the current header) are."""
        self.lz_set[which] = True
        self.lz_s[which] = ps
        self.lz_e[which] = pe
        self.lz_fold[which] = self.spans[self.count - 1].fold

    cdef int which(self, mark) except -1:
        """0, 1, 2 for the marker the Via, From or To left in its deferred field."""
        cdef int k
        for k in range(3):
            if mark is _LAZY_MARKS[k] and self.lz_set[k]:
                return k
        raise ValueError("not a deferred field of this parse")

    cdef inline cp lz_base(self, int k):
        if self.lz_fold[k] < 0:
            return <cp>PyBytes_AS_STRING(self.buf)
        return <cp>PyBytes_AS_STRING(self.folded[self.lz_fold[k]])

    def params_of(self, mark):
        """The ``params`` dict of the Via, From or To this parse built (checked then)."""
        cdef int k = self.which(mark)
        if self.lz_s[k] < 0:
            return {}
        return _params(self.lz_base(k), self.lz_s[k], self.lz_e[k])

    def raw_of(self, mark):
        """The ``raw`` text of the Via this parse built."""
        cdef int k = self.which(mark)
        return _s(self.lz_base(k), self.lz_ds[k], self.lz_de[k])

    def display_of(self, mark):
        """The display name of the From or To this parse built."""
        cdef int k = self.which(mark)
        cdef NameAddrSpan na
        na.ds = self.lz_ds[k]
        na.de = self.lz_de[k]
        na.quoted = self.lz_q[k]
        return _display(self.lz_base(k), &na)

    cdef inline cp base(self, HeaderSpan* h):
        if h.fold < 0:
            return <cp>PyBytes_AS_STRING(self.buf)
        return <cp>PyBytes_AS_STRING(self.folded[h.fold])

    def headers(self):
        cdef list out = []
        cdef HeaderSpan* h
        cdef cp b = <cp>PyBytes_AS_STRING(self.buf)
        cdef int k
        for k in range(self.count):
            h = &self.spans[k]
            if h.idx >= 0:
                name = _known_strs[h.idx]
            else:
                name = _s(b, h.ns, h.ne).lower()
                if h.ne - h.ns == 1:
                    name = _COMPACT.get(name, name)
            out.append((name, _s(self.base(h), h.vs, h.ve)))
        return out

    def response_headers(self):
        """(name, value) of every Via, From, To, Call-ID and CSeq, in order: what a
        response copies (RFC 3261 §8.2.6.2), without building the other headers."""
        cdef list out = []
        cdef HeaderSpan* h
        cdef int k, hid
        for k in range(self.count):
            h = &self.spans[k]
            if h.idx < 0:
                continue  # not a known name, so none of these five
            hid = _known_id[h.idx]
            if (hid == H_VIA or hid == H_FROM or hid == H_TO or hid == H_CALL_ID
                    or hid == H_CSEQ):
                out.append((_known_strs[h.idx], _s(self.base(h), h.vs, h.ve)))
        return out

    def content_type(self):
        cdef HeaderSpan* h
        if self.ctype < 0:
            return None
        h = &self.spans[self.ctype]
        return _content_type(self.base(h), h.vs, h.ve)

    def contacts(self):
        cdef list out = []
        cdef HeaderSpan* h
        cdef cp b
        cdef int k
        if self.any_contact:
            for k in range(self.count):
                h = &self.spans[k]
                if h.idx >= 0 and _known_id[h.idx] == H_CONTACT:
                    b = self.base(h)
                    if not (h.ve - h.vs == 1 and b[h.vs] == 42):
                        _contact_list(b, h.vs, h.ve, out)
        return out

    def allow(self):
        cdef list out
        cdef HeaderSpan* h
        cdef int k
        if not self.any_allow:
            return None
        out = []
        for k in range(self.count):
            h = &self.spans[k]
            if h.idx >= 0 and _known_id[h.idx] == H_ALLOW:
                out.extend(_method_list_str(_s(self.base(h), h.vs, h.ve)))
        return tuple(out)


cdef int _typed(_Source f, _Source src, int hid, cp b, Py_ssize_t i, Py_ssize_t j,
                Py_ssize_t limit) except -1:
    """Parse (or, for a deferred field, check) one typed header value b[i:j]."""
    if hid == H_VIA:
        if f.via is None:
            f.via = _via(b, i, j, limit, src)
    elif hid == H_FROM:
        if f.from_ is not None:
            raise _ParseError("more than one From header")
        f.from_ = _from_to(b, i, j, limit, f, src, 1)
    elif hid == H_TO:
        if f.to is not None:
            raise _ParseError("more than one To header")
        f.to = _from_to(b, i, j, limit, f, src, 2)
    elif hid == H_CALL_ID:
        if f.call_id is not None:
            raise _ParseError("more than one Call-ID header")
        if i >= j or msilo_find(b, i, j, limit, 32) >= 0 or msilo_find(b, i, j, limit, 9) >= 0:
            raise _ParseError(f"bad Call-ID {_s(b, i, j)!r}")
        f.call_id = _s(b, i, j)
    elif hid == H_CSEQ:
        if f.cseq is not None:
            raise _ParseError("more than one CSeq header")
        f.cseq = _cseq(b, i, j, f)
    elif hid == H_MAX_FORWARDS:
        if f.max_forwards is not None:
            raise _ParseError("more than one Max-Forwards header")
        f.max_forwards = _number(b, i, j, MAX_FORWARDS_MAX, False, "Max-Forwards")
    elif hid == H_EXPIRES:
        if f.expires is not None:
            raise _ParseError("more than one Expires header")
        f.expires = _number(b, i, j, EXPIRES_MAX, True, "Expires")
    elif hid == H_CONTENT_LENGTH:
        if f.content_length is not None:
            raise _ParseError("more than one Content-Length header")
        f.content_length = _number(b, i, j, CSEQ_MAX, False, "Content-Length")
    elif hid == H_CONTENT_TYPE:
        if src.ctype >= 0:
            raise _ParseError("more than one Content-Type header")
        _check_content_type(b, i, j, limit)
        src.ctype = src.count - 1
    elif hid == H_CONTACT:
        # Contact = ("*" / (contact-param *(COMMA contact-param)))
        if j - i == 1 and b[i] == 42:
            if f.star or src.any_contact:
                raise _ParseError("Contact: * mixed with other contacts")
            f.star = True
            return 0
        if f.star:
            raise _ParseError("Contact: * mixed with other contacts")
        _contact_list(b, i, j, None)
        src.any_contact = True
    elif hid == H_ALLOW:
        src.any_allow = True
    elif hid == H_DATE:
        # §20.17: rfc1123-date is always "GMT"
        if j - i < 4 or b[j - 4] != 32 or b[j - 3] != 71 or b[j - 2] != 77 or b[j - 1] != 84:
            raise _ParseError(f"Date not in GMT: {_s(b, i, j)!r}")
    return 0


cdef inline int _finish(_Source src, int idx, Py_ssize_t ns, Py_ssize_t ne, cp b,
                        Py_ssize_t vs, Py_ssize_t ve, Py_ssize_t limit) except -1:
    """Record one complete header line (value b[vs:ve]) and type it."""
    cdef HeaderSpan* h
    if src.count == src.cap:
        src.grow()
    h = &src.spans[src.count]
    src.count += 1
    h.idx = idx
    h.ns = ns
    h.ne = ne
    h.fold = -1
    while vs < ve and (b[vs] == 32 or b[vs] == 9):
        vs += 1
    while ve > vs and (b[ve - 1] == 32 or b[ve - 1] == 9):
        ve -= 1
    h.vs = vs
    h.ve = ve
    if idx >= 0 and _known_id[idx] != H_OTHER:
        _typed(src, src, _known_id[idx], b, vs, ve, limit)
    return 0


cdef int _finish_folded(_Source src, int idx, Py_ssize_t ns, Py_ssize_t ne,
                        object folded) except -1:
    """Record one folded header line (its unfolded value in ``folded``) and type it."""
    cdef bytes value = bytes(folded)
    cdef HeaderSpan* h
    cdef cp vb = <cp>PyBytes_AS_STRING(value)
    if src.folded is None:
        src.folded = []
    if src.count == src.cap:
        src.grow()
    h = &src.spans[src.count]
    src.count += 1
    h.idx = idx
    h.ns = ns
    h.ne = ne
    h.fold = len(src.folded)
    src.folded.append(value)
    h.vs = _lskip(vb, 0, PyBytes_GET_SIZE(value))
    h.ve = _rskip(vb, h.vs, PyBytes_GET_SIZE(value))
    if idx >= 0 and _known_id[idx] != H_OTHER:
        _typed(src, src, _known_id[idx], vb, h.vs, h.ve, PyBytes_GET_SIZE(value))
    return 0


DEF MAX_LINES = 48


def parse_message(object data, *, Py_ssize_t max_size=MAX_MESSAGE_SIZE):
    """Parse one SIP request or response (RFC 3261 §7); see ``msilo.sip._parse_py``."""
    cdef bytes buf
    cdef cp b
    cdef Py_ssize_t n, start, k, nl, head_end, body_start, ls, le, colon, fe, vs = 0, ve = 0
    cdef Py_ssize_t fs, fe2, ns = 0, ne = 0
    cdef Py_ssize_t lines[MAX_LINES]
    cdef int nlines = 0, li
    cdef int idx = -1
    cdef bint is_request, named = False
    cdef _Source f
    cdef _Source src
    cdef object folded = None
    if PyBytes_Check(data):
        buf = <bytes>data
    elif isinstance(data, (bytearray, memoryview)):
        try:
            buf = bytes(data)
        except (TypeError, ValueError, BufferError) as exc:
            raise _ParseError(f"unreadable buffer: {exc}") from None
    else:
        raise _ParseError(f"expected bytes, got {type(data).__name__}")
    b = <cp>PyBytes_AS_STRING(buf)
    n = PyBytes_GET_SIZE(buf)
    if n > max_size:
        raise MessageTooLarge(f"message of {n} bytes exceeds {max_size}")
    # §7.5: ignore CRLFs before the start line
    start = 0
    while start < n and (b[start] == 10 or b[start] == 13):
        start += 1
    if start == n:
        raise _ParseError("empty message")
    # the first empty line ends the head; the line ends found on the way are kept
    # for the header loop below (the first MAX_LINES of them) instead of searched again
    if msilo_scan_head(b, start, n, lines, MAX_LINES, &nlines, &head_end, &body_start) < 0:
        raise _ParseError("no empty line after the headers")
    # start line (lines[0] is its end, or head_end when there is no header)
    le = lines[0]
    li = 1
    ls = le + 1
    if le > start and b[le - 1] == 13:
        le -= 1
    src = _Source.__new__(_Source)
    f = src
    src.buf = buf
    if le - start >= 4 and _ieq_letters(b, start, b"sip", 3) and b[start + 3] == 47:
        msg = _status_line(b, start, le)
        is_request = False
    else:
        msg = _request_line(b, start, le, n, f)
        is_request = True
    # header lines; a folded value is rebuilt in a bytearray (rare)
    while ls <= head_end:
        if li < nlines:
            nl = lines[li]
            li += 1
        else:
            nl = msilo_find(b, ls, head_end, n, 10)
            if nl < 0:
                nl = head_end
        le = nl
        if le > ls and b[le - 1] == 13:
            le -= 1
        if le > ls and (b[ls] == 32 or b[ls] == 9):
            # LWS = [*WSP CRLF] 1*WSP: a continuation joins the value with one SP
            if not named:
                raise _ParseError("continuation line before the first header")
            if folded is None:
                folded = bytearray(b[vs:_rskip(b, vs, ve)])
            else:
                fs = len(folded)
                while fs > 0 and (folded[fs - 1] == 32 or folded[fs - 1] == 9):
                    fs -= 1
                del folded[fs:]
            fs = _lskip(b, ls, le)
            fe2 = _rskip(b, fs, le)
            folded.append(32)
            folded += b[fs:fe2]
        else:
            if named:
                if folded is None:
                    _finish(src, idx, ns, ne, b, vs, ve, n)
                else:
                    _finish_folded(src, idx, ns, ne, folded)
                    folded = None
            # field-name = token, then HCOLON: the name is what precedes the first
            # colon; a known name is a token, so only another one is checked
            colon = msilo_find(b, ls, le, n, 58)
            if colon < 0:
                raise _ParseError(
                    f"header line without a colon: {_s(b, ls, min(le, ls + 40))!r}")
            fe = colon
            while fe > ls and (b[fe - 1] == 32 or b[fe - 1] == 9):
                fe -= 1
            idx = _lookup_name(b, ls, fe, n)
            if idx < 0 and not _all(b, ls, fe, C_TOKEN):
                raise _ParseError(f"bad header name {_s(b, ls, min(fe, ls + 40))!r}")
            named = True
            ns = ls
            ne = fe
            vs = colon + 1
            ve = le
        if nl >= head_end:
            break
        ls = nl + 1
    if named:
        if folded is None:
            _finish(src, idx, ns, ne, b, vs, ve, n)
        else:
            _finish_folded(src, idx, ns, ne, folded)
    # §8.2.2 / §16.3: To, From, Call-ID, CSeq and Via are mandatory
    if f.to is None or f.from_ is None or f.call_id is None or f.cseq is None or f.via is None:
        _raise_missing(f.to, f.from_, f.call_id, f.cseq, f.via)
    if is_request and f.cseq_method is not f.method and f.cseq_method != f.method:
        raise _ParseError(f"CSeq method {f.cseq_method!r} does not match {f.method!r}")
    # §18.3: Content-Length frames the body; absent on a datagram means "the rest"
    k = n - body_start
    if f.content_length is None:
        body = PyBytes_FromStringAndSize(<const char*>(b + body_start), k)
    elif <Py_ssize_t>f.content_length > k:
        raise _ParseError(
            f"Content-Length {f.content_length} exceeds the {k} bytes received")
    else:
        body = PyBytes_FromStringAndSize(<const char*>(b + body_start), f.content_length)
    msilo_put(msg, M_HEADERS, _PENDING)
    msilo_put(msg, M_BODY, body)
    msilo_put(msg, M_VIA, f.via)
    msilo_put(msg, M_FROM, f.from_)
    msilo_put(msg, M_TO, f.to)
    msilo_put(msg, M_CALL_ID, f.call_id)
    msilo_put(msg, M_CSEQ, f.cseq)
    msilo_put(msg, M_MAX_FORWARDS, f.max_forwards)
    msilo_put(msg, M_EXPIRES, f.expires)
    msilo_put(msg, M_CONTENT_TYPE, _PENDING if src.ctype >= 0 else None)
    msilo_put(msg, M_CONTENT_LENGTH, f.content_length)
    msilo_put(msg, M_CONTACTS, _PENDING)
    msilo_put(msg, M_CONTACT_STAR, f.star)
    msilo_put(msg, M_ALLOW, _PENDING if src.any_allow else None)
    msilo_put(msg, M_SOURCE, src)
    msilo_put(f.via, V_SOURCE, src)
    msilo_put(f.from_, NA_SOURCE, src)
    msilo_put(f.to, NA_SOURCE, src)
    f.via = f.from_ = f.to = None
    return msg


# --- URIs ---------------------------------------------------------------------------------

cdef struct UriSpan:
    int kind               # 0 sip, 1 sips, 2 tel
    Py_ssize_t us, ue      # user; us = -1 when absent
    Py_ssize_t ws, we      # password; ws = -1 when absent
    Py_ssize_t hs, he      # host
    long port              # -1 when absent
    Py_ssize_t ps, pe      # parameters; ps = -1 when absent
    Py_ssize_t qs, qe      # headers; qs = -1 when absent


cdef int _check_uri_params(cp b, Py_ssize_t i, Py_ssize_t j) except -1:
    # other-param = pname [ "=" pvalue ]: a non-empty item may not start with "="
    cdef Py_ssize_t s = i, e
    while True:
        e = _find(b, s, j, 59)
        if e < 0:
            e = j
        if e > s and b[s] == 61:
            raise _InvalidURI(f"URI parameter without a name: {_s(b, s, e)!r}")
        if e >= j:
            return 0
        s = e + 1


cdef int _scan_uri(cp b, Py_ssize_t n, UriSpan* u) except -1:
    # SIP-URI = "sip:" [ userinfo ] hostport uri-parameters [ headers ]   (§19.1.1)
    cdef Py_ssize_t colon, rs, semi, at, pc, k, q, hpe, close, after
    u.us = u.ws = u.ps = u.qs = -1
    u.port = -1
    if n == 0 or _any(b, 0, n, C_URIBAD):
        raise _InvalidURI(f"invalid character in URI {_s(b, 0, n)!r}" if n else "empty URI")
    colon = _find(b, 0, n, 58)
    if colon < 0 or not (CT[b[0]] & C_ALPHA) or not _all(b, 0, colon, C_SCHEME):
        raise _InvalidURI(f"no scheme in URI {_s(b, 0, n)!r}")
    if _ieq(b, 0, colon, b"sip"):
        u.kind = 0
    elif _ieq(b, 0, colon, b"sips"):
        u.kind = 1
    elif _ieq(b, 0, colon, b"tel"):
        u.kind = 2
    else:
        raise UnsupportedURIScheme(f"unsupported URI scheme {_case_s(b, 0, colon, False)!r}")
    rs = colon + 1
    if u.kind == 2:
        # telephone-uri = "tel:" telephone-subscriber *( ";" par )   (RFC 3966)
        semi = _find(b, rs, n, 59)
        u.us = rs
        u.ue = semi if semi >= 0 else n
        if u.ue == rs:
            raise _InvalidURI(f"tel: URI without a number {_s(b, 0, n)!r}")
        u.hs = u.he = 0
        if semi >= 0:
            u.ps = semi + 1
            u.pe = n
            _check_uri_params(b, u.ps, u.pe)
        return 0
    k = rs
    at = _find(b, rs, n, 64)
    if at >= 0:
        pc = _find(b, rs, at, 58)
        u.us = rs
        u.ue = pc if pc >= 0 else at
        if u.ue == rs:
            raise _InvalidURI(f"empty user part in {_s(b, 0, n)!r}")
        if pc >= 0:
            u.ws = pc + 1
            u.we = at
        k = at + 1
    q = _find(b, k, n, 63)
    if q >= 0:
        u.qs = q + 1
        u.qe = n
        hpe = q
    else:
        hpe = n
    semi = _find(b, k, hpe, 59)
    if semi >= 0:
        u.ps = semi + 1
        u.pe = hpe
        _check_uri_params(b, u.ps, u.pe)
        hpe = semi
    if k < hpe and b[k] == 91:
        close = _find(b, k, hpe, 93)
        if close < 0 or not _valid_host(b, k, close + 1):
            raise _InvalidURI(f"bad IPv6 reference in {_s(b, 0, n)!r}")
        u.hs = k
        u.he = close + 1
        after = close + 1
        if after < hpe and b[after] != 58:
            raise _InvalidURI(f"bad host in {_s(b, 0, n)!r}")
    else:
        pc = _find(b, k, hpe, 58)
        u.hs = k
        u.he = pc if pc >= 0 else hpe
        if not _all(b, u.hs, u.he, C_HOST):
            raise _InvalidURI(f"bad host in {_s(b, 0, n)!r}")
        after = u.he
    if after < hpe:
        try:
            u.port = <long>_number(b, after + 1, hpe, PORT_MAX, False, "port")
        except ParseError as exc:
            raise _InvalidURI(exc.detail) from None
    return 0


cdef bytes _uri_bytes(object text):
    """UTF-8 bytes of a URI str; InvalidURI if it does not survive the round trip."""
    cdef Py_ssize_t size
    cdef const char* p
    if not PyUnicode_Check(text):
        raise _InvalidURI("URI must be a str")
    try:
        p = PyUnicode_AsUTF8AndSize(text, &size)
        return PyBytes_FromStringAndSize(p, size)
    except UnicodeError:
        pass
    try:
        raw = (<str>text).encode("utf-8", "surrogateescape")
    except UnicodeError:
        raise _InvalidURI("URI is not valid text") from None
    if raw.decode("utf-8", "surrogateescape") != text:
        raise _InvalidURI("URI is not valid text")
    return raw


cdef dict _uri_params(cp b, Py_ssize_t i, Py_ssize_t j):
    cdef dict params = {}
    cdef Py_ssize_t s = i, e, eq
    while True:
        e = _find(b, s, j, 59)
        if e < 0:
            e = j
        if e > s:
            eq = _find(b, s, e, 61)
            if eq < 0:
                PyDict_SetItem(params, _case_s(b, s, e, False), None)
            else:
                PyDict_SetItem(params, _case_s(b, s, eq, False), _s(b, eq + 1, e))
        if e >= j:
            return params
        s = e + 1


cpdef object parse_uri(object text):
    """Parse a sip:, sips: or tel: URI (RFC 3261 §19.1.1, RFC 3966)."""
    cdef UriSpan u
    cdef bytes raw = _uri_bytes(text)
    cdef cp b = <cp>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw), s, e, eq
    cdef dict headers = {}
    _scan_uri(b, n, &u)
    uri = msilo_alloc(_SipURI)
    msilo_put(uri, U_SCHEME, _SCHEMES[u.kind])
    msilo_put(uri, U_USER, _s(b, u.us, u.ue) if u.us >= 0 else None)
    msilo_put(uri, U_PASSWORD, _s(b, u.ws, u.we) if u.ws >= 0 else None)
    msilo_put(uri, U_HOST, _s(b, u.hs, u.he))
    msilo_put(uri, U_PORT, u.port if u.port >= 0 else None)
    msilo_put(uri, U_PARAMS, _uri_params(b, u.ps, u.pe) if u.ps >= 0 else {})
    if u.qs >= 0:
        # headers = "?" header *( "&" header )
        s = u.qs
        while True:
            e = _find(b, s, u.qe, 38)
            if e < 0:
                e = u.qe
            if e > s:
                eq = _find(b, s, e, 61)
                if eq < 0:
                    PyDict_SetItem(headers, _s(b, s, e), S_EMPTY)
                else:
                    PyDict_SetItem(headers, _s(b, s, eq), _s(b, eq + 1, e))
            if e >= u.qe:
                break
            s = e + 1
    msilo_put(uri, U_HEADERS, headers)
    msilo_put(uri, U_RAW, text)
    return uri


cdef inline int _hex(unsigned char c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 65 <= c <= 70:
        return c - 55
    if 97 <= c <= 102:
        return c - 87
    return -1


cdef object _aor(cp ub, Py_ssize_t us, Py_ssize_t ue, cp hb, Py_ssize_t hs, Py_ssize_t he):
    """``unescape(user) "@" lower(host)`` decoded as one string."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, (ue - us) + 1 + (he - hs))
    cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING(out)
    cdef Py_ssize_t k = us, m = 0
    cdef unsigned char c
    cdef int hi, lo
    while k < ue:
        c = ub[k]
        if c == 37 and k + 2 < ue:
            hi = _hex(ub[k + 1])
            lo = _hex(ub[k + 2])
            if hi >= 0 and lo >= 0:
                o[m] = <unsigned char>(hi * 16 + lo)
                m += 1
                k += 3
                continue
        o[m] = c
        m += 1
        k += 1
    o[m] = 64
    m += 1
    for k in range(hs, he):
        c = hb[k]
        o[m] = c + 32 if 65 <= c <= 90 else c
        m += 1
    return _s(o, 0, m)


cpdef str normalize_aor(object uri):
    """``user@host`` for an address-of-record (RFC 3261 §10.3, §19.1.4); see the twin."""
    cdef UriSpan u
    cdef bytes raw, ubytes, hbytes
    cdef cp b
    if PyUnicode_Check(uri):
        raw = _uri_bytes(uri)
        b = <cp>PyBytes_AS_STRING(raw)
        _scan_uri(b, PyBytes_GET_SIZE(raw), &u)
        if u.kind == 2:
            raise UnsupportedURIScheme("a tel: URI is not an address-of-record")
        if u.us < 0:
            raise IncompleteURI(f"no user part in {uri!r}")
        return _aor(b, u.us, u.ue, b, u.hs, u.he)
    if isinstance(uri, _SipURI):
        if uri.scheme == "tel":
            raise UnsupportedURIScheme("a tel: URI is not an address-of-record")
        if not uri.user:
            raise IncompleteURI(f"no user part in {uri.raw!r}")
        try:
            ubytes = (<str?>uri.user).encode("utf-8", "surrogateescape")
            hbytes = (<str?>uri.host).encode("utf-8", "surrogateescape")
        except UnicodeError:
            raise _InvalidURI("URI is not valid text") from None
        return _aor(<cp>PyBytes_AS_STRING(ubytes), 0, len(ubytes),
                    <cp>PyBytes_AS_STRING(hbytes), 0, len(hbytes))
    raise _InvalidURI("normalize_aor() takes a str or a SipURI")
