/**
 * A back-end that offers only LOG_SHMFD, RARP, REPLY_ACK and DEVICE_STATE (no MQ, CONFIG,
 * STATUS, BACKEND_REQ, RESET_DEVICE, CONFIGURE_MEM_SLOTS), as minimal vhost-user-net back-ends
 * do: the front-end and the orchestrator negotiate, move traffic and migrate with device state
 * using only those. The two sides are vhostkit switch ports whose negotiation is held to that
 * set (the protocol features both front-ends ask for), so the front-end never sends a request
 * that needs anything else.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import diagnostics_channel from "node:diagnostics_channel";
import { mkdtempSync, rmSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import type { AddressInfo, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { MESSAGE_DIAGNOSTICS_CHANNEL } from "../src/channel.js";
import type { MessageDiagnostic } from "../src/channel.js";
import { silentLogger } from "../src/backend/device.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import type { FrontendQueue } from "../src/frontend/queue.js";
import { Switch } from "../src/net/switch.js";
import { addVhostUserPort } from "../src/net/virtio-net.js";
import { newPortCounters, newPortOffloads } from "../src/net/port.js";
import type { Frame, SwitchPort } from "../src/net/port.js";
import { parseMac } from "../src/net/frame.js";
import { migrateSource } from "../src/orchestrator/source.js";
import type { MigratableGuest } from "../src/orchestrator/source.js";
import { receiveMigration } from "../src/orchestrator/destination.js";
import { ProtocolFeature, VirtioFeature, featureSet } from "../src/protocol/constants.js";
import { until } from "./helpers.js";

const MINIMAL = featureSet(
  ProtocolFeature.LOG_SHMFD,
  ProtocolFeature.RARP,
  ProtocolFeature.REPLY_ACK,
  ProtocolFeature.DEVICE_STATE,
);
/** Requests that need a protocol feature outside the minimal set. */
const NEEDS_MORE = new Set([
  "GET_QUEUE_NUM",
  "GET_CONFIG",
  "SET_CONFIG",
  "SET_STATUS",
  "GET_STATUS",
  "SET_BACKEND_REQ_FD",
  "RESET_DEVICE",
  "RESET_OWNER",
  "GET_MAX_MEM_SLOTS",
  "ADD_MEM_REG",
  "REM_MEM_REG",
]);
const GUEST_MAC = "52:54:00:12:34:56";
const PEER_MAC = "02:00:00:00:00:99";

class Sink implements SwitchPort {
  readonly offloads = newPortOffloads(false);
  readonly counters = newPortCounters();
  readonly up = true;
  readonly seqs: number[] = [];
  constructor(readonly name: string) {}
  deliver(frame: Frame): boolean {
    const d = frame.data;
    if (d.length >= 18 && d[12] === 0x88 && d[13] === 0xb5) {
      this.seqs.push(Buffer.from(d.buffer, d.byteOffset, d.length).readUInt32BE(14));
    }
    return true;
  }
}

function frame(seq: number): Uint8Array {
  const f = new Uint8Array(80);
  f.set(parseMac(PEER_MAC), 0);
  f.set(parseMac(GUEST_MAC), 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  Buffer.from(f.buffer).writeUInt32BE(seq, 14);
  return f;
}

/** Sends numbered frames on TX every millisecond until paused. */
class Sender implements MigratableGuest {
  seq = 0;
  #t: NodeJS.Timeout | null = null;
  constructor(public tx: FrontendQueue) {}
  start(): void {
    this.#t = setInterval(() => {
      this.tx.reclaim();
      for (let i = 0; i < 4; i++) {
        if (this.tx.sendFrame(frame(this.seq)) === null) break;
        this.seq++;
      }
    }, 1);
  }
  pause(): void {
    if (this.#t) clearInterval(this.#t);
    this.#t = null;
  }
  resume(): void {
    this.start();
  }
}

test("minimal protocol features (LOG_SHMFD, RARP, REPLY_ACK, DEVICE_STATE): negotiation, traffic and a migration with device state", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-minimal-"));
  const swA = new Switch({ logger: silentLogger });
  const swB = new Switch({ logger: silentLogger });
  const sinkA = new Sink("sink-a");
  const sinkB = new Sink("sink-b");
  swA.addPort(sinkA);
  swB.addPort(sinkB);
  const pa = addVhostUserPort(swA, {
    path: join(dir, "a.sock"),
    logger: silentLogger,
    mac: GUEST_MAC,
  });
  const pb = addVhostUserPort(swB, {
    path: join(dir, "b.sock"),
    logger: silentLogger,
    mac: GUEST_MAC,
  });
  const sent: string[] = [];
  const onMsg = (m: unknown): void => {
    const d = m as MessageDiagnostic;
    if (d.direction === "out" && d.kind === "request") sent.push(d.name);
  };
  diagnostics_channel.subscribe(MESSAGE_DIAGNOSTICS_CHANNEL, onMsg);
  const ram = GuestRam.create({ size: 4 << 20, name: "minimal-guest" });
  const fe = await VhostUserFrontend.connect(join(dir, "a.sock"));
  const server = createServer({ noDelay: true });
  let incoming: Awaited<ReturnType<typeof receiveMigration>> | null = null;
  try {
    const neg = await fe.negotiate({
      features: featureSet(VirtioFeature.VERSION_1, VirtioFeature.MAC),
      protocolFeatures: MINIMAL,
    });
    assert.equal(neg.protocolFeatures, MINIMAL, "exactly the minimal set");
    assert.equal(neg.queueNum, null);
    assert.equal(neg.maxMemSlots, null);
    const [rx, tx] = await fe.start(ram, [128, 128]);
    (rx as FrontendQueue).postRxBuffers(64);
    const sender = new Sender(tx as FrontendQueue);
    sender.start();
    await until(() => sinkA.seqs.length > 200, "traffic on the source", 8000);

    const dest = new Promise<Awaited<ReturnType<typeof receiveMigration>>>((resolve, reject) => {
      server.once("connection", (s: Socket) => {
        receiveMigration({
          stream: s,
          protocolFeatures: MINIMAL,
          connectBackend: () => VhostUserFrontend.connect(join(dir, "b.sock")),
        }).then(resolve, reject);
      });
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const port = (server.address() as AddressInfo).port;
    const stream = await new Promise<Socket>((resolve, reject) => {
      const s = createConnection({ host: "127.0.0.1", port }, () => resolve(s));
      s.once("error", reject);
    });
    const result = await migrateSource({
      frontend: fe,
      stream,
      guest: sender,
      verifyMemory: true,
      deviceFields: parseMac(GUEST_MAC),
    });
    incoming = await dest;
    assert.equal(result.deviceStateTransferred, true, "the port state went through DEVICE_STATE");
    assert.ok(result.backendStateBytes > 0);
    assert.equal(incoming.memoryVerified, true);
    assert.equal(incoming.frontend.protocolFeatures, MINIMAL);
    assert.equal(incoming.rarpSent, true, "SEND_RARP (the driver lacks GUEST_ANNOUNCE)");
    // traffic goes on from the destination, numbered on
    sender.tx = incoming.queues[1] as FrontendQueue;
    const before = sinkB.seqs.length;
    sender.start();
    await until(() => sinkB.seqs.length > before + 200, "traffic on the destination", 8000);
    sender.pause();
    const bad = sent.filter((n) => NEEDS_MORE.has(n));
    assert.deepEqual(bad, [], "no request outside the minimal set was sent");
    // every frame once across both switches
    await new Promise((r) => setTimeout(r, 100));
    const all = [...sinkA.seqs, ...sinkB.seqs].sort((a, b) => a - b);
    assert.equal(new Set(all).size, all.length, "no frame twice");
    assert.deepEqual(
      all,
      Array.from({ length: sender.seq }, (_, i) => i),
      "every frame once",
    );
  } finally {
    diagnostics_channel.unsubscribe(MESSAGE_DIAGNOSTICS_CHANNEL, onMsg);
    server.close();
    incoming?.frontend.close();
    incoming?.ram.close();
    fe.close();
    ram.close();
    pa.close();
    pb.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
