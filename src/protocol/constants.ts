/**
 * vhost-user wire constants: request ids, feature bits, header flags and limits.
 *
 * Names follow QEMU `docs/interop/vhost-user.rst` without the `VHOST_USER_` prefix, using the
 * current front-end/back-end vocabulary. Feature sets are `bigint` everywhere.
 */

/**
 * Front-end → back-end requests on the main channel (vhost-user: "Front-end message types").
 */
export enum FrontendRequest {
  GET_FEATURES = 1,
  SET_FEATURES = 2,
  SET_OWNER = 3,
  RESET_OWNER = 4,
  SET_MEM_TABLE = 5,
  SET_LOG_BASE = 6,
  SET_LOG_FD = 7,
  SET_VRING_NUM = 8,
  SET_VRING_ADDR = 9,
  SET_VRING_BASE = 10,
  GET_VRING_BASE = 11,
  SET_VRING_KICK = 12,
  SET_VRING_CALL = 13,
  SET_VRING_ERR = 14,
  GET_PROTOCOL_FEATURES = 15,
  SET_PROTOCOL_FEATURES = 16,
  GET_QUEUE_NUM = 17,
  SET_VRING_ENABLE = 18,
  SEND_RARP = 19,
  NET_SET_MTU = 20,
  SET_BACKEND_REQ_FD = 21,
  IOTLB_MSG = 22,
  SET_VRING_ENDIAN = 23,
  GET_CONFIG = 24,
  SET_CONFIG = 25,
  CREATE_CRYPTO_SESSION = 26,
  CLOSE_CRYPTO_SESSION = 27,
  POSTCOPY_ADVISE = 28,
  POSTCOPY_LISTEN = 29,
  POSTCOPY_END = 30,
  GET_INFLIGHT_FD = 31,
  SET_INFLIGHT_FD = 32,
  GPU_SET_SOCKET = 33,
  RESET_DEVICE = 34,
  VRING_KICK = 35,
  GET_MAX_MEM_SLOTS = 36,
  ADD_MEM_REG = 37,
  REM_MEM_REG = 38,
  SET_STATUS = 39,
  GET_STATUS = 40,
  GET_SHARED_OBJECT = 41,
  SET_DEVICE_STATE_FD = 42,
  CHECK_DEVICE_STATE = 43,
}

/**
 * Legacy name of {@link FrontendRequest.SET_BACKEND_REQ_FD} (`VHOST_USER_SET_SLAVE_REQ_FD`),
 * kept only because older revisions of the spec use it.
 */
export const SET_SLAVE_REQ_FD = FrontendRequest.SET_BACKEND_REQ_FD;

/**
 * Back-end → front-end requests on the back-end request channel (vhost-user: "Back-end message
 * types"; the spec names them `VHOST_USER_BACKEND_*`).
 */
export enum BackendRequest {
  IOTLB_MSG = 1,
  CONFIG_CHANGE_MSG = 2,
  VRING_HOST_NOTIFIER_MSG = 3,
  VRING_CALL = 4,
  VRING_ERR = 5,
  SHARED_OBJECT_ADD = 6,
  SHARED_OBJECT_REMOVE = 7,
  SHARED_OBJECT_LOOKUP = 8,
}

/** Protocol feature bit numbers (vhost-user: "Protocol features"). */
export enum ProtocolFeature {
  MQ = 0,
  LOG_SHMFD = 1,
  RARP = 2,
  REPLY_ACK = 3,
  MTU = 4,
  BACKEND_REQ = 5,
  CROSS_ENDIAN = 6,
  CRYPTO_SESSION = 7,
  PAGEFAULT = 8,
  CONFIG = 9,
  BACKEND_SEND_FD = 10,
  HOST_NOTIFIER = 11,
  INFLIGHT_SHMFD = 12,
  RESET_DEVICE = 13,
  INBAND_NOTIFICATIONS = 14,
  CONFIGURE_MEM_SLOTS = 15,
  STATUS = 16,
  XEN_MMAP = 17,
  SHARED_OBJECT = 18,
  DEVICE_STATE = 19,
  GET_VRING_BASE_INFLIGHT = 20,
}

/**
 * Virtio feature bit numbers as exchanged by GET_FEATURES/SET_FEATURES (VIRTIO 1.2 §5.1.3 for
 * the net device bits, §6 for the reserved transport bits), plus the two vhost bits
 * `VHOST_F_LOG_ALL` (26) and `VHOST_USER_F_PROTOCOL_FEATURES` (30).
 */
export enum VirtioFeature {
  NET_F_CSUM = 0,
  GUEST_CSUM = 1,
  CTRL_GUEST_OFFLOADS = 2,
  MTU = 3,
  MAC = 5,
  GUEST_TSO4 = 7,
  GUEST_TSO6 = 8,
  GUEST_ECN = 9,
  GUEST_UFO = 10,
  HOST_TSO4 = 11,
  HOST_TSO6 = 12,
  HOST_ECN = 13,
  HOST_UFO = 14,
  MRG_RXBUF = 15,
  STATUS = 16,
  CTRL_VQ = 17,
  CTRL_RX = 18,
  CTRL_VLAN = 19,
  CTRL_RX_EXTRA = 20,
  GUEST_ANNOUNCE = 21,
  NET_MQ = 22,
  CTRL_MAC_ADDR = 23,
  /** VIRTIO_F_NOTIFY_ON_EMPTY (legacy) */
  NOTIFY_ON_EMPTY = 24,
  /** VHOST_F_LOG_ALL: the back-end can log its writes into the dirty log */
  LOG_ALL = 26,
  /** VIRTIO_F_ANY_LAYOUT (legacy) */
  ANY_LAYOUT = 27,
  RING_INDIRECT_DESC = 28,
  RING_EVENT_IDX = 29,
  /** VHOST_USER_F_PROTOCOL_FEATURES: GET/SET_PROTOCOL_FEATURES are supported */
  PROTOCOL_FEATURES = 30,
  VERSION_1 = 32,
  /** VIRTIO_F_ACCESS_PLATFORM, formerly VIRTIO_F_IOMMU_PLATFORM */
  ACCESS_PLATFORM = 33,
  RING_PACKED = 34,
  IN_ORDER = 35,
  ORDER_PLATFORM = 36,
  SR_IOV = 37,
  NOTIFICATION_DATA = 38,
  RING_RESET = 40,
  GUEST_USO4 = 54,
  GUEST_USO6 = 55,
  HOST_USO = 56,
  HASH_REPORT = 57,
  GUEST_HDRLEN = 59,
  RSS = 60,
  RSC_EXT = 61,
  STANDBY = 62,
  SPEED_DUPLEX = 63,
}

/**
 * The mask of one feature bit.
 * @param bit bit number (0..63)
 * @returns `1n << bit`
 * @throws RangeError when `bit` is not an integer in 0..63
 */
export function featureMask(bit: number): bigint {
  if (!Number.isInteger(bit) || bit < 0 || bit > 63) {
    throw new RangeError(`feature bit out of range (bit=${String(bit)})`);
  }
  return 1n << BigInt(bit);
}

/**
 * Whether a feature set has one bit.
 * @param features a 64-bit feature set
 * @param bit bit number (0..63)
 * @returns true when the bit is set
 */
export function hasFeature(features: bigint, bit: number): boolean {
  return (features & featureMask(bit)) !== 0n;
}

/**
 * The mask of several feature bits.
 * @param bits bit numbers
 * @returns the OR of their masks
 */
export function featureSet(...bits: number[]): bigint {
  let mask = 0n;
  for (const bit of bits) mask |= featureMask(bit);
  return mask;
}

/** Size of the message header: request u32, flags u32, size u32 (vhost-user: "Header"). */
export const HEADER_SIZE = 12;
/** The only protocol version (flags bits 0-1). */
export const VHOST_USER_VERSION = 0x1;
/** Flags bits holding the version. */
export const VERSION_MASK = 0x3;
/** Flags bit 2: the message is a reply. */
export const FLAG_REPLY = 0x4;
/** Flags bit 3: the sender asks for a REPLY_ACK reply. */
export const FLAG_NEED_REPLY = 0x8;
/** Flags bits that must be zero (`~0xf` as an unsigned 32-bit value). */
export const RESERVED_FLAGS_MASK = 0xfffffff0;
/** At most this many fds travel with one message (libvhost-user's limit; RV allows 32). */
export const MAX_FDS = 8;
/** Largest payload accepted; the header is rejected before any allocation above it. */
export const MAX_PAYLOAD_SIZE = 4096;
/** Dirty-log page size. */
export const VHOST_LOG_PAGE = 0x1000;
/** Vring-address flag: log used-ring writes (VHOST_VRING_F_LOG, bit 0). */
export const VRING_F_LOG = 1;
/** Bits of a kick/call/err/host-notifier u64 holding the queue index. */
export const VRING_INDEX_MASK = 0xff;
/** Bit of a kick/call/err/host-notifier/device-state u64 saying no fd is attached. */
export const VRING_NOFD_FLAG = 0x100;
/** SET_MEM_TABLE carries at most this many regions. */
export const MAX_MEM_REGIONS = 8;
/** Largest device config space carried by GET_CONFIG/SET_CONFIG (QEMU's limit). */
export const MAX_CONFIG_SIZE = 256;
/** Memory-slot count a back-end typically reports for GET_MAX_MEM_SLOTS (libvhost-user, RV). */
export const DEFAULT_MAX_MEM_SLOTS = 509;

/** SET_CONFIG/GET_CONFIG `flags` as QEMU defines them (an enum, not bits; RV reads them as bits). */
export enum ConfigFlags {
  /** front-end write to the writable fields */
  FRONTEND = 0,
  /** config written during live migration */
  MIGRATION = 1,
}

/** IOTLB permission values (`perm` field). */
export enum IotlbPerm {
  NONE = 0,
  READ = 1,
  WRITE = 2,
  READ_WRITE = 3,
}

/** IOTLB message types (`type` field). */
export enum IotlbType {
  MISS = 1,
  UPDATE = 2,
  INVALIDATE = 3,
  ACCESS_FAIL = 4,
}

/** Device-state transfer direction (SET_DEVICE_STATE_FD). */
export enum DeviceStateDirection {
  /** back-end → front-end, on the migration source */
  SAVE = 0,
  /** front-end → back-end, on the migration destination */
  LOAD = 1,
}

/** Device-state transfer phase (SET_DEVICE_STATE_FD); STOPPED is the only one defined. */
export enum DeviceStatePhase {
  STOPPED = 0,
}
