/**
 * Byte-exact fixtures for every message of the vhost-user protocol, in both directions, and the
 * codec edge cases (vring base encodings, memory tables, reserved bits).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  BACKEND_REQUEST_SPECS,
  BackendRequest,
  FLAG_NEED_REPLY,
  FRONTEND_REQUEST_SPECS,
  FrontendRequest,
  MessageDecoder,
  ProtocolFeature,
  SET_SLAVE_REQ_FD,
  VhostUserError,
  VirtioFeature,
  checkDeviceStateParams,
  checkGate,
  configCodec,
  decodePackedVringBase,
  decodeSplitVringBase,
  describeRequest,
  encodeAck,
  encodeBackendReply,
  encodeBackendRequest,
  encodeFrontendReply,
  encodeFrontendRequest,
  encodePackedVringBase,
  encodeSplitVringBase,
  featureMask,
  featureSet,
  frontendRequestSpec,
  hasExplicitReply,
  hasFeature,
  iotlbCodec,
  memoryTableCodec,
  needsAck,
  replyExpectation,
  uuidFromString,
  uuidToString,
  vringAddrCodec,
  vringFdCodec,
  type DecodedMessage,
  type TableName,
} from "../src/protocol/index.js";

/** Hex string (spaces allowed) to bytes. */
function hex(text: string): Uint8Array {
  const clean = text.replace(/\s+/g, "");
  assert.equal(clean.length % 2, 0, `odd hex length: ${text}`);
  return Uint8Array.from(clean.match(/../g) ?? [], (b) => parseInt(b, 16));
}

function toHex(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString("hex");
}

function assertCode(fn: () => unknown, code: string): VhostUserError {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  assert.ok(
    caught instanceof VhostUserError,
    `expected VhostUserError ${code}, got ${String(caught)}`,
  );
  assert.equal(caught.code, code, caught.message);
  return caught;
}

interface Fixture {
  title: string;
  table: TableName;
  expect: "request" | "reply";
  /** the exact wire bytes, header included */
  wire: string;
  encode: () => Uint8Array;
  payload: unknown;
  kind?: "request" | "reply" | "ack";
  fds?: number[];
  replyKind?: "body" | "ack";
}

const UUID = "00112233445566778899aabbccddeeff";
const uuid = hex(UUID);
const region1 = {
  guestPhysAddr: 0n,
  memorySize: 0x10000000n,
  userspaceAddr: 0x7f0000000000n,
  mmapOffset: 0n,
};
const region2 = {
  guestPhysAddr: 0x100000000n,
  memorySize: 0x40000000n,
  userspaceAddr: 0x7f0040000000n,
  mmapOffset: 0x1000n,
};
const REGION1 = "0000000000000000 0000001000000000 00000000007f0000 0000000000000000";
const REGION2 = "0000000001000000 0000004000000000 00000040007f0000 0010000000000000";
const mac = hex("525400123456");

const FR = FrontendRequest;
const BR = BackendRequest;

const frontendRequests: Fixture[] = [
  {
    title: "GET_FEATURES",
    wire: "01000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.GET_FEATURES, null),
    payload: null,
  },
  {
    title: "SET_FEATURES",
    wire: "02000000 01000000 08000000 0000004001000000",
    encode: () => encodeFrontendRequest(FR.SET_FEATURES, 0x140000000n),
    payload: 0x140000000n,
  },
  {
    title: "SET_OWNER",
    wire: "03000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.SET_OWNER, null),
    payload: null,
  },
  {
    title: "RESET_OWNER",
    wire: "04000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.RESET_OWNER, null),
    payload: null,
  },
  {
    title: "SET_MEM_TABLE (1 region)",
    wire: `05000000 01000000 28000000 01000000 00000000 ${REGION1}`,
    encode: () => encodeFrontendRequest(FR.SET_MEM_TABLE, { regions: [region1] }),
    payload: { regions: [region1] },
    fds: [100],
  },
  {
    title: "SET_LOG_BASE",
    wire: "06000000 01000000 10000000 0020000000000000 0000000000000000",
    encode: () => encodeFrontendRequest(FR.SET_LOG_BASE, { mmapSize: 0x2000n, mmapOffset: 0n }),
    payload: { mmapSize: 0x2000n, mmapOffset: 0n },
    fds: [100],
  },
  {
    title: "SET_LOG_FD",
    wire: "07000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.SET_LOG_FD, null),
    payload: null,
    fds: [100],
  },
  {
    title: "SET_VRING_NUM",
    wire: "08000000 01000000 08000000 01000000 00010000",
    encode: () => encodeFrontendRequest(FR.SET_VRING_NUM, { index: 1, num: 256 }),
    payload: { index: 1, num: 256 },
  },
  {
    title: "SET_VRING_ADDR (VRING_F_LOG)",
    wire:
      "09000000 01000000 28000000 00000000 01000000 00100000007f0000 00300000007f0000 " +
      "00200000007f0000 0030000000000000",
    encode: () =>
      encodeFrontendRequest(FR.SET_VRING_ADDR, {
        index: 0,
        flags: 1,
        descUserAddr: 0x7f0000001000n,
        usedUserAddr: 0x7f0000003000n,
        availUserAddr: 0x7f0000002000n,
        logGuestAddr: 0x3000n,
      }),
    payload: {
      index: 0,
      flags: 1,
      descUserAddr: 0x7f0000001000n,
      usedUserAddr: 0x7f0000003000n,
      availUserAddr: 0x7f0000002000n,
      logGuestAddr: 0x3000n,
    },
  },
  {
    title: "SET_VRING_BASE",
    wire: "0a000000 01000000 08000000 00000000 34120000",
    encode: () => encodeFrontendRequest(FR.SET_VRING_BASE, { index: 0, num: 0x1234 }),
    payload: { index: 0, num: 0x1234 },
  },
  {
    title: "GET_VRING_BASE",
    wire: "0b000000 01000000 08000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.GET_VRING_BASE, { index: 1, num: 0 }),
    payload: { index: 1, num: 0 },
  },
  {
    title: "SET_VRING_KICK (fd)",
    wire: "0c000000 01000000 08000000 0100000000000000",
    encode: () => encodeFrontendRequest(FR.SET_VRING_KICK, { index: 1, noFd: false }),
    payload: { index: 1, noFd: false },
    fds: [100],
  },
  {
    title: "SET_VRING_CALL (no fd)",
    wire: "0d000000 01000000 08000000 0001000000000000",
    encode: () => encodeFrontendRequest(FR.SET_VRING_CALL, { index: 0, noFd: true }),
    payload: { index: 0, noFd: true },
  },
  {
    title: "SET_VRING_ERR (fd)",
    wire: "0e000000 01000000 08000000 0200000000000000",
    encode: () => encodeFrontendRequest(FR.SET_VRING_ERR, { index: 2, noFd: false }),
    payload: { index: 2, noFd: false },
    fds: [100],
  },
  {
    title: "GET_PROTOCOL_FEATURES",
    wire: "0f000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.GET_PROTOCOL_FEATURES, null),
    payload: null,
  },
  {
    title: "SET_PROTOCOL_FEATURES",
    wire: "10000000 01000000 08000000 0b00000000000000",
    encode: () => encodeFrontendRequest(FR.SET_PROTOCOL_FEATURES, 0x0bn),
    payload: 0x0bn,
  },
  {
    title: "GET_QUEUE_NUM",
    wire: "11000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.GET_QUEUE_NUM, null),
    payload: null,
  },
  {
    title: "SET_VRING_ENABLE",
    wire: "12000000 01000000 08000000 01000000 01000000",
    encode: () => encodeFrontendRequest(FR.SET_VRING_ENABLE, { index: 1, num: 1 }),
    payload: { index: 1, num: 1 },
  },
  {
    title: "SEND_RARP",
    wire: "13000000 01000000 08000000 525400123456 0000",
    encode: () => encodeFrontendRequest(FR.SEND_RARP, { mac }),
    payload: { mac },
  },
  {
    title: "NET_SET_MTU (NEED_REPLY)",
    wire: "14000000 09000000 08000000 dc05000000000000",
    encode: () => encodeFrontendRequest(FR.NET_SET_MTU, 1500n, { needReply: true }),
    payload: 1500n,
  },
  {
    title: "SET_BACKEND_REQ_FD",
    wire: "15000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.SET_BACKEND_REQ_FD, null),
    payload: null,
    fds: [100],
  },
  {
    title: "IOTLB_MSG (update, NEED_REPLY)",
    wire:
      "16000000 09000000 20000000 0010000000000000 0010000000000000 00100000007f0000 " +
      "0302 000000000000",
    encode: () =>
      encodeFrontendRequest(
        FR.IOTLB_MSG,
        { iova: 0x1000n, size: 0x1000n, uaddr: 0x7f0000001000n, perm: 3, type: 2 },
        { needReply: true },
      ),
    payload: { iova: 0x1000n, size: 0x1000n, uaddr: 0x7f0000001000n, perm: 3, type: 2 },
  },
  {
    title: "SET_VRING_ENDIAN",
    wire: "17000000 01000000 08000000 00000000 01000000",
    encode: () => encodeFrontendRequest(FR.SET_VRING_ENDIAN, { index: 0, num: 1 }),
    payload: { index: 0, num: 1 },
  },
  {
    title: "GET_CONFIG",
    wire: "18000000 01000000 10000000 00000000 04000000 00000000 00000000",
    encode: () =>
      encodeFrontendRequest(FR.GET_CONFIG, {
        offset: 0,
        size: 4,
        flags: 0,
        payload: new Uint8Array(4),
      }),
    payload: { offset: 0, size: 4, flags: 0, payload: new Uint8Array(4) },
  },
  {
    title: "SET_CONFIG",
    wire: "19000000 01000000 12000000 00000000 06000000 00000000 525400123456",
    encode: () =>
      encodeFrontendRequest(FR.SET_CONFIG, { offset: 0, size: 6, flags: 0, payload: mac }),
    payload: { offset: 0, size: 6, flags: 0, payload: mac },
  },
  {
    title: "CREATE_CRYPTO_SESSION (opaque)",
    wire: "1a000000 01000000 04000000 deadbeef",
    encode: () => encodeFrontendRequest(FR.CREATE_CRYPTO_SESSION, hex("deadbeef")),
    payload: hex("deadbeef"),
  },
  {
    title: "CLOSE_CRYPTO_SESSION",
    wire: "1b000000 01000000 08000000 0700000000000000",
    encode: () => encodeFrontendRequest(FR.CLOSE_CRYPTO_SESSION, 7n),
    payload: 7n,
  },
  {
    title: "POSTCOPY_ADVISE",
    wire: "1c000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.POSTCOPY_ADVISE, null),
    payload: null,
  },
  {
    title: "POSTCOPY_LISTEN (NEED_REPLY)",
    wire: "1d000000 09000000 00000000",
    encode: () => encodeFrontendRequest(FR.POSTCOPY_LISTEN, null, { needReply: true }),
    payload: null,
  },
  {
    title: "POSTCOPY_END (NEED_REPLY)",
    wire: "1e000000 09000000 00000000",
    encode: () => encodeFrontendRequest(FR.POSTCOPY_END, null, { needReply: true }),
    payload: null,
  },
  {
    title: "GET_INFLIGHT_FD",
    wire: "1f000000 01000000 18000000 0000000000000000 0000000000000000 0200 0001 00000000",
    encode: () =>
      encodeFrontendRequest(FR.GET_INFLIGHT_FD, {
        mmapSize: 0n,
        mmapOffset: 0n,
        numQueues: 2,
        queueSize: 256,
      }),
    payload: { mmapSize: 0n, mmapOffset: 0n, numQueues: 2, queueSize: 256 },
  },
  {
    title: "SET_INFLIGHT_FD",
    wire: "20000000 01000000 18000000 0020000000000000 0000000000000000 0200 0001 00000000",
    encode: () =>
      encodeFrontendRequest(FR.SET_INFLIGHT_FD, {
        mmapSize: 0x2000n,
        mmapOffset: 0n,
        numQueues: 2,
        queueSize: 256,
      }),
    payload: { mmapSize: 0x2000n, mmapOffset: 0n, numQueues: 2, queueSize: 256 },
    fds: [100],
  },
  {
    title: "GPU_SET_SOCKET",
    wire: "21000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.GPU_SET_SOCKET, null),
    payload: null,
    fds: [100],
  },
  {
    title: "RESET_DEVICE",
    wire: "22000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.RESET_DEVICE, null),
    payload: null,
  },
  {
    title: "VRING_KICK",
    wire: "23000000 01000000 08000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.VRING_KICK, { index: 1, num: 0 }),
    payload: { index: 1, num: 0 },
  },
  {
    title: "GET_MAX_MEM_SLOTS",
    wire: "24000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.GET_MAX_MEM_SLOTS, null),
    payload: null,
  },
  {
    title: "ADD_MEM_REG",
    wire: `25000000 01000000 28000000 0000000000000000 ${REGION2}`,
    encode: () => encodeFrontendRequest(FR.ADD_MEM_REG, region2),
    payload: region2,
    fds: [100],
  },
  {
    title: "REM_MEM_REG",
    wire: `26000000 01000000 28000000 0000000000000000 ${REGION2}`,
    encode: () => encodeFrontendRequest(FR.REM_MEM_REG, region2),
    payload: region2,
  },
  {
    title: "SET_STATUS",
    wire: "27000000 01000000 08000000 0f00000000000000",
    encode: () => encodeFrontendRequest(FR.SET_STATUS, 0x0fn),
    payload: 0x0fn,
  },
  {
    title: "GET_STATUS",
    wire: "28000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.GET_STATUS, null),
    payload: null,
  },
  {
    title: "GET_SHARED_OBJECT",
    wire: `29000000 01000000 10000000 ${UUID}`,
    encode: () => encodeFrontendRequest(FR.GET_SHARED_OBJECT, { uuid }),
    payload: { uuid },
  },
  {
    title: "SET_DEVICE_STATE_FD (SAVE, STOPPED)",
    wire: "2a000000 01000000 08000000 00000000 00000000",
    encode: () => encodeFrontendRequest(FR.SET_DEVICE_STATE_FD, { direction: 0, phase: 0 }),
    payload: { direction: 0, phase: 0 },
    fds: [100],
  },
  {
    title: "CHECK_DEVICE_STATE",
    wire: "2b000000 01000000 00000000",
    encode: () => encodeFrontendRequest(FR.CHECK_DEVICE_STATE, null),
    payload: null,
  },
].map((f) => ({ ...f, table: "frontend" as const, expect: "request" as const }));

const backendRequests: Fixture[] = [
  {
    title: "BACKEND IOTLB_MSG (miss)",
    wire:
      "01000000 01000000 20000000 0020000000000000 0000000000000000 0000000000000000 " +
      "0101 000000000000",
    encode: () =>
      encodeBackendRequest(BR.IOTLB_MSG, { iova: 0x2000n, size: 0n, uaddr: 0n, perm: 1, type: 1 }),
    payload: { iova: 0x2000n, size: 0n, uaddr: 0n, perm: 1, type: 1 },
  },
  {
    title: "BACKEND CONFIG_CHANGE_MSG (NEED_REPLY)",
    wire: "02000000 09000000 00000000",
    encode: () => encodeBackendRequest(BR.CONFIG_CHANGE_MSG, null, { needReply: true }),
    payload: null,
  },
  {
    title: "BACKEND VRING_HOST_NOTIFIER_MSG (fd)",
    wire: "03000000 01000000 18000000 0100000000000000 0010000000000000 0000000000000000",
    encode: () =>
      encodeBackendRequest(BR.VRING_HOST_NOTIFIER_MSG, {
        index: 1,
        noFd: false,
        size: 0x1000n,
        offset: 0n,
      }),
    payload: { index: 1, noFd: false, size: 0x1000n, offset: 0n },
    fds: [100],
  },
  {
    title: "BACKEND VRING_CALL",
    wire: "04000000 01000000 08000000 01000000 00000000",
    encode: () => encodeBackendRequest(BR.VRING_CALL, { index: 1, num: 0 }),
    payload: { index: 1, num: 0 },
  },
  {
    title: "BACKEND VRING_ERR",
    wire: "05000000 01000000 08000000 00000000 00000000",
    encode: () => encodeBackendRequest(BR.VRING_ERR, { index: 0, num: 0 }),
    payload: { index: 0, num: 0 },
  },
  {
    title: "BACKEND SHARED_OBJECT_ADD",
    wire: `06000000 01000000 10000000 ${UUID}`,
    encode: () => encodeBackendRequest(BR.SHARED_OBJECT_ADD, { uuid }),
    payload: { uuid },
  },
  {
    title: "BACKEND SHARED_OBJECT_REMOVE",
    wire: `07000000 01000000 10000000 ${UUID}`,
    encode: () => encodeBackendRequest(BR.SHARED_OBJECT_REMOVE, { uuid }),
    payload: { uuid },
  },
  {
    title: "BACKEND SHARED_OBJECT_LOOKUP (NEED_REPLY)",
    wire: `08000000 09000000 10000000 ${UUID}`,
    encode: () => encodeBackendRequest(BR.SHARED_OBJECT_LOOKUP, { uuid }, { needReply: true }),
    payload: { uuid },
  },
].map((f) => ({ ...f, table: "backend" as const, expect: "request" as const }));

const frontendReplies: Fixture[] = [
  {
    title: "reply GET_FEATURES",
    wire: "01000000 05000000 08000000 0000004401000000",
    encode: () => encodeFrontendReply(FR.GET_FEATURES, 0x144000000n),
    payload: 0x144000000n,
  },
  {
    title: "reply SET_MEM_TABLE (postcopy, 2 regions)",
    wire: `05000000 05000000 48000000 02000000 00000000 ${REGION1} ${REGION2}`,
    encode: () => encodeFrontendReply(FR.SET_MEM_TABLE, { regions: [region1, region2] }),
    payload: { regions: [region1, region2] },
    replyKind: "body" as const,
  },
  {
    title: "reply SET_LOG_BASE (empty, DPDK)",
    wire: "06000000 05000000 00000000",
    encode: () => encodeFrontendReply(FR.SET_LOG_BASE, { value: null, log: null }),
    payload: { value: null, log: null },
  },
  {
    title: "reply SET_LOG_BASE (u64, libvhost-user)",
    wire: "06000000 05000000 08000000 0000000000000000",
    encode: () => encodeFrontendReply(FR.SET_LOG_BASE, { value: 0n, log: null }),
    payload: { value: 0n, log: null },
  },
  {
    title: "reply SET_LOG_BASE (log echo, rust-vmm)",
    wire: "06000000 05000000 10000000 0020000000000000 0000000000000000",
    encode: () =>
      encodeFrontendReply(FR.SET_LOG_BASE, {
        value: null,
        log: { mmapSize: 0x2000n, mmapOffset: 0n },
      }),
    payload: { value: null, log: { mmapSize: 0x2000n, mmapOffset: 0n } },
  },
  {
    title: "reply GET_VRING_BASE",
    wire: "0b000000 05000000 08000000 01000000 34120000",
    encode: () => encodeFrontendReply(FR.GET_VRING_BASE, { index: 1, num: 0x1234 }),
    payload: { index: 1, num: 0x1234 },
  },
  {
    title: "reply GET_PROTOCOL_FEATURES",
    wire: "0f000000 05000000 08000000 0b80000000000000",
    encode: () => encodeFrontendReply(FR.GET_PROTOCOL_FEATURES, 0x800bn),
    payload: 0x800bn,
  },
  {
    title: "reply GET_QUEUE_NUM",
    wire: "11000000 05000000 08000000 0200000000000000",
    encode: () => encodeFrontendReply(FR.GET_QUEUE_NUM, 2n),
    payload: 2n,
  },
  {
    title: "reply IOTLB_MSG",
    wire: "16000000 05000000 08000000 0000000000000000",
    encode: () => encodeFrontendReply(FR.IOTLB_MSG, 0n),
    payload: 0n,
  },
  {
    title: "reply GET_CONFIG",
    wire: "18000000 05000000 10000000 00000000 04000000 00000000 01020304",
    encode: () =>
      encodeFrontendReply(FR.GET_CONFIG, {
        offset: 0,
        size: 4,
        flags: 0,
        payload: hex("01020304"),
      }),
    payload: { offset: 0, size: 4, flags: 0, payload: hex("01020304") },
  },
  {
    title: "reply CREATE_CRYPTO_SESSION",
    wire: "1a000000 05000000 08000000 0100000000000000",
    encode: () => encodeFrontendReply(FR.CREATE_CRYPTO_SESSION, hex("0100000000000000")),
    payload: hex("0100000000000000"),
  },
  {
    title: "reply POSTCOPY_ADVISE (userfaultfd)",
    wire: "1c000000 05000000 00000000",
    encode: () => encodeFrontendReply(FR.POSTCOPY_ADVISE, new Uint8Array(0)),
    payload: new Uint8Array(0),
    fds: [100],
  },
  {
    title: "reply POSTCOPY_LISTEN",
    wire: "1d000000 05000000 08000000 0000000000000000",
    encode: () => encodeFrontendReply(FR.POSTCOPY_LISTEN, 0n),
    payload: 0n,
  },
  {
    title: "reply POSTCOPY_END",
    wire: "1e000000 05000000 08000000 0000000000000000",
    encode: () => encodeFrontendReply(FR.POSTCOPY_END, 0n),
    payload: 0n,
  },
  {
    title: "reply GET_INFLIGHT_FD",
    wire: "1f000000 05000000 18000000 0020000000000000 0000000000000000 0200 0001 00000000",
    encode: () =>
      encodeFrontendReply(FR.GET_INFLIGHT_FD, {
        mmapSize: 0x2000n,
        mmapOffset: 0n,
        numQueues: 2,
        queueSize: 256,
      }),
    payload: { mmapSize: 0x2000n, mmapOffset: 0n, numQueues: 2, queueSize: 256 },
    fds: [100],
  },
  {
    title: "reply GET_MAX_MEM_SLOTS",
    wire: "24000000 05000000 08000000 fd01000000000000",
    encode: () => encodeFrontendReply(FR.GET_MAX_MEM_SLOTS, 509n),
    payload: 509n,
  },
  {
    title: "reply ADD_MEM_REG (postcopy)",
    wire: `25000000 05000000 28000000 0000000000000000 ${REGION2}`,
    encode: () => encodeFrontendReply(FR.ADD_MEM_REG, region2),
    payload: region2,
    replyKind: "body" as const,
  },
  {
    title: "reply GET_STATUS",
    wire: "28000000 05000000 08000000 0f00000000000000",
    encode: () => encodeFrontendReply(FR.GET_STATUS, 0x0fn),
    payload: 0x0fn,
  },
  {
    title: "reply GET_SHARED_OBJECT (uuid echo + dmabuf fd)",
    wire: `29000000 05000000 10000000 ${UUID}`,
    encode: () => encodeFrontendReply(FR.GET_SHARED_OBJECT, { value: null, uuid }),
    payload: { value: null, uuid },
    fds: [100],
  },
  {
    title: "reply GET_SHARED_OBJECT (u64, no fd)",
    wire: "29000000 05000000 08000000 0000000000000000",
    encode: () => encodeFrontendReply(FR.GET_SHARED_OBJECT, { value: 0n, uuid: null }),
    payload: { value: 0n, uuid: null },
  },
  {
    title: "reply SET_DEVICE_STATE_FD (no fd)",
    wire: "2a000000 05000000 08000000 0001000000000000",
    encode: () => encodeFrontendReply(FR.SET_DEVICE_STATE_FD, { result: 0, noFd: true }),
    payload: { result: 0, noFd: true },
  },
  {
    title: "reply SET_DEVICE_STATE_FD (back-end fd)",
    wire: "2a000000 05000000 08000000 0000000000000000",
    encode: () => encodeFrontendReply(FR.SET_DEVICE_STATE_FD, { result: 0, noFd: false }),
    payload: { result: 0, noFd: false },
    fds: [100],
  },
  {
    title: "reply CHECK_DEVICE_STATE",
    wire: "2b000000 05000000 08000000 0000000000000000",
    encode: () => encodeFrontendReply(FR.CHECK_DEVICE_STATE, 0n),
    payload: 0n,
  },
  {
    title: "ack SET_VRING_ADDR (success)",
    wire: "09000000 05000000 08000000 0000000000000000",
    encode: () => encodeAck("frontend", FR.SET_VRING_ADDR, true),
    payload: 0n,
    kind: "ack" as const,
  },
  {
    title: "ack SET_FEATURES (failure)",
    wire: "02000000 05000000 08000000 0100000000000000",
    encode: () => encodeAck("frontend", FR.SET_FEATURES, false),
    payload: 1n,
    kind: "ack" as const,
  },
  {
    title: "ack SET_MEM_TABLE (no postcopy)",
    wire: "05000000 05000000 08000000 0000000000000000",
    encode: () => encodeAck("frontend", FR.SET_MEM_TABLE, 0n),
    payload: 0n,
    kind: "ack" as const,
  },
].map((f) => ({ ...f, table: "frontend" as const, expect: "reply" as const }));

const backendReplies: Fixture[] = [
  {
    title: "reply BACKEND SHARED_OBJECT_LOOKUP (fd)",
    wire: "08000000 05000000 08000000 0000000000000000",
    encode: () => encodeBackendReply(BR.SHARED_OBJECT_LOOKUP, 0n),
    payload: 0n,
    fds: [100],
  },
  {
    title: "ack BACKEND CONFIG_CHANGE_MSG",
    wire: "02000000 05000000 08000000 0000000000000000",
    encode: () => encodeAck("backend", BR.CONFIG_CHANGE_MSG, true),
    payload: 0n,
    kind: "ack" as const,
  },
  {
    title: "ack BACKEND VRING_HOST_NOTIFIER_MSG (failure)",
    wire: "03000000 05000000 08000000 0100000000000000",
    encode: () => encodeAck("backend", BR.VRING_HOST_NOTIFIER_MSG, false),
    payload: 1n,
    kind: "ack" as const,
  },
].map((f) => ({ ...f, table: "backend" as const, expect: "reply" as const }));

const ALL: Fixture[] = [
  ...frontendRequests,
  ...backendRequests,
  ...frontendReplies,
  ...backendReplies,
];

function decodeOne(f: Fixture, bytes: Uint8Array): DecodedMessage {
  const decoder = new MessageDecoder({
    table: f.table,
    expect: f.expect,
    ...(f.replyKind ? { replyKind: () => f.replyKind as "body" | "ack" } : {}),
  });
  const out = decoder.push(bytes, f.fds ?? []);
  assert.equal(out.length, 1);
  assert.equal(decoder.pendingBytes, 0);
  return out[0] as DecodedMessage;
}

describe("byte-exact fixtures", () => {
  for (const f of ALL) {
    it(`${f.table} ${f.expect}: ${f.title}`, () => {
      const wire = hex(f.wire);
      // encode -> exact bytes
      assert.equal(toHex(f.encode()), toHex(wire));
      // decode(bytes) -> object
      const m = decodeOne(f, wire);
      assert.equal(m.kind, f.kind ?? f.expect);
      assert.deepEqual(m.payload, f.payload);
      assert.deepEqual(m.fds, f.fds ?? []);
      assert.equal(m.size, wire.length - 12);
      assert.equal(m.needReply, (m.flags & FLAG_NEED_REPLY) !== 0);
      // round trip: re-encoding the decoded payload gives the same bytes
      let again: Uint8Array;
      if (m.kind === "request") {
        again =
          f.table === "frontend"
            ? encodeFrontendRequest(m.request as FrontendRequest, m.payload as never, {
                needReply: m.needReply,
              })
            : encodeBackendRequest(m.request as BackendRequest, m.payload as never, {
                needReply: m.needReply,
              });
      } else if (m.kind === "ack") {
        again = encodeAck(f.table, m.request, m.payload);
      } else {
        again =
          f.table === "frontend"
            ? encodeFrontendReply(m.request as FrontendRequest, m.payload as never)
            : encodeBackendReply(m.request as BackendRequest, m.payload as never);
      }
      assert.equal(toHex(again), toHex(wire));
    });
  }

  it("covers every front-end and back-end request, and every kind of reply", () => {
    const ids = (table: TableName, expect: string) =>
      new Set(
        ALL.filter((f) => f.table === table && f.expect === expect).map((f) =>
          new DataView(hex(f.wire).buffer).getUint32(0, true),
        ),
      );
    assert.deepEqual(
      [...ids("frontend", "request")].sort((a, b) => a - b),
      FRONTEND_REQUEST_SPECS.map((s) => s.id),
    );
    assert.deepEqual(
      [...ids("backend", "request")].sort((a, b) => a - b),
      BACKEND_REQUEST_SPECS.map((s) => s.id),
    );
    const withBody = (specs: typeof FRONTEND_REQUEST_SPECS) =>
      specs.filter((s) => s.replyCodec !== null).map((s) => s.id);
    for (const id of withBody(FRONTEND_REQUEST_SPECS)) {
      assert.ok(ids("frontend", "reply").has(id), `no reply fixture for ${describeRequest(id)}`);
    }
    for (const id of withBody(BACKEND_REQUEST_SPECS)) {
      assert.ok(ids("backend", "reply").has(id), `no reply fixture for backend ${id}`);
    }
    assert.ok(frontendReplies.some((f) => f.kind === "ack"));
    assert.ok(backendReplies.some((f) => f.kind === "ack"));
  });
});

describe("request table", () => {
  it("has ids 1..43 and 1..8 with the enum names", () => {
    assert.deepEqual(
      FRONTEND_REQUEST_SPECS.map((s) => s.id),
      Array.from({ length: 43 }, (_, i) => i + 1),
    );
    for (const s of FRONTEND_REQUEST_SPECS) assert.equal(s.name, FrontendRequest[s.id]);
    assert.deepEqual(
      BACKEND_REQUEST_SPECS.map((s) => s.id),
      Array.from({ length: 8 }, (_, i) => i + 1),
    );
    for (const s of BACKEND_REQUEST_SPECS) assert.equal(s.name, BackendRequest[s.id]);
    assert.equal(SET_SLAVE_REQ_FD, FrontendRequest.SET_BACKEND_REQ_FD);
    assert.equal(FrontendRequest.SET_DEVICE_STATE_FD, 42);
    assert.equal(FrontendRequest.CHECK_DEVICE_STATE, 43);
    assert.equal(ProtocolFeature.DEVICE_STATE, 19);
    assert.equal(ProtocolFeature.GET_VRING_BASE_INFLIGHT, 20);
    assert.equal(describeRequest(8), "SET_VRING_NUM (8)");
    assert.equal(describeRequest(99), "UNKNOWN (99)");
    assert.equal(describeRequest(3, "backend"), "VRING_HOST_NOTIFIER_MSG (3)");
  });

  it("has sizes within the cap and fds within MAX_FDS", () => {
    for (const s of [...FRONTEND_REQUEST_SPECS, ...BACKEND_REQUEST_SPECS]) {
      assert.ok(s.size.min <= s.size.max && s.size.max <= 4096, s.name);
      assert.ok(s.fds.min <= s.fds.max && s.fds.max <= 8, s.name);
      assert.ok(Object.isFrozen(s), s.name);
    }
    assert.deepEqual(frontendRequestSpec(FR.SET_MEM_TABLE).fds, { min: 1, max: 8 });
    assert.deepEqual(frontendRequestSpec(FR.SET_LOG_BASE).fds, { min: 1, max: 1 });
    assert.deepEqual(frontendRequestSpec(FR.SET_VRING_KICK).fds, { min: 0, max: 1 });
    assert.deepEqual(frontendRequestSpec(FR.REM_MEM_REG).fds, { min: 0, max: 1 });
    assert.deepEqual(frontendRequestSpec(FR.SET_DEVICE_STATE_FD).fds, { min: 1, max: 1 });
    assert.equal(frontendRequestSpec(99), undefined);
  });

  it("implements the reply and REPLY_ACK rules", () => {
    const logShm = featureMask(ProtocolFeature.LOG_SHMFD);
    const ack = featureMask(ProtocolFeature.REPLY_ACK);
    const spec = (id: FrontendRequest) => frontendRequestSpec(id);
    assert.equal(hasExplicitReply(spec(FR.GET_FEATURES), 0n), true);
    assert.equal(hasExplicitReply(spec(FR.SET_LOG_BASE), 0n), false);
    assert.equal(hasExplicitReply(spec(FR.SET_LOG_BASE), logShm), true);
    assert.equal(hasExplicitReply(spec(FR.GET_INFLIGHT_FD), 0n), false);
    assert.equal(
      hasExplicitReply(spec(FR.GET_INFLIGHT_FD), featureMask(ProtocolFeature.INFLIGHT_SHMFD)),
      true,
    );
    assert.equal(hasExplicitReply(spec(FR.SET_MEM_TABLE), ack), false);
    assert.equal(hasExplicitReply(spec(FR.SET_MEM_TABLE), ack, { postcopy: true }), true);
    assert.equal(hasExplicitReply(spec(FR.SET_VRING_ADDR), ack), false);
    // NEED_REPLY on a request without a body: ack only when REPLY_ACK is negotiated
    assert.equal(needsAck(spec(FR.SET_VRING_ADDR), 0x9, ack), true);
    assert.equal(needsAck(spec(FR.SET_VRING_ADDR), 0x9, 0n), false);
    assert.equal(needsAck(spec(FR.SET_VRING_ADDR), 0x1, ack), false);
    // NEED_REPLY on a request that already has a reply body: exactly one reply, the body
    assert.equal(needsAck(spec(FR.GET_FEATURES), 0x9, ack), false);
    assert.equal(needsAck(spec(FR.SET_LOG_BASE), 0x9, ack | logShm), false);
    assert.equal(needsAck(spec(FR.SET_LOG_BASE), 0x9, ack), true);
    assert.equal(replyExpectation(spec(FR.GET_VRING_BASE), 0x1, 0n), "body");
    assert.equal(replyExpectation(spec(FR.SET_VRING_NUM), 0x9, ack), "ack");
    assert.equal(replyExpectation(spec(FR.SET_VRING_NUM), 0x1, ack), null);
  });

  it("checks feature gates", () => {
    const pf = featureMask(VirtioFeature.PROTOCOL_FEATURES);
    const spec = (id: FrontendRequest) => frontendRequestSpec(id);
    checkGate(spec(FR.SET_OWNER), { features: 0n, protocolFeatures: 0n });
    // GET_PROTOCOL_FEATURES is legal before SET_FEATURES once offered
    checkGate(spec(FR.GET_PROTOCOL_FEATURES), {
      features: 0n,
      protocolFeatures: 0n,
      offeredFeatures: pf,
    });
    const e = assertCode(
      () =>
        checkGate(spec(FR.SET_VRING_ENABLE), {
          features: 0n,
          protocolFeatures: 0n,
          offeredFeatures: pf,
        }),
      "ERR_VHOST_NOT_NEGOTIATED",
    );
    assert.equal(e.fatal, false);
    checkGate(spec(FR.SET_VRING_ENABLE), { features: pf, protocolFeatures: 0n });
    const g = assertCode(
      () => checkGate(spec(FR.SET_LOG_BASE), { features: pf, protocolFeatures: 0n }),
      "ERR_VHOST_NOT_NEGOTIATED",
    );
    assert.match(
      g.message,
      /^SET_LOG_BASE: feature not negotiated \(feature=PROTOCOL_F_LOG_SHMFD\)$/,
    );
    checkGate(spec(FR.SET_LOG_BASE), {
      features: pf,
      protocolFeatures: featureMask(ProtocolFeature.LOG_SHMFD),
    });
    assertCode(
      () => checkGate(spec(FR.IOTLB_MSG), { features: pf, protocolFeatures: 0n }),
      "ERR_VHOST_NOT_NEGOTIATED",
    );
  });
});

describe("feature helpers", () => {
  it("masks and tests bits as bigint", () => {
    assert.equal(featureMask(VirtioFeature.PROTOCOL_FEATURES), 0x40000000n);
    assert.equal(featureMask(VirtioFeature.LOG_ALL), 0x4000000n);
    assert.equal(featureMask(VirtioFeature.VERSION_1), 0x100000000n);
    assert.equal(featureSet(VirtioFeature.VERSION_1, VirtioFeature.RING_PACKED), 0x500000000n);
    assert.equal(hasFeature(0x400000000n, VirtioFeature.RING_PACKED), true);
    assert.equal(hasFeature(0x400000000n, VirtioFeature.VERSION_1), false);
    assert.throws(() => featureMask(64), RangeError);
  });
});

describe("vring base encodings", () => {
  it("split: bits 0-15, reserved bits rejected", () => {
    assert.equal(encodeSplitVringBase({ availIdx: 0xffff }), 0xffff);
    assert.deepEqual(decodeSplitVringBase(0x1234), { availIdx: 0x1234 });
    const e = assertCode(() => decodeSplitVringBase(0x10000), "ERR_VHOST_BAD_FIELD");
    assert.match(e.message, /^SET_VRING_BASE: .*\(num=65536\)$/);
    assertCode(() => encodeSplitVringBase({ availIdx: 0x10000 }), "ERR_VHOST_BAD_FIELD");
  });

  it("packed: bits 0-14, 15, 16-30, 31", () => {
    const base = { availIdx: 0x1234, availWrap: true, usedIdx: 0x0567, usedWrap: true };
    assert.equal(encodePackedVringBase(base), 0x85679234);
    assert.deepEqual(decodePackedVringBase(0x85679234), base);
    assert.deepEqual(decodePackedVringBase(0x00018000), {
      availIdx: 0,
      availWrap: true,
      usedIdx: 1,
      usedWrap: false,
    });
    assertCode(() => encodePackedVringBase({ ...base, availIdx: 0x8000 }), "ERR_VHOST_BAD_FIELD");
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), (num) => {
        assert.equal(encodePackedVringBase(decodePackedVringBase(num)), num);
      }),
    );
  });
});

describe("memory tables", () => {
  const regions8 = Array.from({ length: 8 }, (_, i) => ({
    guestPhysAddr: BigInt(i) << 32n,
    memorySize: 0x1000n * BigInt(i + 1),
    userspaceAddr: 0x7f0000000000n + (BigInt(i) << 32n),
    mmapOffset: BigInt(i) * 0x1000n,
  }));

  it("encodes and decodes 8 regions (8 fds)", () => {
    const wire = encodeFrontendRequest(FR.SET_MEM_TABLE, { regions: regions8 });
    assert.equal(wire.length, 12 + 8 + 8 * 32);
    assert.equal(toHex(wire.subarray(0, 20)), "05000000010000000801000008000000" + "00000000");
    // region 7 starts at 12 + 8 + 7*32
    assert.equal(
      toHex(wire.subarray(12 + 8 + 7 * 32, 12 + 8 + 8 * 32)),
      "0000000007000000" +
        "0080000000000000" +
        "0000000007 7f0000".replace(" ", "") +
        "0070000000000000",
    );
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    const [m] = d.push(wire, [1, 2, 3, 4, 5, 6, 7, 8]);
    assert.deepEqual(m?.payload, { regions: regions8 });
  });

  it("rejects 0 regions, 9 regions, and a size that does not match nregions", () => {
    assertCode(
      () => memoryTableCodec.decode(hex("00000000 00000000" + "00".repeat(32)), "T"),
      "ERR_VHOST_BAD_FIELD",
    );
    const nine = new Uint8Array(8 + 9 * 32);
    nine[0] = 9;
    assertCode(() => memoryTableCodec.decode(nine, "T"), "ERR_VHOST_BAD_FIELD");
    assertCode(
      () => encodeFrontendRequest(FR.SET_MEM_TABLE, { regions: [...regions8, region1] }),
      "ERR_VHOST_BAD_FIELD",
    );
    assertCode(
      () => encodeFrontendRequest(FR.SET_MEM_TABLE, { regions: [] }),
      "ERR_VHOST_BAD_FIELD",
    );
    // nregions = 2 but one region of bytes
    const short = hex(`02000000 00000000 ${REGION1}`);
    const e = assertCode(
      () => memoryTableCodec.decode(short, "SET_MEM_TABLE"),
      "ERR_VHOST_BAD_PAYLOAD_SIZE",
    );
    assert.match(e.message, /^SET_MEM_TABLE: memory table size does not match nregions=2/);
    // 9 regions on the wire are rejected from the header (size above 264) before the body
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    assertCode(() => d.push(hex("05000000 01000000 28010000")), "ERR_VHOST_BAD_PAYLOAD_SIZE");
    assert.equal(d.largestAllocation, 0);
  });

  it("accepts the full 264-byte form when the unused regions are zero", () => {
    const full = new Uint8Array(8 + 8 * 32);
    full.set(hex(`01000000 00000000 ${REGION1}`));
    assert.deepEqual(memoryTableCodec.decode(full, "T"), { regions: [region1] });
    full[100] = 1;
    assertCode(() => memoryTableCodec.decode(full, "T"), "ERR_VHOST_BAD_FIELD");
    // a size that is not a whole number of regions is refused
    assertCode(
      () => memoryTableCodec.decode(full.subarray(0, 8 + 32 + 5), "T"),
      "ERR_VHOST_BAD_PAYLOAD_SIZE",
    );
  });

  it("needs one fd per region", () => {
    const wire = encodeFrontendRequest(FR.SET_MEM_TABLE, { regions: [region1, region2] });
    const fewer = new MessageDecoder({ table: "frontend", expect: "request" });
    assertCode(() => fewer.push(wire, [7]), "ERR_VHOST_MISSING_FDS");
    assert.deepEqual(fewer.drainFds(), [7]);
    const more = new MessageDecoder({ table: "frontend", expect: "request" });
    assertCode(() => more.push(wire, [7, 8, 9]), "ERR_VHOST_UNEXPECTED_FDS");
    assert.deepEqual(more.drainFds(), [7, 8, 9]);
  });
});

describe("field checks", () => {
  it("vring address: unknown flag bits rejected", () => {
    const bytes = new Uint8Array(40);
    bytes[4] = 2;
    const e = assertCode(
      () => vringAddrCodec.decode(bytes, "SET_VRING_ADDR"),
      "ERR_VHOST_BAD_FIELD",
    );
    assert.equal(e.message, "SET_VRING_ADDR: unknown vring address flag (flags=2)");
    assert.equal(e.request, "SET_VRING_ADDR");
    assert.equal(e.field, "flags");
    assert.equal(e.value, 2);
  });

  it("kick/call/err: reserved bits rejected, no-fd flag must agree with the fds", () => {
    assertCode(
      () => vringFdCodec.decode(hex("0002000000000000"), "SET_VRING_KICK"),
      "ERR_VHOST_BAD_FIELD",
    );
    assertCode(
      () => vringFdCodec.encode({ index: 256, noFd: false }, "SET_VRING_KICK"),
      "ERR_VHOST_BAD_FIELD",
    );
    const withFlag = encodeFrontendRequest(FR.SET_VRING_KICK, { index: 0, noFd: true });
    assertCode(
      () => new MessageDecoder({ table: "frontend", expect: "request" }).push(withFlag, [5]),
      "ERR_VHOST_UNEXPECTED_FDS",
    );
    const withoutFlag = encodeFrontendRequest(FR.SET_VRING_CALL, { index: 0, noFd: false });
    assertCode(
      () => new MessageDecoder({ table: "frontend", expect: "request" }).push(withoutFlag, []),
      "ERR_VHOST_MISSING_FDS",
    );
  });

  it("config space: size must match the payload and be <= 256", () => {
    assertCode(
      () => configCodec.decode(hex("00000000 05000000 00000000 01020304"), "GET_CONFIG"),
      "ERR_VHOST_BAD_PAYLOAD_SIZE",
    );
    const big = new Uint8Array(12 + 257);
    new DataView(big.buffer).setUint32(4, 257, true);
    assertCode(() => configCodec.decode(big, "GET_CONFIG"), "ERR_VHOST_BAD_FIELD");
    assertCode(
      () => encodeFrontendRequest(FR.SET_CONFIG, { offset: 0, size: 3, flags: 0, payload: mac }),
      "ERR_VHOST_BAD_FIELD",
    );
  });

  it("IOTLB: unknown permission or type rejected", () => {
    const b = new Uint8Array(32);
    b[24] = 4;
    b[25] = 1;
    assertCode(() => iotlbCodec.decode(b, "IOTLB_MSG"), "ERR_VHOST_BAD_FIELD");
    b[24] = 1;
    b[25] = 5;
    assertCode(() => iotlbCodec.decode(b, "IOTLB_MSG"), "ERR_VHOST_BAD_FIELD");
  });

  it("device state: unknown direction/phase decode as numbers and are refused by the semantic check", () => {
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    const [m] = d.push(hex("2a000000 01000000 08000000 02000000 07000000"), [9]);
    assert.deepEqual(m?.payload, { direction: 2, phase: 7 });
    const e = assertCode(
      () => checkDeviceStateParams(m?.payload as { direction: number; phase: number }),
      "ERR_VHOST_BAD_FIELD",
    );
    assert.equal(e.message, "SET_DEVICE_STATE_FD: unknown transfer direction (direction=2)");
    assertCode(() => checkDeviceStateParams({ direction: 1, phase: 1 }), "ERR_VHOST_BAD_FIELD");
    checkDeviceStateParams({ direction: 1, phase: 0 });
    // a reply that both fails and returns an fd is refused
    const r = new MessageDecoder({ table: "frontend", expect: "reply" });
    assertCode(
      () => r.push(hex("2a000000 05000000 08000000 0100000000000000"), [4]),
      "ERR_VHOST_BAD_FIELD",
    );
  });

  it("encoders check ranges", () => {
    assertCode(() => encodeFrontendRequest(FR.SET_FEATURES, -1n), "ERR_VHOST_BAD_FIELD");
    assertCode(() => encodeFrontendRequest(FR.SET_FEATURES, 1n << 64n), "ERR_VHOST_BAD_FIELD");
    assertCode(
      () => encodeFrontendRequest(FR.SET_VRING_NUM, { index: -1, num: 0 }),
      "ERR_VHOST_BAD_FIELD",
    );
    assertCode(
      () => encodeFrontendRequest(FR.SET_VRING_NUM, { index: 0, num: 2 ** 32 }),
      "ERR_VHOST_BAD_FIELD",
    );
    assertCode(
      () => encodeFrontendRequest(FR.SEND_RARP, { mac: new Uint8Array(5) }),
      "ERR_VHOST_BAD_FIELD",
    );
    assertCode(
      () => encodeFrontendRequest(FR.SET_OWNER, 0 as unknown as null),
      "ERR_VHOST_BAD_FIELD",
    );
    assertCode(
      () => encodeFrontendReply(FR.SET_VRING_NUM as FrontendRequest.GET_FEATURES, 0n),
      "ERR_VHOST_UNEXPECTED_REPLY",
    );
  });

  it("UUID text form", () => {
    assert.equal(uuidToString(uuid), "00112233-4455-6677-8899-aabbccddeeff");
    assert.deepEqual(uuidFromString("00112233-4455-6677-8899-AABBCCDDEEFF"), uuid);
    assert.throws(() => uuidFromString("not-a-uuid"), RangeError);
  });
});
