/*
 * TAP devices: open /dev/net/tun and attach to (or create) a TAP interface, optionally with a
 * 12-byte virtio-net header on every frame and the kernel's checksum / TSO offloads.
 *
 * The frames themselves are read and written with the plain read/write of vk_fd.c: one
 * read(2) or write(2) per frame, no other native call on the data path.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "vk.h"

/* virtio-net header with num_buffers (VIRTIO 1.x, or MRG_RXBUF): what vhostkit's ports use. */
#define VK_TAP_VNET_HDR_LEN 12

/** tapOpen(name: string, vnetHdr?: boolean): { fd: number, name: string, vnetHdr: boolean } */
static napi_value fn_tap_open(napi_env env, napi_callback_info info) {
  vk_args a;
  char name[IFNAMSIZ];
  bool vnet_hdr = false;
  if (!vk_args_get(env, info, "tapOpen", &a)) return NULL;
  if (!vk_arg_string(&a, 0, "name", name, IFNAMSIZ - 1)) return NULL;
  napi_valuetype type = napi_undefined;
  napi_typeof(env, a.argv[1], &type);
  if (type != napi_undefined && !vk_arg_bool(&a, 1, "vnetHdr", &vnet_hdr)) return NULL;
  int fd;
  do fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) return vk_throw_errno(env, "open(/dev/net/tun)", errno);
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  /* No packet-information prefix; a virtio-net header when asked. */
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | (vnet_hdr ? IFF_VNET_HDR : 0);
  memcpy(ifr.ifr_name, name, strlen(name));
  const char* failed = NULL;
  if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
    failed = "ioctl(TUNSETIFF)";
  } else if (vnet_hdr) {
    int len = VK_TAP_VNET_HDR_LEN;
    /* The reader (vhostkit) takes partial checksums and TCP segmentation offload frames. */
    unsigned int offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
    if (ioctl(fd, TUNSETVNETHDRSZ, &len) < 0) {
      failed = "ioctl(TUNSETVNETHDRSZ)";
    } else if (ioctl(fd, TUNSETOFFLOAD, offloads) < 0) {
      failed = "ioctl(TUNSETOFFLOAD)";
    }
  }
  if (failed != NULL) {
    int err = errno;
    close(fd);
    return vk_throw_errno(env, failed, err);
  }
  napi_value result, fd_value, name_value, vnet_value;
  char actual[IFNAMSIZ + 1];
  memset(actual, 0, sizeof actual);
  memcpy(actual, ifr.ifr_name, IFNAMSIZ);
  if (napi_create_object(env, &result) != napi_ok ||
      napi_create_string_utf8(env, actual, NAPI_AUTO_LENGTH, &name_value) != napi_ok ||
      (fd_value = vk_number(env, fd)) == NULL || (vnet_value = vk_bool(env, vnet_hdr)) == NULL ||
      napi_set_named_property(env, result, "fd", fd_value) != napi_ok ||
      napi_set_named_property(env, result, "name", name_value) != napi_ok ||
      napi_set_named_property(env, result, "vnetHdr", vnet_value) != napi_ok) {
    close(fd);
    return vk_napi_failed(env, "tapOpen");
  }
  return result;
}

bool vk_register_tap(napi_env env, napi_value exports) {
  static const vk_fn fns[] = {
      {"tapOpen", fn_tap_open},
  };
  return vk_export_fns(env, exports, fns, sizeof fns / sizeof fns[0]);
}
