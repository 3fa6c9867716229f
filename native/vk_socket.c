/*
 * Unix stream sockets and fd passing (SCM_RIGHTS).
 *
 * vhost-user: "Communication / Passing fds": fds travel as SCM_RIGHTS ancillary data, at most 8
 * per message. recvmsg accepts a control buffer large enough for the kernel's own limit
 * (SCM_MAX_FD = 253), so a peer that sends more than 8 fds is detected and the surplus closed
 * rather than silently truncated by the kernel.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "vk.h"

/** The kernel's per-message SCM_RIGHTS limit (SCM_MAX_FD in include/net/scm.h). */
#define VK_SCM_MAX_FD 253

#define VK_SUN_PATH_MAX (sizeof(((struct sockaddr_un*)0)->sun_path) - 1)

static int close_keep_errno(int fd) {
  int saved = errno;
  close(fd);
  errno = saved;
  return -1;
}

static void fill_addr(struct sockaddr_un* addr, const char* path) {
  memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  /* path was checked to be at most VK_SUN_PATH_MAX bytes: the NUL from memset stays. */
  memcpy(addr->sun_path, path, strnlen(path, VK_SUN_PATH_MAX));
}

/** unixListen(path, backlog): number */
static napi_value fn_unix_listen(napi_env env, napi_callback_info info) {
  vk_args a;
  char path[VK_SUN_PATH_MAX + 1];
  uint64_t backlog = 0;
  if (!vk_args_get(env, info, "unixListen", &a)) return NULL;
  if (!vk_arg_string(&a, 0, "path", path, VK_SUN_PATH_MAX)) return NULL;
  if (!vk_arg_uint(&a, 1, "backlog", 0, INT32_MAX, &backlog)) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return vk_throw_errno(env, "socket", errno);
  struct sockaddr_un addr;
  fill_addr(&addr, path);
  if (bind(fd, (struct sockaddr*)&addr, sizeof addr) < 0) {
    close_keep_errno(fd);
    return vk_throw_errno(env, "bind", errno);
  }
  if (listen(fd, (int)backlog) < 0) {
    close_keep_errno(fd);
    return vk_throw_errno(env, "listen", errno);
  }
  return vk_number(env, fd);
}

/** unixAccept(fd): number | null */
static napi_value fn_unix_accept(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  if (!vk_args_get(env, info, "unixAccept", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  int conn;
  do conn = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  while (conn < 0 && errno == EINTR);
  if (conn < 0) {
    if (errno == EAGAIN) return vk_null(env);
    return vk_throw_errno(env, "accept4", errno);
  }
  return vk_number(env, conn);
}

/** unixConnect(path): number */
static napi_value fn_unix_connect(napi_env env, napi_callback_info info) {
  vk_args a;
  char path[VK_SUN_PATH_MAX + 1];
  if (!vk_args_get(env, info, "unixConnect", &a)) return NULL;
  if (!vk_arg_string(&a, 0, "path", path, VK_SUN_PATH_MAX)) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return vk_throw_errno(env, "socket", errno);
  struct sockaddr_un addr;
  fill_addr(&addr, path);
  /* A non-blocking Unix stream connect completes at once or fails; it is not retried on EINTR
   * (a retry could report EALREADY/EISCONN for a connect that went through). */
  if (connect(fd, (struct sockaddr*)&addr, sizeof addr) < 0) {
    close_keep_errno(fd);
    return vk_throw_errno(env, "connect", errno);
  }
  return vk_number(env, fd);
}

/** socketpair(): [number, number] */
static napi_value fn_socketpair(napi_env env, napi_callback_info info) {
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) < 0) {
    return vk_throw_errno(env, "socketpair", errno);
  }
  napi_value result = vk_fd_pair(env, fds[0], fds[1]);
  if (result == NULL) {
    close(fds[0]);
    close(fds[1]);
    return vk_napi_failed(env, "socketpair");
  }
  return result;
}

/** shutdown(fd): void */
static napi_value fn_shutdown(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  if (!vk_args_get(env, info, "shutdown", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  if (shutdown(fd, SHUT_RDWR) < 0) return vk_throw_errno(env, "shutdown", errno);
  return vk_undefined(env);
}

/** sendmsg(fd, data, offset, length, fds): number | null */
static napi_value fn_sendmsg(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  uint8_t* data = NULL;
  size_t buf_len = 0, off = 0, len = 0;
  int fds[VK_MAX_FDS];
  uint32_t nfds = 0;
  if (!vk_args_get(env, info, "sendmsg", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  if (!vk_arg_bytes(&a, 1, "data", &data, &buf_len)) return NULL;
  if (!vk_arg_range(&a, 2, 3, buf_len, 0, &off, &len)) return NULL;
  bool is_array = false;
  if (napi_is_array(env, a.argv[4], &is_array) != napi_ok || !is_array) {
    return vk_throw_arg(env, a.fn, a.argv[4], "fds must be an array of file descriptors");
  }
  napi_get_array_length(env, a.argv[4], &nfds);
  if (nfds > VK_MAX_FDS) {
    return vk_throw_arg(env, a.fn, a.argv[4], "fds must hold at most %d file descriptors",
                        VK_MAX_FDS);
  }
  for (uint32_t i = 0; i < nfds; i++) {
    vk_args element = a;
    char name[16];
    snprintf(name, sizeof name, "fds[%u]", i);
    if (napi_get_element(env, a.argv[4], i, &element.argv[0]) != napi_ok) return NULL;
    if (!vk_arg_fd(&element, 0, name, &fds[i])) return NULL;
  }
  if (nfds > 0 && len == 0) {
    /* On a stream socket the kernel drops ancillary data sent with no bytes. */
    return vk_throw_arg(env, a.fn, a.argv[3], "length must be at least 1 when fds are sent");
  }

  struct iovec iov = {.iov_base = len > 0 ? data + off : NULL, .iov_len = len};
  union {
    char buf[CMSG_SPACE(sizeof(int) * VK_MAX_FDS)];
    struct cmsghdr align;
  } control;
  memset(&control, 0, sizeof control);
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
  if (nfds > 0) {
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * nfds);
  }
  ssize_t n;
  do n = sendmsg(fd, &msg, MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return vk_null(env);
    return vk_throw_errno(env, "sendmsg", errno);
  }
  return vk_number(env, (double)n);
}

static void close_all(const int* fds, size_t count) {
  for (size_t i = 0; i < count; i++) close(fds[i]);
}

/** recvmsg(fd, buffer, offset, length): { bytes, fds, fdsTruncated } | null */
static napi_value fn_recvmsg(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  uint8_t* data = NULL;
  size_t buf_len = 0, off = 0, len = 0;
  if (!vk_args_get(env, info, "recvmsg", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  if (!vk_arg_bytes(&a, 1, "buffer", &data, &buf_len)) return NULL;
  /* length >= 1: a return of 0 bytes must mean the peer closed. */
  if (!vk_arg_range(&a, 2, 3, buf_len, 1, &off, &len)) return NULL;

  struct iovec iov = {.iov_base = data + off, .iov_len = len};
  union {
    char buf[CMSG_SPACE(sizeof(int) * VK_SCM_MAX_FD)];
    struct cmsghdr align;
  } control;
  struct msghdr msg = {
      .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
      .msg_controllen = sizeof control.buf};
  ssize_t n;
  do n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return vk_null(env);
    return vk_throw_errno(env, "recvmsg", errno);
  }

  int received[VK_SCM_MAX_FD];
  size_t count = 0;
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const unsigned char* p = CMSG_DATA(c);
    for (size_t j = 0; j < k; j++) {
      int rfd;
      memcpy(&rfd, p + j * sizeof(int), sizeof(int));
      if (count < VK_SCM_MAX_FD) {
        received[count++] = rfd;
      } else {
        close(rfd);
      }
    }
  }
  bool truncated = false;
  if ((msg.msg_flags & MSG_CTRUNC) != 0) {
    /* Some fds were lost in the kernel: the set is incomplete, so keep none. */
    close_all(received, count);
    count = 0;
    truncated = true;
  } else if (count > VK_MAX_FDS) {
    close_all(received + VK_MAX_FDS, count - VK_MAX_FDS);
    count = VK_MAX_FDS;
    truncated = true;
  }

  napi_value result, fds_v;
  if (napi_create_object(env, &result) != napi_ok ||
      napi_create_array_with_length(env, count, &fds_v) != napi_ok) {
    close_all(received, count);
    return vk_napi_failed(env, "recvmsg");
  }
  for (size_t i = 0; i < count; i++) {
    if (napi_set_element(env, fds_v, (uint32_t)i, vk_number(env, received[i])) != napi_ok) {
      close_all(received, count);
      return vk_napi_failed(env, "recvmsg");
    }
  }
  if (napi_set_named_property(env, result, "bytes", vk_number(env, (double)n)) != napi_ok ||
      napi_set_named_property(env, result, "fds", fds_v) != napi_ok ||
      napi_set_named_property(env, result, "fdsTruncated", vk_bool(env, truncated)) != napi_ok) {
    close_all(received, count);
    return vk_napi_failed(env, "recvmsg");
  }
  return result;
}

bool vk_register_socket(napi_env env, napi_value exports) {
  static const vk_fn fns[] = {
      {"unixListen", fn_unix_listen}, {"unixAccept", fn_unix_accept},
      {"unixConnect", fn_unix_connect}, {"socketpair", fn_socketpair},
      {"shutdown", fn_shutdown},      {"sendmsg", fn_sendmsg},
      {"recvmsg", fn_recvmsg},
  };
  return vk_export_fns(env, exports, fns, sizeof fns / sizeof fns[0]);
}
