/*
 * SIGBUS in shared mappings: survive a fault inside a mapping made by mmap(), die on any other.
 *
 * A front-end owns the files behind guest memory and the dirty log. When it shrinks one after
 * vhostkit mapped it (ftruncate), the next access to a page beyond the new end of file raises
 * SIGBUS, and size checks made at map time cannot prevent that. So every mapping made by
 * fn_mmap is entered in a process-wide table, and the SIGBUS handler, for a fault inside one of
 * them:
 * - maps anonymous zero memory MAP_FIXED over the faulting page (same protection), so the
 *   faulting instruction runs again and reads zeros (or writes to a private page);
 * - counts the fault on the mapping and remembers the offset of the first one;
 * - writes 1 to every subscriber eventfd (faultSubscribe), so the owners of mappings learn that
 *   something faulted and can ask mappingFault(buffer) which mapping it was.
 * A SIGBUS anywhere else (or sent by kill) restores the handler that was there before (by
 * default SIG_DFL) and lets the fault happen again: the process dies as it did before.
 *
 * Process-wide state: a signal handler cannot find per-environment state (it runs on whatever
 * thread faulted), so the table lives here, not in vk_state. It is the only mutable global
 * state of the addon. Writers (mmap, munmap, subscribe) take g_lock; the handler never locks:
 * it reads the atomics and announces itself in g_in_handler, and a writer that removes an entry
 * waits until no handler runs before the memory or fd behind it goes away.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vk.h"

/** Mappings the handler can protect at once (guest regions, logs, inflight areas). */
#define VK_FAULT_SLOTS 16384
/** Subscriber eventfds (one per connection that owns mappings). */
#define VK_FAULT_SUBSCRIBERS 4096

typedef struct vk_fault_slot {
  _Atomic uintptr_t start;
  /** 0 = free; set last on registration, cleared first on removal */
  _Atomic size_t length;
  _Atomic int prot;
  _Atomic uint32_t faults;
  /** offset of the first fault + 1, or 0 */
  _Atomic size_t first_offset;
} vk_fault_slot;

static vk_fault_slot g_slots[VK_FAULT_SLOTS];
/** one past the highest slot ever used: the handler scans [0, g_slot_high) */
static _Atomic uint32_t g_slot_high;
static _Atomic int g_subscribers[VK_FAULT_SUBSCRIBERS];
static _Atomic uint32_t g_subscriber_high;
/** faults survived since the process started */
static _Atomic uint64_t g_faults_total;
static _Atomic int g_in_handler;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static struct sigaction g_previous;
static bool g_installed;
static long g_page_size;

static void restore_previous(void) { sigaction(SIGBUS, &g_previous, NULL); }

static void on_sigbus(int sig, siginfo_t* info, void* context) {
  int saved_errno = errno;
  atomic_fetch_add(&g_in_handler, 1);
  bool handled = false;
  if (info != NULL && info->si_code > 0) {
    uintptr_t addr = (uintptr_t)info->si_addr;
    uint32_t high = atomic_load(&g_slot_high);
    for (uint32_t i = 0; i < high && !handled; i++) {
      vk_fault_slot* s = &g_slots[i];
      size_t length = atomic_load(&s->length);
      if (length == 0) continue;
      uintptr_t start = atomic_load(&s->start);
      if (addr < start || addr - start >= length) continue;
      uintptr_t page = addr & ~((uintptr_t)g_page_size - 1);
      void* r = mmap((void*)page, (size_t)g_page_size, atomic_load(&s->prot),
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
      if (r == MAP_FAILED) break;
      atomic_fetch_add(&s->faults, 1);
      size_t none = 0;
      atomic_compare_exchange_strong(&s->first_offset, &none, (size_t)(addr - start) + 1);
      atomic_fetch_add(&g_faults_total, 1);
      uint32_t subs = atomic_load(&g_subscriber_high);
      for (uint32_t k = 0; k < subs; k++) {
        int fd = atomic_load(&g_subscribers[k]);
        if (fd < 0) continue;
        uint64_t one = 1;
        ssize_t n = write(fd, &one, sizeof one); /* async-signal-safe; EAGAIN when full is fine */
        (void)n;
      }
      handled = true;
    }
  }
  atomic_fetch_sub(&g_in_handler, 1);
  errno = saved_errno;
  if (handled) return;
  /* Not ours: behave as if this handler were not there. */
  if ((g_previous.sa_flags & SA_SIGINFO) && g_previous.sa_sigaction != NULL) {
    g_previous.sa_sigaction(sig, info, context);
    return;
  }
  if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN &&
      g_previous.sa_handler != NULL) {
    g_previous.sa_handler(sig);
    return;
  }
  restore_previous();
  /* A hardware fault repeats when the instruction runs again; a sent signal must be re-sent. */
  if (info == NULL || info->si_code <= 0) raise(sig);
}

static void install_once(void) {
  g_page_size = sysconf(_SC_PAGESIZE);
  for (uint32_t k = 0; k < VK_FAULT_SUBSCRIBERS; k++) atomic_store(&g_subscribers[k], -1);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  g_installed = sigaction(SIGBUS, &sa, &g_previous) == 0;
}

/** Wait until no SIGBUS handler runs on any thread (called with g_lock held). */
static void wait_handlers(void) {
  while (atomic_load(&g_in_handler) > 0) sched_yield();
}

int vk_fault_register(void* addr, size_t length, int prot) {
  pthread_once(&g_once, install_once);
  if (!g_installed) return -1;
  pthread_mutex_lock(&g_lock);
  int slot = -1;
  uint32_t high = atomic_load(&g_slot_high);
  for (uint32_t i = 0; i < high; i++) {
    if (atomic_load(&g_slots[i].length) == 0) {
      slot = (int)i;
      break;
    }
  }
  if (slot < 0 && high < VK_FAULT_SLOTS) slot = (int)high;
  if (slot >= 0) {
    vk_fault_slot* s = &g_slots[slot];
    atomic_store(&s->start, (uintptr_t)addr);
    atomic_store(&s->prot, prot);
    atomic_store(&s->faults, 0);
    atomic_store(&s->first_offset, 0);
    // ORDERING: length last, so the handler never sees a half-written entry.
    atomic_store(&s->length, length);
    if ((uint32_t)slot >= high) atomic_store(&g_slot_high, (uint32_t)slot + 1);
  }
  pthread_mutex_unlock(&g_lock);
  return slot;
}

void vk_fault_unregister(int slot) {
  if (slot < 0 || slot >= VK_FAULT_SLOTS) return;
  pthread_mutex_lock(&g_lock);
  atomic_store(&g_slots[slot].length, 0);
  // LIFETIME: a handler that matched this entry may still be mapping over it; the caller
  // unmaps only after it is done.
  wait_handlers();
  pthread_mutex_unlock(&g_lock);
}

bool vk_fault_info(int slot, uint32_t* faults, size_t* first_offset) {
  if (slot < 0 || slot >= VK_FAULT_SLOTS) return false;
  *faults = atomic_load(&g_slots[slot].faults);
  size_t first = atomic_load(&g_slots[slot].first_offset);
  *first_offset = first == 0 ? 0 : first - 1;
  return true;
}

/** faultSubscribe(): number. An eventfd the addon writes 1 to on every survived fault. */
static napi_value fn_fault_subscribe(napi_env env, napi_callback_info info) {
  pthread_once(&g_once, install_once);
  if (!g_installed) return vk_throw_errno(env, "sigaction", EINVAL);
  int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) return vk_throw_errno(env, "eventfd", errno);
  pthread_mutex_lock(&g_lock);
  int slot = -1;
  uint32_t high = atomic_load(&g_subscriber_high);
  for (uint32_t k = 0; k < high; k++) {
    if (atomic_load(&g_subscribers[k]) < 0) {
      slot = (int)k;
      break;
    }
  }
  if (slot < 0 && high < VK_FAULT_SUBSCRIBERS) {
    slot = (int)high;
    atomic_store(&g_subscriber_high, high + 1);
  }
  if (slot >= 0) atomic_store(&g_subscribers[slot], fd);
  pthread_mutex_unlock(&g_lock);
  if (slot < 0) {
    close(fd);
    return vk_throw_state(env, "faultSubscribe", EMFILE,
                          "faultSubscribe failed: EMFILE (too many fault subscribers)");
  }
  return vk_number(env, fd);
}

/** faultUnsubscribe(fd): void. Closes the eventfd. Throws for an fd not subscribed. */
static napi_value fn_fault_unsubscribe(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  if (!vk_args_get(env, info, "faultUnsubscribe", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  pthread_mutex_lock(&g_lock);
  bool found = false;
  uint32_t high = atomic_load(&g_subscriber_high);
  for (uint32_t k = 0; k < high && !found; k++) {
    if (atomic_load(&g_subscribers[k]) == fd) {
      atomic_store(&g_subscribers[k], -1);
      found = true;
    }
  }
  // LIFETIME: a handler may be writing to the fd right now; close it only after.
  if (found) wait_handlers();
  pthread_mutex_unlock(&g_lock);
  if (!found) {
    return vk_throw_arg(env, a.fn, a.argv[0], "fd must be an fd returned by faultSubscribe");
  }
  close(fd);
  return vk_undefined(env);
}

/** faultCount(): number. Faults survived in this process so far. */
static napi_value fn_fault_count(napi_env env, napi_callback_info info) {
  return vk_number(env, (double)atomic_load(&g_faults_total));
}

/** fileSeals(fd): number. F_GET_SEALS, or 0 for a file that cannot carry seals (EINVAL). */
static napi_value fn_file_seals(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  if (!vk_args_get(env, info, "fileSeals", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) {
    if (errno == EINVAL) return vk_number(env, 0);
    return vk_throw_errno(env, "fcntl", errno);
  }
  return vk_number(env, seals);
}

/** addSeals(fd, seals): void. F_ADD_SEALS. */
static napi_value fn_add_seals(napi_env env, napi_callback_info info) {
  vk_args a;
  int fd;
  uint64_t seals = 0;
  if (!vk_args_get(env, info, "addSeals", &a)) return NULL;
  if (!vk_arg_fd(&a, 0, "fd", &fd)) return NULL;
  if (!vk_arg_uint(&a, 1, "seals", 0, 0xffff, &seals)) return NULL;
  if (fcntl(fd, F_ADD_SEALS, (int)seals) < 0) return vk_throw_errno(env, "fcntl", errno);
  return vk_undefined(env);
}

bool vk_register_fault(napi_env env, napi_value exports) {
  static const vk_fn fns[] = {
      {"faultSubscribe", fn_fault_subscribe},
      {"faultUnsubscribe", fn_fault_unsubscribe},
      {"faultCount", fn_fault_count},
      {"fileSeals", fn_file_seals},
      {"addSeals", fn_add_seals},
  };
  return vk_export_fns(env, exports, fns, sizeof fns / sizeof fns[0]);
}
