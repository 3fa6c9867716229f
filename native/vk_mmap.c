/*
 * memfd, ftruncate, fstat, mmap and munmap.
 *
 * mmap returns an external ArrayBuffer over the mapping, type-tagged so munmap can tell its
 * own buffers from others. Each mapping has a record:
 * - while mapped and reachable it is on state->live_mappings (munmap looks it up by address);
 * - munmap(buffer) takes it off that list, detaches the buffer (byteLength 0, so no view can
 *   reach the pages any more), unmaps, and marks it unmapped;
 * - the ArrayBuffer finalizer runs later (after GC, or soon after the detach, or at environment
 *   exit) and unmaps only when the record is not marked unmapped, then frees the record.
 * So each mapping is unmapped exactly once, whichever comes first.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vk.h"

/* Tags buffers made by mmap (a constant, not state). */
static const napi_type_tag kMappingTag = {0x76686f73746b6974ULL, 0x6d6d61702d627566ULL};

/** Longest memfd name Linux accepts (249 bytes plus "memfd:" fits NAME_MAX). */
#define VK_MEMFD_NAME_MAX 249

typedef struct vk_mapping {
  void* addr;
  size_t length;
  vk_state* state;
  bool unmapped;
  /** on state->live_mappings */
  bool linked;
  /** napi_create_external_arraybuffer has not returned yet */
  bool creating;
  /** the finalizer ran while creating (buffer creation failed) */
  bool finalized_early;
  /** slot in the SIGBUS table (vk_fault.c), or -1 */
  int fault_slot;
  struct vk_mapping* prev;
  struct vk_mapping* next;
} vk_mapping;

static void mapping_link(vk_mapping* m) {
  vk_state* state = m->state;
  m->prev = NULL;
  m->next = state->live_mappings;
  if (m->next != NULL) m->next->prev = m;
  state->live_mappings = m;
  m->linked = true;
}

static void mapping_unlink(vk_mapping* m) {
  if (!m->linked) return;
  if (m->prev != NULL) {
    m->prev->next = m->next;
  } else {
    m->state->live_mappings = m->next;
  }
  if (m->next != NULL) m->next->prev = m->prev;
  m->prev = m->next = NULL;
  m->linked = false;
}

static void mapping_release(vk_mapping* m) {
  if (!m->unmapped) {
    vk_fault_unregister(m->fault_slot);
    m->fault_slot = -1;
    munmap(m->addr, m->length);
    m->unmapped = true;
  }
}

/* ArrayBuffer finalizer: runs on the JS thread, after GC or detach, or at environment exit. */
static void mapping_finalize(napi_env env, void* data, void* hint) {
  vk_mapping* m = (vk_mapping*)hint;
  mapping_release(m);
  mapping_unlink(m);
  if (m->creating) {
    /* Buffer creation failed and Node released the memory at once: fn_mmap frees m. */
    m->finalized_early = true;
    return;
  }
  vk_state* state = m->state;
  free(m);
  state->mapping_records--;
  vk_state_maybe_free(state);
}

void vk_mmap_env_gone(vk_state* state) {
  /* No JS can run any more in this environment: unmap what is left. The records stay until
   * their finalizers run (if they ever do), which then find them unmapped. */
  while (state->live_mappings != NULL) {
    vk_mapping* m = state->live_mappings;
    mapping_release(m);
    mapping_unlink(m);
  }
}

/**
 * Wrap a fresh mapping in a tagged external ArrayBuffer and record it (see the file comment).
 * On failure the mapping is released (unmapped, its fault slot unregistered) and an error thrown.
 */
static napi_value mapping_wrap(napi_env env, vk_state* state, const char* fn, void* addr,
                               size_t length, int fault_slot) {
  vk_mapping* m = calloc(1, sizeof *m);
  if (m == NULL) {
    vk_fault_unregister(fault_slot);
    munmap(addr, length);
    return vk_throw_errno(env, fn, ENOMEM);
  }
  m->addr = addr;
  m->length = length;
  m->fault_slot = fault_slot;
  m->state = state;
  m->creating = true;
  state->mapping_records++;

  napi_value buffer = NULL;
  napi_status status =
      napi_create_external_arraybuffer(env, addr, length, mapping_finalize, m, &buffer);
  m->creating = false;
  if (status != napi_ok) {
    /* Node may already have called the finalizer (e.g. length above its buffer limit). If it
     * has not, it may still run later: unmap now and leave the record to it. */
    mapping_release(m);
    if (m->finalized_early) {
      free(m);
      state->mapping_records--;
    }
    bool pending = false;
    napi_is_exception_pending(env, &pending);
    if (pending) {
      napi_value ignored;
      napi_get_and_clear_last_exception(env, &ignored);
    }
    char message[160];
    snprintf(message, sizeof message,
             "%s failed: ENOMEM (Node cannot make an ArrayBuffer of %llu bytes)", fn,
             (unsigned long long)length);
    return vk_throw_state(env, fn, ENOMEM, message);
  }
  mapping_link(m);
  if (napi_type_tag_object(env, buffer, &kMappingTag) != napi_ok) {
    /* The buffer still owns the mapping; its finalizer unmaps it. */
    return vk_napi_failed(env, fn);
  }
  return buffer;
}

/** memfdCreate(name): number */
static napi_value fn_memfd_create(napi_env env, napi_callback_info info) {
  vk_args a;
  char name[VK_MEMFD_NAME_MAX + 1];
  if (!vk_args_get(env, info, "memfdCreate", &a)) return NULL;
  if (!vk_arg_string(&a, 0, "name", name, VK_MEMFD_NAME_MAX)) return NULL;
  int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return vk_throw_errno(env, "memfd_create", errno);
  return vk_number(env, fd);
}

/** ftruncate(fd, size): void */
static napi_value fn_ftruncate(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  uint64_t size = 0;
  if (!vk_args_get(env, info, "ftruncate", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  if (!vk_arg_uint(&a, 1, "size", 0, (uint64_t)VK_MAX_SAFE_INTEGER, &size)) return NULL;
  int r;
  do r = ftruncate(fd, (off_t)size);
  while (r < 0 && errno == EINTR);
  if (r < 0) return vk_throw_errno(env, "ftruncate", errno);
  return vk_undefined(env);
}

/** fstatSize(fd): number */
static napi_value fn_fstat_size(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  if (!vk_args_get(env, info, "fstatSize", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  struct stat st;
  if (fstat(fd, &st) < 0) return vk_throw_errno(env, "fstat", errno);
  if ((double)st.st_size > VK_MAX_SAFE_INTEGER) return vk_throw_errno(env, "fstat", EOVERFLOW);
  return vk_number(env, (double)st.st_size);
}

/** mmap(fd, offset, length, writable): ArrayBuffer */
static napi_value fn_mmap(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  uint64_t offset = 0, length = 0;
  bool writable = false;
  if (!vk_args_get(env, info, "mmap", &a)) return NULL;
  vk_state* state = vk_get_state(env);
  if (state == NULL) return vk_napi_failed(env, "mmap");
  long page = sysconf(_SC_PAGESIZE);
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  if (!vk_arg_uint(&a, 1, "offset", 0, (uint64_t)VK_MAX_SAFE_INTEGER, &offset)) return NULL;
  if (offset % (uint64_t)page != 0) {
    return vk_throw_arg(env, a.fn, a.argv[1], "offset must be a multiple of the page size %ld",
                        page);
  }
  if (!vk_arg_uint(&a, 2, "length", 1, (uint64_t)VK_MAX_SAFE_INTEGER, &length)) return NULL;
  if (!vk_arg_bool(&a, 3, "writable", &writable)) return NULL;
  /* A read-only mapping is still exposed as a plain ArrayBuffer: writing to it from JS faults
   * (SIGSEGV). Callers map read-only only what they never write. */
  int prot = PROT_READ | (writable ? PROT_WRITE : 0);
  void* addr = mmap(NULL, (size_t)length, prot, MAP_SHARED, fd, (off_t)offset);
  if (addr == MAP_FAILED) return vk_throw_errno(env, "mmap", errno);
  /* A fault beyond the end of the file (the front-end shrank it) is survived, see vk_fault.c */
  return mapping_wrap(env, state, "mmap", addr, (size_t)length,
                      vk_fault_register(addr, (size_t)length, prot));
}

/**
 * mapAnonymous(length, hugePages): ArrayBuffer. A private zero-filled mapping (MAP_NORESERVE):
 * it holds memory only where it is written. With hugePages, madvise(MADV_HUGEPAGE) asks for
 * transparent huge pages (512 times fewer page faults; ignored where THP is off).
 */
static napi_value fn_map_anonymous(napi_env env, napi_callback_info info) {
  vk_args a;
  uint64_t length = 0;
  bool huge = false;
  if (!vk_args_get(env, info, "mapAnonymous", &a)) return NULL;
  vk_state* state = vk_get_state(env);
  if (state == NULL) return vk_napi_failed(env, "mapAnonymous");
  if (!vk_arg_uint(&a, 0, "length", 1, (uint64_t)VK_MAX_SAFE_INTEGER, &length)) return NULL;
  if (!vk_arg_bool(&a, 1, "hugePages", &huge)) return NULL;
  void* addr = mmap(NULL, (size_t)length, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (addr == MAP_FAILED) return vk_throw_errno(env, "mmap", errno);
  /* Advice only: a kernel without THP refuses it (EINVAL) and the mapping works as before. */
  if (huge) (void)madvise(addr, (size_t)length, MADV_HUGEPAGE);
  return mapping_wrap(env, state, "mapAnonymous", addr, (size_t)length, -1);
}

/** munmap(buffer): void. Idempotent. */
static napi_value fn_munmap(napi_env env, napi_callback_info info) {
  vk_args a;
  if (!vk_args_get(env, info, "munmap", &a)) return NULL;
  vk_state* state = vk_get_state(env);
  if (state == NULL) return vk_napi_failed(env, "munmap");
  bool is = false, tagged = false;
  if (napi_is_arraybuffer(env, a.argv[0], &is) != napi_ok || !is) {
    return vk_throw_arg(env, a.fn, a.argv[0], "buffer must be an ArrayBuffer returned by mmap");
  }
  if (napi_check_object_type_tag(env, a.argv[0], &kMappingTag, &tagged) != napi_ok || !tagged) {
    return vk_throw_arg(env, a.fn, a.argv[0], "buffer must be an ArrayBuffer returned by mmap");
  }
  bool detached = false;
  if (napi_is_detached_arraybuffer(env, a.argv[0], &detached) != napi_ok) {
    return vk_napi_failed(env, "munmap");
  }
  if (detached) return vk_undefined(env);
  void* data = NULL;
  size_t length = 0;
  if (napi_get_arraybuffer_info(env, a.argv[0], &data, &length) != napi_ok) {
    return vk_napi_failed(env, "munmap");
  }
  vk_mapping* m = state->live_mappings;
  while (m != NULL && m->addr != data) m = m->next;
  // LIFETIME: detach before unmapping, so that no JS view can reach the pages after munmap.
  if (napi_detach_arraybuffer(env, a.argv[0]) != napi_ok) return vk_napi_failed(env, "munmap");
  if (m == NULL) return vk_undefined(env); /* already unmapped at environment exit */
  mapping_unlink(m);
  vk_fault_unregister(m->fault_slot);
  m->fault_slot = -1;
  if (munmap(m->addr, m->length) < 0) {
    /* The finalizer retries, since m->unmapped stays false. */
    return vk_throw_errno(env, "munmap", errno);
  }
  m->unmapped = true;
  return vk_undefined(env);
}

/** mappingFault(buffer): {faults, offset} | null. Faults survived in a mapping made by mmap. */
static napi_value fn_mapping_fault(napi_env env, napi_callback_info info) {
  vk_args a;
  if (!vk_args_get(env, info, "mappingFault", &a)) return NULL;
  vk_state* state = vk_get_state(env);
  if (state == NULL) return vk_napi_failed(env, "mappingFault");
  bool is = false, tagged = false;
  if (napi_is_arraybuffer(env, a.argv[0], &is) != napi_ok || !is ||
      napi_check_object_type_tag(env, a.argv[0], &kMappingTag, &tagged) != napi_ok || !tagged) {
    return vk_throw_arg(env, a.fn, a.argv[0], "buffer must be an ArrayBuffer returned by mmap");
  }
  void* data = NULL;
  size_t length = 0;
  if (napi_get_arraybuffer_info(env, a.argv[0], &data, &length) != napi_ok) {
    return vk_napi_failed(env, "mappingFault");
  }
  vk_mapping* m = state->live_mappings;
  while (m != NULL && (m->addr != data || length == 0)) m = m->next;
  uint32_t faults = 0;
  size_t offset = 0;
  if (m == NULL || !vk_fault_info(m->fault_slot, &faults, &offset) || faults == 0) {
    return vk_null(env);
  }
  napi_value result;
  if (napi_create_object(env, &result) != napi_ok ||
      napi_set_named_property(env, result, "faults", vk_number(env, faults)) != napi_ok ||
      napi_set_named_property(env, result, "offset", vk_number(env, (double)offset)) != napi_ok) {
    return vk_napi_failed(env, "mappingFault");
  }
  return result;
}

bool vk_register_mmap(napi_env env, napi_value exports) {
  static const vk_fn fns[] = {
      {"memfdCreate", fn_memfd_create}, {"ftruncate", fn_ftruncate}, {"fstatSize", fn_fstat_size},
      {"mmap", fn_mmap},                {"munmap", fn_munmap},
      {"mappingFault", fn_mapping_fault}, {"mapAnonymous", fn_map_anonymous},
  };
  return vk_export_fns(env, exports, fns, sizeof fns / sizeof fns[0]);
}
