// lmkv chunk hashing on CPU, called straight from Python (CPython C API, METH_FASTCALL): no torch dispatcher,
// no tensor wrapping, and Python lists are read in C, so a short prompt costs a few microseconds, not tens.
//
// Limits: CPython only. The functions are handed to optimized/hashing/ext.py as a dict by
// lmkv_hashing_api(), which it calls once through ctypes.PyDLL on the library that load_component("hashing")
// built (this file is part of it). Tokens are a list/tuple of ints or a 1-D C-contiguous native-endian integer
// buffer (numpy array); anything else, or an id outside [0, 2**32), returns None so that the Python side can
// normalise the input or raise its named error: these functions never raise for bad tokens themselves. The
// GIL is released while hashing from 16k tokens on. Digests are identical to reference/hashing.py.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <memory>
#include <new>
#include <vector>

#include "lmkv/hash_chunks.h"

namespace {

using namespace lmkv::b2s;

constexpr int64_t kReleaseGil = 1 << 14;

// One token argument, borrowed (a buffer view) or converted (list items, 8/16-bit ids) into own.
struct Tokens {
  Py_buffer view{};
  bool has_view = false;
  std::vector<uint32_t> own;
  Span span{nullptr, 0, false};
  Tokens() = default;
  Tokens(const Tokens&) = delete;
  Tokens& operator=(const Tokens&) = delete;
  ~Tokens() {
    if (has_view) PyBuffer_Release(&view);
  }
};

template <typename T>
bool narrow_to_own(const T* p, int64_t n, Tokens& t) {
  t.own.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] < 0) return false;
    t.own[i] = static_cast<uint32_t>(p[i]);
  }
  t.span = {t.own.data(), n, false};
  return true;
}

// A list item as a token id: false when it is not an int in [0, 2**32). Reads the digits of small ints directly
// (CPython's documented layout for 3.11, the PyUnstable compact-value API from 3.12): ~1 ns, not ~4.
inline bool token_of(PyObject* it, uint32_t& out) {
  if (!PyLong_Check(it)) return false;
#if PY_VERSION_HEX >= 0x030C0000
  if (PyUnstable_Long_IsCompact(reinterpret_cast<PyLongObject*>(it))) {
    const Py_ssize_t v = PyUnstable_Long_CompactValue(reinterpret_cast<PyLongObject*>(it));
    if (v < 0 || v > 0xFFFFFFFFLL) return false;
    out = static_cast<uint32_t>(v);
    return true;
  }
#elif PY_VERSION_HEX >= 0x030B0000
  const Py_ssize_t size = Py_SIZE(it);
  const digit* d = reinterpret_cast<PyLongObject*>(it)->ob_digit;
  if (size == 0 || size == 1) {
    out = size ? static_cast<uint32_t>(d[0]) : 0u;
    return true;
  }
  if (size == 2) {
    const uint64_t v = static_cast<uint64_t>(d[0]) | (static_cast<uint64_t>(d[1]) << PyLong_SHIFT);
    if (v > 0xFFFFFFFFull) return false;
    out = static_cast<uint32_t>(v);
    return true;
  }
#endif
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(it, &overflow);
  if (overflow || v < 0 || v > 0xFFFFFFFFLL) {
    PyErr_Clear();
    return false;
  }
  out = static_cast<uint32_t>(v);
  return true;
}

// Range-check (and for 8/16-bit ids, widen) n ids of itemsize bytes at p; 1 on success, 0 if refused.
int acquire_raw(const void* p, int64_t n, Py_ssize_t itemsize, bool is_signed, Tokens& t) {
  switch (itemsize) {
    case 8: {  // one OR over all ids: a negative or >= 2**32 id sets a high bit
      const uint64_t* q = static_cast<const uint64_t*>(p);
      uint64_t acc = 0;
      for (int64_t i = 0; i < n; ++i) acc |= q[i];
      if (acc >> 32) return 0;
      t.span = {p, n, true};
      return 1;
    }
    case 4: {
      if (is_signed) {
        const uint32_t* q = static_cast<const uint32_t*>(p);
        uint32_t acc = 0;
        for (int64_t i = 0; i < n; ++i) acc |= q[i];
        if (acc >> 31) return 0;
      }
      t.span = {p, n, false};
      return 1;
    }
    case 2:
      return is_signed ? narrow_to_own(static_cast<const int16_t*>(p), n, t)
                       : narrow_to_own(static_cast<const uint16_t*>(p), n, t);
    case 1:
      return is_signed ? narrow_to_own(static_cast<const int8_t*>(p), n, t)
                       : narrow_to_own(static_cast<const uint8_t*>(p), n, t);
    default:
      return 0;
  }
}


// 1: t holds the tokens; 0: not handled here (the caller normalises or raises); -1: a Python error is set.
int acquire(PyObject* o, Tokens& t) {
  if (PyList_CheckExact(o) || PyTuple_CheckExact(o)) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    PyObject** items = PySequence_Fast_ITEMS(o);
    t.own.resize(static_cast<size_t>(n));
    uint32_t* dst = t.own.data();
    for (Py_ssize_t i = 0; i < n; ++i)
      if (!token_of(items[i], dst[i])) return 0;
    t.span = {t.own.data(), static_cast<int64_t>(n), false};
    return 1;
  }
  if (!PyObject_CheckBuffer(o)) return 0;
  if (PyObject_GetBuffer(o, &t.view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
    PyErr_Clear();
    return 0;
  }
  t.has_view = true;
  if (t.view.ndim != 1) return 0;
  const char* f = t.view.format ? t.view.format : "B";
  if (*f == '@' || *f == '=' || *f == '<') ++f;  // native or little-endian (x86/ARM hosts are little-endian)
  if (f[0] == 0 || f[1] != 0) return 0;
  const char c = f[0];
  const bool is_signed = c == 'b' || c == 'h' || c == 'i' || c == 'l' || c == 'q';
  const bool is_unsigned = c == 'B' || c == 'H' || c == 'I' || c == 'L' || c == 'Q';
  if (!is_signed && !is_unsigned) return 0;
  return acquire_raw(t.view.buf, t.view.len / (t.view.itemsize ? t.view.itemsize : 1), t.view.itemsize, is_signed, t);
}

bool parse_root(PyObject* o, uint32_t r[4]) {
  if (!PyBytes_Check(o) || PyBytes_GET_SIZE(o) != 16) {
    PyErr_SetString(PyExc_TypeError, "root must be 16 bytes");
    return false;
  }
  load_digest(reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(o)), r);
  return true;
}

PyObject* digest_list(const uint8_t* d, int64_t n) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(n));
  if (!list) return nullptr;
  for (int64_t i = 0; i < n; ++i) {
    PyObject* b = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(d + 16 * i), 16);
    if (!b) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, i, b);
  }
  return list;
}

struct Common {
  int64_t chunk_size;
  bool include_partial;
  uint32_t root[4];
  long threads;
};

// args[1:] = chunk_size, include_partial, root (16 bytes), threads.
bool parse_common(PyObject* const* args, Common& c) {
  c.chunk_size = PyLong_AsLongLong(args[0]);
  if (c.chunk_size == -1 && PyErr_Occurred()) return false;
  if (c.chunk_size <= 0) {
    PyErr_SetString(PyExc_ValueError, "chunk_size must be positive");
    return false;
  }
  const int partial = PyObject_IsTrue(args[1]);
  if (partial < 0) return false;
  c.include_partial = partial != 0;
  if (!parse_root(args[2], c.root)) return false;
  c.threads = PyLong_AsLong(args[3]);
  return !(c.threads == -1 && PyErr_Occurred());
}

// Hash the spans (GIL released for big inputs) into one buffer of first[nseq] digests.
std::vector<uint8_t> run_chunks(const std::vector<Span>& spans, const Common& c, std::vector<int64_t>& first) {
  const int64_t nseq = static_cast<int64_t>(spans.size());
  first.assign(nseq + 1, 0);
  int64_t tokens = 0;
  for (int64_t s = 0; s < nseq; ++s) {
    first[s + 1] = first[s] + num_chunks(spans[s].n, c.chunk_size, c.include_partial);
    tokens += spans[s].n;
  }
  std::vector<uint8_t> out(static_cast<size_t>(first[nseq]) * 16);
  const int threads = pick_threads(c.threads, tokens);
  if (tokens >= kReleaseGil) {
    Py_BEGIN_ALLOW_THREADS
    chunk_keys_spans(spans.data(), nseq, c.chunk_size, c.include_partial, c.root, first.data(), out.data(), threads);
    Py_END_ALLOW_THREADS
  } else {
    chunk_keys_spans(spans.data(), nseq, c.chunk_size, c.include_partial, c.root, first.data(), out.data(), threads);
  }
  return out;
}

// chunk_keys(tokens, chunk_size, include_partial, root, threads) -> list[bytes] | None
PyObject* py_chunk_keys(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "chunk_keys takes 5 arguments");
    return nullptr;
  }
  try {
    Common c;
    if (!parse_common(args + 1, c)) return nullptr;
    Tokens t;
    const int ok = acquire(args[0], t);
    if (ok <= 0) {
      if (ok < 0) return nullptr;
      Py_RETURN_NONE;
    }
    std::vector<int64_t> first;
    const std::vector<uint8_t> out = run_chunks({t.span}, c, first);
    return digest_list(out.data(), first[1]);
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  }
}

// chunk_keys_ptr(address, n, itemsize, is_signed, chunk_size, include_partial, root, threads) -> list | None:
// a contiguous CPU tensor's memory (the caller keeps the tensor alive); Tensor.numpy() alone costs ~2 us.
PyObject* py_chunk_keys_ptr(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "chunk_keys_ptr takes 8 arguments");
    return nullptr;
  }
  try {
    void* p = PyLong_AsVoidPtr(args[0]);
    const long long n = PyLong_AsLongLong(args[1]);
    const Py_ssize_t itemsize = PyLong_AsSsize_t(args[2]);
    const int is_signed = PyObject_IsTrue(args[3]);
    if (PyErr_Occurred() || is_signed < 0) return nullptr;
    if (n < 0 || (n > 0 && !p)) {
      PyErr_SetString(PyExc_ValueError, "bad token memory");
      return nullptr;
    }
    Common c;
    if (!parse_common(args + 4, c)) return nullptr;
    Tokens t;
    if (!acquire_raw(p, n, itemsize, is_signed != 0, t)) Py_RETURN_NONE;
    std::vector<int64_t> first;
    const std::vector<uint8_t> out = run_chunks({t.span}, c, first);
    return digest_list(out.data(), first[1]);
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  }
}

// batch_chunk_keys(sequences: list | tuple, chunk_size, include_partial, root, threads) -> list[list[bytes]] | None
PyObject* py_batch_chunk_keys(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5 || !(PyList_CheckExact(args[0]) || PyTuple_CheckExact(args[0]))) {
    PyErr_SetString(PyExc_TypeError, "batch_chunk_keys takes (list of sequences, chunk_size, partial, root, threads)");
    return nullptr;
  }
  try {
    Common c;
    if (!parse_common(args + 1, c)) return nullptr;
    const Py_ssize_t nseq = PySequence_Fast_GET_SIZE(args[0]);
    PyObject** items = PySequence_Fast_ITEMS(args[0]);
    std::vector<std::unique_ptr<Tokens>> held;
    std::vector<Span> spans;
    for (Py_ssize_t s = 0; s < nseq; ++s) {
      held.emplace_back(new Tokens());
      const int ok = acquire(items[s], *held.back());
      if (ok <= 0) {
        if (ok < 0) return nullptr;
        Py_RETURN_NONE;
      }
      spans.push_back(held.back()->span);
    }
    std::vector<int64_t> first;
    const std::vector<uint8_t> out = run_chunks(spans, c, first);
    PyObject* result = PyList_New(nseq);
    if (!result) return nullptr;
    for (Py_ssize_t s = 0; s < nseq; ++s) {
      PyObject* keys = digest_list(out.data() + 16 * first[s], first[s + 1] - first[s]);
      if (!keys) {
        Py_DECREF(result);
        return nullptr;
      }
      PyList_SET_ITEM(result, s, keys);
    }
    return result;
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  }
}

// segment_keys(tokens, spans: int64 buffer [2k] of start, end pairs, root, threads) -> list[bytes] | None
PyObject* py_segment_keys(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "segment_keys takes 4 arguments");
    return nullptr;
  }
  try {
    uint32_t r[4];
    if (!parse_root(args[2], r)) return nullptr;
    const long threads = PyLong_AsLong(args[3]);
    if (threads == -1 && PyErr_Occurred()) return nullptr;
    Tokens t;
    const int ok = acquire(args[0], t);
    if (ok <= 0) {
      if (ok < 0) return nullptr;
      Py_RETURN_NONE;
    }
    Py_buffer sv;
    if (PyObject_GetBuffer(args[1], &sv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return nullptr;
    std::unique_ptr<Py_buffer, void (*)(Py_buffer*)> release(&sv, PyBuffer_Release);
    if (sv.itemsize != 8 || sv.len % 16 != 0) {
      PyErr_SetString(PyExc_TypeError, "spans must be int64 (start, end) pairs");
      return nullptr;
    }
    const int64_t n = sv.len / 16;
    std::vector<int64_t> starts(n), ends(n);
    const int64_t* sp = static_cast<const int64_t*>(sv.buf);
    for (int64_t i = 0; i < n; ++i) {
      starts[i] = sp[2 * i];
      ends[i] = sp[2 * i + 1];
      if (!(0 <= starts[i] && starts[i] <= ends[i] && ends[i] <= t.span.n)) {
        PyErr_SetString(PyExc_ValueError, "bad segment span");
        return nullptr;
      }
    }
    std::vector<uint8_t> out(static_cast<size_t>(n) * 16);
    const int th = pick_threads(threads, t.span.n);
    if (t.span.n >= kReleaseGil) {
      Py_BEGIN_ALLOW_THREADS
      segment_keys_span(t.span, starts.data(), ends.data(), n, r, out.data(), th);
      Py_END_ALLOW_THREADS
    } else {
      segment_keys_span(t.span, starts.data(), ends.data(), n, r, out.data(), th);
    }
    return digest_list(out.data(), n);
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  }
}

PyMethodDef kMethods[] = {
    {"chunk_keys", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_chunk_keys)), METH_FASTCALL,
     "chunk_keys(tokens, chunk_size, include_partial, root, threads) -> list[bytes] | None"},
    {"chunk_keys_ptr", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_chunk_keys_ptr)),
     METH_FASTCALL, "chunk_keys_ptr(address, n, itemsize, is_signed, chunk_size, include_partial, root, threads)"},
    {"batch_chunk_keys", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_batch_chunk_keys)),
     METH_FASTCALL, "batch_chunk_keys(sequences, chunk_size, include_partial, root, threads) -> list | None"},
    {"segment_keys", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_segment_keys)), METH_FASTCALL,
     "segment_keys(tokens, spans, root, threads) -> list[bytes] | None"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// {name: builtin function}: called once, with the GIL held, through ctypes.PyDLL.
extern "C" __attribute__((visibility("default"))) PyObject* lmkv_hashing_api(void) {
  PyObject* d = PyDict_New();
  if (!d) return nullptr;
  for (PyMethodDef* m = kMethods; m->ml_name; ++m) {
    PyObject* fn = PyCFunction_New(m, nullptr);
    if (!fn || PyDict_SetItemString(d, m->ml_name, fn) != 0) {
      Py_XDECREF(fn);
      Py_DECREF(d);
      return nullptr;
    }
    Py_DECREF(fn);
  }
  return d;
}
