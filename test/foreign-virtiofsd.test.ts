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
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { featureSet, VirtioFeature } from "../src/protocol/constants.js";
import { startVirtiofsd } from "./peers/libvhost-user.js";
import type { LibvhostUserPeer } from "./peers/libvhost-user.js";
import { FS_REQUEST_QUEUE, FUSE_ROOT_ID, VirtioFsDriver } from "./peers/virtio-fs.js";

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
