/**
 * Unit and property tests of the migration orchestrator's formats: the layered virtio device
 * state (round trips, subsections known, optional and unknown, truncation, load-time checks
 * naming the field), the stream framing (header versions, CRC, truncation) and the front-end's
 * dirty log (size from the memory table, fetch-and-clear).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { PassThrough } from "node:stream";
import fc from "fast-check";

import { GuestRam } from "../src/frontend/guest-ram.js";
import { FrontendDirtyLog, logSizeFor } from "../src/frontend/migration.js";
import { encodeStreamHeader, hostStream, stateStream } from "../src/migration/staged.js";
import { crc32, isMigrationStreamError } from "../src/migration/state-codec.js";
import { native } from "../src/native.js";
import { VirtioFeature, featureMask } from "../src/protocol/constants.js";
import {
  MigrationStreamFormatError,
  READER_HIGH_WATER,
  SectionReader,
  SectionType,
  VirtioStateError,
  decodeVirtioState,
  encodeSection,
  encodeVirtioState,
  validateVirtioState,
} from "../src/orchestrator/index.js";
import type { VirtioDeviceState } from "../src/orchestrator/index.js";

const PACKED = featureMask(VirtioFeature.RING_PACKED);

function hostHeader(version = 1, compat = 1): Buffer {
  return Buffer.from(encodeStreamHeader(hostStream, version, compat));
}

function baseState(features: bigint): VirtioDeviceState {
  return {
    status: 15,
    features,
    config: new Uint8Array([1, 2, 3, 4, 5, 6, 0, 1]),
    protocolFeatures: 0x10cbfn,
    queues: [
      {
        index: 0,
        size: 256,
        desc: 0x1000,
        avail: 0x2000,
        used: 0x3000,
        lastAvailIdx: 10,
        usedIdx: 10,
        enabled: true,
        availWrap: true,
        usedWrap: false,
      },
      {
        index: 1,
        size: 256,
        desc: 0x5000,
        avail: 0x6000,
        used: 0x7000,
        lastAvailIdx: 65530,
        usedIdx: 65530,
        enabled: true,
        availWrap: false,
        usedWrap: true,
      },
    ],
    deviceId: 1,
    device: new Uint8Array([2, 0, 0, 0, 0, 1]),
  };
}

test("virtio state: round trip, features64 and packed subsections only when needed", () => {
  fc.assert(
    fc.property(
      fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
      fc.integer({ min: 0, max: 255 }),
      fc.uint8Array({ maxLength: 64 }),
      fc.uint8Array({ maxLength: 32 }),
      (features, status, config, device) => {
        const s = { ...baseState(features), status, config, device };
        if ((features & PACKED) !== 0n) {
          for (const q of s.queues) q.lastAvailIdx = q.usedIdx = 7;
        }
        const bytes = encodeVirtioState(s);
        const d = decodeVirtioState(bytes);
        assert.equal(d.features, features);
        assert.equal(d.status, status);
        assert.deepEqual(d.config, config);
        assert.deepEqual(d.device, device);
        assert.equal(d.queues.length, 2);
        assert.equal(d.queues[1]?.used, 0x7000);
        const text = Buffer.from(bytes).toString("latin1");
        assert.equal(text.includes("virtio/64bit_features"), features >> 32n !== 0n);
        assert.equal(text.includes("virtio/packed_virtqueues"), (features & PACKED) !== 0n);
        const v1 = (features & featureMask(VirtioFeature.VERSION_1)) !== 0n;
        assert.equal(text.includes("virtio/virtqueues"), v1);
        // the rings here are at the legacy layout: derived from desc without VERSION_1
        assert.equal(text.includes("virtio/legacy_rings"), false);
        assert.equal(text.includes("virtio/device_endian"), false, "little-endian is the default");
        if ((features & PACKED) !== 0n) {
          assert.equal(d.queues[0]?.usedWrap, false);
          assert.equal(d.queues[1]?.availWrap, false);
        }
      },
    ),
    { numRuns: 200 },
  );
});

test("virtio state: saved in seed 001's order (transport, common, queues, queue transport, device, subsections); enabled and endianness round-trip", () => {
  const s = baseState(featureMask(VirtioFeature.VERSION_1));
  s.queues[1]!.enabled = false;
  s.deviceEndian = "big";
  const b = encodeVirtioState(s);
  assert.equal(b[0], 2, "virtio state version");
  assert.equal(b[1], 1, "transport first: vhost-user");
  assert.equal(b.readBigUInt64BE(2), s.protocolFeatures, "transport: protocol features");
  assert.equal(b[10], s.status, "then the common device fields: status");
  assert.equal(b.readUInt32BE(11), Number(s.features & 0xffffffffn), "features");
  const qAt = 15 + 4 + s.config.length + 2;
  assert.equal(b.readUInt16BE(qAt - 2), 2, "number of queues");
  assert.equal(b.readUInt16BE(qAt), 0, "common virtqueue fields: index");
  assert.equal(b.readUInt16BE(qAt + 2), 256, "size");
  const tAt = qAt + 2 * 16;
  assert.deepEqual([b[tAt], b[tAt + 1]], [1, 0], "per-queue transport fields: enabled flags");
  assert.equal(b.readUInt16BE(tAt + 2), 1, "then the device: virtio-net");
  const text = b.toString("latin1");
  const order = ["virtio/device_endian", "virtio/virtqueues"].map((n) => text.indexOf(n));
  assert.ok(order[0]! > tAt && order[0]! < order[1]!, `subsections in order: ${order}`);
  const d = decodeVirtioState(b);
  assert.equal(d.queues[0]!.enabled, true);
  assert.equal(d.queues[1]!.enabled, false, "a disabled queue stays disabled");
  assert.equal(d.deviceEndian, "big");
  assert.equal(d.queues[1]!.avail, 0x6000);
  // without VERSION_1, rings at the legacy layout travel as desc only; others in a subsection
  const legacy = baseState(0n);
  assert.ok(!encodeVirtioState(legacy).toString("latin1").includes("virtio/legacy_rings"));
  assert.equal(decodeVirtioState(encodeVirtioState(legacy)).queues[1]!.used, 0x7000);
  legacy.queues[1]!.used = 0x9000;
  const moved = encodeVirtioState(legacy);
  assert.ok(moved.toString("latin1").includes("virtio/legacy_rings"));
  assert.equal(decodeVirtioState(moved).queues[1]!.used, 0x9000);
});

test("virtio state: an optional unknown subsection is skipped, a required one fails", () => {
  const s = baseState(1n << 32n);
  s.extraSubsections = [{ name: "vendor/x", optional: true, data: new Uint8Array([9, 9]) }];
  const d = decodeVirtioState(encodeVirtioState(s));
  assert.deepEqual(d.skipped, ["vendor/x"]);
  s.extraSubsections = [{ name: "vendor/needed", optional: false, data: new Uint8Array([1]) }];
  assert.throws(
    () => decodeVirtioState(encodeVirtioState(s)),
    (e: unknown) =>
      e instanceof VirtioStateError && e.field === "subsection" && e.value === "vendor/needed",
  );
});

test("virtio state: truncated at every offset or with trailing bytes fails with a field", () => {
  const bytes = encodeVirtioState(baseState((1n << 33n) | PACKED));
  for (let n = 0; n < bytes.length; n++) {
    assert.throws(
      () => decodeVirtioState(bytes.subarray(0, n)),
      (e: unknown) => e instanceof VirtioStateError && typeof e.field === "string",
      `cut at ${n}`,
    );
  }
  const longer = Buffer.concat([bytes, Buffer.from([0])]);
  assert.throws(
    () => decodeVirtioState(longer),
    (e: unknown) => e instanceof VirtioStateError,
  );
});

test("virtio state: load-time checks name the field", () => {
  const ram = GuestRam.create({ regions: [{ gpa: 0, size: 1 << 20 }] });
  try {
    const offered =
      featureMask(VirtioFeature.VERSION_1) | featureMask(VirtioFeature.RING_EVENT_IDX);
    const ok = baseState(featureMask(VirtioFeature.VERSION_1));
    const poke = (gpa: number, v: number): void =>
      new DataView(ram.regions[0]!.pieces[0]!.buffer).setUint16(
        ram.regions[0]!.pieces[0]!.base + gpa,
        v,
        true,
      );
    // avail.idx of queue 1 in guest memory: 65530 + 3 (3 pending); queue 0: 10 + 2
    poke(0x6002, 65533);
    poke(0x2002, 12);
    // used.idx in guest memory, as the state says
    poke(0x3002, 10);
    poke(0x7002, 65530);
    validateVirtioState(ok, { offeredFeatures: offered, memory: ram.memory });
    let last: VirtioStateError | null = null;
    const field = (s: VirtioDeviceState, crossEndian = false): string | undefined => {
      try {
        validateVirtioState(s, {
          offeredFeatures: offered,
          memory: ram.memory,
          maxQueues: 2,
          crossEndian,
        });
        return undefined;
      } catch (e) {
        assert.ok(e instanceof VirtioStateError);
        last = e;
        return e.field;
      }
    };
    const lastValue = (): string => String((last as VirtioStateError | null)?.value);
    // 1. endianness: a virtio 1 device is little-endian; big legacy needs CROSS_ENDIAN
    assert.equal(field({ ...ok, deviceEndian: "big" }), "deviceEndian");
    assert.match(lastValue(), /VERSION_1/);
    assert.equal(field({ ...ok, features: 0n, deviceEndian: "big" }), "deviceEndian");
    assert.match(lastValue(), /CROSS_ENDIAN/);
    assert.notEqual(field({ ...ok, features: 0n, deviceEndian: "big" }, true), "deviceEndian");
    // 2. features against the destination back-end's offer, naming both
    assert.equal(field({ ...ok, features: ok.features | PACKED }), "features");
    assert.match(lastValue(), /acked 0x.*offered 0x/);
    const q = (patch: object, i = 0): VirtioDeviceState => ({
      ...ok,
      queues: ok.queues.map((x, k) => (k === i ? { ...x, ...patch } : x)),
    });
    assert.equal(field(q({ size: 100 })), "queue[0].size");
    assert.equal(field(q({ desc: 0xff800 })), "queue[0].desc");
    assert.equal(field(q({ used: 2 << 20 })), "queue[0].used");
    assert.equal(field(q({ lastAvailIdx: 65000, usedIdx: 65000 }, 1)), "queue[1].lastAvailIdx");
    // 3. the used idx is read from guest memory, not only taken from the state
    assert.equal(field(q({ usedIdx: 11 })), "queue[0].usedIdx");
    assert.match(lastValue(), /11 \(used idx in guest memory 10\)/);
    poke(0x3002, (10 - 300) & 0xffff);
    assert.equal(field(q({ usedIdx: (10 - 300) & 0xffff })), "queue[0].usedIdx");
    assert.match(lastValue(), /last avail idx 10, size 256/);
    poke(0x3002, 10);
    // 4. queue count and queue indices within the count
    assert.equal(
      field({ ...ok, queues: [...ok.queues, { ...ok.queues[0]!, index: 2 }] }),
      "numQueues",
    );
    assert.equal(field(q({ index: 5 }, 1)), "queue[1].index");
    assert.match(lastValue(), /5 \(queue count 2\)/);
  } finally {
    ram.close();
  }
});

async function readAll(bytes: Buffer): Promise<unknown> {
  const p = new PassThrough();
  const r = new SectionReader(p);
  p.end(bytes);
  try {
    await r.header();
    for (;;) await r.next();
  } catch (e) {
    return e;
  }
}

test("stream: header versions, CRC and truncation", async () => {
  const good = Buffer.concat([
    hostHeader(),
    encodeSection(SectionType.VIRTIO_STATE, new Uint8Array([1, 2, 3])),
  ]);
  const p = new PassThrough();
  const r = new SectionReader(p);
  p.end(good);
  assert.deepEqual(await r.header(), { version: 1, compatVersion: 1 });
  const s = await r.next();
  assert.equal(s.type, SectionType.VIRTIO_STATE);
  assert.deepEqual([...s.payload], [1, 2, 3]);
  // the version choice is the receiver's (runDestinationStages): the reader takes any header
  const p2 = new PassThrough();
  const r2 = new SectionReader(p2);
  p2.end(hostHeader(2, 1));
  assert.deepEqual(await r2.header(), { version: 2, compatVersion: 1 });
  // the state stream's header is not a host stream's
  const e1 = await readAll(Buffer.from(encodeStreamHeader(stateStream, 1, 1)));
  assert.ok(isMigrationStreamError(e1, "BAD_MAGIC"), String(e1));
  // every single-bit flip in the section is caught by the CRC (or the length check)
  for (let i = 16; i < good.length; i++) {
    const bad = Buffer.from(good);
    bad[i] = (bad[i] as number) ^ 0x10;
    const e = await readAll(bad);
    assert.ok(e instanceof MigrationStreamFormatError, `flip at ${i}: ${String(e)}`);
  }
  // truncation anywhere
  for (let n = 0; n < good.length; n++) {
    const e = await readAll(good.subarray(0, n));
    assert.ok(e instanceof MigrationStreamFormatError, `cut at ${n}`);
    assert.match(e.message, /truncated/);
    // the error names what was cut: the header, a section's header, or its body
    assert.equal(
      (e as MigrationStreamFormatError).field,
      n < 16 ? "header" : n < 24 ? "section header" : `section ${SectionType[good[16] as number]}`,
      `cut at ${n}`,
    );
  }
});

test("stream: a bad header, section flags or reserved bytes are refused", async () => {
  const e1 = await readAll(hostHeader(1, 2));
  assert.ok(isMigrationStreamError(e1, "BAD_HEADER"), String(e1));
  assert.match(String(e1), /compat_version/);
  /** a section with byte `at` of its header set to `v`, CRC recomputed */
  const tampered = (at: number, v: number): Buffer => {
    const sec = encodeSection(SectionType.END, new Uint8Array(33));
    sec[at] = v;
    sec.writeUInt32BE(crc32(sec.subarray(0, sec.length - 4)), sec.length - 4);
    return Buffer.concat([hostHeader(), sec]);
  };
  const e2 = await readAll(tampered(1, 0x80));
  assert.ok(e2 instanceof MigrationStreamFormatError, String(e2));
  assert.equal(e2.field, "flags");
  assert.match(e2.message, /section END: flags must be 0/);
  for (const at of [2, 3]) {
    const e3 = await readAll(tampered(at, 1));
    assert.ok(e3 instanceof MigrationStreamFormatError, String(e3));
    assert.equal(e3.field, "reserved", `reserved byte ${at}`);
  }
  // untampered: read to the end
  const ok = await readAll(tampered(1, 0));
  assert.ok(ok instanceof MigrationStreamFormatError && ok.field === "section header");
});

test("stream: the reader pauses its socket above the high-water mark and resumes", async () => {
  const p = new PassThrough({ highWaterMark: 1 << 16 });
  const r = new SectionReader(p);
  const payload = new Uint8Array(1 << 20).fill(7);
  const count = 20;
  p.write(hostHeader());
  for (let i = 0; i < count; i++) p.write(encodeSection(SectionType.PAGES, payload));
  p.end();
  for (let i = 0; i < 20; i++) await new Promise((resolve) => setImmediate(resolve));
  assert.equal(p.isPaused(), true, "paused while nobody reads");
  assert.ok(
    p.readableLength + p.writableLength > (count << 20) - READER_HIGH_WATER - (2 << 20),
    `bytes held back in the socket: ${p.readableLength + p.writableLength}`,
  );
  assert.equal(r.bytesRead, 0);
  assert.deepEqual(await r.header(), { version: 1, compatVersion: 1 });
  for (let i = 0; i < count; i++) {
    const s = await r.next();
    assert.equal(s.payload.length, 1 << 20, `section ${i}`);
  }
  assert.equal(p.isPaused(), false, "resumed once consumed");
  const end = await r.next().then(
    () => null,
    (e: unknown) => e,
  );
  assert.ok(end instanceof MigrationStreamFormatError && /truncated/.test(end.message));
});

test("front-end dirty log: size from the memory table, atomic fetch-and-clear", () => {
  const ram = GuestRam.create({ size: 8 << 20 });
  try {
    const table = ram.memoryTable();
    // regions at 0 and 4 GiB: the log covers 0 .. 4 GiB + 4 MiB, in whole u64 words
    assert.equal(logSizeFor(table), Math.ceil(((4 * 2 ** 30) / 4096 + 1024) / 64) * 8);
    const log = FrontendDirtyLog.create(table);
    // LIFETIME: a second mapping of the log memfd, as a back-end has; unmapped below.
    const theirs = native.mmap(log.fd, 0, log.size, true);
    try {
      const bytes = new Uint8Array(theirs);
      const pages = [0, 1, 7, 8, 31, 32, 1000, (4 * 2 ** 30) / 4096 + 5];
      fc.assert(
        fc.property(fc.subarray(pages), (set) => {
          for (const p of set) bytes[p >> 3] = (bytes[p >> 3] as number) | (1 << (p & 7));
          const got: number[] = [];
          const n = log.fetchAndClear((p) => got.push(p));
          assert.equal(n, set.length);
          assert.deepEqual(
            got,
            [...set].sort((a, b) => a - b),
          );
          assert.equal(
            log.fetchAndClear(() => undefined),
            0,
            "cleared",
          );
          assert.ok(
            bytes.every((b) => b === 0),
            "the back-end sees a clear log",
          );
        }),
      );
    } finally {
      native.munmap(theirs);
      log.close();
    }
  } finally {
    ram.close();
  }
});
