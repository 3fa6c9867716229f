/*
 * vhostkit native addon: shared declarations.
 *
 * The addon is split by concern: vhostkit.c (module init, per-environment state, teardown),
 * vk_errors.c (errors and argument checks), vk_fd.c (plain fd syscalls), vk_mmap.c (memfd,
 * mmap and the mapping registry), vk_socket.c (Unix sockets, SCM_RIGHTS), vk_watcher.c
 * (FdWatcher), vk_tap.c (TAP devices) and vk_fault.c (SIGBUS in mappings). The typed surface is src/native.ts; keep both in step.
 *
 * Conventions:
 * - Every exported function checks all of its arguments before its first syscall. An argument
 *   error throws code "EINVAL_ARG", errno 0, syscall = the JS function name.
 * - A syscall failure throws code = errno name, errno = number, syscall = syscall name.
 * - There is no mutable global state: everything lives in vk_state, one per napi_env (main
 *   thread and each worker), attached with napi_set_instance_data. The one exception is the
 *   SIGBUS table of vk_fault.c (a signal handler cannot reach per-environment state).
 */
#ifndef VHOSTKIT_VK_H
#define VHOSTKIT_VK_H

#include <node_api.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

/** Most fds sendmsg accepts and recvmsg returns (vhost-user: "at most 8 fds per message"). */
#define VK_MAX_FDS 8

/** Largest integer a JS number holds exactly (Number.MAX_SAFE_INTEGER). */
#define VK_MAX_SAFE_INTEGER 9007199254740991.0

struct vk_mapping;
struct vk_watcher;

/**
 * Per-environment state. It is shared by the JS module instance, every live mapping record and
 * every watcher, and is freed only when all of them are gone (see vk_state_maybe_free).
 */
typedef struct vk_state {
  napi_env env;
  /** set by the async cleanup hook: the environment is shutting down */
  bool teardown;
  /** set by the instance-data finalizer: napi calls on env are no longer allowed */
  bool env_gone;
  /** the async cleanup hook has been removed (or was never added) */
  bool hook_removed;
  napi_async_cleanup_hook_handle cleanup_handle;

  /* ---- mappings (vk_mmap.c) ---- */
  /** mappings that are still mapped and reachable from JS (doubly linked) */
  struct vk_mapping* live_mappings;
  /** mapping records not yet freed (live ones plus those waiting for their finalizer) */
  size_t mapping_records;

  /* ---- watchers (vk_watcher.c) ---- */
  /** epoll instance shared by all watchers of this environment, or -1 before the first one */
  int epfd;
  /** uv_poll_t on epfd, on this environment's loop; NULL before the first watcher / after close */
  uv_poll_t* epoll_handle;
  /** watchers currently started; the uv_poll_t is active (keeps the loop alive) iff > 0 */
  size_t started_watchers;
  /** watcher structs not yet freed (their JS objects may still be alive) */
  size_t watcher_structs;
  /** slot table: epoll events carry (generation << 32 | slot) so a stale event finds nothing */
  struct vk_watcher** slots;
  uint32_t* slot_generation;
  uint32_t slot_count;
  /** called by the teardown once the uv_poll_t is closed */
  void (*teardown_done)(struct vk_state* state);
} vk_state;

/* ---- vhostkit.c ---- */
vk_state* vk_get_state(napi_env env);
void vk_state_maybe_free(vk_state* state);

/* ---- vk_errors.c ---- */
/** Name of an errno value ("EAGAIN", ...), or NULL when the table does not know it. */
const char* vk_errno_name(int err);
/** Throw a syscall error (code = errno name, errno, syscall). Always returns NULL. */
napi_value vk_throw_errno(napi_env env, const char* syscall, int err);
/** Throw a libuv error (status < 0): code = uv_err_name. Always returns NULL. */
napi_value vk_throw_uv(napi_env env, const char* syscall, int status);
/** Create (not throw) a syscall error object; NULL if even that fails. */
napi_value vk_make_errno_error(napi_env env, const char* syscall, int err);
/** Create (not throw) a libuv error object; NULL if that fails. */
napi_value vk_make_uv_error(napi_env env, const char* syscall, int status);
/** Throw an argument error: "<fn>: <what>, got <value>". Always returns NULL. */
napi_value vk_throw_arg(napi_env env, const char* fn, napi_value got, const char* fmt, ...)
    __attribute__((format(printf, 4, 5)));
/** Throw a state error with an errno code but a custom message. Always returns NULL. */
napi_value vk_throw_state(napi_env env, const char* syscall, int err, const char* message);
/** When status is not napi_ok and no exception is pending, throw a generic one. */
napi_value vk_napi_failed(napi_env env, const char* fn);

/* ---- argument checks (vk_errors.c) ---- */
/** Arguments of one call: the function name for errors plus up to 6 values. */
typedef struct vk_args {
  napi_env env;
  const char* fn;
  size_t argc;
  napi_value argv[6];
  napi_value self;
} vk_args;

/** Fetch the arguments of a call. Returns false (exception pending) on failure. */
bool vk_args_get(napi_env env, napi_callback_info info, const char* fn, vk_args* args);
/** argv[i] must be a non-negative int32 fd. */
bool vk_arg_fd(vk_args* a, size_t i, const char* name, int* out);
/** argv[i] must be an integer number in [min, max] (max <= 2^53 - 1). */
bool vk_arg_uint(vk_args* a, size_t i, const char* name, uint64_t min, uint64_t max, uint64_t* out);
/** argv[i] must be a boolean. */
bool vk_arg_bool(vk_args* a, size_t i, const char* name, bool* out);
/** argv[i] must be a function. */
bool vk_arg_function(vk_args* a, size_t i, const char* name);
/** argv[i] must be a Uint8Array (a Buffer is one); returns its data and length. */
bool vk_arg_bytes(vk_args* a, size_t i, const char* name, uint8_t** data, size_t* length);
/**
 * argv[off_i] and argv[len_i] must be non-negative safe integers with off + len <= buf_len and
 * len >= min_len.
 */
bool vk_arg_range(vk_args* a, size_t off_i, size_t len_i, size_t buf_len, size_t min_len,
                  size_t* off, size_t* len);
/**
 * argv[i] must be a string of 1..max_len UTF-8 bytes without NUL; copied into out (which has
 * room for max_len + 1 bytes).
 */
bool vk_arg_string(vk_args* a, size_t i, const char* name, char* out, size_t max_len);

/* ---- helpers to build results ---- */
napi_value vk_number(napi_env env, double value);
napi_value vk_undefined(napi_env env);
napi_value vk_null(napi_env env);
napi_value vk_bool(napi_env env, bool value);
napi_value vk_fd_pair(napi_env env, int a, int b);

/* ---- registration: each file adds its functions to exports ---- */
typedef struct vk_fn {
  const char* name;
  napi_callback cb;
} vk_fn;
bool vk_export_fns(napi_env env, napi_value exports, const vk_fn* fns, size_t count);

bool vk_register_fd(napi_env env, napi_value exports);
bool vk_register_mmap(napi_env env, napi_value exports);
bool vk_register_socket(napi_env env, napi_value exports);
bool vk_register_watcher(napi_env env, napi_value exports);
bool vk_register_tap(napi_env env, napi_value exports);
bool vk_register_fault(napi_env env, napi_value exports);

/* ---- vk_fault.c: SIGBUS in mappings ---- */
/**
 * Enter a mapping in the SIGBUS table. Returns its slot, or -1 when the table is full or the
 * handler could not be installed (a fault in the mapping is then fatal).
 */
int vk_fault_register(void* addr, size_t length, int prot);
/** Remove a mapping from the table (before it is unmapped). Ignores -1. */
void vk_fault_unregister(int slot);
/** Faults survived in a slot and the offset of the first. False for an invalid slot. */
bool vk_fault_info(int slot, uint32_t* faults, size_t* first_offset);

/* ---- teardown hooks ---- */
/** Unmap every live mapping (the environment is gone; no JS can reach them any more). */
void vk_mmap_env_gone(vk_state* state);
/**
 * Close every watcher and the shared epoll handle. Calls done(state) once the uv handle is
 * closed (possibly synchronously when there is none).
 */
void vk_watcher_teardown(vk_state* state, void (*done)(vk_state* state));

#endif
