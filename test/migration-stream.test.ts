/**
 * The versioned migration stream (the layout of passt's `migrate.h`): header layout, the version matrix, round trips,
 * and truncated, corrupted and oversized streams leaving the destination untouched.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";

import {
  MIGRATION_MAGIC,
  MigrationFormat,
  inspectStream,
  loadStream,
  readHeader,
  saveStream,
} from "../src/migration/stream.js";
import type { MigrationStage, MigrationVersion } from "../src/migration/stream.js";
import {
  MigrationStreamError,
  crc32,
  isMigrationStreamError,
  TRANSFER_PIPE_SIZE,
  readStateFromFd,
  writeStateToFd,
} from "../src/migration/index.js";
import { encodeStreamHeader, stateStream } from "../src/migration/staged.js";
import { native } from "../src/native.js";

/** A toy device: a name, counters and a list of MACs, as a device author would have. */
interface Toy {
  name: string;
  rx: number;
  tx: number;
  macs: string[];
  extra: number;
}

function toy(seed = 0): Toy {
  return {
    name: `port${seed}`,
    rx: seed * 3,
    tx: seed * 5,
    macs: [`52:54:00:00:00:${(seed & 0xff).toString(16).padStart(2, "0")}`],
    extra: seed * 7,
  };
}

const identity: MigrationStage<Toy> = {
  name: "identity",
  save: (t, w) => w.string("name", t.name, 64),
  load: (_t, r) => {
    const name = r.string("name", 64);
    return () => {
      _t.name = name;
    };
  },
};
const counters: MigrationStage<Toy> = {
  name: "counters",
  save: (t, w) => {
    w.u64("rx", t.rx);
    w.u64("tx", t.tx);
  },
  load: (t, r) => {
    const rx = r.u64Number("rx");
    const tx = r.u64Number("tx");
    return () => {
      t.rx = rx;
      t.tx = tx;
    };
  },
};
const macs: MigrationStage<Toy> = {
  name: "macs",
  maxBytes: 4 + 64 * 6,
  save: (t, w) => w.array("macs", t.macs, 64, (w2, m) => w2.mac("mac", m)),
  load: (t, r) => {
    const list = r.array("macs", 64, (r2) =>
      Array.from(r2.mac("mac"), (b) => b.toString(16).padStart(2, "0")).join(":"),
    );
    return () => {
      t.macs = list;
    };
  },
};
const extra: MigrationStage<Toy> = {
  name: "extra",
  save: (t, w) => w.u32("extra", t.extra),
  load: (t, r) => {
    const v = r.u32("extra");
    return () => {
      t.extra = v;
    };
  },
};

const V1: MigrationVersion<Toy> = { id: 1, stages: [identity, counters, macs] };
const V2: MigrationVersion<Toy> = { id: 2, compat: 1, stages: [identity, counters, macs, extra] };
const V3: MigrationVersion<Toy> = { id: 3, stages: [identity, counters, extra] };

function snapshot(t: Toy): string {
  return JSON.stringify(t);
}

test("header: 16 bytes, magic 0xB1BB1D1B0BB1D1B0, version, compat_version, network order", () => {
  const f = new MigrationFormat([V1, V2]);
  const s = f.saveStream(toy(1));
  assert.deepEqual(
    Array.from(s.subarray(0, 16)),
    [0xb1, 0xbb, 0x1d, 0x1b, 0x0b, 0xb1, 0xd1, 0xb0, 0, 0, 0, 2, 0, 0, 0, 1],
  );
  assert.deepEqual(readHeader(s), { version: 2, compatVersion: 1 });
  assert.equal(MIGRATION_MAGIC, 0xb1bb1d1b0bb1d1b0n);
  const v1 = f.saveStream(toy(1), { version: 1 });
  assert.deepEqual(readHeader(v1), { version: 1, compatVersion: 1 });
  assert.deepEqual(
    inspectStream(s).sections.map((x) => x.name),
    ["identity", "counters", "macs", "extra"],
  );
});

test("round trip: every stage's state arrives, for random devices (property)", () => {
  const f = new MigrationFormat([V1, V2]);
  fc.assert(
    fc.property(
      fc.record({
        name: fc.string({ maxLength: 20 }),
        rx: fc.nat(),
        tx: fc.maxSafeNat(),
        macs: fc.array(
          fc
            .uint8Array({ minLength: 6, maxLength: 6 })
            .map((b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join(":")),
          { maxLength: 64 },
        ),
        extra: fc.integer({ min: 0, max: 0xffff_ffff }),
      }),
      (src) => {
        const dst = toy(99);
        const r = loadStream(f, dst, saveStream(f, src));
        assert.equal(r.version, 2);
        assert.deepEqual(r.loaded, ["identity", "counters", "macs", "extra"]);
        assert.equal(snapshot(dst), snapshot(src));
      },
    ),
    { numRuns: 200 },
  );
});

test("version matrix: the target uses its newest version in [compat, version], or names both", () => {
  // [source versions, source writes, target versions] -> target version used, or error
  const cases: [MigrationVersion<Toy>[], number, MigrationVersion<Toy>[], number | "error"][] = [
    [[V1], 1, [V1], 1],
    [[V1], 1, [V1, V2], 1], // a v2 target loads a v1 stream
    [[V1, V2], 2, [V1, V2], 2],
    [[V1, V2], 2, [V1], 1], // v2 declared compat 1: a v1 target skips "extra"
    [[V1, V2], 1, [V2], "error"], // v1 stream, target knows only v2 (> 1)
    [[V1, V2, V3], 3, [V1, V2], "error"], // v3 is compat 3 only
    [[V1, V2, V3], 3, [V3], 3],
    [[V3], 3, [V1, V2, V3], 3],
    [[V1, V2], 2, [V3], "error"], // stream [1,2], target knows 3
  ];
  for (const [srcVersions, writes, dstVersions, want] of cases) {
    const src = new MigrationFormat(srcVersions);
    const dst = new MigrationFormat(dstVersions);
    const bytes = src.saveStream(toy(4), { version: writes });
    const target = toy(8);
    const before = snapshot(target);
    const what = `source ${srcVersions.map((v) => v.id)} writes v${writes}, target ${dstVersions.map((v) => v.id)}`;
    if (want === "error") {
      assert.throws(
        () => dst.loadStream(target, bytes),
        (e: unknown) => {
          assert.ok(isMigrationStreamError(e, "NO_COMPATIBLE_VERSION"), `${what}: ${String(e)}`);
          const h = readHeader(bytes);
          assert.match((e as Error).message, new RegExp(`stream version ${h.version}`));
          assert.match((e as Error).message, new RegExp(`back to ${h.compatVersion}`));
          assert.match(
            (e as Error).message,
            new RegExp(`knows versions ${dst.versions.join(", ")}`),
          );
          return true;
        },
        what,
      );
      assert.equal(snapshot(target), before, `${what}: destination unchanged`);
    } else {
      const r = dst.loadStream(target, bytes);
      assert.equal(r.version, want, what);
      const src4 = toy(4);
      assert.equal(target.rx, src4.rx, what);
      assert.equal(target.name, src4.name, what);
      const used = dstVersions.find((v) => v.id === want) as MigrationVersion<Toy>;
      const wrote = srcVersions.find((v) => v.id === writes) as MigrationVersion<Toy>;
      const carriesExtra =
        used.stages.includes(extra) && wrote.stages.includes(extra) ? src4.extra : 8 * 7;
      assert.equal(target.extra, carriesExtra, `${what}: extra`);
    }
  }
});

test("bad headers: magic, zero versions, compat above version", () => {
  const f = new MigrationFormat([V1]);
  const good = f.saveStream(toy(1));
  const magic = good.slice();
  magic[0] = 0xb2;
  assert.throws(
    () => f.loadStream(toy(2), magic),
    (e) =>
      isMigrationStreamError(e, "BAD_MAGIC") &&
      e.code === "ERR_VHOST_MIGRATION_STREAM" &&
      e.fatal === false,
  );
  for (const [v, c] of [
    [0, 0],
    [1, 0],
    [1, 2],
    [0, 1],
  ] as const) {
    const s = good.slice();
    s.set(encodeStreamHeader(stateStream, v, c));
    assert.throws(
      () => f.loadStream(toy(2), s),
      (e) => isMigrationStreamError(e, "BAD_HEADER"),
      `version ${v} compat ${c}`,
    );
  }
});

test("a stream cut at any byte fails with TRUNCATED and changes nothing", () => {
  const f = new MigrationFormat([V1, V2]);
  const s = f.saveStream(toy(3));
  for (let n = 0; n < s.length; n++) {
    const target = toy(9);
    const before = snapshot(target);
    assert.throws(
      () => f.loadStream(target, s.subarray(0, n)),
      (e: unknown) => isMigrationStreamError(e, "TRUNCATED"),
      `cut at ${n} of ${s.length}`,
    );
    assert.equal(snapshot(target), before, `cut at ${n}: destination unchanged`);
  }
});

test("any single bit flipped is detected (CRC or structure) and changes nothing (property)", () => {
  const f = new MigrationFormat([V1, V2]);
  const s = f.saveStream(toy(5));
  fc.assert(
    fc.property(fc.nat({ max: s.length * 8 - 1 }), (bit) => {
      const bad = s.slice();
      bad[bit >> 3] = (bad[bit >> 3] as number) ^ (1 << (bit & 7));
      const target = toy(6);
      const before = snapshot(target);
      assert.throws(
        () => f.loadStream(target, bad),
        (e: unknown) => e instanceof MigrationStreamError,
      );
      assert.equal(snapshot(target), before);
    }),
    { numRuns: 300 },
  );
  // A flip inside a section's data is a CRC mismatch naming the stage.
  const sec = inspectStream(s).sections.find((x) => x.name === "counters")!;
  const bad = s.slice();
  bad[sec.offset + 3] = (bad[sec.offset + 3] as number) ^ 0x10;
  assert.throws(
    () => f.loadStream(toy(6), bad),
    (e: unknown) =>
      isMigrationStreamError(e, "CRC_MISMATCH") && (e as MigrationStreamError).stage === "counters",
  );
});

test("random bytes and random mutations only ever produce MigrationStreamError (property)", () => {
  const f = new MigrationFormat([V1, V2]);
  const s = f.saveStream(toy(5));
  fc.assert(
    fc.property(
      fc.oneof(
        fc.uint8Array({ maxLength: 200 }),
        fc
          .tuple(fc.nat({ max: s.length - 1 }), fc.uint8Array({ minLength: 1, maxLength: 8 }))
          .map(([at, b]) => {
            const m = s.slice();
            m.set(b.subarray(0, m.length - at), at);
            return m;
          }),
      ),
      (bytes) => {
        const target = toy(6);
        const before = snapshot(target);
        try {
          f.loadStream(target, bytes);
        } catch (e) {
          assert.ok(e instanceof MigrationStreamError, String(e));
          assert.equal(snapshot(target), before);
        }
      },
    ),
    { numRuns: 300 },
  );
});

test("oversized: a stream over the cap, a section over its stage's cap, trailing bytes", () => {
  const f = new MigrationFormat([V1], { maxBytes: 200 });
  const big = toy(1);
  big.macs = Array.from({ length: 60 }, () => "52:54:00:00:00:01");
  assert.throws(
    () => f.saveStream(big),
    (e) => isMigrationStreamError(e, "TOO_LARGE"),
  );
  const wide = new MigrationFormat([V1]);
  const bytes = wide.saveStream(big);
  const target = toy(2);
  assert.throws(
    () => f.loadStream(target, bytes),
    (e: unknown) => isMigrationStreamError(e, "TOO_LARGE"),
  );
  // A "macs" section larger than the stage's own cap (4 + 64*6) is refused before its data.
  const sectionTooBig = new MigrationFormat([
    {
      id: 1,
      stages: [
        identity,
        counters,
        { name: "macs", save: (_t, w) => w.fixed("blob", new Uint8Array(1000)) },
      ],
    },
  ]).saveStream(toy(1));
  assert.throws(
    () => new MigrationFormat([V1]).loadStream(toy(2), sectionTooBig),
    (e: unknown) =>
      isMigrationStreamError(e, "TOO_LARGE") && (e as MigrationStreamError).stage === "macs",
  );
  const trailing = new Uint8Array(bytes.length + 1);
  trailing.set(bytes);
  assert.throws(
    () => wide.loadStream(toy(2), trailing),
    (e: unknown) => isMigrationStreamError(e, "TRAILING_BYTES"),
  );
  assert.equal(snapshot(target), snapshot(toy(2)));
});

test("sections out of order, missing, unknown, or not fully read are refused", () => {
  const swapped = new MigrationFormat<Toy>([{ id: 1, stages: [counters, identity, macs] }]);
  const f = new MigrationFormat([V1]);
  assert.throws(
    () => f.loadStream(toy(2), swapped.saveStream(toy(1))),
    (e: unknown) => isMigrationStreamError(e, "UNEXPECTED_STAGE"),
  );
  const missing = new MigrationFormat<Toy>([{ id: 1, stages: [identity, counters] }]);
  assert.throws(
    () => f.loadStream(toy(2), missing.saveStream(toy(1))),
    (e: unknown) =>
      isMigrationStreamError(e, "UNEXPECTED_STAGE") && (e as MigrationStreamError).stage === "macs",
  );
  // Same version, a section the target does not know: refused (only newer streams may add).
  const added = new MigrationFormat<Toy>([{ id: 1, stages: [identity, counters, macs, extra] }]);
  assert.throws(
    () => f.loadStream(toy(2), added.saveStream(toy(1))),
    (e: unknown) =>
      isMigrationStreamError(e, "UNEXPECTED_STAGE") &&
      (e as MigrationStreamError).stage === "extra",
  );
  // A stage reading less than its section: trailing bytes in the section.
  const lazy = new MigrationFormat<Toy>([
    { id: 1, stages: [identity, { ...counters, load: (_t, r) => void r.u64("rx") }, macs] },
  ]);
  assert.throws(
    () => lazy.loadStream(toy(2), f.saveStream(toy(1))),
    (e: unknown) =>
      isMigrationStreamError(e, "TRAILING_BYTES") &&
      (e as MigrationStreamError).stage === "counters",
  );
});

test("load is transactional: nothing applies until the whole stream checked out", () => {
  const applied: string[] = [];
  const spy = (s: MigrationStage<Toy>): MigrationStage<Toy> => ({
    ...s,
    load: (t, r) => {
      const apply = s.load!(t, r);
      return () => {
        applied.push(s.name);
        if (apply) apply();
      };
    },
  });
  const f = new MigrationFormat<Toy>([
    { id: 1, stages: [spy(identity), spy(counters), spy(macs)] },
  ]);
  const s = f.saveStream(toy(1));
  // Break the end record's CRC: every section parses, yet nothing may apply.
  const bad = s.slice();
  bad[bad.length - 1] = (bad[bad.length - 1] as number) ^ 1;
  const target = toy(2);
  assert.throws(
    () => f.loadStream(target, bad),
    (e) => isMigrationStreamError(e, "CRC_MISMATCH"),
  );
  assert.deepEqual(applied, []);
  assert.equal(snapshot(target), snapshot(toy(2)));
  // A target side that rejects a value: same.
  const strict = new MigrationFormat<Toy>([
    {
      id: 1,
      stages: [
        spy(identity),
        {
          name: "counters",
          load: (_t, r) => {
            r.u64Number("rx", { max: 1 });
            r.u64("tx");
          },
        },
        spy(macs),
      ],
    },
  ]);
  assert.throws(
    () => strict.loadStream(target, f.saveStream(toy(3))),
    (e: unknown) => isMigrationStreamError(e, "BAD_VALUE") && /rx=9/.test((e as Error).message),
  );
  assert.deepEqual(applied, []);
  // prepareLoad + commit, and commit only once.
  const p = f.prepareLoad(target, s);
  assert.deepEqual(applied, []);
  p.commit();
  assert.deepEqual(applied, ["identity", "counters", "macs"]);
  assert.throws(
    () => p.commit(),
    (e) => isMigrationStreamError(e, "ALREADY_COMMITTED"),
  );
});

test("the end record carries the CRC-32 of everything before it", () => {
  const f = new MigrationFormat([V1]);
  const s = f.saveStream(toy(1));
  const view = new DataView(s.buffer, s.byteOffset, s.byteLength);
  assert.equal(view.getUint16(s.length - 6, false), 0);
  assert.equal(view.getUint32(s.length - 4, false), crc32(s.subarray(0, s.length - 4)));
});

test("malformed version tables are refused at definition", () => {
  const bad: MigrationVersion<Toy>[][] = [
    [],
    [{ id: 0, stages: [] }],
    [V1, { ...V1 }],
    [{ id: 2, compat: 3, stages: [] }],
    [{ id: 1, stages: [identity, identity] }],
    [{ id: 1, stages: [{ name: "" }] }],
    [{ id: 1, stages: [{ name: "x".repeat(256) }] }],
  ];
  for (const v of bad) {
    assert.throws(
      () => new MigrationFormat(v),
      (e) => isMigrationStreamError(e, "BAD_DEFINITION"),
    );
  }
});

test("state transfer over a pipe: exact bytes in any chunking, TOO_LARGE past the cap, ABORTED", async () => {
  const data = Uint8Array.from({ length: 200_003 }, (_, i) => (i * 31 + 7) & 0xff);
  {
    const [r, w] = native.pipe(true);
    const [got] = await Promise.all([
      readStateFromFd(r, { maxBytes: 1 << 20 }),
      writeStateToFd(w, data),
    ]);
    assert.equal(Buffer.compare(got, data), 0, "bytes arrive unchanged");
  }
  {
    // a writer trickling small chunks: the reader keeps only what arrived
    const [r, w] = native.pipe(true);
    const reading = readStateFromFd(r, { maxBytes: 1 << 20 });
    for (let off = 0; off < 3000; off += 7) {
      native.write(w, data, off, Math.min(7, 3000 - off));
      await new Promise((res) => setImmediate(res));
    }
    native.close(w);
    const got = await reading;
    assert.equal(Buffer.compare(got, data.subarray(0, 3000)), 0);
  }
  {
    const [r, w] = native.pipe(true);
    const reading = readStateFromFd(r, { maxBytes: 1000 });
    // more than the pipe holds (the transfer widens it to TRANSFER_PIPE_SIZE)
    const big = new Uint8Array(TRANSFER_PIPE_SIZE * 4);
    const writing = writeStateToFd(w, big).catch((e: unknown) => e);
    await assert.rejects(
      reading,
      (e: unknown) => e instanceof MigrationStreamError && e.reason === "TOO_LARGE",
    );
    const werr = await writing;
    assert.ok(werr instanceof MigrationStreamError, "the writer sees the reader go (EPIPE)");
  }
  {
    const [r, w] = native.pipe(true);
    const ac = new AbortController();
    const reading = readStateFromFd(r, { maxBytes: 1000, signal: ac.signal });
    ac.abort();
    await assert.rejects(
      reading,
      (e: unknown) => e instanceof MigrationStreamError && e.reason === "ABORTED",
    );
    native.close(w);
  }
});
