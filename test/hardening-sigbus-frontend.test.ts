/**
 * The front-end side of SIGBUS hardening: what a vhostkit front-end maps is guest RAM and the
 * dirty log, both memfds it made itself and sends to the back-end (SET_MEM_TABLE, ADD_MEM_REG,
 * SET_LOG_BASE). It maps no fd a back-end sends (no inflight region: GET_INFLIGHT_FD is not
 * used). A hostile back-end that shrinks one of those memfds would make the front-end's next
 * access fault; the memfds are sealed (F_SEAL_SHRINK, as QEMU's memory-backend-memfd does), so
 * the shrink fails and the front-end never faults.
 */
import { test } from "node:test";
import assert from "node:assert/strict";

import { FileSeal, isNativeError, native } from "../src/native.js";
import { Channel } from "../src/channel.js";
import type { FrontendMessage } from "../src/channel.js";
import {
  FrontendRequest,
  ProtocolFeature,
  VirtioFeature,
  featureSet,
} from "../src/protocol/constants.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { FrontendDirtyLog } from "../src/frontend/migration.js";

/** A back-end that tries to shrink every memfd it is sent to one page, and records the result. */
class ShrinkingBackend {
  readonly channel: Channel<"main">;
  /** per memfd received: "shrunk" or the errno code of the refused ftruncate */
  readonly results: { request: string; result: string }[] = [];
  constructor(fd: number) {
    this.channel = new Channel<"main">(fd, { role: "backend", kind: "main", name: "shrinker" });
    this.channel.on("message", (m: FrontendMessage) => this.#handle(m));
  }
  #handle(m: FrontendMessage): void {
    const ch = this.channel;
    if (m.request === FrontendRequest.SET_MEM_TABLE || m.request === FrontendRequest.SET_LOG_BASE) {
      for (const fd of m.fds) {
        let result = "shrunk";
        try {
          native.ftruncate(fd, 4096);
        } catch (err) {
          result = isNativeError(err) ? err.code : String(err);
        }
        this.results.push({ request: m.name, result });
      }
    }
    for (const fd of m.fds) native.close(fd);
    switch (m.request) {
      case FrontendRequest.GET_FEATURES:
        ch.reply(m, featureSet(VirtioFeature.VERSION_1, VirtioFeature.PROTOCOL_FEATURES));
        break;
      case FrontendRequest.GET_PROTOCOL_FEATURES:
        ch.reply(m, featureSet(ProtocolFeature.LOG_SHMFD, ProtocolFeature.REPLY_ACK));
        break;
      case FrontendRequest.SET_PROTOCOL_FEATURES:
        ch.setNegotiatedProtocolFeatures(m.payload);
        break;
      case FrontendRequest.SET_LOG_BASE:
        ch.reply(m, { value: 0n, log: null });
        break;
      default:
        break;
    }
    if (ch.needsAck(m)) ch.ack(m, true);
  }
  close(): void {
    this.channel.close();
  }
}

test("sigbus (front-end): a back-end cannot shrink the guest RAM or dirty-log memfds it is sent; the front-end's mappings never fault", async () => {
  const [a, b] = native.socketpair();
  const be = new ShrinkingBackend(b);
  const fe = new VhostUserFrontend(a, { name: "fe", requestTimeoutMs: 3000 });
  fe.on("error", () => undefined);
  const ram = GuestRam.create({ size: 2 << 20, name: "vk-sigbus-fe" });
  const sharedRam = GuestRam.create({ size: 2 << 20, layout: "shared-fd", name: "vk-sigbus-fe2" });
  let log: FrontendDirtyLog | null = null;
  try {
    for (const fd of [...ram.regionFds, ...sharedRam.regionFds]) {
      assert.equal(native.fileSeals(fd) & FileSeal.SHRINK, FileSeal.SHRINK, "sealed");
    }
    await fe.negotiate({ features: featureSet(VirtioFeature.VERSION_1) });
    await fe.setMemTable(ram);
    await fe.setMemTable(sharedRam);
    log = FrontendDirtyLog.create(ram.memoryTable());
    await fe.request(FrontendRequest.SET_LOG_BASE, { mmapSize: BigInt(log.size), mmapOffset: 0n }, [
      log.fd,
    ]);
    // a shared-fd layout sends its one memfd once per region
    assert.deepEqual(be.results, [
      { request: "SET_MEM_TABLE", result: "EPERM" },
      { request: "SET_MEM_TABLE", result: "EPERM" },
      { request: "SET_MEM_TABLE", result: "EPERM" },
      { request: "SET_MEM_TABLE", result: "EPERM" },
      { request: "SET_LOG_BASE", result: "EPERM" },
    ]);
    // the front-end touches the last byte of every region and the log: no fault
    const before = native.faultCount();
    for (const r of [...ram.regions, ...sharedRam.regions]) {
      for (const p of r.pieces) p.bytes[p.size - 1] = 1;
    }
    log.fetchAndClear(() => undefined);
    assert.equal(native.faultCount(), before, "no SIGBUS survived in the front-end");
  } finally {
    log?.close();
    fe.close();
    be.close();
    ram.close();
    sharedRam.close();
  }
});

test("sigbus (front-end): guest RAM made with seal: false can be shrunk (the hostile-front-end tests use it)", () => {
  const ram = GuestRam.create({ regions: [{ gpa: 0, size: 1 << 20 }], seal: false });
  try {
    assert.equal(native.fileSeals(ram.regionFds[0]!), 0);
    native.ftruncate(ram.regionFds[0]!, 4096);
    assert.equal(native.fstatSize(ram.regionFds[0]!), 4096);
  } finally {
    ram.close();
  }
});
