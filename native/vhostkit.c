/*
 * vhostkit native addon: module init, per-environment state and teardown.
 *
 * Lifetime of vk_state (one per napi_env: the main thread and each worker):
 * - created in Init and attached with napi_set_instance_data;
 * - at environment exit the async cleanup hook closes every watcher and the shared epoll
 *   uv_poll_t; the hook is removed once libuv has run the handle's close callback (the hook
 *   keeps the environment, and so its loop, alive until then);
 * - the instance-data finalizer marks the environment gone and unmaps what is still mapped;
 * - the struct is freed by whichever of those, or of the mapping and watcher finalizers, comes
 *   last (vk_state_maybe_free).
 */
#include <stdlib.h>

#include "vk.h"

vk_state* vk_get_state(napi_env env) {
  void* data = NULL;
  if (napi_get_instance_data(env, &data) != napi_ok) return NULL;
  return (vk_state*)data;
}

void vk_state_maybe_free(vk_state* state) {
  if (state->env_gone && state->hook_removed && state->mapping_records == 0 &&
      state->watcher_structs == 0 && state->epoll_handle == NULL) {
    free(state->slots);
    free(state->slot_generation);
    free(state);
  }
}

static void on_watchers_closed(vk_state* state) {
  if (!state->hook_removed) {
    state->hook_removed = true;
    napi_remove_async_cleanup_hook(state->cleanup_handle);
  }
  vk_state_maybe_free(state);
}

static void on_env_cleanup(napi_async_cleanup_hook_handle handle, void* arg) {
  vk_state* state = (vk_state*)arg;
  state->teardown = true;
  state->cleanup_handle = handle;
  vk_watcher_teardown(state, on_watchers_closed);
}

static void on_instance_finalize(napi_env env, void* data, void* hint) {
  vk_state* state = (vk_state*)data;
  state->env_gone = true;
  vk_mmap_env_gone(state);
  vk_state_maybe_free(state);
}

static napi_value Init(napi_env env, napi_value exports) {
  vk_state* state = calloc(1, sizeof *state);
  if (state == NULL) {
    napi_throw_error(env, "ENOMEM", "vhostkit: cannot allocate the addon state");
    return NULL;
  }
  state->env = env;
  state->epfd = -1;
  if (napi_set_instance_data(env, state, on_instance_finalize, NULL) != napi_ok) {
    free(state);
    return vk_napi_failed(env, "vhostkit init");
  }
  /* From here on the instance-data finalizer owns state. */
  if (napi_add_async_cleanup_hook(env, on_env_cleanup, state, &state->cleanup_handle) !=
      napi_ok) {
    state->hook_removed = true;
    return vk_napi_failed(env, "vhostkit init");
  }
  if (!vk_register_fd(env, exports) || !vk_register_mmap(env, exports) ||
      !vk_register_socket(env, exports) || !vk_register_watcher(env, exports) ||
      !vk_register_tap(env, exports) || !vk_register_fault(env, exports)) {
    return vk_napi_failed(env, "vhostkit init");
  }
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
