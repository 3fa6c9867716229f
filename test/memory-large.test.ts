/**
 * Memory regions larger than one ArrayBuffer can hold (4 GiB on Node.js 20): both ends map
 * them as adjacent pieces of at most MAX_REGION_MAPPING bytes. Unit tests of the split over a
 * real memfd, then a 5 GiB sparse region served end to end: rings in the third piece, buffers
 * that cross the boundary between the first two.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { native } from "../src/native.js";
import { VirtioFeature, featureSet } from "../src/protocol/constants.js";
import { gpa, mmapOffset, uaddr } from "../src/memory/address.js";
import { GuestMemory } from "../src/memory/guest-memory.js";
import {
  MAX_REGION_MAPPING,
  mapRegion,
  mapRegionSplit,
  splitRegionInfo,
  unmapRegion,
} from "../src/memory/mapping.js";
import { serveBackend } from "../src/backend/server.js";
import type { BackendSession } from "../src/backend/session.js";
import { NetTestDevice } from "../src/devices/net-test-device.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import type { UsedBuffer } from "../src/frontend/queue.js";
import { VIRTIO_NET_HDR_SIZE } from "../src/frontend/queue.js";
import { until } from "./helpers.js";

const GiB = 2 ** 30;

/** Bytes of this process's address space mapped from memfds whose name contains `name`. */
function mappedBytes(name: string): number {
  let total = 0;
  for (const line of readFileSync("/proc/self/maps", "utf8").split("\n")) {
    if (!line.includes(`memfd:${name}`)) continue;
    const [start, end] = (line.split(" ")[0] as string).split("-") as [string, string];
    total += Number(BigInt(`0x${end}`) - BigInt(`0x${start}`));
  }
  return total;
}

test("splitRegionInfo: adjacent pieces advance gpa, uaddr and mmap offset together", () => {
  const info = {
    gpa: gpa(0x1_0000_0000),
    size: 5 * GiB + 4096,
    uaddr: uaddr(0x7f00_0000_0000),
    mmapOffset: mmapOffset(0x2000),
  };
  const pieces = splitRegionInfo(info);
  assert.deepEqual(
    pieces.map((p) => [p.gpa - info.gpa, p.size, p.uaddr - info.uaddr, p.mmapOffset - 0x2000]),
    [
      [0, MAX_REGION_MAPPING, 0, 0],
      [MAX_REGION_MAPPING, MAX_REGION_MAPPING, MAX_REGION_MAPPING, MAX_REGION_MAPPING],
      [2 * MAX_REGION_MAPPING, GiB + 4096, 2 * MAX_REGION_MAPPING, 2 * MAX_REGION_MAPPING],
    ],
  );
  assert.deepEqual(splitRegionInfo({ ...info, size: 4096 }), [{ ...info, size: 4096 }]);
  assert.throws(() => splitRegionInfo(info, 0), RangeError);
});

test("mapRegionSplit: pieces of one memfd read and write across their boundaries; all or nothing", () => {
  const name = `vk-split-${process.pid}`;
  const fd = native.memfdCreate(name);
  const size = 256 << 10;
  const piece = 64 << 10;
  native.ftruncate(fd, size + 8192);
  const info = {
    gpa: gpa(0x10_0000),
    size,
    uaddr: uaddr(0x5000_0000),
    mmapOffset: mmapOffset(8192),
  };
  const pieces = mapRegionSplit(fd, info, piece);
  // One plain mapping of the whole file to check the pieces' offsets against.
  const whole = mapRegion(fd, { ...info, mmapOffset: mmapOffset(0), size: size + 8192 });
  try {
    assert.equal(pieces.length, 4);
    const mem = new GuestMemory(pieces);
    const data = Uint8Array.from({ length: 200 << 10 }, (_, i) => (i * 31 + 7) & 0xff);
    const at = info.gpa + 10_000;
    mem.write(gpa(at), data);
    const back = new Uint8Array(data.length);
    mem.read(gpa(at), back);
    assert.deepEqual(back, data, "read back across three boundaries");
    const inFile = whole.bytes.subarray(8192 + 10_000, 8192 + 10_000 + data.length);
    assert.deepEqual(inFile, data, "the pieces sit at the right file offsets");
    // A range inside one piece translates; one across a boundary does not (rings need one).
    assert.equal(mem.uaddrToGpa(uaddr(info.uaddr + piece + 16), 64), info.gpa + piece + 16);
    assert.throws(() => mem.regionFor(gpa(info.gpa + piece - 8), 16), /not inside one/);
  } finally {
    for (const p of pieces) unmapRegion(p);
    unmapRegion(whole);
  }
  assert.equal(mappedBytes(name), 0, "every piece unmapped");
  // Larger than its fd: refused before any piece is mapped.
  assert.throws(
    () => mapRegionSplit(fd, { ...info, size: size + 16384 }, piece),
    /exceeds the size of fd/,
  );
  assert.equal(mappedBytes(name), 0, "nothing left mapped by the failed call");
  native.close(fd);
});

test("a 5 GiB region is served end to end: rings above 4 GiB, buffers across the 2 GiB boundary", async () => {
  const name = `vk-large-${process.pid}`;
  const path = join(tmpdir(), `${name}.sock`);
  const device = new NetTestDevice({ mode: "echo" });
  const server = serveBackend(device, { path });
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 10_000 });
  // A sparse memfd: only the pages touched below take memory.
  const ram = GuestRam.create({ regions: [{ gpa: 0, size: 5 * GiB }], name });
  try {
    assert.equal(ram.regions[0]!.pieces.length, 3, "the front-end maps 2 + 2 + 1 GiB");
    await until(() => server.session !== null, "the session");
    const session = server.session as BackendSession;
    ram.alloc(4 * GiB - 4096); // rings and pools go to the third piece
    await fe.negotiate({
      features: featureSet(VirtioFeature.VERSION_1, VirtioFeature.RING_EVENT_IDX),
    });
    const [rx, tx] = await fe.start(ram, [64, 64]);
    assert.ok(rx && tx);
    assert.equal(session.stats.failedRequests, 0);
    assert.equal(mappedBytes(name), 10 * GiB, "both ends map the whole region");

    // Echo through rings in the third piece.
    rx.postRxBuffers(8);
    const frames = Array.from({ length: 8 }, (_, i) =>
      Uint8Array.from({ length: 100 }, (_, k) => i + k),
    );
    for (const f of frames) assert.notEqual(tx.addFrame(f), null);
    tx.kick();
    const got: Uint8Array[] = [];
    await until(() => {
      got.push(...rx.receiveFrames());
      return got.length === frames.length;
    }, "8 frames echoed");
    assert.deepEqual(got, frames);
    tx.reclaim();

    // A transmit buffer and a receive buffer that both cross the first piece boundary: the
    // back-end reads and writes them across its own two mappings.
    const edge = MAX_REGION_MAPPING;
    const payload = Uint8Array.from({ length: 300 }, (_, k) => (k * 13) & 0xff);
    const txBytes = new Uint8Array(VIRTIO_NET_HDR_SIZE + payload.length);
    txBytes.set(payload, VIRTIO_NET_HDR_SIZE);
    const txAt = gpa(edge - 100);
    const rxAt = gpa(edge - 4096 - 50); // 4 KiB below, so it crosses the same boundary
    ram.write(txAt, txBytes);
    assert.notEqual(rx.add([{ gpa: rxAt, len: 4096 + 2048, writable: true }], "edge"), null);
    rx.kick();
    assert.notEqual(tx.add([{ gpa: txAt, len: txBytes.length, writable: false }], "edge"), null);
    tx.kick();
    let used: UsedBuffer | null = null;
    await until(() => (used = rx.getUsed()) !== null, "the echo into the crossing buffer");
    const u = used as unknown as UsedBuffer;
    assert.equal(u.token, "edge");
    assert.equal(u.len, txBytes.length);
    assert.deepEqual(ram.read(rxAt, u.len).subarray(VIRTIO_NET_HDR_SIZE), payload);
    assert.equal(session.stats.failedRequests, 0);
  } finally {
    fe.close();
    server.close();
  }
  await until(() => mappedBytes(name) === 5 * GiB, "the back-end to unmap its pieces");
  ram.close();
  assert.equal(mappedBytes(name), 0);
});
