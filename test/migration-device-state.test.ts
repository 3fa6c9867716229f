/**
 * The device state of a switch port moved from one switch to another by a vhostkit front-end
 * over SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE (vhost-user: "Migrating back-end state"):
 * SAVE and LOAD over the front-end's pipe and over a back-end-provided fd; refused phases and
 * running rings; bad streams leave the destination as it was; the suspended device writes no
 * guest memory and sends no call; SEND_RARP broadcasts a RARP on the other ports.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { native } from "../src/native.js";
import {
  DeviceStateDirection,
  DeviceStatePhase,
  FrontendRequest,
  ProtocolFeature,
  VirtioFeature,
  featureMask,
  featureSet,
} from "../src/protocol/constants.js";
import type { DeviceStateReply } from "../src/protocol/codecs.js";
import { Channel } from "../src/channel.js";
import { serveBackend } from "../src/backend/server.js";
import type { BackendServer } from "../src/backend/server.js";
import { BackendSession } from "../src/backend/session.js";
import { silentLogger } from "../src/backend/device.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { FRONTEND_PROTOCOL_FEATURES, VhostUserFrontend } from "../src/frontend/frontend.js";
import { Switch } from "../src/net/switch.js";
import { VirtioNetDevice } from "../src/net/virtio-net.js";
import { newPortCounters, newPortOffloads } from "../src/net/port.js";
import type { Frame, SwitchPort } from "../src/net/port.js";
import { formatMac, macKey, parseMac } from "../src/net/frame.js";
import { readStateFromFd, writeStateToFd } from "../src/migration/transfer.js";
import { inspectStream } from "../src/migration/stream.js";
import { openFds, sleep, until } from "./helpers.js";

const FR = FrontendRequest;

/** The fds open now (epoll instances aside). */
const FDS_AT_START = openFds();
const GUEST_MAC = "52:54:00:12:34:56";
const PEER_MAC = "02:00:00:00:00:99";
const FEATURES = featureSet(
  VirtioFeature.VERSION_1,
  VirtioFeature.MRG_RXBUF,
  VirtioFeature.NET_F_CSUM,
  VirtioFeature.GUEST_CSUM,
  VirtioFeature.GUEST_TSO4,
  VirtioFeature.MAC,
  VirtioFeature.STATUS,
  VirtioFeature.RING_EVENT_IDX,
);
const PROTOCOL = FRONTEND_PROTOCOL_FEATURES | featureMask(ProtocolFeature.DEVICE_STATE);

let counter = 0;
function socketPath(): string {
  counter++;
  return join(tmpdir(), `vk-mig-ds-${process.pid}-${counter}.sock`);
}

/** A switch port that keeps what it is given (another guest, an uplink). */
class RecordingPort implements SwitchPort {
  readonly offloads = newPortOffloads(false);
  readonly counters = newPortCounters();
  readonly up = true;
  readonly frames: Uint8Array[] = [];
  constructor(readonly name: string) {}
  deliver(frame: Frame): boolean {
    this.frames.push(frame.data.slice());
    return true;
  }
}

/** An Ethernet frame: dst, src, EtherType 0x88b5, `len` bytes in all. */
function ethFrame(dst: string, src: string, seq: number, len = 80): Uint8Array {
  const f = new Uint8Array(len);
  f.set(parseMac(dst), 0);
  f.set(parseMac(src), 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  f[14] = seq & 0xff;
  return f;
}

/**
 * A port on a switch; its saveState/loadState (VirtioNetDevice's) go through
 * src/net/port-state.ts with the switch it is in, and keep the MACs learned before the
 * suspension (`suspendedMacs`).
 */
function migratingPort(sw: Switch, name: string): VirtioNetDevice {
  const dev = new VirtioNetDevice({ name, mac: GUEST_MAC });
  sw.addPort(dev);
  return dev;
}

interface Conn {
  fe: VhostUserFrontend;
  /** errors the back-end reported (failed requests) */
  errors: Error[];
  ram: GuestRam;
  session: BackendSession;
  close(): void;
}

/** Connect a front-end: through a listening server, or a socketpair session with its own fd. */
async function connect(
  dev: VirtioNetDevice,
  ownStateChannel: boolean,
  name: string,
): Promise<Conn> {
  const ram = GuestRam.create({ size: 2 << 20, name });
  const errors: Error[] = [];
  if (ownStateChannel) {
    const [a, b] = native.socketpair();
    const ch = new Channel(a, { role: "backend", kind: "main", name });
    const session = new BackendSession(ch, dev, { name, logger: silentLogger, ownStateChannel });
    session.on("error", (e: Error) => errors.push(e));
    const fe = new VhostUserFrontend(b, { name: `${name}-fe`, requestTimeoutMs: 5000 });
    return {
      fe,
      errors,
      ram,
      session,
      close() {
        fe.close();
        session.close();
        ram.close();
      },
    };
  }
  const path = socketPath();
  const server: BackendServer = serveBackend(dev, { path, logger: silentLogger });
  server.on("error", (e: Error) => errors.push(e));
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 5000 });
  await until(() => server.session !== null, "the session", 3000);
  return {
    fe,
    errors,
    ram,
    session: server.session as BackendSession,
    close() {
      fe.close();
      server.close();
      ram.close();
    },
  };
}

/** SET_DEVICE_STATE_FD; returns the reply and our end of the channel (the back-end's if given). */
async function setStateFd(
  fe: VhostUserFrontend,
  direction: DeviceStateDirection,
  phase: number = DeviceStatePhase.STOPPED,
): Promise<{ reply: DeviceStateReply; fd: number | null }> {
  const [r, w] = native.pipe(true);
  const give = direction === DeviceStateDirection.SAVE ? w : r;
  const keep = direction === DeviceStateDirection.SAVE ? r : w;
  const msg = (await fe.request(FR.SET_DEVICE_STATE_FD, { direction, phase }, [
    give,
  ])) as unknown as {
    payload: DeviceStateReply;
    fds: number[];
  };
  native.close(give);
  if (msg.payload.result !== 0) {
    native.close(keep);
    for (const fd of msg.fds) native.close(fd);
    return { reply: msg.payload, fd: null };
  }
  if (!msg.payload.noFd) {
    // The back-end offered its own channel: drop ours (vhost-user: SET_DEVICE_STATE_FD).
    native.close(keep);
    assert.equal(msg.fds.length, 1, "a back-end fd comes with noFd clear");
    return { reply: msg.payload, fd: msg.fds[0] as number };
  }
  return { reply: msg.payload, fd: keep };
}

async function checkState(fe: VhostUserFrontend): Promise<bigint> {
  const m = (await fe.request(FR.CHECK_DEVICE_STATE, null)) as unknown as { payload: bigint };
  return m.payload;
}

/** Save the device state through the front-end: SET_DEVICE_STATE_FD(SAVE), read, CHECK. */
async function saveThrough(fe: VhostUserFrontend): Promise<{ bytes: Uint8Array; own: boolean }> {
  const { reply, fd } = await setStateFd(fe, DeviceStateDirection.SAVE);
  assert.equal(reply.result, 0, "SET_DEVICE_STATE_FD(SAVE) succeeds");
  const bytes = await readStateFromFd(fd as number, { maxBytes: 1 << 20 });
  assert.equal(await checkState(fe), 0n, "CHECK_DEVICE_STATE after SAVE");
  return { bytes, own: !reply.noFd };
}

/** Load a device state through the front-end: SET_DEVICE_STATE_FD(LOAD), write, CHECK. */
async function loadThrough(fe: VhostUserFrontend, bytes: Uint8Array): Promise<bigint> {
  const { reply, fd } = await setStateFd(fe, DeviceStateDirection.LOAD);
  assert.equal(reply.result, 0, "SET_DEVICE_STATE_FD(LOAD) succeeds");
  await writeStateToFd(fd as number, bytes);
  return checkState(fe);
}

function portSnapshot(dev: VirtioNetDevice, sw: Switch | string[]): string {
  const st = dev.state;
  return JSON.stringify({
    mac: st.mac,
    macSource: st.macSource,
    mtu: st.mtu,
    activePairs: st.activePairs,
    guestOffloads: st.guestOffloads,
    filter: { ...st.filter, vlans: Buffer.from(st.filter.vlans.buffer).toString("base64") },
    counters: dev.counters,
    pairs: dev.pairCounters,
    features: (dev.negotiatedFeatures & ~featureMask(VirtioFeature.LOG_ALL)).toString(16),
    macs: (Array.isArray(sw) ? sw : sw.macsOnPort(dev.name).map((m) => m.mac)).sort(),
  });
}

/**
 * Run traffic through the source port: the guest transmits from its MAC and from a second MAC
 * (learned on the port), the peer sends frames to the guest.
 */
async function traffic(conn: Conn, sw: Switch, peer: RecordingPort): Promise<void> {
  const { fe } = conn;
  fe.postRxBuffers(0, 32);
  for (let i = 0; i < 5; i++) fe.sendFrame(1, ethFrame("ff:ff:ff:ff:ff:ff", GUEST_MAC, i));
  fe.sendFrame(1, ethFrame(PEER_MAC, "52:54:00:aa:bb:cc", 9));
  await until(() => peer.frames.length >= 6, "the guest's frames on the peer port", 3000);
  for (let i = 0; i < 4; i++)
    sw.receive(peer, { data: ethFrame(GUEST_MAC, PEER_MAC, i), meta: {} });
  sw.flush();
  const rx = fe.queue(0)!;
  await until(
    () => {
      rx.receiveFrames();
      return rx.stats.used >= 4;
    },
    "the peer's frames in the guest",
    3000,
  );
}

for (const own of [false, true]) {
  test(`a port's state moves from switch A to switch B over ${own ? "a back-end-provided fd" : "the front-end's pipe"} (SAVE and LOAD)`, async () => {
    const swA = new Switch();
    const swB = new Switch();
    const peerA = new RecordingPort("peerA");
    const peerB = new RecordingPort("peerB");
    swA.addPort(peerA);
    swB.addPort(peerB);
    const devA = migratingPort(swA, "guest");
    const devB = migratingPort(swB, "guest");
    const src = await connect(devA, own, `mig-src-${own}`);
    const dst = await connect(devB, own, `mig-dst-${own}`);
    try {
      await src.fe.negotiate({ features: FEATURES, protocolFeatures: PROTOCOL });
      await src.fe.start(src.ram, [64, 64]);
      await traffic(src, swA, peerA);
      assert.ok(devA.counters.rxPackets >= 6 && devA.counters.txPackets >= 4);
      assert.deepEqual(
        swA
          .macsOnPort("guest")
          .map((m) => m.mac)
          .sort(),
        ["52:54:00:12:34:56", "52:54:00:aa:bb:cc"],
      );
      // Running rings: the transfer is refused (the device is not suspended).
      const refused = await setStateFd(src.fe, DeviceStateDirection.SAVE);
      assert.notEqual(refused.reply.result, 0, "SAVE refused while rings run");
      assert.equal(refused.fd, null);
      // Suspend: stop both rings (the port goes down: switch A forgets its MACs).
      const learned = swA.macsOnPort("guest").map((m) => m.mac);
      await src.fe.stopQueue(0);
      await src.fe.stopQueue(1);
      assert.equal(devA.up, false);
      const before = portSnapshot(devA, learned);
      const { bytes, own: gotOwn } = await saveThrough(src.fe);
      assert.equal(gotOwn, own, "the back-end offers its own fd exactly when configured to");
      assert.deepEqual(
        inspectStream(bytes).sections.map((s) => s.name),
        ["features", "port", "counters", "macs", "rx-filter", "pair-counters"],
      );
      assert.equal(portSnapshot(devA, learned), before, "saving does not change the source");

      // Destination: negotiate, LOAD before the rings are set up (as QEMU does), then start.
      await dst.fe.negotiate({ features: FEATURES, protocolFeatures: PROTOCOL });
      assert.equal(await loadThrough(dst.fe, bytes), 0n, "CHECK_DEVICE_STATE after LOAD");
      assert.equal(portSnapshot(devB, swB), before, "the destination holds the source's state");
      await dst.fe.start(dst.ram, [64, 64]);
      assert.equal(
        devB.negotiatedFeatures & ~featureMask(VirtioFeature.LOG_ALL),
        devA.negotiatedFeatures & ~featureMask(VirtioFeature.LOG_ALL),
      );
      assert.equal(devB.offloads.csum, true);
      assert.equal(devB.offloads.tso4, true);
      assert.deepEqual(
        swB
          .macsOnPort("guest")
          .map((m) => m.mac)
          .sort(),
        ["52:54:00:12:34:56", "52:54:00:aa:bb:cc"],
      );
      // The destination keeps counting from the source's counters.
      const rxBefore = devB.counters.rxPackets;
      dst.fe.sendFrame(1, ethFrame("ff:ff:ff:ff:ff:ff", GUEST_MAC, 42));
      await until(
        () => devB.counters.rxPackets === rxBefore + 1,
        "a frame on the destination",
        3000,
      );
    } finally {
      src.close();
      dst.close();
      swA.close();
      swB.close();
    }
  });
}

test("SET_DEVICE_STATE_FD: a phase other than STOPPED is refused and the fd closed", async () => {
  const sw = new Switch();
  const dev = migratingPort(sw, "guest");
  const c = await connect(dev, false, "mig-phase");
  try {
    await c.fe.negotiate({ features: FEATURES, protocolFeatures: PROTOCOL });
    const [r, w] = native.pipe(true);
    const msg = (await c.fe.request(
      FR.SET_DEVICE_STATE_FD,
      { direction: DeviceStateDirection.SAVE, phase: 1 },
      [w],
    )) as unknown as { payload: DeviceStateReply; fds: number[] };
    native.close(w);
    assert.notEqual(msg.payload.result, 0);
    assert.equal(msg.payload.noFd, true);
    assert.equal(msg.fds.length, 0);
    // The back-end closed its copy: the read end sees end of file at once.
    await until(
      () => native.read(r, new Uint8Array(8), 0, 8) === 0,
      "EOF on the refused pipe",
      3000,
    );
    native.close(r);
    // A proper transfer still works afterwards.
    const { bytes } = await saveThrough(c.fe);
    assert.ok(bytes.length > 16);
  } finally {
    c.close();
    sw.close();
  }
});

test("LOAD of a truncated or corrupted stream fails CHECK_DEVICE_STATE and leaves the port as it was", async () => {
  const swA = new Switch();
  const swB = new Switch();
  const devA = migratingPort(swA, "guest");
  const devB = migratingPort(swB, "guest");
  const src = await connect(devA, false, "mig-bad-src");
  const dst = await connect(devB, true, "mig-bad-dst");
  try {
    await src.fe.negotiate({ features: FEATURES, protocolFeatures: PROTOCOL });
    await src.fe.start(src.ram, [64, 64]);
    src.fe.sendFrame(1, ethFrame("ff:ff:ff:ff:ff:ff", GUEST_MAC, 1));
    await until(() => devA.counters.rxPackets === 1, "a frame on the source", 3000);
    await src.fe.stopQueue(0);
    await src.fe.stopQueue(1);
    const { bytes } = await saveThrough(src.fe);
    await dst.fe.negotiate({ features: FEATURES, protocolFeatures: PROTOCOL });
    const pristine = portSnapshot(devB, swB);
    const truncated = bytes.subarray(0, bytes.length - 3);
    const corrupted = bytes.slice();
    corrupted[40] = (corrupted[40] as number) ^ 0x55;
    const oversized = new Uint8Array((1 << 20) + 100);
    oversized.set(bytes);
    for (const [what, bad] of [
      ["truncated", truncated],
      ["corrupted", corrupted],
      ["oversized", oversized],
      ["empty", new Uint8Array(0)],
    ] as const) {
      assert.notEqual(await loadThrough(dst.fe, bad), 0n, `${what}: CHECK_DEVICE_STATE fails`);
      assert.equal(portSnapshot(devB, swB), pristine, `${what}: destination unchanged`);
    }
    assert.equal(await loadThrough(dst.fe, bytes), 0n, "the intact stream still loads");
    assert.equal(devB.counters.rxPackets, 1);
  } finally {
    src.close();
    dst.close();
    swA.close();
    swB.close();
  }
});

test("suspended: with every ring stopped the device writes no guest memory and sends no call", async () => {
  const sw = new Switch();
  const peer = new RecordingPort("peer");
  sw.addPort(peer);
  const dev = migratingPort(sw, "guest");
  const c = await connect(dev, false, "mig-susp");
  try {
    await c.fe.negotiate({ features: FEATURES, protocolFeatures: PROTOCOL });
    await c.fe.start(c.ram, [64, 64]);
    await traffic(c, sw, peer);
    // Buffers are posted, then the rings stop.
    c.fe.postRxBuffers(0, 16);
    await sleep(20);
    await c.fe.stopQueue(0);
    await c.fe.stopQueue(1);
    const rx = c.fe.queue(0)!;
    const tx = c.fe.queue(1)!;
    const hash = (): string =>
      createHash("sha256")
        .update(Buffer.concat(c.ram.regions.map((r) => c.ram.read(r.info.gpa, r.info.size))))
        .digest("hex");
    // The driver makes a TX frame available and publishes it (its own writes: the avail
    // index moves), then the memory is fingerprinted.
    const availBefore = tx.availIdx;
    tx.add([{ gpa: c.ram.alloc(128), len: 92, writable: false }] as never, "t");
    tx.kick();
    assert.notEqual(tx.availIdx, availBefore, "the frame is visible to the device");
    native.eventfdRead(rx.callFd); // calls made while the rings ran
    native.eventfdRead(tx.callFd);
    const memBefore = hash();
    const calls = rx.stats.calls + tx.stats.calls;
    const txBefore = dev.counters.txPackets;
    for (let i = 0; i < 20; i++)
      sw.receive(peer, { data: ethFrame(GUEST_MAC, PEER_MAC, i), meta: {} });
    sw.flush();
    // The TX queue is kicked with a frame pending: nothing may be taken.
    tx.forceKick();
    await sleep(100);
    assert.equal(hash(), memBefore, "guest memory unchanged");
    assert.equal(rx.stats.calls + tx.stats.calls, calls, "no call");
    assert.equal(dev.counters.txPackets, txBefore, "nothing delivered to the suspended port");
    assert.equal(c.session.vrings[1]!.started, false, "a kick does not restart a stopped ring");
    assert.equal(native.eventfdRead(rx.callFd), null);
    assert.equal(native.eventfdRead(tx.callFd), null);
  } finally {
    c.close();
    sw.close();
  }
});

test("SEND_RARP: a RARP broadcast for the MAC on every other port, and the MAC table moves", async () => {
  const sw = new Switch();
  const peer1 = new RecordingPort("uplink");
  const peer2 = new RecordingPort("other");
  sw.addPort(peer1);
  sw.addPort(peer2);
  const dev = migratingPort(sw, "guest");
  const c = await connect(dev, false, "mig-rarp");
  try {
    await c.fe.negotiate({ features: FEATURES, protocolFeatures: PROTOCOL });
    await c.fe.start(c.ram, [64, 64]);
    c.fe.postRxBuffers(0, 8); // the first kick starts the ring: the port comes up
    await until(() => dev.up, "the port up", 3000);
    const mac = "52:54:00:0a:0b:0c";
    // The MAC was last seen on the uplink (the guest lived on another host).
    sw.learnMac(mac, "uplink");
    await c.fe.sendRarp(mac);
    await c.fe.barrier();
    await until(() => peer1.frames.length > 0 && peer2.frames.length > 0, "the RARP", 3000);
    for (const p of [peer1, peer2]) {
      const f = p.frames[0] as Uint8Array;
      assert.equal(formatMac(f.subarray(0, 6)), "ff:ff:ff:ff:ff:ff", `${p.name}: broadcast`);
      assert.equal(formatMac(f.subarray(6, 12)), mac, `${p.name}: from the guest's MAC`);
      assert.equal((f[12] as number) * 256 + (f[13] as number), 0x8035, `${p.name}: RARP`);
      // ARP payload: htype 1, ptype IPv4, hlen 6, plen 4, op 3 (request reverse), sha = tha = mac
      assert.deepEqual(Array.from(f.subarray(14, 22)), [0, 1, 8, 0, 6, 4, 0, 3]);
      assert.equal(formatMac(f.subarray(22, 28)), mac);
      assert.equal(formatMac(f.subarray(32, 38)), mac);
    }
    assert.equal(
      sw.macTable().find((e) => e.mac === mac)?.port,
      "guest",
      "the switch moved the MAC to the guest's port",
    );
    assert.equal(dev.state.mac, macKey(parseMac(GUEST_MAC)), "the configured MAC is kept");
  } finally {
    c.close();
    sw.close();
  }
});

test("a migration that fails after SAVE: the source resumes as it was", async () => {
  const sw = new Switch();
  const peer = new RecordingPort("peer");
  sw.addPort(peer);
  const dev = migratingPort(sw, "guest");
  const c = await connect(dev, false, "mig-resume");
  try {
    await c.fe.negotiate({ features: FEATURES, protocolFeatures: PROTOCOL });
    await c.fe.start(c.ram, [64, 64]);
    await traffic(c, sw, peer);
    const acked = c.fe.ackedFeatures as bigint;
    // Migration begins (LOG_ALL), the device is suspended and saved...
    await c.fe.setFeatures(acked | featureMask(VirtioFeature.LOG_ALL));
    const learned = sw.macsOnPort("guest").map((m) => m.mac);
    await c.fe.stopQueue(0);
    await c.fe.stopQueue(1);
    const saved = portSnapshot(dev, learned);
    await saveThrough(c.fe);
    assert.equal(portSnapshot(dev, learned), saved);
    // ...then the migration fails: logging off, the rings restart where they stopped.
    await c.fe.setFeatures(acked);
    await c.fe.restartQueue(0);
    await c.fe.restartQueue(1);
    const rx = dev.counters.rxPackets;
    c.fe.sendFrame(1, ethFrame("ff:ff:ff:ff:ff:ff", GUEST_MAC, 77));
    await until(() => dev.counters.rxPackets === rx + 1, "traffic after the resume", 3000);
    assert.equal(dev.up, true);
    assert.equal(dev.offloads.tso4, true, "negotiated offloads kept");
    assert.equal(dev.negotiatedFeatures, acked);
    sw.receive(peer, { data: ethFrame(GUEST_MAC, PEER_MAC, 1), meta: {} });
    sw.flush();
    const q = c.fe.queue(0)!;
    const used = q.stats.used;
    await until(
      () => {
        q.receiveFrames();
        return q.stats.used > used;
      },
      "a frame delivered to the resumed guest",
      3000,
    );
  } finally {
    c.close();
    sw.close();
  }
});

test("no fd is left open by these tests", async () => {
  await sleep(50);
  const now = openFds();
  const leaked = [...now].filter((fd) => !FDS_AT_START.has(fd));
  assert.deepEqual(
    leaked.map((fd) => {
      try {
        return `${fd} -> ${readlinkSync(`/proc/self/fd/${fd}`)}`;
      } catch {
        return fd;
      }
    }),
    [],
  );
});
