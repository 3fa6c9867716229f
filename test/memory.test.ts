import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { gpa, mmapOffset, uaddr, GuestMemoryError } from "../src/memory/address.js";
import type { Gpa } from "../src/memory/address.js";
import { DirtyLog } from "../src/memory/dirty-log.js";
import { GuestMemory, createRegion } from "../src/memory/guest-memory.js";
import type { Region } from "../src/memory/guest-memory.js";
import { mapRegion, unmapRegion } from "../src/memory/mapping.js";
import { native } from "../src/native.js";

function region(g: number, size: number, ua = 0x100000000 + g, buffer?: ArrayBuffer): Region {
  return createRegion(
    { gpa: gpa(g), size, uaddr: uaddr(ua), mmapOffset: mmapOffset(0) },
    buffer ?? new ArrayBuffer(size),
  );
}

function fakeRegion(g: number, size: number, ua: number): Region {
  // Regions too large for a real buffer (wrap-around checks): fields only.
  const buffer = new ArrayBuffer(16);
  return {
    gpa: g as Gpa,
    size,
    uaddr: uaddr(ua),
    mmapOffset: mmapOffset(0),
    buffer,
    base: 0,
    bytes: new Uint8Array(buffer),
    view: new DataView(buffer),
  };
}

function memError(fn: () => unknown, check: (e: GuestMemoryError) => void): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof GuestMemoryError, `expected GuestMemoryError, got ${String(e)}`);
    assert.equal(e.code, "ERR_VHOST_GUEST_MEMORY");
    check(e);
    return true;
  });
}

test("address brands reject non-integers, negatives and values >= 2^53", () => {
  assert.equal(gpa(0x1000), 0x1000);
  memError(
    () => gpa(-1),
    (e) => assert.equal(e.value, -1),
  );
  memError(
    () => uaddr(1.5),
    (e) => assert.equal(e.field, "uaddr"),
  );
  memError(
    () => mmapOffset(2 ** 53),
    (e) => assert.equal(e.field, "mmapOffset"),
  );
});

test("constructor rejects zero size, naming the region index", () => {
  memError(
    () => new GuestMemory([region(0, 4096), fakeRegion(0x10000, 0, 0x900000)]),
    (e) => {
      assert.equal(e.region, 1);
      assert.equal(e.field, "size");
      assert.match(e.message, /region 1/);
    },
  );
  memError(
    () => new GuestMemory([]),
    (e) => assert.equal(e.field, "regions"),
  );
});

test("constructor rejects overlap in GPA space, naming both regions and ranges", () => {
  memError(
    () => new GuestMemory([region(0, 0x2000), region(0x3000, 0x1000), region(0x1000, 0x1000)]),
    (e) => {
      assert.equal(e.field, "gpa");
      assert.match(e.message, /regions 0 and 2 overlap in gpa space/);
      assert.match(e.message, /0x1000/);
    },
  );
});

test("constructor rejects overlap in front-end address space", () => {
  memError(
    () => new GuestMemory([region(0, 0x1000, 0x5000), region(0x10000, 0x1000, 0x5800)]),
    (e) => {
      assert.equal(e.field, "uaddr");
      assert.match(e.message, /regions 0 and 1 overlap in uaddr space/);
    },
  );
});

test("constructor rejects gpa + size beyond 2^53 and uaddr + size beyond 2^53", () => {
  memError(
    () => new GuestMemory([fakeRegion(2 ** 53 - 4096, 8192, 0)]),
    (e) => {
      assert.equal(e.region, 0);
      assert.match(e.message, /wraps beyond 2\^53/);
    },
  );
  // exactly 1 byte over: the sum is not representable, the check must still catch it
  memError(
    () => new GuestMemory([fakeRegion(2 ** 53 - 1, 2, 0)]),
    (e) => assert.equal(e.field, "size"),
  );
  memError(
    () => new GuestMemory([fakeRegion(0, 8, 2 ** 53 - 4)]),
    (e) => assert.equal(e.field, "uaddr"),
  );
});

test("constructor rejects a region larger than its buffer", () => {
  const r = region(0, 4096);
  memError(
    () => new GuestMemory([{ ...r, size: 8192 }]),
    (e) => assert.equal(e.field, "base"),
  );
  memError(
    () => createRegion(r, new ArrayBuffer(100)),
    (e) => assert.equal(e.value, 4096),
  );
});

test("regionFor finds the right region, with the cache, and throws naming the address", () => {
  const a = region(0, 0x1000);
  const b = region(0x1000, 0x1000); // adjacent to a
  const c = region(0x100000, 0x2000);
  const mem = new GuestMemory([c, a, b]);
  assert.equal(mem.end, 0x102000);
  for (let round = 0; round < 3; round++) {
    assert.equal(mem.regionFor(gpa(0), 0x1000), a);
    assert.equal(mem.regionFor(gpa(0x1fff), 1), b);
    assert.equal(mem.regionFor(gpa(0x101000), 0x1000), c);
    assert.equal(mem.regionFor(gpa(0x1000), 0), b);
  }
  // spanning two adjacent regions: not inside one region
  memError(
    () => mem.regionFor(gpa(0xff0), 0x20),
    (e) => {
      assert.equal(e.gpa, 0xff0);
      assert.equal(e.length, 0x20);
      assert.match(e.message, /0xff0/);
    },
  );
  memError(
    () => mem.regionFor(gpa(0x101fff), 2),
    (e) => assert.equal(e.gpa, 0x101fff),
  );
  memError(
    () => mem.regionFor(gpa(0x50000), 1),
    (e) => assert.equal(e.gpa, 0x50000),
  );
  assert.equal(mem.tryRegionFor(0x50000, 1), null);
  assert.equal(mem.tryRegionFor(0, -1), null);
});

test("regionFor agrees with a linear model on random lookups (property)", () => {
  fc.assert(
    fc.property(
      fc.array(fc.tuple(fc.integer({ min: 0, max: 64 }), fc.integer({ min: 1, max: 16 })), {
        minLength: 1,
        maxLength: 6,
      }),
      fc.array(fc.tuple(fc.integer({ min: 0, max: 90 * 64 }), fc.integer({ min: 0, max: 200 })), {
        maxLength: 40,
      }),
      (specs, lookups) => {
        // lay regions out without overlap: gaps of `gap * 64`, sizes of `size * 64`
        const regions: Region[] = [];
        let at = 0;
        for (const [gap, size] of specs) {
          at += gap * 64;
          regions.push(region(at, size * 64, 0x10000000 + at));
          at += size * 64;
        }
        const mem = new GuestMemory(regions.slice().reverse());
        for (const [g, len] of lookups) {
          const model = regions.find((r) => g >= r.gpa && g + len <= r.gpa + r.size) ?? null;
          assert.equal(mem.tryRegionFor(g, len), model);
        }
      },
    ),
    { numRuns: 300 },
  );
});

test("gpaToView is a view of guest memory; uaddrToGpa translates", () => {
  const a = region(0x10000, 0x1000, 0x7f0000000000);
  const mem = new GuestMemory([a]);
  const v = mem.gpaToView(gpa(0x10010), 4);
  v.set([1, 2, 3, 4]);
  assert.deepEqual([...a.bytes.subarray(0x10, 0x14)], [1, 2, 3, 4]);
  assert.equal(mem.uaddrToGpa(uaddr(0x7f0000000100), 16), 0x10100);
  memError(
    () => mem.uaddrToGpa(uaddr(0x7f0000000ff0), 32),
    (e) => {
      assert.equal(e.field, "uaddr");
      assert.equal(e.value, 0x7f0000000ff0);
    },
  );
  memError(
    () => mem.gpaToView(gpa(0x10ff0), 32),
    (e) => assert.equal(e.gpa, 0x10ff0),
  );
});

test("read and write span adjacent regions; out-of-range writes write nothing", () => {
  const a = region(0, 0x1000);
  const b = region(0x1000, 0x1000);
  const mem = new GuestMemory([a, b]);
  const data = Uint8Array.from({ length: 64 }, (_, i) => i + 1);
  mem.write(gpa(0xfe0), data);
  assert.deepEqual([...a.bytes.subarray(0xfe0)], [...data.subarray(0, 32)]);
  assert.deepEqual([...b.bytes.subarray(0, 32)], [...data.subarray(32)]);
  const back = new Uint8Array(64);
  mem.read(gpa(0xfe0), back);
  assert.deepEqual(back, data);
  assert.ok(mem.covers(0xfe0, 64));
  assert.ok(!mem.covers(0x1fe0, 64));
  memError(
    () => mem.write(gpa(0x1fe0), data),
    (e) => {
      assert.equal(e.gpa, 0x1fe0);
      assert.equal(e.length, 64);
    },
  );
  assert.ok(
    b.bytes.subarray(0xfe0).every((x) => x === 0),
    "nothing written",
  );
});

test("write marks the attached dirty log; replacing the log flushes the old one", () => {
  const mem = new GuestMemory([region(0, 0x10000)]);
  const logA = new DirtyLog(new ArrayBuffer(8), 0, 8);
  const logB = new DirtyLog(new ArrayBuffer(8), 0, 8);
  mem.write(gpa(0x3000), new Uint8Array(4)); // no log: nothing to mark
  mem.log = logA;
  mem.write(gpa(0x5ffe), new Uint8Array(4)); // pages 5 and 6
  assert.equal(logA.isDirty(0x5000), false, "batched until flush");
  mem.log = logB; // flushes A
  assert.ok(logA.isDirty(0x5000) && logA.isDirty(0x6000));
  assert.ok(!logA.isDirty(0x3000) && !logA.isDirty(0x7000));
  mem.write(gpa(0x9000), new Uint8Array(1));
  mem.log = null;
  assert.ok(logB.isDirty(0x9000));
  assert.ok(!logB.isDirty(0x5000));
});

test("mapRegion maps a memfd at a non-page-aligned offset; two mappings share memory", () => {
  const page = native.pageSize();
  const fd = native.memfdCreate("memory-test");
  const regions: Region[] = [];
  try {
    native.ftruncate(fd, 4 * page);
    const info = {
      gpa: gpa(0x40000),
      size: 2 * page,
      uaddr: uaddr(0x7f0000000000),
      mmapOffset: mmapOffset(page + 100),
    };
    const r1 = mapRegion(fd, info);
    regions.push(r1);
    const r2 = mapRegion(fd, info);
    regions.push(r2);
    assert.equal(r1.base, 100);
    assert.equal(r1.bytes.length, 2 * page);
    const m1 = new GuestMemory([r1]);
    const m2 = new GuestMemory([r2]);
    m1.write(gpa(0x40000 + 10), Uint8Array.of(0xab, 0xcd));
    const out = new Uint8Array(2);
    m2.read(gpa(0x40000 + 10), out);
    assert.deepEqual([...out], [0xab, 0xcd]);
    // the region starts at file offset page + 100
    const r3 = mapRegion(fd, { ...info, gpa: gpa(0), mmapOffset: mmapOffset(0), size: 4 * page });
    regions.push(r3);
    assert.equal(r3.bytes[page + 100 + 10], 0xab);
    unmapRegion(r3);
    assert.equal(r3.buffer.byteLength, 0, "unmapped buffers are detached");
  } finally {
    for (const r of regions) unmapRegion(r);
    native.close(fd);
  }
});

test("mapRegion refuses a region larger than its fd before mapping it", () => {
  const page = native.pageSize();
  const fd = native.memfdCreate("memory-test-small");
  try {
    native.ftruncate(fd, 2 * page);
    memError(
      () =>
        mapRegion(fd, {
          gpa: gpa(0),
          size: 2 * page,
          uaddr: uaddr(0),
          mmapOffset: mmapOffset(1),
        }),
      (e) => {
        assert.equal(e.field, "size");
        assert.match(e.message, /exceeds the size of fd/);
      },
    );
    memError(
      () => mapRegion(fd, { gpa: gpa(0), size: 0, uaddr: uaddr(0), mmapOffset: mmapOffset(0) }),
      (e) => assert.equal(e.field, "size"),
    );
  } finally {
    native.close(fd);
  }
});
