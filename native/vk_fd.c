/*
 * Plain fd syscalls: eventfd, pipe, dup, close, O_NONBLOCK, read, write, vmsplice, page size.
 * Reads and writes retry on EINTR and return null on EAGAIN.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "vk.h"

/** eventfd(initval: number): number */
static napi_value fn_eventfd(napi_env env, napi_callback_info info) {
  vk_args a;
  uint64_t initval = 0;
  if (!vk_args_get(env, info, "eventfd", &a)) return NULL;
  if (!vk_arg_uint(&a, 0, "initval", 0, UINT32_MAX, &initval)) return NULL;
  int fd = eventfd((unsigned int)initval, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) return vk_throw_errno(env, "eventfd", errno);
  return vk_number(env, fd);
}

/** eventfdRead(fd): bigint | null */
static napi_value fn_eventfd_read(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  if (!vk_args_get(env, info, "eventfdRead", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  uint64_t value = 0;
  ssize_t n;
  do n = read(fd, &value, sizeof value);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return vk_null(env);
    return vk_throw_errno(env, "read", errno);
  }
  if (n != (ssize_t)sizeof value) {
    return vk_throw_state(env, "read", EINVAL, "read failed: EINVAL (not an eventfd: short read)");
  }
  napi_value result;
  if (napi_create_bigint_uint64(env, value, &result) != napi_ok) {
    return vk_napi_failed(env, "eventfdRead");
  }
  return result;
}

/** eventfdWrite(fd, value = 1): boolean (false on EAGAIN) */
static napi_value fn_eventfd_write(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  uint64_t value = 1;
  if (!vk_args_get(env, info, "eventfdWrite", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  napi_valuetype type = napi_undefined;
  napi_typeof(env, a.argv[1], &type);
  if (type == napi_bigint) {
    bool lossless = false;
    napi_get_value_bigint_uint64(env, a.argv[1], &value, &lossless);
    if (!lossless || value < 1 || value == UINT64_MAX) {
      return vk_throw_arg(env, a.fn, a.argv[1], "value must be in [1, 2^64-2]");
    }
  } else if (type != napi_undefined) {
    if (!vk_arg_uint(&a, 1, "value", 1, (uint64_t)VK_MAX_SAFE_INTEGER, &value)) return NULL;
  }
  ssize_t n;
  do n = write(fd, &value, sizeof value);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return vk_bool(env, false);
    return vk_throw_errno(env, "write", errno);
  }
  return vk_bool(env, true);
}

/** pipe(nonBlocking): [readEnd, writeEnd] */
static napi_value fn_pipe(napi_env env, napi_callback_info info) {
  vk_args a;
  bool nonblocking = false;
  if (!vk_args_get(env, info, "pipe", &a)) return NULL;
  if (!vk_arg_bool(&a, 0, "nonBlocking", &nonblocking)) return NULL;
  int fds[2];
  if (pipe2(fds, O_CLOEXEC | (nonblocking ? O_NONBLOCK : 0)) < 0) {
    return vk_throw_errno(env, "pipe2", errno);
  }
  napi_value result = vk_fd_pair(env, fds[0], fds[1]);
  if (result == NULL) {
    close(fds[0]);
    close(fds[1]);
    return vk_napi_failed(env, "pipe");
  }
  return result;
}

/** dup(fd): number (F_DUPFD_CLOEXEC) */
static napi_value fn_dup(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  if (!vk_args_get(env, info, "dup", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) return vk_throw_errno(env, "fcntl", errno);
  return vk_number(env, copy);
}

/** close(fd): void. EINTR is success: on Linux the fd is released even then. */
static napi_value fn_close(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  if (!vk_args_get(env, info, "close", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  /* Never retry close: after EINTR the number may already belong to another thread's fd. */
  if (close(fd) < 0 && errno != EINTR) return vk_throw_errno(env, "close", errno);
  return vk_undefined(env);
}

/** setNonBlocking(fd, nonBlocking): void */
static napi_value fn_set_nonblocking(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  bool nonblocking = false;
  if (!vk_args_get(env, info, "setNonBlocking", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  if (!vk_arg_bool(&a, 1, "nonBlocking", &nonblocking)) return NULL;
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) return vk_throw_errno(env, "fcntl", errno);
  int wanted = nonblocking ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
  if (wanted != flags && fcntl(fd, F_SETFL, wanted) < 0) {
    return vk_throw_errno(env, "fcntl", errno);
  }
  return vk_undefined(env);
}

/**
 * setPipeSize(fd, bytes): number. F_SETPIPE_SZ: the pipe's capacity (the kernel rounds up to a
 * power-of-two number of pages; capped by /proc/sys/fs/pipe-max-size for unprivileged users).
 * Returns the capacity set, or -1 when the fd is not a pipe or the size is refused.
 */
static napi_value fn_set_pipe_size(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  uint64_t bytes = 0;
  if (!vk_args_get(env, info, "setPipeSize", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  if (!vk_arg_uint(&a, 1, "bytes", 4096, 1u << 30, &bytes)) return NULL;
  int r = fcntl(fd, F_SETPIPE_SZ, (int)bytes);
  return vk_number(env, r < 0 ? -1 : r);
}

/** read(fd, buffer, offset, length): number | null */
static napi_value fn_read(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  uint8_t* data = NULL;
  size_t buf_len = 0, off = 0, len = 0;
  if (!vk_args_get(env, info, "read", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  if (!vk_arg_bytes(&a, 1, "buffer", &data, &buf_len)) return NULL;
  if (!vk_arg_range(&a, 2, 3, buf_len, 0, &off, &len)) return NULL;
  ssize_t n;
  do n = read(fd, len > 0 ? data + off : NULL, len);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return vk_null(env);
    return vk_throw_errno(env, "read", errno);
  }
  return vk_number(env, (double)n);
}

/** write(fd, buffer, offset, length): number | null */
static napi_value fn_write(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  uint8_t* data = NULL;
  size_t buf_len = 0, off = 0, len = 0;
  if (!vk_args_get(env, info, "write", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  if (!vk_arg_bytes(&a, 1, "buffer", &data, &buf_len)) return NULL;
  if (!vk_arg_range(&a, 2, 3, buf_len, 0, &off, &len)) return NULL;
  ssize_t n;
  do n = write(fd, len > 0 ? data + off : NULL, len);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return vk_null(env);
    return vk_throw_errno(env, "write", errno);
  }
  return vk_number(env, (double)n);
}

/**
 * vmsplice(fd, buffer, offset, length): number | null. Hands the pages of
 * buffer[offset, offset+length) to a pipe without copying them (SPLICE_F_NONBLOCK; no GIFT):
 * the pipe refers to the caller's memory until the reader has consumed it. Returns bytes
 * queued, or null on EAGAIN. EBADF/EINVAL when fd is not the write end of a pipe.
 */
static napi_value fn_vmsplice(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  uint8_t* data = NULL;
  size_t buf_len = 0, off = 0, len = 0;
  if (!vk_args_get(env, info, "vmsplice", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  if (!vk_arg_bytes(&a, 1, "buffer", &data, &buf_len)) return NULL;
  if (!vk_arg_range(&a, 2, 3, buf_len, 0, &off, &len)) return NULL;
  if (len == 0) return vk_number(env, 0);
  struct iovec iov = {.iov_base = data + off, .iov_len = len};
  ssize_t n;
  do n = vmsplice(fd, &iov, 1, SPLICE_F_NONBLOCK);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return vk_null(env);
    return vk_throw_errno(env, "vmsplice", errno);
  }
  return vk_number(env, (double)n);
}

/** pageSize(): number */
static napi_value fn_page_size(napi_env env, napi_callback_info info) {
  long size = sysconf(_SC_PAGESIZE);
  if (size < 0) return vk_throw_errno(env, "sysconf", errno);
  return vk_number(env, (double)size);
}

bool vk_register_fd(napi_env env, napi_value exports) {
  static const vk_fn fns[] = {
      {"eventfd", fn_eventfd},
      {"eventfdRead", fn_eventfd_read},
      {"eventfdWrite", fn_eventfd_write},
      {"pipe", fn_pipe},
      {"dup", fn_dup},
      {"close", fn_close},
      {"setNonBlocking", fn_set_nonblocking},
      {"setPipeSize", fn_set_pipe_size},
      {"read", fn_read},
      {"write", fn_write},
      {"vmsplice", fn_vmsplice},
      {"pageSize", fn_page_size},
  };
  return vk_export_fns(env, exports, fns, sizeof fns / sizeof fns[0]);
}
