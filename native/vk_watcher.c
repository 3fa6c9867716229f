/*
 * FdWatcher: fd readiness on the calling environment's own event loop.
 *
 * Design. libuv aborts the process (uv__io_poll: epoll_ctl fails, then abort()) when a
 * uv_poll_t is started on an fd that is closed before the loop next polls, e.g.
 * `w.start(POLL_READABLE); native.close(fd)` in one tick. So watchers do not each own a
 * uv_poll_t. Each environment has one epoll instance; every watcher registers its fd there
 * with epoll_ctl directly (errors are thrown synchronously), and one heap-allocated uv_poll_t
 * on napi_get_uv_event_loop(env) watches the epoll fd. That handle is active only while at
 * least one watcher is started, so watchers keep the loop alive only while started.
 *
 * - Registrations use EPOLLONESHOT and are re-armed after each delivery. An fd closed while
 *   watched then either vanishes from the epoll set (nothing is reported) or, if its file
 *   lives on elsewhere, fires once and fails to re-arm: the callback gets that error.
 * - epoll events carry (generation << 32 | slot), never a pointer: an event for a watcher
 *   closed earlier in the same batch finds an empty or reused slot and is dropped.
 * - A started watcher holds a strong reference to its JS object (so it is not collected while
 *   it can fire); stop() and close() release it. A collected watcher is closed by its
 *   finalizer. At environment exit the async cleanup hook closes all watchers and the handle.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "vk.h"

#define VK_POLL_READABLE 1
#define VK_POLL_WRITABLE 2
#define VK_EPOLL_BATCH 64

/* Tags FdWatcher instances, so methods reject foreign receivers (a constant, not state). */
static const napi_type_tag kWatcherTag = {0x76686f73746b6974ULL, 0x6664776174636872ULL};

typedef struct vk_watcher {
  vk_state* state;
  int fd;
  /** slot in state->slots, and the id carried by epoll events; valid while !closed */
  uint32_t slot;
  uint64_t id;
  /** POLL_* events requested by start() */
  int events;
  bool started;
  /** the fd is in the epoll set (as far as we know) */
  bool registered;
  /** the one-shot registration is armed */
  bool armed;
  bool closed;
  napi_ref callback;
  /** weak while stopped, strong while started */
  napi_ref self;
  napi_async_context async_context;
} vk_watcher;

/* ---------------------------------------------------------------------------------------- */
/* Slot table                                                                               */

static bool slot_alloc(vk_state* state, vk_watcher* w) {
  for (uint32_t i = 0; i < state->slot_count; i++) {
    if (state->slots[i] == NULL) {
      state->slots[i] = w;
      state->slot_generation[i]++;
      w->slot = i;
      w->id = ((uint64_t)state->slot_generation[i] << 32) | i;
      return true;
    }
  }
  uint32_t count = state->slot_count == 0 ? 16 : state->slot_count * 2;
  vk_watcher** slots = realloc(state->slots, count * sizeof *slots);
  if (slots == NULL) return false;
  state->slots = slots;
  uint32_t* gens = realloc(state->slot_generation, count * sizeof *gens);
  if (gens == NULL) return false;
  state->slot_generation = gens;
  for (uint32_t i = state->slot_count; i < count; i++) {
    slots[i] = NULL;
    gens[i] = 0;
  }
  state->slot_count = count;
  return slot_alloc(state, w);
}

static vk_watcher* slot_lookup(vk_state* state, uint64_t id) {
  uint32_t slot = (uint32_t)id;
  if (slot >= state->slot_count) return NULL;
  if (state->slot_generation[slot] != (uint32_t)(id >> 32)) return NULL;
  return state->slots[slot];
}

/* ---------------------------------------------------------------------------------------- */
/* Shared epoll handle                                                                      */

static void on_epoll_ready(uv_poll_t* handle, int status, int events);

static int epoll_handle_ensure(vk_state* state, napi_env env) {
  if (state->epoll_handle != NULL) return 0;
  uv_loop_t* loop = NULL;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) return -EINVAL;
  int epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) return -errno;
  uv_poll_t* handle = calloc(1, sizeof *handle);
  if (handle == NULL) {
    close(epfd);
    return -ENOMEM;
  }
  int r = uv_poll_init(loop, handle, epfd);
  if (r < 0) {
    free(handle);
    close(epfd);
    return r;
  }
  handle->data = state;
  state->epfd = epfd;
  state->epoll_handle = handle;
  return 0;
}

static void epoll_handle_update(vk_state* state) {
  if (state->epoll_handle == NULL || state->teardown) return;
  if (state->started_watchers > 0) {
    /* Cannot fail: the epoll fd is ours and open. */
    uv_poll_start(state->epoll_handle, UV_READABLE, on_epoll_ready);
  } else {
    uv_poll_stop(state->epoll_handle);
  }
}

/* ---------------------------------------------------------------------------------------- */
/* Watcher state changes (no JS calls; safe from finalizers)                                */

static uint32_t to_epoll(int events) {
  uint32_t e = EPOLLONESHOT;
  if (events & VK_POLL_READABLE) e |= EPOLLIN | EPOLLRDHUP;
  if (events & VK_POLL_WRITABLE) e |= EPOLLOUT;
  return e;
}

/* Arms (or re-arms) the registration. Returns 0 or an errno. */
static int watcher_arm(vk_watcher* w) {
  vk_state* state = w->state;
  struct epoll_event ev;
  memset(&ev, 0, sizeof ev);
  ev.events = to_epoll(w->events);
  ev.data.u64 = w->id;
  if (w->registered) {
    if (epoll_ctl(state->epfd, EPOLL_CTL_MOD, w->fd, &ev) == 0) {
      w->armed = true;
      return 0;
    }
    if (errno != ENOENT) return errno;
    /* The fd was closed and its number reused: register the new file. */
    w->registered = false;
  }
  if (epoll_ctl(state->epfd, EPOLL_CTL_ADD, w->fd, &ev) < 0) return errno;
  /* Other watchers that believed they had this fd number registered held a stale entry (their
   * file is gone, or ADD would have failed with EEXIST): they must not delete ours. */
  for (uint32_t i = 0; i < state->slot_count; i++) {
    vk_watcher* other = state->slots[i];
    if (other != NULL && other != w && other->fd == w->fd && other->registered) {
      other->registered = false;
      other->armed = false;
    }
  }
  w->registered = true;
  w->armed = true;
  return 0;
}

static void watcher_unregister(vk_watcher* w) {
  if (w->registered) {
    /* EBADF/ENOENT mean the fd was closed under us: the entry is gone or unreachable. */
    epoll_ctl(w->state->epfd, EPOLL_CTL_DEL, w->fd, NULL);
    w->registered = false;
  }
  w->armed = false;
}

/* Stops the watcher. js: napi calls allowed (false in finalizers after env teardown). */
static void watcher_stop(vk_watcher* w, bool js) {
  watcher_unregister(w);
  if (w->started) {
    w->started = false;
    if (js && w->self != NULL) napi_reference_unref(w->state->env, w->self, NULL);
    w->state->started_watchers--;
    epoll_handle_update(w->state);
  }
}

static void watcher_close(vk_watcher* w, bool js) {
  if (w->closed) return;
  watcher_stop(w, js);
  vk_state* state = w->state;
  state->slots[w->slot] = NULL;
  w->closed = true;
  if (js) {
    if (w->callback != NULL) napi_delete_reference(state->env, w->callback);
    if (w->async_context != NULL) napi_async_destroy(state->env, w->async_context);
  }
  w->callback = NULL;
  w->async_context = NULL;
}

static void watcher_finalize(napi_env env, void* data, void* hint) {
  vk_watcher* w = (vk_watcher*)data;
  vk_state* state = w->state;
  bool js = !state->env_gone;
  watcher_close(w, js);
  if (js && w->self != NULL) napi_delete_reference(env, w->self);
  w->self = NULL;
  free(w);
  state->watcher_structs--;
  vk_state_maybe_free(state);
}

/* ---------------------------------------------------------------------------------------- */
/* Dispatch                                                                                 */

static void call_back(vk_watcher* w, int events, napi_value error) {
  napi_env env = w->state->env;
  napi_value self, callback, argv[2];
  if (w->callback == NULL || w->self == NULL) return;
  if (napi_get_reference_value(env, w->self, &self) != napi_ok || self == NULL) return;
  if (napi_get_reference_value(env, w->callback, &callback) != napi_ok || callback == NULL) {
    return;
  }
  argv[0] = vk_number(env, events);
  argv[1] = error != NULL ? error : vk_null(env);
  napi_status status = napi_make_callback(env, w->async_context, self, callback, 2, argv, NULL);
  if (status == napi_pending_exception) {
    napi_value exception;
    if (napi_get_and_clear_last_exception(env, &exception) == napi_ok) {
      /* Reported like any uncaught exception ('uncaughtException', or exit). */
      napi_fatal_exception(env, exception);
    }
  }
}

static int ready_events(const vk_watcher* w, uint32_t e) {
  int ready = 0;
  /* Errors and hang-ups count as ready for whatever is watched: the next read or write
   * reports what happened (0 bytes, EPIPE, ECONNRESET, ...). */
  if ((w->events & VK_POLL_READABLE) && (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
    ready |= VK_POLL_READABLE;
  }
  if ((w->events & VK_POLL_WRITABLE) && (e & (EPOLLOUT | EPOLLHUP | EPOLLERR))) {
    ready |= VK_POLL_WRITABLE;
  }
  return ready;
}

static void dispatch_one(vk_state* state, uint64_t id, uint32_t e) {
  vk_watcher* w = slot_lookup(state, id);
  if (w == NULL || !w->started) return;
  w->armed = false; /* EPOLLONESHOT disarmed it */
  int ready = ready_events(w, e);
  napi_env env = state->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  if (ready != 0) call_back(w, ready, NULL);
  /* The callback may have stopped, restarted (re-armed) or closed the watcher. The struct is
   * still valid: it is freed only by the finalizer, never while its callback runs. */
  if (w->started && !w->closed && !w->armed) {
    int err = watcher_arm(w);
    if (err != 0) {
      watcher_stop(w, true);
      napi_value error = vk_make_errno_error(env, "epoll_ctl", err);
      if (error != NULL) call_back(w, 0, error);
    }
  }
  napi_close_handle_scope(env, scope);
}

static void on_epoll_ready(uv_poll_t* handle, int status, int events) {
  vk_state* state = (vk_state*)handle->data;
  if (state->teardown) return;
  napi_env env = state->env;
  if (status < 0) {
    /* The epoll fd itself failed (not expected): every started watcher gets the error. */
    for (uint32_t i = 0; i < state->slot_count; i++) {
      vk_watcher* w = state->slots[i];
      if (w == NULL || !w->started) continue;
      napi_handle_scope scope;
      if (napi_open_handle_scope(env, &scope) != napi_ok) return;
      watcher_stop(w, true);
      napi_value error = vk_make_uv_error(env, "uv_poll", status);
      if (error != NULL) call_back(w, 0, error);
      napi_close_handle_scope(env, scope);
    }
    return;
  }
  struct epoll_event batch[VK_EPOLL_BATCH];
  int n;
  do n = epoll_wait(state->epfd, batch, VK_EPOLL_BATCH, 0);
  while (n < 0 && errno == EINTR);
  /* More than a batch pending: the level-triggered uv_poll_t fires again next iteration. */
  for (int i = 0; i < n && !state->teardown; i++) {
    dispatch_one(state, batch[i].data.u64, batch[i].events);
  }
}

/* ---------------------------------------------------------------------------------------- */
/* JS methods                                                                               */

static vk_watcher* unwrap(vk_args* a) {
  bool tagged = false;
  void* data = NULL;
  if (a->self == NULL || napi_check_object_type_tag(a->env, a->self, &kWatcherTag, &tagged) !=
                             napi_ok ||
      !tagged || napi_unwrap(a->env, a->self, &data) != napi_ok || data == NULL) {
    vk_throw_arg(a->env, a->fn, a->self, "this must be an FdWatcher");
    return NULL;
  }
  return (vk_watcher*)data;
}

/** new FdWatcher(fd, callback) */
static napi_value fn_watcher_new(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  napi_value new_target = NULL;
  if (!vk_args_get(env, info, "FdWatcher", &a)) return NULL;
  if (napi_get_new_target(env, info, &new_target) != napi_ok || new_target == NULL) {
    return vk_throw_arg(env, a.fn, a.self, "FdWatcher must be called with new");
  }
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  if (!vk_arg_function(&a, 1, "callback")) return NULL;
  vk_state* state = vk_get_state(env);
  if (state == NULL) return vk_napi_failed(env, "FdWatcher");
  if (state->teardown) {
    return vk_throw_state(env, "FdWatcher", ECANCELED,
                          "FdWatcher failed: ECANCELED (the environment is shutting down)");
  }
  /* Fail early on a closed fd; epoll_ctl in start() reports the rest (e.g. EPERM: regular
   * files cannot be polled). */
  if (fcntl(fd, F_GETFD) < 0) return vk_throw_errno(env, "fcntl", errno);
  int r = epoll_handle_ensure(state, env);
  if (r < 0) return vk_throw_uv(env, "uv_poll_init", r);

  vk_watcher* w = calloc(1, sizeof *w);
  if (w == NULL) return vk_throw_errno(env, "FdWatcher", ENOMEM);
  w->state = state;
  w->fd = fd;
  if (!slot_alloc(state, w)) {
    free(w);
    return vk_throw_errno(env, "FdWatcher", ENOMEM);
  }
  napi_value name;
  if (napi_wrap(env, a.self, w, watcher_finalize, NULL, NULL) != napi_ok) {
    state->slots[w->slot] = NULL;
    free(w);
    return vk_napi_failed(env, "FdWatcher");
  }
  /* From here on the finalizer owns w. */
  state->watcher_structs++;
  if (napi_type_tag_object(env, a.self, &kWatcherTag) != napi_ok ||
      napi_create_reference(env, a.argv[1], 1, &w->callback) != napi_ok ||
      napi_create_reference(env, a.self, 0, &w->self) != napi_ok ||
      napi_create_string_utf8(env, "vhostkit.FdWatcher", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_async_init(env, a.self, name, &w->async_context) != napi_ok) {
    watcher_close(w, true);
    return vk_napi_failed(env, "FdWatcher");
  }
  return a.self;
}

/** start(events): void */
static napi_value fn_watcher_start(napi_env env, napi_callback_info info) {
  vk_args a;
  uint64_t events = 0;
  if (!vk_args_get(env, info, "FdWatcher.start", &a)) return NULL;
  vk_watcher* w = unwrap(&a);
  if (w == NULL) return NULL;
  if (!vk_arg_uint(&a, 0, "events", 1, VK_POLL_READABLE | VK_POLL_WRITABLE, &events)) {
    return NULL;
  }
  if (w->closed) {
    return vk_throw_state(env, "FdWatcher.start", EBADF,
                          "FdWatcher.start failed: EBADF (the watcher is closed)");
  }
  if (w->state->teardown) {
    return vk_throw_state(env, "FdWatcher.start", ECANCELED,
                          "FdWatcher.start failed: ECANCELED (the environment is shutting down)");
  }
  if (w->started && w->armed && w->events == (int)events) return vk_undefined(env);
  int previous = w->events;
  w->events = (int)events;
  int err = watcher_arm(w);
  if (err != 0) {
    w->events = previous;
    /* An armed registration with the old events may be gone now: stop cleanly. */
    watcher_stop(w, true);
    return vk_throw_errno(env, "epoll_ctl", err);
  }
  if (!w->started) {
    w->started = true;
    napi_reference_ref(env, w->self, NULL);
    w->state->started_watchers++;
    epoll_handle_update(w->state);
  }
  return vk_undefined(env);
}

/** stop(): void */
static napi_value fn_watcher_stop(napi_env env, napi_callback_info info) {
  vk_args a;
  if (!vk_args_get(env, info, "FdWatcher.stop", &a)) return NULL;
  vk_watcher* w = unwrap(&a);
  if (w == NULL) return NULL;
  if (!w->closed) watcher_stop(w, true);
  return vk_undefined(env);
}

/** close(): void. Idempotent. */
static napi_value fn_watcher_close(napi_env env, napi_callback_info info) {
  vk_args a;
  if (!vk_args_get(env, info, "FdWatcher.close", &a)) return NULL;
  vk_watcher* w = unwrap(&a);
  if (w == NULL) return NULL;
  watcher_close(w, true);
  return vk_undefined(env);
}

/* ---------------------------------------------------------------------------------------- */

static void on_teardown_closed(uv_handle_t* handle) {
  vk_state* state = (vk_state*)handle->data;
  free(handle);
  close(state->epfd);
  state->epfd = -1;
  state->epoll_handle = NULL;
  state->teardown_done(state);
}

void vk_watcher_teardown(vk_state* state, void (*done)(vk_state* state)) {
  for (uint32_t i = 0; i < state->slot_count; i++) {
    if (state->slots[i] != NULL) watcher_close(state->slots[i], true);
  }
  if (state->epoll_handle == NULL) {
    done(state);
    return;
  }
  state->teardown_done = done;
  uv_poll_stop(state->epoll_handle);
  uv_close((uv_handle_t*)state->epoll_handle, on_teardown_closed);
}

bool vk_register_watcher(napi_env env, napi_value exports) {
  napi_property_descriptor methods[] = {
      {"start", NULL, fn_watcher_start, NULL, NULL, NULL, napi_default_method, NULL},
      {"stop", NULL, fn_watcher_stop, NULL, NULL, NULL, napi_default_method, NULL},
      {"close", NULL, fn_watcher_close, NULL, NULL, NULL, napi_default_method, NULL},
  };
  napi_value ctor;
  if (napi_define_class(env, "FdWatcher", NAPI_AUTO_LENGTH, fn_watcher_new, NULL,
                        sizeof methods / sizeof methods[0], methods, &ctor) != napi_ok) {
    return false;
  }
  return napi_set_named_property(env, exports, "FdWatcher", ctor) == napi_ok;
}
