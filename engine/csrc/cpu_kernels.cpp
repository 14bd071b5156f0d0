// tandem's CPU kernels for bfloat16 models: GEMM (packed weights), RMSNorm, rotary + KV cache
// write, paged causal attention. Every result is computed in an order fixed by the data alone
// (not by the thread count, nor by the other rows of the batch), so a token's logits are the
// same bits whichever way the engine batches, chunks or threads its computation.
//
// A CPython module without torch: tensors arrive as addresses and sizes, checked by
// engine/cpu_kernels.py. The kernel bodies are compiled once per ISA tier (AVX512-BF16, AVX2,
// baseline) and the tier is picked once per process; threads come from OpenMP, whose runtime
// (libgomp.so.1) is the one torch already loaded.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

typedef uint16_t bf16;
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
namespace tier_avx512bf16 {
#define TANDEM_NATIVE_BF16 1
#include "vec.h"
#include "gemm.h"
#include "norm_rope.h"
#include "attention.h"
#undef TANDEM_NATIVE_BF16
}  // namespace tier_avx512bf16
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace tier_avx2 {
#define TANDEM_NATIVE_BF16 0
#include "vec.h"
#include "gemm.h"
#include "norm_rope.h"
#include "attention.h"
#undef TANDEM_NATIVE_BF16
}  // namespace tier_avx2
#pragma GCC pop_options
#endif

namespace tier_generic {
#define TANDEM_NATIVE_BF16 0
#include "vec.h"
#include "gemm.h"
#include "norm_rope.h"
#include "attention.h"
#undef TANDEM_NATIVE_BF16
}  // namespace tier_generic

enum Tier { GENERIC = 0, AVX2 = 1, AVX512BF16 = 2 };
static const char* TIER_NAMES[] = {"generic", "avx2", "avx512bf16"};
static int g_tier = -1;

static int best_tier() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16"))
    return AVX512BF16;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
#endif
  return GENERIC;
}

#if defined(__x86_64__)
#define DISPATCH(call)                                     \
  switch (g_tier) {                                        \
    case AVX512BF16: tier_avx512bf16::call; break;         \
    case AVX2: tier_avx2::call; break;                     \
    default: tier_generic::call; break;                    \
  }
#else
#define DISPATCH(call) tier_generic::call;
#endif

typedef unsigned long long addr_t;
template <class T>
static T* ptr(addr_t a) { return reinterpret_cast<T*>(static_cast<uintptr_t>(a)); }

static PyObject* py_tier(PyObject*, PyObject*) { return PyUnicode_FromString(TIER_NAMES[g_tier]); }

static PyObject* py_best_tier(PyObject*, PyObject*) { return PyUnicode_FromString(TIER_NAMES[best_tier()]); }

static PyObject* py_set_tier(PyObject*, PyObject* args) {
  const char* name;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  for (int t = GENERIC; t <= best_tier(); t++) {
    if (strcmp(name, TIER_NAMES[t]) == 0) {
      g_tier = t;
      Py_RETURN_NONE;
    }
  }
  PyErr_Format(PyExc_ValueError, "ISA tier %s is unknown or not supported by this CPU (best: %s)", name,
               TIER_NAMES[best_tier()]);
  return nullptr;
}

// gemm(a, lda, m, k, w, num_blocks, n, bias, epilogue, c, ldc, threads)
static PyObject* py_gemm(PyObject*, PyObject* args) {
  addr_t a, w, bias, c;
  long long lda, m, k, num_blocks, n, ldc;
  int epi, threads;
  if (!PyArg_ParseTuple(args, "KLLLKLLKiKLi", &a, &lda, &m, &k, &w, &num_blocks, &n, &bias, &epi, &c, &ldc, &threads))
    return nullptr;
  Py_BEGIN_ALLOW_THREADS
  DISPATCH(gemm(ptr<const bf16>(a), lda, m, k, ptr<const uint32_t>(w), num_blocks, n, ptr<const float>(bias), epi,
                ptr<void>(c), ldc, threads))
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// rms_norm(x, ldx, res, ldr, res_out, ldro, weight, out, ldo, m, d, eps, threads)
static PyObject* py_rms_norm(PyObject*, PyObject* args) {
  addr_t x, res, res_out, weight, out;
  long long ldx, ldr, ldro, ldo, m, d;
  float eps;
  int threads;
  if (!PyArg_ParseTuple(args, "KLKLKLKKLLLfi", &x, &ldx, &res, &ldr, &res_out, &ldro, &weight, &out, &ldo, &m, &d,
                        &eps, &threads))
    return nullptr;
  Py_BEGIN_ALLOW_THREADS
  DISPATCH(rms_norm(ptr<const bf16>(x), ldx, ptr<const bf16>(res), ldr, ptr<bf16>(res_out), ldro,
                    ptr<const bf16>(weight), ptr<bf16>(out), ldo, m, d, eps, threads))
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// rotary_cache_write(q, k, v, ld, t, h, kvh, hd, cos, sin, ld_rot, q_out,
//                    cache, block_size, block_stride, v_offset, token_stride, slots, threads)
static PyObject* py_rotary_cache_write(PyObject*, PyObject* args) {
  addr_t q, k, v, cos, sin, q_out, cache, slots;
  long long ld, t, h, kvh, hd, ld_rot, block_size, block_stride, v_offset, token_stride;
  int threads;
  if (!PyArg_ParseTuple(args, "KKKLLLLLKKLKKLLLLKi", &q, &k, &v, &ld, &t, &h, &kvh, &hd, &cos, &sin, &ld_rot, &q_out,
                        &cache, &block_size, &block_stride, &v_offset, &token_stride, &slots, &threads))
    return nullptr;
  Py_BEGIN_ALLOW_THREADS
  DISPATCH(rotary_cache_write(ptr<const bf16>(q), ptr<const bf16>(k), ptr<const bf16>(v), ld, t, h, kvh, hd,
                              ptr<const bf16>(cos), ptr<const bf16>(sin), ld_rot, ptr<bf16>(q_out),
                              {ptr<bf16>(cache), block_size, block_stride, v_offset, token_stride},
                              ptr<const int64_t>(slots), threads))
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// attention(q, out, h, kvh, hd, cache, block_size, block_stride, v_offset, token_stride,
//           query_start, seq_lens, block_tables, table_stride, num_seqs, scale, threads)
static PyObject* py_attention(PyObject*, PyObject* args) {
  addr_t q, out, cache, query_start, seq_lens, tables;
  long long h, kvh, hd, block_size, block_stride, v_offset, token_stride, table_stride, num_seqs;
  float scale;
  int threads;
  if (!PyArg_ParseTuple(args, "KKLLLKLLLLKKKLLfi", &q, &out, &h, &kvh, &hd, &cache, &block_size, &block_stride,
                        &v_offset, &token_stride, &query_start, &seq_lens, &tables, &table_stride, &num_seqs, &scale,
                        &threads))
    return nullptr;
  Py_BEGIN_ALLOW_THREADS
  DISPATCH(attention(ptr<const bf16>(q), ptr<bf16>(out), h, kvh, hd,
                     {ptr<bf16>(cache), block_size, block_stride, v_offset, token_stride},
                     ptr<const int32_t>(query_start), ptr<const int32_t>(seq_lens), ptr<const int32_t>(tables),
                     table_stride, num_seqs, scale, threads))
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyMethodDef METHODS[] = {
    {"tier", py_tier, METH_NOARGS, "The ISA tier in use."},
    {"best_tier", py_best_tier, METH_NOARGS, "The best ISA tier this CPU supports."},
    {"set_tier", py_set_tier, METH_VARARGS, "Use an ISA tier (one this CPU supports)."},
    {"gemm", py_gemm, METH_VARARGS, "C = A W^T over a packed weight."},
    {"rms_norm", py_rms_norm, METH_VARARGS, "RMSNorm with an optional residual add."},
    {"rotary_cache_write", py_rotary_cache_write, METH_VARARGS, "Rotary on q and k; k and v into the cache."},
    {"attention", py_attention, METH_VARARGS, "Causal attention over the paged cache."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_cpu_kernels", nullptr, -1, METHODS};

#ifndef TANDEM_KERNELS_HASH
#define TANDEM_KERNELS_HASH ""
#endif

PyMODINIT_FUNC PyInit__cpu_kernels(void) {
  g_tier = best_tier();
  PyObject* mod = PyModule_Create(&MODULE);
  if (mod && PyModule_AddStringConstant(mod, "SOURCE_HASH", TANDEM_KERNELS_HASH) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
