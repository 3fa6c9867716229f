/**
 * vhostkit's front-end and migration orchestrator against QEMU 7.2's virtiofsd (C, on
 * libvhost-user), a back-end vhostkit did not write: FUSE reads byte for byte, rings stopped and
 * restarted, dirty logging while virtiofsd serves reads, a live migration to a second virtiofsd
 * and migrations that fail and leave the source serving.
 *
 * libvhost-user closes a ring's call fd on GET_VRING_BASE (`vu_get_vring_base_exec`) and
 * panics at its next notification when the front-end did not send SET_VRING_CALL again
 * ("libvhost-user: Error writing eventfd: Bad file descriptor"): every restart here is
 * followed by a request that makes virtiofsd notify.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import diagnostics_channel from "node:diagnostics_channel";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import type { AddressInfo, Server, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { MESSAGE_DIAGNOSTICS_CHANNEL } from "../src/channel.js";
import type { MessageDiagnostic } from "../src/channel.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { startDirtyLogging, stopDirtyLogging } from "../src/frontend/migration.js";
import type { FrontendQueue } from "../src/frontend/queue.js";
import { MigrationError, migrateSource } from "../src/orchestrator/source.js";
import type { MigratableGuest } from "../src/orchestrator/source.js";
import { receiveMigration } from "../src/orchestrator/destination.js";
import {
  SectionReader,
  SectionType,
  encodeJsonSection,
  encodeSection,
} from "../src/orchestrator/stream.js";
import { featureSet, hasFeature, VirtioFeature } from "../src/protocol/constants.js";
import { startVirtiofsd } from "./peers/libvhost-user.js";
import type { LibvhostUserPeer } from "./peers/libvhost-user.js";
import { FS_REQUEST_QUEUE, FUSE_ROOT_ID, VIRTIO_ID_FS, VirtioFsDriver } from "./peers/virtio-fs.js";
import type { VirtioFsDriverState } from "./peers/virtio-fs.js";
import { until } from "./helpers.js";

/** Files the tests read: name to content. */
const FILES = new Map<string, Buffer>([
  ["small.txt", Buffer.from("hello from virtiofsd\n")],
  ["odd.bin", randomBytes(5000)],
  ["big.bin", randomBytes(1 << 20)],
]);

function shareDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "vk-vfs-src-"));
  for (const [name, data] of FILES) writeFileSync(join(dir, name), data);
  return dir;
}

interface FsGuest {
  peer: LibvhostUserPeer;
  fe: VhostUserFrontend;
  ram: GuestRam;
  driver: VirtioFsDriver;
  dir: string;
  close(): Promise<void>;
}

/** virtiofsd serving a fresh directory, a front-end started on it, FUSE_INIT done. */
async function startFs(dir = shareDir(), ramBytes = 8 << 20): Promise<FsGuest> {
  const peer = await startVirtiofsd({ source: dir });
  const fe = await VhostUserFrontend.connect(peer.socketPath, { timeoutMs: 5000 });
  const ram = GuestRam.create({ size: ramBytes, name: "vfs-guest" });
  await fe.negotiate({ features: featureSet(VirtioFeature.VERSION_1) });
  const queues = await fe.start(ram, [128, 128]);
  const driver = new VirtioFsDriver(queues[FS_REQUEST_QUEUE] as never, ram);
  const init = await driver.init();
  assert.equal(init.major, 7);
  return {
    peer,
    fe,
    ram,
    driver,
    dir,
    async close() {
      driver.detach();
      fe.close();
      await peer.stop();
      ram.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** LOOKUP + OPEN + READ (in chunks) of a whole file; RELEASE. */
async function readFile(d: VirtioFsDriver, name: string, chunk = 64 << 10): Promise<Buffer> {
  const { nodeid, size } = await d.lookup(FUSE_ROOT_ID, name);
  const fh = await d.open(nodeid);
  const parts: Uint8Array[] = [];
  for (let off = 0; off < size; off += chunk) {
    const r = await d.read(nodeid, fh, off, Math.min(chunk, size - off));
    parts.push(r.body);
  }
  await d.release(nodeid, fh);
  return Buffer.concat(parts);
}

async function assertServes(g: FsGuest, what: string): Promise<void> {
  for (const [name, data] of FILES) {
    const got = await readFile(g.driver, name).catch((e: unknown) => {
      throw new Error(
        `${what}: ${String(e)}; virtiofsd running=${g.peer.running}:\n${g.peer.output}`,
      );
    });
    assert.ok(got.equals(data), `${what}: ${name} read back byte for byte`);
  }
  g.peer.assertRunning();
}

test("virtiofsd: FUSE_INIT, LOOKUP, OPEN and READ return the files byte for byte", async () => {
  const g = await startFs();
  try {
    await assertServes(g, "first reads");
    // a read at an odd offset past a page boundary, shorter than asked at the end of the file
    const { nodeid } = await g.driver.lookup(FUSE_ROOT_ID, "odd.bin");
    const fh = await g.driver.open(nodeid);
    const r = await g.driver.read(nodeid, fh, 4095, 4096);
    assert.ok(Buffer.from(r.body).equals((FILES.get("odd.bin") as Buffer).subarray(4095)));
    assert.equal(r.usedLen, 16 + 5000 - 4095, "used.len is the out header plus the data");
    await g.driver.release(nodeid, fh);
    await assert.rejects(g.driver.lookup(FUSE_ROOT_ID, "missing"), /error -2/);
  } finally {
    await g.close();
  }
});

test("regression: a ring restart sends SET_VRING_CALL again (virtiofsd panicked on a closed call fd)", async () => {
  const g = await startFs();
  try {
    await assertServes(g, "before the restart");
    for (const index of g.fe.queues.keys()) await g.fe.stopQueue(index);
    for (const index of g.fe.queues.keys()) await g.fe.restartQueue(index);
    await assertServes(g, "after stopQueue/restartQueue");
  } finally {
    await g.close();
  }
});

test("regression: replaceMemory({mode: 'stop'}) keeps virtiofsd serving", async () => {
  const g = await startFs();
  try {
    await assertServes(g, "before");
    const copy = g.ram.duplicate();
    await g.fe.replaceMemory(copy, { mode: "stop", closePrevious: true });
    await assertServes(g, "after replaceMemory stop");
  } finally {
    await g.close();
  }
});

/**
 * The guest of a migration: FUSE reads of big.bin at varying offsets and sizes, each checked
 * against the file. pause() stops issuing and waits for the read in flight (a guest whose vCPUs
 * stop leaves no request half-written); the driver state goes in the GUEST_STATE section.
 */
class FsReader implements MigratableGuest {
  reads = 0;
  #paused = false;
  #loop: Promise<void> | null = null;
  error: Error | null = null;
  constructor(readonly driver: VirtioFsDriver) {}

  start(): void {
    this.#paused = false;
    this.#loop = this.#run().catch((e: unknown) => {
      this.error = e as Error;
    });
  }

  async #run(): Promise<void> {
    const big = FILES.get("big.bin") as Buffer;
    const { nodeid } = await this.driver.lookup(FUSE_ROOT_ID, "big.bin");
    const fh = await this.driver.open(nodeid);
    let x = 7;
    while (!this.#paused) {
      x = (x * 1103515245 + 12345) >>> 0;
      const off = x % (big.length - 1);
      const len = 1 + ((x >>> 8) % (64 << 10));
      const r = await this.driver.read(nodeid, fh, off, len);
      const want = big.subarray(off, Math.min(big.length, off + len));
      if (!Buffer.from(r.body).equals(want)) throw new Error(`read ${off}+${len} differs`);
      this.reads++;
    }
    await this.driver.release(nodeid, fh);
  }

  async pause(): Promise<void> {
    this.#paused = true;
    await this.#loop;
  }

  resume(): void {
    this.start();
  }

  saveState(): Uint8Array {
    return Buffer.from(JSON.stringify(this.driver.saveState()));
  }
}

async function listen(onConn: (s: Socket) => void): Promise<{ server: Server; port: number }> {
  const server = createServer({ noDelay: true }, onConn);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { server, port: (server.address() as AddressInfo).port };
}

function connectTo(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = createConnection({ host: "127.0.0.1", port, noDelay: true }, () => resolve(s));
    s.once("error", reject);
  });
}

/** Requests vhostkit sent on a named front-end's main channel, as the diagnostics publish them. */
function recordRequests(name: string): { names: string[]; stop(): void } {
  const names: string[] = [];
  const onMsg = (m: unknown): void => {
    const d = m as MessageDiagnostic;
    if (d.channel === name && d.direction === "out" && d.kind === "request") names.push(d.name);
  };
  diagnostics_channel.subscribe(MESSAGE_DIAGNOSTICS_CHANNEL, onMsg);
  return { names, stop: () => diagnostics_channel.unsubscribe(MESSAGE_DIAGNOSTICS_CHANNEL, onMsg) };
}

test("migration virtiofsd -> second virtiofsd under FUSE reads: RAM identical, the destination serves, no RESET_OWNER after switch-over", async () => {
  const src = await startFs(shareDir(), 16 << 20);
  const dstDir = shareDir();
  // the destination shares the same files (a shared file system on both hosts)
  for (const [name, data] of FILES) writeFileSync(join(dstDir, name), data);
  const dstPeer = await startVirtiofsd({ source: dstDir });
  const guest = new FsReader(src.driver);
  const rec = recordRequests(src.fe.name);
  let server: Server | null = null;
  let incoming: Awaited<ReturnType<typeof receiveMigration>> | null = null;
  try {
    guest.start();
    await until(() => guest.reads > 20, "reads", 8000);
    let destErr: unknown = null;
    const done = new Promise<Awaited<ReturnType<typeof receiveMigration>>>((resolve) => {
      void listen((s) => {
        receiveMigration({
          stream: s,
          connectBackend: () => VhostUserFrontend.connect(dstPeer.socketPath, { timeoutMs: 5000 }),
        }).then(resolve, (e: unknown) => {
          destErr = e;
        });
      }).then((l) => {
        server = l.server;
        port = l.port;
      });
    });
    let port = 0;
    await until(() => port !== 0, "listener", 8000);
    const readsBefore = guest.reads;
    const result = await migrateSource({
      frontend: src.fe,
      stream: await connectTo(port),
      guest,
      deviceId: VIRTIO_ID_FS,
      verifyMemory: true,
    });
    incoming = await done;
    assert.equal(destErr, null);
    assert.ok(guest.reads > readsBefore, "reads went on during pre-copy");
    assert.equal(guest.error, null, String(guest.error));
    assert.equal(incoming.memoryVerified, true, "the destination's RAM hash equals the source's");
    assert.ok(result.memoryHash);
    // After switch-over the source sends nothing QEMU 7.2 would not: its rings are stopped and
    // it keeps the connection until the VM is gone. Above all no RESET_OWNER.
    const afterStop = rec.names.slice(rec.names.lastIndexOf("GET_VRING_BASE") + 1);
    assert.deepEqual(
      afterStop.filter((n) => n !== "GET_FEATURES"),
      [],
      `requests after the rings stopped: ${afterStop.join(",")}`,
    );
    assert.ok(!rec.names.includes("RESET_OWNER"));
    // The source closed its connection (the VM is gone): virtiofsd ends as it does when QEMU
    // quits, without an error.
    assert.ok(src.fe.closed);
    await src.peer.waitExit(3000);
    assert.doesNotMatch(src.peer.output, /panic|Unhandled|Error|error/, src.peer.output);
    // The destination: the driver goes on from the migrated state. QEMU 7.2's virtiofsd has no
    // DEVICE_STATE, so the FUSE session does not move: the guest mounts again (FUSE_INIT).
    const state = JSON.parse(
      Buffer.from(incoming.guestState as Uint8Array).toString(),
    ) as VirtioFsDriverState;
    assert.equal(state.pending.length, 0);
    const q = incoming.queues[FS_REQUEST_QUEUE] as FrontendQueue;
    const d2 = new VirtioFsDriver(q, incoming.ram, { restore: state });
    await d2.init();
    for (const [name, data] of FILES) {
      assert.ok((await readFile(d2, name)).equals(data), `${name} read on the destination`);
    }
    d2.detach();
    dstPeer.assertRunning();
  } finally {
    rec.stop();
    await guest.pause().catch(() => undefined);
    (server as Server | null)?.close();
    incoming?.frontend.close();
    incoming?.ram.close();
    await dstPeer.stop();
    rmSync(dstDir, { recursive: true, force: true });
    await src.close();
  }
});

/**
 * A destination that takes the stream, acknowledges every pre-copy pass and answers FAIL once the
 * virtio device state has come: the migration fails after the source stopped its rings and sent
 * everything but the end.
 */
async function failAfterVirtioState(): Promise<{
  server: Server;
  port: number;
  sawState: () => boolean;
}> {
  let saw = false;
  const l = await listen((s) => {
    s.on("error", () => undefined);
    const reader = new SectionReader(s);
    void (async () => {
      try {
        await reader.header();
        s.write(
          encodeJsonSection(SectionType.HELLO, {
            offeredFeatures: (2n ** 64n - 1n).toString(),
            protocolFeatures: "0",
            deviceState: false,
          }),
        );
        for (;;) {
          const sec = await reader.next();
          if (sec.type === SectionType.ITERATION_END) {
            const ack = Buffer.alloc(4);
            ack.writeUInt32BE(Buffer.from(sec.payload).readUInt32BE(0), 0);
            s.write(Buffer.from(encodeSection(SectionType.ITERATION_ACK, ack)));
          } else if (sec.type === SectionType.VIRTIO_STATE) {
            saw = true;
            s.write(
              encodeJsonSection(SectionType.FAIL, { error: "injected after the virtio state" }),
            );
            setTimeout(() => s.destroy(), 20);
            return;
          }
        }
      } catch {
        s.destroy();
      }
    })();
  });
  return { ...l, sawState: () => saw };
}

test("regression: a migration that fails after the virtio state was sent leaves the source virtiofsd serving", async () => {
  const g = await startFs(shareDir(), 16 << 20);
  const guest = new FsReader(g.driver);
  const d = await failAfterVirtioState();
  try {
    guest.start();
    await until(() => guest.reads > 20, "reads", 8000);
    const err = await migrateSource({
      frontend: g.fe,
      stream: await connectTo(d.port),
      guest,
      deviceId: VIRTIO_ID_FS,
    }).then(
      () => null,
      (e: unknown) => e,
    );
    assert.ok(err instanceof MigrationError, String(err));
    assert.ok(d.sawState(), "the failure came after the virtio state");
    assert.equal(err.sourceResumed, true);
    assert.equal(hasFeature(g.fe.features, VirtioFeature.LOG_ALL), false, "logging is off");
    // the guest resumed: reads go on and virtiofsd notifies on the restarted rings
    const n = guest.reads;
    await until(
      () => guest.reads > n + 20 || guest.error !== null,
      "reads after the rollback",
      8000,
    );
    assert.equal(guest.error, null, `${String(guest.error)}\n${g.peer.output}`);
    await guest.pause();
    await assertServes(g, "after the rollback");
  } finally {
    await guest.pause().catch(() => undefined);
    d.server.close();
    await g.close();
  }
});

test("resetDevice sends no RESET_OWNER to a back-end without RESET_DEVICE unless asked", async () => {
  const g = await startFs();
  const rec = recordRequests(g.fe.name);
  try {
    await assert.rejects(g.fe.resetDevice(), /RESET_DEVICE/);
    assert.deepEqual(rec.names, [], "nothing was sent");
    await assertServes(g, "after the refused reset");
  } finally {
    rec.stop();
    await g.close();
  }
});

test("dirty logging while virtiofsd serves reads: the pages marked are exactly the pages written", async () => {
  const g = await startFs();
  try {
    const q = g.fe.queue(FS_REQUEST_QUEUE) as FrontendQueue;
    const big = FILES.get("big.bin") as Buffer;
    const { nodeid } = await g.driver.lookup(FUSE_ROOT_ID, "big.bin");
    const fh = await g.driver.open(nodeid);
    const log = await startDirtyLogging(g.fe);
    try {
      log.fetchAndClear(() => undefined);
      const usedStart = q.lastUsedIdx as number;
      const expected = new Set<number>();
      const sizes = [1, 4096, 4097, 10_000, 65_536, 3 * 4096 + 17];
      for (const [i, size] of sizes.entries()) {
        const off = 4096 * i + 5;
        const r = await g.driver.read(nodeid, fh, off, size);
        assert.ok(Buffer.from(r.body).equals(big.subarray(off, off + size)));
        // buffers up to used.len (out header + data), nothing beyond
        for (
          let p = Math.floor(r.outGpa / 4096);
          p <= Math.floor((r.outGpa + r.usedLen - 1) / 4096);
          p++
        ) {
          expected.add(p);
        }
      }
      // the used ring with VHOST_VRING_F_LOG: the elements written and used->idx
      const usedEnd = q.lastUsedIdx as number;
      const used = q.ring.used;
      expected.add(Math.floor((used + 2) / 4096));
      for (let k = usedStart; k !== usedEnd; k = (k + 1) & 0xffff) {
        const at = used + 4 + 8 * (k % q.size);
        expected.add(Math.floor(at / 4096));
        expected.add(Math.floor((at + 7) / 4096));
      }
      const marked = new Set<number>();
      log.fetchAndClear((p) => marked.add(p));
      const missing = [...expected].filter((p) => !marked.has(p));
      const extra = [...marked].filter((p) => !expected.has(p));
      assert.deepEqual(missing, [], "pages written but not marked");
      assert.deepEqual(extra, [], "pages marked but not written");
    } finally {
      await stopDirtyLogging(g.fe, log);
    }
    await g.driver.release(nodeid, fh);
    await assertServes(g, "after dirty logging");
  } finally {
    await g.close();
  }
});
