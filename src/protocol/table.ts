/**
 * The request table: one entry per front-end request (ids 1..43) and per back-end request
 * (ids 1..8), with its payload codec, size bounds, fds allowed, reply kind, reply codec and the
 * feature that gates it. Decoding, validation, REPLY_ACK handling, fuzzing and the generated
 * docs (docs/protocol.md) all read this table.
 *
 * vhost-user: "Front-end message types", "Back-end message types", "Communication" (replies,
 * REPLY_ACK), "Protocol features".
 */
import {
  BackendRequest,
  FLAG_NEED_REPLY,
  FrontendRequest,
  MAX_FDS,
  MAX_PAYLOAD_SIZE,
  ProtocolFeature,
  VirtioFeature,
  hasFeature,
} from "./constants.js";
import {
  type Codec,
  type ConfigSpace,
  type DeviceStateParams,
  type DeviceStateReply,
  type InflightDescription,
  type IotlbMsg,
  type LogBaseReply,
  type LogDescription,
  type MemoryRegion,
  type MemoryTable,
  type RarpPayload,
  type SharedObject,
  type SharedObjectReply,
  type SizeRange,
  type VringAddr,
  type VringArea,
  type VringFd,
  type VringState,
  configCodec,
  deviceStateParamsCodec,
  deviceStateReplyCodec,
  emptyCodec,
  inflightCodec,
  iotlbCodec,
  logBaseReplyCodec,
  logCodec,
  memoryTableCodec,
  opaqueCodec,
  rarpCodec,
  sharedObjectCodec,
  sharedObjectReplyCodec,
  singleRegionCodec,
  u64Codec,
  vringAddrCodec,
  vringAreaCodec,
  vringFdCodec,
  vringStateCodec,
} from "./codecs.js";
import { VhostUserError } from "./errors.js";

/** Which request table: front-end requests (main channel) or back-end requests (back-end channel). */
export type TableName = "frontend" | "backend";

/**
 * When a request gets a reply body:
 * - `none`: never (a u64 ack only when REPLY_ACK is negotiated and NEED_REPLY is set);
 * - `always`: always (only when `replyFeature` is negotiated, if the entry names one);
 * - `postcopy`: only while postcopy is being set up (SET_MEM_TABLE, ADD_MEM_REG); otherwise
 *   as `none`.
 */
export type ReplyKind = "none" | "always" | "postcopy";

/**
 * How a back-end answers a request its handler completed (vhostkit's back-end: the handler
 * table in src/backend/session.ts); a failed request is answered from this table instead
 * (see {@link failureReply}):
 * - `body`: the reply body the handler returned;
 * - `ack`: a REPLY_ACK u64 0 when the front-end asked for one (NEED_REPLY);
 * - `self`: the handler sends its reply body itself, at the point that matters;
 * - `none`: nothing, whatever NEED_REPLY says.
 */
export type HandlerReply = "body" | "ack" | "self" | "none";

/**
 * What must be negotiated before a request is legal: a protocol feature (which itself needs
 * VHOST_USER_F_PROTOCOL_FEATURES), the virtio bit `PROTOCOL_FEATURES` itself, the virtio bit
 * `ACCESS_PLATFORM` (IOTLB), or nothing.
 */
export type RequestGate = ProtocolFeature | "PROTOCOL_FEATURES" | "ACCESS_PLATFORM" | null;

/** One table entry. `P` is the request payload type, `R` the reply payload type. */
export interface RequestSpec<P = unknown, R = unknown> {
  /** which table the entry belongs to */
  readonly table: TableName;
  /** request id (the header's `request` field) */
  readonly id: number;
  /** spec name without the `VHOST_USER_` (or `VHOST_USER_BACKEND_`) prefix */
  readonly name: string;
  /** request payload codec */
  readonly codec: Codec<P>;
  /** request payload size bounds (checked from the header, before the body is read) */
  readonly size: SizeRange;
  /** fds the request carries (min..max) */
  readonly fds: SizeRange;
  /** when the request has a reply body */
  readonly reply: ReplyKind;
  /** the protocol feature without which the reply body does not exist (SET_LOG_BASE) */
  readonly replyFeature: ProtocolFeature | null;
  /** reply body codec, or null when the request never has a reply body */
  readonly replyCodec: Codec<R> | null;
  /** reply body size bounds, or null */
  readonly replySize: SizeRange | null;
  /** fds the reply body carries (min..max) */
  readonly replyFds: SizeRange;
  /** what must be negotiated first */
  readonly gate: RequestGate;
  /** legal before SET_FEATURES once the back-end offered PROTOCOL_FEATURES */
  readonly allowedBeforeFeatures: boolean;
  /**
   * Reply body that reports a failure, where an all-zero body would read as success (e.g. a
   * u64 result where 0 = success); null: the zero-filled minimum body reports the failure.
   */
  readonly replyOnFailure: R | null;
  /** one line of what the request does */
  readonly summary: string;
  /**
   * Stateless semantic step after decoding (e.g. as many fds as regions, the no-fd flag agrees
   * with the fds). Throws VhostUserError.
   */
  check?(payload: P, fds: readonly number[], request: string): void;
  /** Stateless semantic step for the reply body. Throws VhostUserError. */
  replyCheck?(payload: R, fds: readonly number[], request: string): void;
}

/** Any table entry. */
export type AnyRequestSpec = RequestSpec<unknown, unknown>;

/** Request payload type of each front-end request. */
export interface FrontendRequestPayloads {
  [FrontendRequest.GET_FEATURES]: null;
  [FrontendRequest.SET_FEATURES]: bigint;
  [FrontendRequest.SET_OWNER]: null;
  [FrontendRequest.RESET_OWNER]: null;
  [FrontendRequest.SET_MEM_TABLE]: MemoryTable;
  [FrontendRequest.SET_LOG_BASE]: LogDescription;
  [FrontendRequest.SET_LOG_FD]: null;
  [FrontendRequest.SET_VRING_NUM]: VringState;
  [FrontendRequest.SET_VRING_ADDR]: VringAddr;
  [FrontendRequest.SET_VRING_BASE]: VringState;
  [FrontendRequest.GET_VRING_BASE]: VringState;
  [FrontendRequest.SET_VRING_KICK]: VringFd;
  [FrontendRequest.SET_VRING_CALL]: VringFd;
  [FrontendRequest.SET_VRING_ERR]: VringFd;
  [FrontendRequest.GET_PROTOCOL_FEATURES]: null;
  [FrontendRequest.SET_PROTOCOL_FEATURES]: bigint;
  [FrontendRequest.GET_QUEUE_NUM]: null;
  [FrontendRequest.SET_VRING_ENABLE]: VringState;
  [FrontendRequest.SEND_RARP]: RarpPayload;
  [FrontendRequest.NET_SET_MTU]: bigint;
  [FrontendRequest.SET_BACKEND_REQ_FD]: null;
  [FrontendRequest.IOTLB_MSG]: IotlbMsg;
  [FrontendRequest.SET_VRING_ENDIAN]: VringState;
  [FrontendRequest.GET_CONFIG]: ConfigSpace;
  [FrontendRequest.SET_CONFIG]: ConfigSpace;
  [FrontendRequest.CREATE_CRYPTO_SESSION]: Uint8Array;
  [FrontendRequest.CLOSE_CRYPTO_SESSION]: bigint;
  [FrontendRequest.POSTCOPY_ADVISE]: null;
  [FrontendRequest.POSTCOPY_LISTEN]: null;
  [FrontendRequest.POSTCOPY_END]: null;
  [FrontendRequest.GET_INFLIGHT_FD]: InflightDescription;
  [FrontendRequest.SET_INFLIGHT_FD]: InflightDescription;
  [FrontendRequest.GPU_SET_SOCKET]: null;
  [FrontendRequest.RESET_DEVICE]: null;
  [FrontendRequest.VRING_KICK]: VringState;
  [FrontendRequest.GET_MAX_MEM_SLOTS]: null;
  [FrontendRequest.ADD_MEM_REG]: MemoryRegion;
  [FrontendRequest.REM_MEM_REG]: MemoryRegion;
  [FrontendRequest.SET_STATUS]: bigint;
  [FrontendRequest.GET_STATUS]: null;
  [FrontendRequest.GET_SHARED_OBJECT]: SharedObject;
  [FrontendRequest.SET_DEVICE_STATE_FD]: DeviceStateParams;
  [FrontendRequest.CHECK_DEVICE_STATE]: null;
}

/** Reply body type of each front-end request (`never` when it has none; acks are u64). */
export interface FrontendReplyPayloads {
  [FrontendRequest.GET_FEATURES]: bigint;
  [FrontendRequest.SET_FEATURES]: never;
  [FrontendRequest.SET_OWNER]: never;
  [FrontendRequest.RESET_OWNER]: never;
  [FrontendRequest.SET_MEM_TABLE]: MemoryTable;
  [FrontendRequest.SET_LOG_BASE]: LogBaseReply;
  [FrontendRequest.SET_LOG_FD]: never;
  [FrontendRequest.SET_VRING_NUM]: never;
  [FrontendRequest.SET_VRING_ADDR]: never;
  [FrontendRequest.SET_VRING_BASE]: never;
  [FrontendRequest.GET_VRING_BASE]: VringState;
  [FrontendRequest.SET_VRING_KICK]: never;
  [FrontendRequest.SET_VRING_CALL]: never;
  [FrontendRequest.SET_VRING_ERR]: never;
  [FrontendRequest.GET_PROTOCOL_FEATURES]: bigint;
  [FrontendRequest.SET_PROTOCOL_FEATURES]: never;
  [FrontendRequest.GET_QUEUE_NUM]: bigint;
  [FrontendRequest.SET_VRING_ENABLE]: never;
  [FrontendRequest.SEND_RARP]: never;
  [FrontendRequest.NET_SET_MTU]: never;
  [FrontendRequest.SET_BACKEND_REQ_FD]: never;
  [FrontendRequest.IOTLB_MSG]: bigint;
  [FrontendRequest.SET_VRING_ENDIAN]: never;
  [FrontendRequest.GET_CONFIG]: ConfigSpace;
  [FrontendRequest.SET_CONFIG]: never;
  [FrontendRequest.CREATE_CRYPTO_SESSION]: Uint8Array;
  [FrontendRequest.CLOSE_CRYPTO_SESSION]: never;
  [FrontendRequest.POSTCOPY_ADVISE]: Uint8Array;
  [FrontendRequest.POSTCOPY_LISTEN]: bigint;
  [FrontendRequest.POSTCOPY_END]: bigint;
  [FrontendRequest.GET_INFLIGHT_FD]: InflightDescription;
  [FrontendRequest.SET_INFLIGHT_FD]: never;
  [FrontendRequest.GPU_SET_SOCKET]: never;
  [FrontendRequest.RESET_DEVICE]: never;
  [FrontendRequest.VRING_KICK]: never;
  [FrontendRequest.GET_MAX_MEM_SLOTS]: bigint;
  [FrontendRequest.ADD_MEM_REG]: MemoryRegion;
  [FrontendRequest.REM_MEM_REG]: never;
  [FrontendRequest.SET_STATUS]: never;
  [FrontendRequest.GET_STATUS]: bigint;
  [FrontendRequest.GET_SHARED_OBJECT]: SharedObjectReply;
  [FrontendRequest.SET_DEVICE_STATE_FD]: DeviceStateReply;
  [FrontendRequest.CHECK_DEVICE_STATE]: bigint;
}

/** Request payload type of each back-end request. */
export interface BackendRequestPayloads {
  [BackendRequest.IOTLB_MSG]: IotlbMsg;
  [BackendRequest.CONFIG_CHANGE_MSG]: null;
  [BackendRequest.VRING_HOST_NOTIFIER_MSG]: VringArea;
  [BackendRequest.VRING_CALL]: VringState;
  [BackendRequest.VRING_ERR]: VringState;
  [BackendRequest.SHARED_OBJECT_ADD]: SharedObject;
  [BackendRequest.SHARED_OBJECT_REMOVE]: SharedObject;
  [BackendRequest.SHARED_OBJECT_LOOKUP]: SharedObject;
}

/** Reply body type of each back-end request (`never` when it has none; acks are u64). */
export interface BackendReplyPayloads {
  [BackendRequest.IOTLB_MSG]: never;
  [BackendRequest.CONFIG_CHANGE_MSG]: never;
  [BackendRequest.VRING_HOST_NOTIFIER_MSG]: never;
  [BackendRequest.VRING_CALL]: never;
  [BackendRequest.VRING_ERR]: never;
  [BackendRequest.SHARED_OBJECT_ADD]: never;
  [BackendRequest.SHARED_OBJECT_REMOVE]: never;
  [BackendRequest.SHARED_OBJECT_LOOKUP]: bigint;
}

/** The front-end request table, typed per id. */
export type FrontendTable = {
  readonly [K in FrontendRequest]: RequestSpec<
    FrontendRequestPayloads[K],
    FrontendReplyPayloads[K]
  >;
};

/**
 * GET_CONFIG's reply: a config space, or an empty body, the spec's failure answer (libvhost-user
 * back-ends such as vhost-user-gpu send it for a request they refuse). The empty body decodes
 * as a config of size 0, which the front-end reports as a failed request, not a framing error.
 */
const configReplyCodec: Codec<ConfigSpace> = {
  name: "config space",
  size: { min: 0, max: configCodec.size.max },
  decode(bytes, request) {
    if (bytes.length === 0) return { offset: 0, size: 0, flags: 0, payload: new Uint8Array(0) };
    return configCodec.decode(bytes, request);
  },
  encode: (value, request) => configCodec.encode(value, request),
};

/** The back-end request table, typed per id. */
export type BackendTable = {
  readonly [K in BackendRequest]: RequestSpec<BackendRequestPayloads[K], BackendReplyPayloads[K]>;
};

interface EntryInit<P, R> {
  codec: Codec<P>;
  summary: string;
  fds?: SizeRange;
  reply?: ReplyKind;
  replyFeature?: ProtocolFeature;
  replyCodec?: Codec<R>;
  replyFds?: SizeRange;
  gate?: RequestGate;
  allowedBeforeFeatures?: boolean;
  replyOnFailure?: R;
  check?(payload: P, fds: readonly number[], request: string): void;
  replyCheck?(payload: R, fds: readonly number[], request: string): void;
}

const NO_FDS: SizeRange = Object.freeze({ min: 0, max: 0 });
const ONE_FD: SizeRange = Object.freeze({ min: 1, max: 1 });
const OPTIONAL_FD: SizeRange = Object.freeze({ min: 0, max: 1 });

function entry<P, R = never>(
  table: TableName,
  id: number,
  name: string,
  init: EntryInit<P, R>,
): RequestSpec<P, R> {
  const replyCodec = init.replyCodec ?? null;
  const spec: RequestSpec<P, R> = {
    table,
    id,
    name,
    codec: init.codec,
    size: init.codec.size,
    fds: init.fds ?? NO_FDS,
    reply: init.reply ?? (replyCodec !== null ? "always" : "none"),
    replyFeature: init.replyFeature ?? null,
    replyCodec,
    replySize: replyCodec !== null ? replyCodec.size : null,
    replyFds: init.replyFds ?? NO_FDS,
    gate: init.gate ?? null,
    allowedBeforeFeatures: init.allowedBeforeFeatures ?? false,
    replyOnFailure: init.replyOnFailure ?? null,
    summary: init.summary,
  };
  if (init.check) spec.check = init.check;
  if (init.replyCheck) spec.replyCheck = init.replyCheck;
  return Object.freeze(spec);
}

/**
 * Semantic check: an fd is attached exactly when the no-fd flag is clear.
 * @param noFd the decoded no-fd flag
 * @param fds the fds that arrived
 * @param request request name
 * @throws VhostUserError ERR_VHOST_UNEXPECTED_FDS / ERR_VHOST_MISSING_FDS
 */
export function checkNoFdFlag(noFd: boolean, fds: readonly number[], request: string): void {
  if (noFd && fds.length !== 0) {
    throw new VhostUserError(
      "ERR_VHOST_UNEXPECTED_FDS",
      "fd attached although the no-fd flag is set",
      {
        request,
        field: "fds",
        value: fds.length,
      },
    );
  }
  if (!noFd && fds.length !== 1) {
    throw new VhostUserError(
      "ERR_VHOST_MISSING_FDS",
      "no fd attached and the no-fd flag is clear",
      {
        request,
        field: "fds",
        value: fds.length,
      },
    );
  }
}

function checkBoolNum(state: VringState, _fds: readonly number[], request: string): void {
  if (state.num !== 0 && state.num !== 1) {
    throw new VhostUserError("ERR_VHOST_BAD_FIELD", "value must be 0 or 1", {
      request,
      field: "num",
      value: state.num,
    });
  }
}

const vringFdCheck = (p: VringFd, fds: readonly number[], request: string): void =>
  checkNoFdFlag(p.noFd, fds, request);

const F = "frontend";
const B = "backend";
const FR = FrontendRequest;
const PF = ProtocolFeature;
const cryptoSessionCodec = opaqueCodec("crypto session", 1, MAX_PAYLOAD_SIZE);

/** The front-end request table (vhost-user: "Front-end message types"). */
export const FRONTEND_REQUESTS: FrontendTable = Object.freeze({
  [FR.GET_FEATURES]: entry(F, FR.GET_FEATURES, "GET_FEATURES", {
    codec: emptyCodec,
    replyCodec: u64Codec,
    summary: "get the virtio feature bits the back-end offers",
  }),
  [FR.SET_FEATURES]: entry(F, FR.SET_FEATURES, "SET_FEATURES", {
    codec: u64Codec,
    summary: "set the negotiated virtio feature bits (LOG_ALL toggles dirty logging)",
  }),
  [FR.SET_OWNER]: entry(F, FR.SET_OWNER, "SET_OWNER", {
    codec: emptyCodec,
    summary: "claim the back-end for this session",
  }),
  [FR.RESET_OWNER]: entry(F, FR.RESET_OWNER, "RESET_OWNER", {
    codec: emptyCodec,
    summary: "deprecated: ignore it or disable all rings",
  }),
  [FR.SET_MEM_TABLE]: entry(F, FR.SET_MEM_TABLE, "SET_MEM_TABLE", {
    codec: memoryTableCodec,
    fds: { min: 1, max: MAX_FDS },
    reply: "postcopy",
    replyCodec: memoryTableCodec,
    summary: "set the guest memory regions, one fd per region",
    check(p, fds, request) {
      if (fds.length !== p.regions.length) {
        throw new VhostUserError(
          fds.length > p.regions.length ? "ERR_VHOST_UNEXPECTED_FDS" : "ERR_VHOST_MISSING_FDS",
          `one fd per region expected (nregions=${p.regions.length})`,
          { request, field: "fds", value: fds.length },
        );
      }
    },
  }),
  [FR.SET_LOG_BASE]: entry(F, FR.SET_LOG_BASE, "SET_LOG_BASE", {
    codec: logCodec,
    fds: ONE_FD,
    replyCodec: logBaseReplyCodec,
    replyFeature: PF.LOG_SHMFD,
    gate: PF.LOG_SHMFD,
    replyOnFailure: { value: 1n, log: null },
    summary: "set the dirty log (size and offset in the attached memfd)",
  }),
  [FR.SET_LOG_FD]: entry(F, FR.SET_LOG_FD, "SET_LOG_FD", {
    codec: emptyCodec,
    fds: ONE_FD,
    summary: "set an eventfd the back-end may signal after logging",
  }),
  [FR.SET_VRING_NUM]: entry(F, FR.SET_VRING_NUM, "SET_VRING_NUM", {
    codec: vringStateCodec,
    summary: "set a queue's size",
  }),
  [FR.SET_VRING_ADDR]: entry(F, FR.SET_VRING_ADDR, "SET_VRING_ADDR", {
    codec: vringAddrCodec,
    summary: "set a queue's ring addresses and the VRING_F_LOG flag",
  }),
  [FR.SET_VRING_BASE]: entry(F, FR.SET_VRING_BASE, "SET_VRING_BASE", {
    codec: vringStateCodec,
    summary: "set a queue's next avail index (split or packed encoding)",
  }),
  [FR.GET_VRING_BASE]: entry(F, FR.GET_VRING_BASE, "GET_VRING_BASE", {
    codec: vringStateCodec,
    replyCodec: vringStateCodec,
    summary: "stop a queue and get its next avail index",
  }),
  [FR.SET_VRING_KICK]: entry(F, FR.SET_VRING_KICK, "SET_VRING_KICK", {
    codec: vringFdCodec,
    fds: OPTIONAL_FD,
    summary: "set a queue's kick eventfd (no-fd flag: poll); starts the ring",
    check: vringFdCheck,
  }),
  [FR.SET_VRING_CALL]: entry(F, FR.SET_VRING_CALL, "SET_VRING_CALL", {
    codec: vringFdCodec,
    fds: OPTIONAL_FD,
    summary: "set a queue's call eventfd",
    check: vringFdCheck,
  }),
  [FR.SET_VRING_ERR]: entry(F, FR.SET_VRING_ERR, "SET_VRING_ERR", {
    codec: vringFdCodec,
    fds: OPTIONAL_FD,
    summary: "set a queue's error eventfd",
    check: vringFdCheck,
  }),
  [FR.GET_PROTOCOL_FEATURES]: entry(F, FR.GET_PROTOCOL_FEATURES, "GET_PROTOCOL_FEATURES", {
    codec: emptyCodec,
    replyCodec: u64Codec,
    gate: "PROTOCOL_FEATURES",
    allowedBeforeFeatures: true,
    summary: "get the protocol feature bits the back-end offers",
  }),
  [FR.SET_PROTOCOL_FEATURES]: entry(F, FR.SET_PROTOCOL_FEATURES, "SET_PROTOCOL_FEATURES", {
    codec: u64Codec,
    gate: "PROTOCOL_FEATURES",
    allowedBeforeFeatures: true,
    summary: "set the negotiated protocol feature bits",
  }),
  [FR.GET_QUEUE_NUM]: entry(F, FR.GET_QUEUE_NUM, "GET_QUEUE_NUM", {
    codec: emptyCodec,
    replyCodec: u64Codec,
    gate: PF.MQ,
    summary: "get the number of queues the back-end supports",
  }),
  [FR.SET_VRING_ENABLE]: entry(F, FR.SET_VRING_ENABLE, "SET_VRING_ENABLE", {
    codec: vringStateCodec,
    gate: "PROTOCOL_FEATURES",
    summary: "enable (1) or disable (0) a queue",
    check: checkBoolNum,
  }),
  [FR.SEND_RARP]: entry(F, FR.SEND_RARP, "SEND_RARP", {
    codec: rarpCodec,
    gate: PF.RARP,
    summary: "broadcast a RARP for the guest MAC after migration",
  }),
  [FR.NET_SET_MTU]: entry(F, FR.NET_SET_MTU, "NET_SET_MTU", {
    codec: u64Codec,
    gate: PF.MTU,
    summary: "set the MTU the guest driver uses",
  }),
  [FR.SET_BACKEND_REQ_FD]: entry(F, FR.SET_BACKEND_REQ_FD, "SET_BACKEND_REQ_FD", {
    codec: emptyCodec,
    fds: ONE_FD,
    gate: PF.BACKEND_REQ,
    summary: "set the socket of the back-end request channel",
  }),
  [FR.IOTLB_MSG]: entry(F, FR.IOTLB_MSG, "IOTLB_MSG", {
    codec: iotlbCodec,
    replyCodec: u64Codec,
    replyOnFailure: 1n,
    gate: "ACCESS_PLATFORM",
    summary: "update or invalidate an IOTLB entry (reply 0 = success)",
  }),
  [FR.SET_VRING_ENDIAN]: entry(F, FR.SET_VRING_ENDIAN, "SET_VRING_ENDIAN", {
    codec: vringStateCodec,
    gate: PF.CROSS_ENDIAN,
    summary: "set a legacy queue's endianness (0 little, 1 big)",
    check: checkBoolNum,
  }),
  [FR.GET_CONFIG]: entry(F, FR.GET_CONFIG, "GET_CONFIG", {
    codec: configCodec,
    replyCodec: configReplyCodec,
    gate: PF.CONFIG,
    summary: "read the device config space (an empty reply, or size 0, = failure)",
  }),
  [FR.SET_CONFIG]: entry(F, FR.SET_CONFIG, "SET_CONFIG", {
    codec: configCodec,
    gate: PF.CONFIG,
    summary: "write the device config space",
  }),
  [FR.CREATE_CRYPTO_SESSION]: entry(F, FR.CREATE_CRYPTO_SESSION, "CREATE_CRYPTO_SESSION", {
    codec: cryptoSessionCodec,
    replyCodec: cryptoSessionCodec,
    gate: PF.CRYPTO_SESSION,
    summary: "create a crypto session (payload kept opaque)",
  }),
  [FR.CLOSE_CRYPTO_SESSION]: entry(F, FR.CLOSE_CRYPTO_SESSION, "CLOSE_CRYPTO_SESSION", {
    codec: u64Codec,
    gate: PF.CRYPTO_SESSION,
    summary: "close a crypto session",
  }),
  [FR.POSTCOPY_ADVISE]: entry(F, FR.POSTCOPY_ADVISE, "POSTCOPY_ADVISE", {
    codec: emptyCodec,
    replyCodec: opaqueCodec("postcopy advise reply", 0, 8),
    // A reply without the fd reports a failure (QEMU: "failed to get PostCopyAdvise reply fd").
    replyFds: OPTIONAL_FD,
    gate: PF.PAGEFAULT,
    summary: "open a userfaultfd and return it",
  }),
  [FR.POSTCOPY_LISTEN]: entry(F, FR.POSTCOPY_LISTEN, "POSTCOPY_LISTEN", {
    codec: emptyCodec,
    replyCodec: u64Codec,
    replyOnFailure: 1n,
    gate: PF.PAGEFAULT,
    summary: "register the regions with the userfaultfd (reply 0 = success)",
  }),
  [FR.POSTCOPY_END]: entry(F, FR.POSTCOPY_END, "POSTCOPY_END", {
    codec: emptyCodec,
    replyCodec: u64Codec,
    replyOnFailure: 1n,
    gate: PF.PAGEFAULT,
    summary: "postcopy is over (reply 0 = success)",
  }),
  [FR.GET_INFLIGHT_FD]: entry(F, FR.GET_INFLIGHT_FD, "GET_INFLIGHT_FD", {
    codec: inflightCodec,
    replyCodec: inflightCodec,
    replyFeature: PF.INFLIGHT_SHMFD,
    // mmap_size 0 without an fd: no inflight area (QEMU accepts it; the failure reply).
    replyFds: OPTIONAL_FD,
    gate: PF.INFLIGHT_SHMFD,
    summary: "get the shared inflight-tracking buffer",
  }),
  [FR.SET_INFLIGHT_FD]: entry(F, FR.SET_INFLIGHT_FD, "SET_INFLIGHT_FD", {
    codec: inflightCodec,
    fds: ONE_FD,
    gate: PF.INFLIGHT_SHMFD,
    summary: "hand the inflight-tracking buffer back after a reconnect",
  }),
  [FR.GPU_SET_SOCKET]: entry(F, FR.GPU_SET_SOCKET, "GPU_SET_SOCKET", {
    codec: emptyCodec,
    fds: ONE_FD,
    summary: "set the vhost-user-gpu socket",
  }),
  [FR.RESET_DEVICE]: entry(F, FR.RESET_DEVICE, "RESET_DEVICE", {
    codec: emptyCodec,
    gate: PF.RESET_DEVICE,
    summary: "reset the device",
  }),
  [FR.VRING_KICK]: entry(F, FR.VRING_KICK, "VRING_KICK", {
    codec: vringStateCodec,
    gate: PF.INBAND_NOTIFICATIONS,
    summary: "in-band kick of a queue",
  }),
  [FR.GET_MAX_MEM_SLOTS]: entry(F, FR.GET_MAX_MEM_SLOTS, "GET_MAX_MEM_SLOTS", {
    codec: emptyCodec,
    replyCodec: u64Codec,
    gate: PF.CONFIGURE_MEM_SLOTS,
    summary: "get the number of memory slots the back-end supports",
  }),
  [FR.ADD_MEM_REG]: entry(F, FR.ADD_MEM_REG, "ADD_MEM_REG", {
    codec: singleRegionCodec,
    fds: ONE_FD,
    reply: "postcopy",
    replyCodec: singleRegionCodec,
    gate: PF.CONFIGURE_MEM_SLOTS,
    summary: "add one memory region",
  }),
  [FR.REM_MEM_REG]: entry(F, FR.REM_MEM_REG, "REM_MEM_REG", {
    codec: singleRegionCodec,
    fds: OPTIONAL_FD,
    gate: PF.CONFIGURE_MEM_SLOTS,
    summary: "remove one memory region (matched on GPA, UVA and size; a stray fd is closed)",
  }),
  [FR.SET_STATUS]: entry(F, FR.SET_STATUS, "SET_STATUS", {
    codec: u64Codec,
    gate: PF.STATUS,
    summary: "set the virtio device status byte",
  }),
  [FR.GET_STATUS]: entry(F, FR.GET_STATUS, "GET_STATUS", {
    codec: emptyCodec,
    replyCodec: u64Codec,
    gate: PF.STATUS,
    summary: "get the virtio device status byte",
  }),
  [FR.GET_SHARED_OBJECT]: entry(F, FR.GET_SHARED_OBJECT, "GET_SHARED_OBJECT", {
    codec: sharedObjectCodec,
    replyCodec: sharedObjectReplyCodec,
    replyOnFailure: { value: 1n, uuid: null },
    replyFds: OPTIONAL_FD,
    gate: PF.SHARED_OBJECT,
    summary: "get the dmabuf fd of a shared object",
  }),
  [FR.SET_DEVICE_STATE_FD]: entry(F, FR.SET_DEVICE_STATE_FD, "SET_DEVICE_STATE_FD", {
    codec: deviceStateParamsCodec,
    fds: ONE_FD,
    replyCodec: deviceStateReplyCodec,
    replyOnFailure: { result: 1, noFd: true },
    replyFds: OPTIONAL_FD,
    gate: PF.DEVICE_STATE,
    summary: "start a device-state transfer over the attached pipe end",
    replyCheck(p, fds, request) {
      checkNoFdFlag(p.noFd, fds, request);
      if (p.result !== 0 && !p.noFd) {
        throw new VhostUserError("ERR_VHOST_BAD_FIELD", "reply both fails and returns an fd", {
          request,
          field: "result",
          value: p.result,
        });
      }
    },
  }),
  [FR.CHECK_DEVICE_STATE]: entry(F, FR.CHECK_DEVICE_STATE, "CHECK_DEVICE_STATE", {
    codec: emptyCodec,
    replyCodec: u64Codec,
    replyOnFailure: 1n,
    gate: PF.DEVICE_STATE,
    summary: "ask whether the device-state transfer succeeded (reply 0 = success)",
  }),
});

const BR = BackendRequest;

/** The back-end request table (vhost-user: "Back-end message types"). */
export const BACKEND_REQUESTS: BackendTable = Object.freeze({
  [BR.IOTLB_MSG]: entry(B, BR.IOTLB_MSG, "IOTLB_MSG", {
    codec: iotlbCodec,
    gate: "ACCESS_PLATFORM",
    summary: "report an IOTLB miss or access failure",
  }),
  [BR.CONFIG_CHANGE_MSG]: entry(B, BR.CONFIG_CHANGE_MSG, "CONFIG_CHANGE_MSG", {
    codec: emptyCodec,
    gate: PF.CONFIG,
    summary: "the device config space changed",
  }),
  [BR.VRING_HOST_NOTIFIER_MSG]: entry(B, BR.VRING_HOST_NOTIFIER_MSG, "VRING_HOST_NOTIFIER_MSG", {
    codec: vringAreaCodec,
    fds: OPTIONAL_FD,
    gate: PF.HOST_NOTIFIER,
    summary: "set (fd) or unregister (no-fd flag) a queue's host notifier area",
    check: (p, fds, request) => checkNoFdFlag(p.noFd, fds, request),
  }),
  [BR.VRING_CALL]: entry(B, BR.VRING_CALL, "VRING_CALL", {
    codec: vringStateCodec,
    gate: PF.INBAND_NOTIFICATIONS,
    summary: "in-band call notification of a queue",
  }),
  [BR.VRING_ERR]: entry(B, BR.VRING_ERR, "VRING_ERR", {
    codec: vringStateCodec,
    gate: PF.INBAND_NOTIFICATIONS,
    summary: "in-band error notification of a queue",
  }),
  [BR.SHARED_OBJECT_ADD]: entry(B, BR.SHARED_OBJECT_ADD, "SHARED_OBJECT_ADD", {
    codec: sharedObjectCodec,
    gate: PF.SHARED_OBJECT,
    summary: "add a shared object to the front-end's table",
  }),
  [BR.SHARED_OBJECT_REMOVE]: entry(B, BR.SHARED_OBJECT_REMOVE, "SHARED_OBJECT_REMOVE", {
    codec: sharedObjectCodec,
    gate: PF.SHARED_OBJECT,
    summary: "remove a shared object this back-end owns",
  }),
  [BR.SHARED_OBJECT_LOOKUP]: entry(B, BR.SHARED_OBJECT_LOOKUP, "SHARED_OBJECT_LOOKUP", {
    codec: sharedObjectCodec,
    replyCodec: u64Codec,
    replyFds: OPTIONAL_FD,
    gate: PF.SHARED_OBJECT,
    summary: "look up a shared object's dmabuf fd",
  }),
});

/** Every front-end table entry, by id. */
export const FRONTEND_REQUEST_SPECS: readonly AnyRequestSpec[] = Object.freeze(
  Object.values(FRONTEND_REQUESTS as Record<number, AnyRequestSpec>).sort((a, b) => a.id - b.id),
);

/** Every back-end table entry, by id. */
export const BACKEND_REQUEST_SPECS: readonly AnyRequestSpec[] = Object.freeze(
  Object.values(BACKEND_REQUESTS as Record<number, AnyRequestSpec>).sort((a, b) => a.id - b.id),
);

function lookup(table: object, id: number): AnyRequestSpec | undefined {
  return Object.hasOwn(table, id) ? (table as Record<number, AnyRequestSpec>)[id] : undefined;
}

/**
 * Look up a front-end request.
 * @param id request id from a header
 * @returns the entry, or undefined for an unknown id
 */
export function frontendRequestSpec<K extends FrontendRequest>(id: K): FrontendTable[K];
export function frontendRequestSpec(id: number): AnyRequestSpec | undefined;
export function frontendRequestSpec(id: number): AnyRequestSpec | undefined {
  return lookup(FRONTEND_REQUESTS, id);
}

/**
 * Look up a back-end request.
 * @param id request id from a header
 * @returns the entry, or undefined for an unknown id
 */
export function backendRequestSpec<K extends BackendRequest>(id: K): BackendTable[K];
export function backendRequestSpec(id: number): AnyRequestSpec | undefined;
export function backendRequestSpec(id: number): AnyRequestSpec | undefined {
  return lookup(BACKEND_REQUESTS, id);
}

/**
 * Look up a request in either table.
 * @param table which table
 * @param id request id
 * @returns the entry, or undefined for an unknown id
 */
export function requestSpec(table: TableName, id: number): AnyRequestSpec | undefined {
  return lookup(table === "frontend" ? FRONTEND_REQUESTS : BACKEND_REQUESTS, id);
}

/**
 * A request id for logs: `"SET_VRING_NUM (8)"`, or `"UNKNOWN (99)"`.
 * @param id request id
 * @param table which table (default front-end)
 * @returns the name and the id
 */
export function describeRequest(id: number, table: TableName = "frontend"): string {
  const spec = requestSpec(table, id);
  return `${spec ? spec.name : "UNKNOWN"} (${id})`;
}

/** Context for reply rules that depend on more than the negotiated features. */
export interface ReplyContext {
  /** the front-end is setting up postcopy (SET_MEM_TABLE/ADD_MEM_REG then carry a reply) */
  postcopy?: boolean;
}

/**
 * Whether a request gets a reply body (vhost-user: "Communication", list of messages that
 * require a reply).
 * @param spec the table entry
 * @param protocolFeatures negotiated protocol features
 * @param context postcopy state
 * @returns true when the receiver must send a reply body whatever the flags
 */
export function hasExplicitReply(
  spec: AnyRequestSpec,
  protocolFeatures: bigint,
  context: ReplyContext = {},
): boolean {
  switch (spec.reply) {
    case "none":
      return false;
    case "postcopy":
      return context.postcopy === true;
    case "always":
      return spec.replyFeature === null || hasFeature(protocolFeatures, spec.replyFeature);
  }
}

/**
 * Whether the receiver must answer with a u64 ack (vhost-user: REPLY_ACK): NEED_REPLY is set,
 * REPLY_ACK is negotiated and the request has no reply body of its own (a request that already
 * has one gets exactly one reply, the body).
 * @param spec the table entry
 * @param flags the header flags
 * @param protocolFeatures negotiated protocol features
 * @param context postcopy state
 * @returns true when a u64 ack (0 = success) must be sent
 */
export function needsAck(
  spec: AnyRequestSpec,
  flags: number,
  protocolFeatures: bigint,
  context: ReplyContext = {},
): boolean {
  return (
    (flags & FLAG_NEED_REPLY) !== 0 &&
    hasFeature(protocolFeatures, ProtocolFeature.REPLY_ACK) &&
    !hasExplicitReply(spec, protocolFeatures, context)
  );
}

/**
 * What reply, if any, follows a request.
 * @param spec the table entry
 * @param flags the header flags
 * @param protocolFeatures negotiated protocol features
 * @param context postcopy state
 * @returns `"body"`, `"ack"` or null
 */
export function replyExpectation(
  spec: AnyRequestSpec,
  flags: number,
  protocolFeatures: bigint,
  context: ReplyContext = {},
): "body" | "ack" | null {
  if (hasExplicitReply(spec, protocolFeatures, context)) return "body";
  return needsAck(spec, flags, protocolFeatures, context) ? "ack" : null;
}

/**
 * The reply body that reports a failed request (vhost-user: "Communication": a request with a
 * reply body is always answered, also on failure): the entry's `replyOnFailure`, else the
 * zero-filled minimum body (0 features, size 0 config, zero-sized inflight area...).
 * @param spec the table entry
 * @param request the request payload (echoed where the reply names a queue or a region)
 * @returns the payload to pass to the reply encoder, or null when the request has no reply body
 */
export function failureReply(spec: AnyRequestSpec, request?: unknown): unknown {
  if (spec.replyCodec === null || spec.replySize === null) return null;
  if (spec.replyOnFailure !== null) return spec.replyOnFailure;
  const zero = spec.replyCodec.decode(new Uint8Array(spec.replySize.min), spec.name);
  if (
    spec.replyCodec === spec.codec &&
    typeof request === "object" &&
    request !== null &&
    "index" in request &&
    typeof zero === "object" &&
    zero !== null
  ) {
    // GET_VRING_BASE: the reply names the queue asked about.
    return { ...zero, index: (request as { index: number }).index };
  }
  return zero;
}

/** Feature state a gate is checked against. */
export interface NegotiatedFeatures {
  /** virtio features acked by SET_FEATURES (0n before) */
  features: bigint;
  /** protocol features set by SET_PROTOCOL_FEATURES (0n before) */
  protocolFeatures: bigint;
  /** virtio features the back-end offered (for requests legal before SET_FEATURES) */
  offeredFeatures?: bigint;
}

/**
 * Check that what gates a request has been negotiated (a back-end's semantic step;
 * vhost-user: "Protocol features", and each message's "Using this function requires...").
 * @param spec the table entry
 * @param negotiated the current feature state
 * @throws VhostUserError ERR_VHOST_NOT_NEGOTIATED naming the missing feature
 */
export function checkGate(spec: AnyRequestSpec, negotiated: NegotiatedFeatures): void {
  const gate = spec.gate;
  if (gate === null) return;
  const virtio = spec.allowedBeforeFeatures
    ? negotiated.features | (negotiated.offeredFeatures ?? 0n)
    : negotiated.features;
  const fail = (feature: string): never => {
    throw new VhostUserError("ERR_VHOST_NOT_NEGOTIATED", "feature not negotiated", {
      request: spec.name,
      field: "feature",
      value: feature,
    });
  };
  if (gate === "PROTOCOL_FEATURES") {
    if (!hasFeature(virtio, VirtioFeature.PROTOCOL_FEATURES)) fail("F_PROTOCOL_FEATURES");
    return;
  }
  if (gate === "ACCESS_PLATFORM") {
    if (!hasFeature(negotiated.features, VirtioFeature.ACCESS_PLATFORM)) fail("F_ACCESS_PLATFORM");
    return;
  }
  if (!hasFeature(negotiated.protocolFeatures, gate)) fail(`PROTOCOL_F_${ProtocolFeature[gate]}`);
}

/**
 * Name of a gate for docs and logs.
 * @param gate the gate
 * @returns e.g. `"LOG_SHMFD (1)"`, `"F_PROTOCOL_FEATURES"`, or `"-"`
 */
export function describeGate(gate: RequestGate): string {
  if (gate === null) return "-";
  if (gate === "PROTOCOL_FEATURES") return "F_PROTOCOL_FEATURES";
  if (gate === "ACCESS_PLATFORM") return "F_ACCESS_PLATFORM";
  return `${ProtocolFeature[gate]} (${gate})`;
}
