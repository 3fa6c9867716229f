/*
 * Errors thrown by the addon, and argument checks.
 *
 * Syscall errors: { code: "EBADF", errno: 9, syscall: "close",
 *                   message: "close failed: EBADF (Bad file descriptor)" }.
 * Argument errors: { code: "EINVAL_ARG", errno: 0, syscall: "<JS function name>",
 *                    message: "<fn>: <argument> must be <...>, got <value>" }.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "vk.h"

/* One line per errno: the name is the code of the thrown error. */
#define VK_ERRNO_LIST(X)                                                                       \
  X(EPERM) X(ENOENT) X(ESRCH) X(EINTR) X(EIO) X(ENXIO) X(E2BIG) X(ENOEXEC) X(EBADF)            \
  X(ECHILD) X(EAGAIN) X(ENOMEM) X(EACCES) X(EFAULT) X(EBUSY) X(EEXIST) X(EXDEV) X(ENODEV)      \
  X(ENOTDIR) X(EISDIR) X(EINVAL) X(ENFILE) X(EMFILE) X(ENOTTY) X(ETXTBSY) X(EFBIG) X(ENOSPC)   \
  X(ESPIPE) X(EROFS) X(EMLINK) X(EPIPE) X(EDOM) X(ERANGE) X(EDEADLK) X(ENAMETOOLONG)           \
  X(ENOLCK) X(ENOSYS) X(ENOTEMPTY) X(ELOOP) X(ENOMSG) X(EOVERFLOW) X(EILSEQ) X(ENOTSOCK)       \
  X(EDESTADDRREQ) X(EMSGSIZE) X(EPROTOTYPE) X(ENOPROTOOPT) X(EPROTONOSUPPORT)                 \
  X(EOPNOTSUPP) X(EAFNOSUPPORT) X(EADDRINUSE) X(EADDRNOTAVAIL) X(ENETDOWN) X(ENETUNREACH)    \
  X(ECONNABORTED) X(ECONNRESET) X(ENOBUFS) X(EISCONN) X(ENOTCONN) X(ESHUTDOWN) X(ETIMEDOUT)  \
  X(ECONNREFUSED) X(EHOSTUNREACH) X(EALREADY) X(EINPROGRESS) X(ECANCELED) X(EOWNERDEAD)      \
  X(ENOTRECOVERABLE)

/* ENOTSUP == EOPNOTSUPP and EWOULDBLOCK == EAGAIN on Linux, so they have no line of their own. */

const char* vk_errno_name(int err) {
  switch (err) {
#define VK_ERRNO_CASE(name) \
  case name:                \
    return #name;
    VK_ERRNO_LIST(VK_ERRNO_CASE)
#undef VK_ERRNO_CASE
    default:
      return NULL;
  }
}

static napi_value make_error(napi_env env, const char* code, const char* message, double errnum,
                             const char* syscall) {
  napi_value code_v, msg_v, err, errno_v, syscall_v;
  if (napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &code_v) != napi_ok) return NULL;
  if (napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &msg_v) != napi_ok) return NULL;
  if (napi_create_error(env, code_v, msg_v, &err) != napi_ok) return NULL;
  if (napi_create_double(env, errnum, &errno_v) != napi_ok) return NULL;
  if (napi_set_named_property(env, err, "errno", errno_v) != napi_ok) return NULL;
  if (napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscall_v) != napi_ok) return NULL;
  if (napi_set_named_property(env, err, "syscall", syscall_v) != napi_ok) return NULL;
  return err;
}

static napi_value throw_value(napi_env env, napi_value err) {
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (err != NULL && !pending) napi_throw(env, err);
  if (err == NULL && !pending) napi_throw_error(env, "ENAPI", "vhostkit: could not create an error object");
  return NULL;
}

napi_value vk_make_errno_error(napi_env env, const char* syscall, int err) {
  char code_buf[24];
  const char* code = vk_errno_name(err);
  if (code == NULL) {
    snprintf(code_buf, sizeof code_buf, "E%d", err);
    code = code_buf;
  }
  char message[256];
  snprintf(message, sizeof message, "%s failed: %s (%s)", syscall, code, strerror(err));
  return make_error(env, code, message, (double)err, syscall);
}

napi_value vk_make_uv_error(napi_env env, const char* syscall, int status) {
  char message[256];
  snprintf(message, sizeof message, "%s failed: %s (%s)", syscall, uv_err_name(status),
           uv_strerror(status));
  /* On Unix a libuv status is a negated errno. */
  return make_error(env, uv_err_name(status), message, (double)-status, syscall);
}

napi_value vk_throw_errno(napi_env env, const char* syscall, int err) {
  return throw_value(env, vk_make_errno_error(env, syscall, err));
}

napi_value vk_throw_uv(napi_env env, const char* syscall, int status) {
  return throw_value(env, vk_make_uv_error(env, syscall, status));
}

napi_value vk_throw_state(napi_env env, const char* syscall, int err, const char* message) {
  const char* code = vk_errno_name(err);
  return throw_value(env, make_error(env, code != NULL ? code : "EINVAL", message, (double)err,
                                     syscall));
}

napi_value vk_napi_failed(napi_env env, const char* fn) {
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (!pending) {
    const napi_extended_error_info* info = NULL;
    napi_get_last_error_info(env, &info);
    char message[256];
    snprintf(message, sizeof message, "%s: Node-API call failed: %s", fn,
             info != NULL && info->error_message != NULL ? info->error_message : "unknown");
    napi_throw_error(env, "ENAPI", message);
  }
  return NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* Describing an offending value for error messages, without running any JS.               */

static void describe_value(napi_env env, napi_value v, char* out, size_t size) {
  napi_valuetype type = napi_undefined;
  if (v == NULL || napi_typeof(env, v, &type) != napi_ok) {
    snprintf(out, size, "undefined");
    return;
  }
  switch (type) {
    case napi_undefined:
      snprintf(out, size, "undefined");
      return;
    case napi_null:
      snprintf(out, size, "null");
      return;
    case napi_boolean: {
      bool b = false;
      napi_get_value_bool(env, v, &b);
      snprintf(out, size, "%s", b ? "true" : "false");
      return;
    }
    case napi_number: {
      double d = 0;
      napi_get_value_double(env, v, &d);
      if (isnan(d)) {
        snprintf(out, size, "NaN");
      } else if (isinf(d)) {
        snprintf(out, size, "%sInfinity", d < 0 ? "-" : "");
      } else if (d == floor(d) && fabs(d) < 1e21) {
        snprintf(out, size, "%.0f", d);
      } else {
        snprintf(out, size, "%.17g", d);
      }
      return;
    }
    case napi_string: {
      char s[48];
      size_t len = 0;
      napi_get_value_string_utf8(env, v, s, sizeof s, &len);
      size_t total = 0;
      napi_get_value_string_utf8(env, v, NULL, 0, &total);
      snprintf(out, size, "\"%s%s\"", s, total > len ? "..." : "");
      return;
    }
    case napi_bigint: {
      int64_t i64 = 0;
      bool lossless = false;
      napi_get_value_bigint_int64(env, v, &i64, &lossless);
      if (lossless) {
        snprintf(out, size, "%lldn", (long long)i64);
        return;
      }
      uint64_t u64 = 0;
      napi_get_value_bigint_uint64(env, v, &u64, &lossless);
      if (lossless) {
        snprintf(out, size, "%llun", (unsigned long long)u64);
      } else {
        snprintf(out, size, "a bigint beyond 64 bits");
      }
      return;
    }
    case napi_symbol:
      snprintf(out, size, "a symbol");
      return;
    case napi_function:
      snprintf(out, size, "a function");
      return;
    case napi_external:
      snprintf(out, size, "an external");
      return;
    case napi_object: {
      bool is = false;
      if (napi_is_array(env, v, &is) == napi_ok && is) {
        uint32_t n = 0;
        napi_get_array_length(env, v, &n);
        snprintf(out, size, "an array of length %u", n);
        return;
      }
      if (napi_is_typedarray(env, v, &is) == napi_ok && is) {
        napi_typedarray_type tt = napi_int8_array;
        size_t n = 0;
        napi_get_typedarray_info(env, v, &tt, &n, NULL, NULL, NULL);
        static const char* const names[] = {
            "Int8Array",    "Uint8Array",   "Uint8ClampedArray", "Int16Array",
            "Uint16Array",  "Int32Array",   "Uint32Array",       "Float32Array",
            "Float64Array", "BigInt64Array", "BigUint64Array"};
        const char* name = (size_t)tt < sizeof names / sizeof names[0] ? names[tt] : "typed array";
        snprintf(out, size, "a %s of length %zu", name, n);
        return;
      }
      if (napi_is_arraybuffer(env, v, &is) == napi_ok && is) {
        size_t n = 0;
        napi_get_arraybuffer_info(env, v, NULL, &n);
        snprintf(out, size, "an ArrayBuffer of %zu bytes", n);
        return;
      }
      if (napi_is_dataview(env, v, &is) == napi_ok && is) {
        snprintf(out, size, "a DataView");
        return;
      }
      snprintf(out, size, "an object");
      return;
    }
  }
  snprintf(out, size, "a value of unknown type");
}

napi_value vk_throw_arg(napi_env env, const char* fn, napi_value got, const char* fmt, ...) {
  char what[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  char value[96];
  describe_value(env, got, value, sizeof value);
  char message[400];
  snprintf(message, sizeof message, "%s: %s, got %s", fn, what, value);
  return throw_value(env, make_error(env, "EINVAL_ARG", message, 0, fn));
}

/* ---------------------------------------------------------------------------------------- */
/* Argument checks. Each returns false with an exception pending when the value is wrong.  */

bool vk_args_get(napi_env env, napi_callback_info info, const char* fn, vk_args* a) {
  a->env = env;
  a->fn = fn;
  a->argc = sizeof a->argv / sizeof a->argv[0];
  a->self = NULL;
  if (napi_get_cb_info(env, info, &a->argc, a->argv, &a->self, NULL) != napi_ok) {
    vk_napi_failed(env, fn);
    return false;
  }
  /* napi fills missing arguments (up to the array size) with undefined. */
  return true;
}

/* Reads argv[i] as a number that is an integer; false (with error thrown) otherwise. */
static bool arg_integer(vk_args* a, size_t i, const char* name, const char* expect, double* out) {
  napi_valuetype type = napi_undefined;
  napi_typeof(a->env, a->argv[i], &type);
  if (type != napi_number) {
    vk_throw_arg(a->env, a->fn, a->argv[i], "%s must be %s", name, expect);
    return false;
  }
  double d = 0;
  napi_get_value_double(a->env, a->argv[i], &d);
  if (!isfinite(d) || d != floor(d)) {
    vk_throw_arg(a->env, a->fn, a->argv[i], "%s must be %s", name, expect);
    return false;
  }
  *out = d;
  return true;
}

bool vk_arg_fd(vk_args* a, size_t i, const char* name, int* out) {
  double d = 0;
  const char* expect = "a file descriptor (an integer in [0, 2^31-1])";
  if (!arg_integer(a, i, name, expect, &d)) return false;
  if (d < 0 || d > 2147483647.0) {
    vk_throw_arg(a->env, a->fn, a->argv[i], "%s must be %s", name, expect);
    return false;
  }
  *out = (int)d;
  return true;
}

bool vk_arg_uint(vk_args* a, size_t i, const char* name, uint64_t min, uint64_t max,
                 uint64_t* out) {
  char expect[96];
  snprintf(expect, sizeof expect, "an integer in [%llu, %llu]", (unsigned long long)min,
           (unsigned long long)max);
  double d = 0;
  if (!arg_integer(a, i, name, expect, &d)) return false;
  if (d < (double)min || d > (double)max || d > VK_MAX_SAFE_INTEGER) {
    vk_throw_arg(a->env, a->fn, a->argv[i], "%s must be %s", name, expect);
    return false;
  }
  *out = (uint64_t)d;
  return true;
}

bool vk_arg_bool(vk_args* a, size_t i, const char* name, bool* out) {
  napi_valuetype type = napi_undefined;
  napi_typeof(a->env, a->argv[i], &type);
  if (type != napi_boolean) {
    vk_throw_arg(a->env, a->fn, a->argv[i], "%s must be a boolean", name);
    return false;
  }
  napi_get_value_bool(a->env, a->argv[i], out);
  return true;
}

bool vk_arg_function(vk_args* a, size_t i, const char* name) {
  napi_valuetype type = napi_undefined;
  napi_typeof(a->env, a->argv[i], &type);
  if (type != napi_function) {
    vk_throw_arg(a->env, a->fn, a->argv[i], "%s must be a function", name);
    return false;
  }
  return true;
}

bool vk_arg_bytes(vk_args* a, size_t i, const char* name, uint8_t** data, size_t* length) {
  bool is = false;
  napi_typedarray_type tt = napi_int8_array;
  if (napi_is_typedarray(a->env, a->argv[i], &is) != napi_ok || !is ||
      napi_get_typedarray_info(a->env, a->argv[i], &tt, length, (void**)data, NULL, NULL) !=
          napi_ok ||
      tt != napi_uint8_array) {
    vk_throw_arg(a->env, a->fn, a->argv[i], "%s must be a Uint8Array", name);
    return false;
  }
  /* A view on a detached buffer reports length 0; data may be NULL then. */
  if (*data == NULL) *length = 0;
  return true;
}

bool vk_arg_range(vk_args* a, size_t off_i, size_t len_i, size_t buf_len, size_t min_len,
                  size_t* off, size_t* len) {
  uint64_t o = 0, l = 0;
  if (!vk_arg_uint(a, off_i, "offset", 0, (uint64_t)VK_MAX_SAFE_INTEGER, &o)) return false;
  if (!vk_arg_uint(a, len_i, "length", 0, (uint64_t)VK_MAX_SAFE_INTEGER, &l)) return false;
  if (o > buf_len) {
    vk_throw_arg(a->env, a->fn, a->argv[off_i], "offset must be at most the buffer length %zu",
                 buf_len);
    return false;
  }
  if (l > buf_len - o) {
    vk_throw_arg(a->env, a->fn, a->argv[len_i],
                 "length must fit in the buffer (offset %llu, buffer length %zu)",
                 (unsigned long long)o, buf_len);
    return false;
  }
  if (l < min_len) {
    vk_throw_arg(a->env, a->fn, a->argv[len_i], "length must be at least %zu", min_len);
    return false;
  }
  *off = (size_t)o;
  *len = (size_t)l;
  return true;
}

bool vk_arg_string(vk_args* a, size_t i, const char* name, char* out, size_t max_len) {
  napi_valuetype type = napi_undefined;
  napi_typeof(a->env, a->argv[i], &type);
  if (type != napi_string) {
    vk_throw_arg(a->env, a->fn, a->argv[i], "%s must be a string", name);
    return false;
  }
  size_t total = 0;
  napi_get_value_string_utf8(a->env, a->argv[i], NULL, 0, &total);
  if (total == 0 || total > max_len) {
    vk_throw_arg(a->env, a->fn, a->argv[i], "%s must be 1 to %zu UTF-8 bytes long (is %zu)", name,
                 max_len, total);
    return false;
  }
  size_t copied = 0;
  napi_get_value_string_utf8(a->env, a->argv[i], out, max_len + 1, &copied);
  if (copied != total || strlen(out) != total) {
    vk_throw_arg(a->env, a->fn, a->argv[i], "%s must not contain NUL characters", name);
    return false;
  }
  return true;
}

/* ---------------------------------------------------------------------------------------- */

napi_value vk_number(napi_env env, double value) {
  napi_value v = NULL;
  napi_create_double(env, value, &v);
  return v;
}

napi_value vk_undefined(napi_env env) {
  napi_value v = NULL;
  napi_get_undefined(env, &v);
  return v;
}

napi_value vk_null(napi_env env) {
  napi_value v = NULL;
  napi_get_null(env, &v);
  return v;
}

napi_value vk_bool(napi_env env, bool value) {
  napi_value v = NULL;
  napi_get_boolean(env, value, &v);
  return v;
}

napi_value vk_fd_pair(napi_env env, int a, int b) {
  napi_value arr = NULL;
  if (napi_create_array_with_length(env, 2, &arr) != napi_ok ||
      napi_set_element(env, arr, 0, vk_number(env, a)) != napi_ok ||
      napi_set_element(env, arr, 1, vk_number(env, b)) != napi_ok) {
    return NULL;
  }
  return arr;
}

bool vk_export_fns(napi_env env, napi_value exports, const vk_fn* fns, size_t count) {
  for (size_t i = 0; i < count; i++) {
    napi_value f;
    if (napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].cb, NULL, &f) !=
            napi_ok ||
        napi_set_named_property(env, exports, fns[i].name, f) != napi_ok) {
      return false;
    }
  }
  return true;
}
