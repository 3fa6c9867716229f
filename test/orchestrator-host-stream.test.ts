/**
 * The host stream as named, versioned stages (seed 004, passt `migrate.h`): the receiver picks
 * the newest version it knows within the sender's [compat_version, version] or aborts naming
 * both; a stage added in a newer version is skipped by an older receiver; a stream cut at any
 * stage boundary fails naming the stage. First with toy stages over an in-memory pipe, then
 * with the real orchestrator between two vhostkit back-ends.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, readlinkSync, rmSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import type { AddressInfo, Server, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Duplex, PassThrough } from "node:stream";

import { serveBackend } from "../src/backend/server.js";
import { NetTestDevice } from "../src/devices/net-test-device.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { StageTable, hostStream } from "../src/migration/staged.js";
import { isMigrationStreamError } from "../src/migration/state-codec.js";
import {
  DESTINATION_VERSIONS,
  HOST_STREAM_STAGES,
  MigrationError,
  SOURCE_VERSIONS,
  SectionReader,
  SectionType,
  SeqTrafficGuest,
  encodeJsonSection,
  migrateSource,
  parseJson,
  receiveMigration,
  runDestinationStages,
  runSourceStages,
  writeAll,
} from "../src/orchestrator/index.js";
import type { HostStage, HostVersion, SourceContext } from "../src/orchestrator/index.js";
import { until } from "./helpers.js";

// --- toy stages over a pipe

interface ToySource {
  wire: PassThrough;
  values: Record<string, number>;
}
interface ToyDest {
  reader: SectionReader;
  got: Record<string, unknown>;
}

function toySource(name: string, sections: number): HostStage<ToySource> {
  return {
    name,
    async run(c) {
      for (let i = 0; i < sections; i++) {
        await writeAll(
          c.wire,
          encodeJsonSection(SectionType.DRIVER_STATE, { stage: name, i, v: c.values[name] }),
        );
      }
    },
  };
}

/** A receiving stage: reads its sections up to the next stage (the last one: 2 of them). */
function toyDest(name: string): HostStage<ToyDest> {
  return {
    name,
    async run(c) {
      const seen: unknown[] = [];
      const last = name === "switch";
      for (;;) {
        if (last && seen.length === 2) break;
        const s = await c.reader.nextInStage();
        if (s === null) break;
        seen.push(parseJson(s));
      }
      c.got[name] = seen;
    },
  };
}

const V1_NAMES = ["hello", "memory", "virtio", "switch"];
const sourceV1: HostVersion<ToySource> = {
  id: 1,
  stages: V1_NAMES.map((n) => toySource(n, 2)),
};
/** v2 adds "telemetry" (3 sections) before "switch" and declares v1 compatible. */
function sourceV2(compat: number): HostVersion<ToySource> {
  return {
    id: 2,
    compat,
    stages: [
      ...V1_NAMES.slice(0, 3).map((n) => toySource(n, 2)),
      toySource("telemetry", 3),
      toySource("switch", 2),
    ],
  };
}
const destV1: HostVersion<ToyDest> = { id: 1, stages: V1_NAMES.map(toyDest) };
const destV2: HostVersion<ToyDest> = {
  id: 2,
  compat: 1,
  stages: [...V1_NAMES.slice(0, 3).map(toyDest), toyDest("telemetry"), toyDest("switch")],
};

async function record(versions: HostVersion<ToySource>[], version?: number): Promise<Buffer> {
  const wire = new PassThrough();
  const chunks: Buffer[] = [];
  wire.on("data", (c: Buffer) => chunks.push(c));
  const values = { hello: 1, memory: 2, virtio: 3, telemetry: 4, switch: 5 };
  await runSourceStages(
    new StageTable(hostStream, versions),
    { wire, values },
    (b) => writeAll(wire, b),
    version !== undefined ? { version } : {},
  );
  wire.end();
  await new Promise((resolve) => wire.on("end", resolve));
  return Buffer.concat(chunks);
}

async function receive(
  bytes: Uint8Array,
  versions: HostVersion<ToyDest>[],
): Promise<{ ctx: ToyDest; result: Awaited<ReturnType<typeof runDestinationStages>> }> {
  const p = new PassThrough();
  const ctx: ToyDest = { reader: new SectionReader(p), got: {} };
  p.end(bytes);
  const result = await runDestinationStages(new StageTable(hostStream, versions), ctx, ctx.reader);
  return { ctx, result };
}

/** Offsets of every STAGE section in a recorded stream, with the stage's name. */
function stageOffsets(bytes: Buffer): { name: string; at: number }[] {
  const out: { name: string; at: number }[] = [];
  let off = 16;
  while (off < bytes.length) {
    const type = bytes.readUInt8(off);
    const len = bytes.readUInt32BE(off + 4);
    if (type === SectionType.STAGE) {
      out.push({ name: bytes.subarray(off + 8, off + 8 + len).toString("utf8"), at: off });
    }
    off += 8 + len + 4;
  }
  return out;
}

test("host stream: a v2 sender to a v1 receiver within compat; the stage added in v2 is skipped", async () => {
  const bytes = await record([sourceV1, sourceV2(1)]);
  assert.equal(bytes.readUInt32BE(8), 2, "version 2 written");
  assert.equal(bytes.readUInt32BE(12), 1, "compat_version 1 written");
  const { ctx, result } = await receive(bytes, [destV1]);
  assert.equal(result.version, 1);
  assert.deepEqual(result.header, { version: 2, compatVersion: 1 });
  assert.deepEqual(result.ran, V1_NAMES);
  assert.deepEqual(result.skipped, ["telemetry"]);
  assert.deepEqual(ctx.got.switch, [
    { stage: "switch", i: 0, v: 5 },
    { stage: "switch", i: 1, v: 5 },
  ]);
  assert.equal(ctx.got.telemetry, undefined, "v1 never ran the v2 stage");
  // A v2 receiver reads the same stream with its v2 stages, skipping nothing.
  const both = await receive(bytes, [destV1, destV2]);
  assert.equal(both.result.version, 2);
  assert.deepEqual(both.result.skipped, []);
  assert.equal((both.ctx.got.telemetry as unknown[]).length, 3);
  // A v1 sender to a v2 receiver: v1 is the newest within [1, 1].
  const old = await receive(await record([sourceV1]), [destV1, destV2]);
  assert.equal(old.result.version, 1);
  assert.deepEqual(old.result.ran, V1_NAMES);
});

test("host stream: a v2 sender outside the v1 receiver's compat aborts naming both", async () => {
  const bytes = await record([sourceV2(2)]);
  await assert.rejects(
    () => receive(bytes, [destV1]),
    (e: unknown) =>
      isMigrationStreamError(e, "NO_COMPATIBLE_VERSION") &&
      /stream version 2 \(compatible back to 2\)/.test(e.message) &&
      /knows versions 1\b/.test(e.message),
  );
});

test("host stream: an unknown stage from a same-version sender, or a stage out of order, is refused", async () => {
  // a v1 stream (compat 1) carrying a stage v1 does not know: no promise to skip it
  const rogue: HostVersion<ToySource> = {
    id: 1,
    stages: [toySource("hello", 1), toySource("rogue", 1), toySource("memory", 1)],
  };
  await assert.rejects(
    async () => receive(await record([rogue]), [destV1]),
    (e: unknown) => isMigrationStreamError(e, "UNEXPECTED_STAGE") && /"rogue"/.test(e.message),
  );
  // v2 stages in the wrong order for a v2 receiver
  const swapped: HostVersion<ToySource> = {
    id: 2,
    compat: 1,
    stages: [toySource("memory", 1), toySource("hello", 1)],
  };
  await assert.rejects(
    async () => receive(await record([swapped]), [destV1, destV2]),
    (e: unknown) =>
      isMigrationStreamError(e, "UNEXPECTED_STAGE") &&
      /stage "memory" where "hello" comes next/.test(e.message),
  );
});

test("host stream: truncated at every stage boundary, the receiver fails naming the stage", async () => {
  const bytes = await record([sourceV1, sourceV2(1)]);
  const marks = stageOffsets(bytes);
  assert.deepEqual(
    marks.map((m) => m.name),
    ["hello", "memory", "virtio", "telemetry", "switch"],
  );
  // cut before each STAGE section, inside it, and just after it; then before the end
  const cuts: { at: number; stage: RegExp }[] = [];
  marks.forEach((m, i) => {
    const before = i === 0 ? "header" : (marks[i - 1] as { name: string }).name;
    cuts.push({ at: m.at, stage: new RegExp(`stage "(${before}|${m.name})"`) });
    cuts.push({ at: m.at + 9, stage: new RegExp(`stage "(${before}|${m.name})"`) });
    cuts.push({ at: m.at + 8 + m.name.length + 4, stage: new RegExp(`stage "${m.name}"`) });
  });
  cuts.push({ at: 8, stage: /stage "header"/ });
  for (const versions of [[destV1], [destV1, destV2]]) {
    for (const c of cuts) {
      await assert.rejects(
        () => receive(bytes.subarray(0, c.at), versions),
        (e: unknown) =>
          e instanceof Error && /truncated/.test(e.message) && c.stage.test(e.message),
        `cut at ${c.at} (v${versions.length}): ${c.stage}`,
      );
    }
  }
  // the whole stream is fine
  await receive(bytes, [destV1]);
});

// --- the real orchestrator

function incomingRamFds(): number {
  let n = 0;
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`).includes("vhostkit-incoming")) n++;
    } catch {
      // closed meanwhile
    }
  }
  return n;
}

async function listen(onConn: (s: Socket) => void): Promise<{ server: Server; port: number }> {
  const server = createServer({ noDelay: true }, onConn);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { server, port: (server.address() as AddressInfo).port };
}

function connect(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = createConnection({ host: "127.0.0.1", port, noDelay: true }, () => resolve(s));
    s.once("error", reject);
  });
}

interface Pair {
  dir: string;
  srvB: ReturnType<typeof serveBackend>;
  devA: NetTestDevice;
  devB: EnableRecorder;
  fe: VhostUserFrontend;
  gen: SeqTrafficGuest;
  close(): void;
}

/** A sink that records every SET_VRING_ENABLE it sees, per queue. */
class EnableRecorder extends NetTestDevice {
  readonly enables = new Map<number, boolean[]>();
  constructor() {
    super({ mode: "sink" });
  }
  queueStateChanged(q: { index: number; enabled: boolean }): void {
    const list = this.enables.get(q.index) ?? [];
    if (list[list.length - 1] !== q.enabled) list.push(q.enabled);
    this.enables.set(q.index, list);
  }
}

async function pair(): Promise<Pair> {
  const dir = mkdtempSync(join(tmpdir(), "vk-hoststream-"));
  const devA = new NetTestDevice({ mode: "sink" });
  const devB = new EnableRecorder();
  const srvA = serveBackend(devA, { path: join(dir, "a.sock") });
  const srvB = serveBackend(devB, { path: join(dir, "b.sock") });
  const fe = await VhostUserFrontend.connect(join(dir, "a.sock"));
  await fe.negotiate({});
  const ram = GuestRam.create({ size: 4 << 20 });
  await fe.start(ram, [256, 256]);
  const gen = new SeqTrafficGuest(fe, { rxQueue: null, burst: 8 });
  gen.start();
  await until(() => (devA.counters[0]?.txPackets ?? 0) > 50, "traffic", 8000);
  return {
    dir,
    srvB,
    devA,
    devB,
    fe,
    gen,
    close() {
      gen.stop();
      fe.close();
      ram.close();
      srvA.close();
      srvB.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** The source's stages with a v2 that adds a "telemetry" stage before the switch-over. */
function sourceWithTelemetry(compat: number): HostVersion<SourceContext>[] {
  const v1 = SOURCE_VERSIONS[0] as HostVersion<SourceContext>;
  const last = v1.stages.length - 1;
  const telemetry: HostStage<SourceContext> = {
    name: "telemetry",
    async run(c) {
      // a section type no v1 receiver knows
      await c.send(encodeJsonSection(0x20 as SectionType, { counters: [1, 2, 3] }));
    },
  };
  return [
    v1,
    {
      id: 2,
      compat,
      stages: [...v1.stages.slice(0, last), telemetry, v1.stages[last] as HostStage<SourceContext>],
    },
  ];
}

test("host stream names: both sides define every stage of every version, in one order", () => {
  for (const [id, names] of Object.entries(HOST_STREAM_STAGES)) {
    const s = SOURCE_VERSIONS.find((v) => v.id === Number(id));
    const d = DESTINATION_VERSIONS.find((v) => v.id === Number(id));
    assert.deepEqual(
      s?.stages.map((x) => x.name),
      names,
    );
    assert.deepEqual(
      d?.stages.map((x) => x.name),
      names,
    );
  }
  assert.deepEqual(HOST_STREAM_STAGES[1], [
    "setup",
    "precopy",
    "stop",
    "final pages",
    "virtio state",
    "backend state",
    "driver state",
    "guest state",
    "switchover",
  ]);
});

test("orchestrator: a v2 source migrates to a v1 destination within compat (telemetry skipped); outside compat the source resumes", async () => {
  const p = await pair();
  let server: Server | null = null;
  try {
    // outside compat: the destination aborts naming both, the source resumes
    let destErr: unknown = null;
    let l = await listen((s) => {
      receiveMigration({
        stream: s,
        connectBackend: () => VhostUserFrontend.connect(join(p.dir, "b.sock")),
      }).catch((e: unknown) => {
        destErr = e;
      });
    });
    server = l.server;
    const err = await migrateSource({
      frontend: p.fe,
      stream: await connect(l.port),
      guest: p.gen,
      streamVersions: sourceWithTelemetry(2),
    }).then(
      () => null,
      (e: unknown) => e,
    );
    assert.ok(err instanceof MigrationError, String(err));
    assert.equal(err.sourceResumed, true);
    assert.match(err.message, /stream version 2 \(compatible back to 2\).*knows versions 1/);
    assert.ok(isMigrationStreamError(destErr, "NO_COMPATIBLE_VERSION"), String(destErr));
    await until(() => incomingRamFds() === 0, "destination released its RAM", 8000);
    const before = p.devA.counters[0]?.txPackets ?? 0;
    await until(() => (p.devA.counters[0]?.txPackets ?? 0) > before + 50, "traffic resumes", 8000);
    server.close();

    // within compat: the destination (v1) skips the telemetry stage and runs the device
    let incoming: ReturnType<typeof receiveMigration> | null = null;
    l = await listen((s) => {
      incoming = receiveMigration({
        stream: s,
        connectBackend: () => VhostUserFrontend.connect(join(p.dir, "b.sock")),
      });
    });
    server = l.server;
    const res = await migrateSource({
      frontend: p.fe,
      stream: await connect(l.port),
      guest: p.gen,
      streamVersions: sourceWithTelemetry(1),
    });
    assert.ok(incoming !== null);
    const inc = await (incoming as ReturnType<typeof receiveMigration>);
    try {
      assert.equal(inc.streamVersion, 1);
      assert.deepEqual(inc.skippedStages, ["telemetry"]);
      assert.ok(res.downtimeMs > 0);
      const tx = p.devB.counters[0]?.txPackets ?? 0;
      const g = SeqTrafficGuest.restore(inc.frontend, inc.guestState ?? new Uint8Array(0));
      g.start();
      await until(
        () => (p.devB.counters[0]?.txPackets ?? 0) > tx,
        "traffic on the destination",
        8000,
      );
      g.stop();
    } finally {
      inc.frontend.close();
      inc.ram.close();
    }
  } finally {
    server?.close();
    p.close();
  }
});

/** A stream that delivers `bytes` then ends, and swallows what is written to it. */
function replayDuplex(bytes: Uint8Array): Duplex {
  const d = new Duplex({
    read() {
      return undefined;
    },
    write(_c: Buffer, _e: BufferEncoding, cb: () => void) {
      cb();
    },
  });
  d.push(Buffer.from(bytes));
  d.push(null);
  return d;
}

test("orchestrator: the host stream cut at every stage boundary; the destination fails naming the stage and releases everything", async () => {
  const p = await pair();
  const servers: Server[] = [];
  try {
    // Record a whole stream on its way to a real destination (a recording TCP proxy).
    let incoming: ReturnType<typeof receiveMigration> | null = null;
    const dest = await listen((s) => {
      incoming = receiveMigration({
        stream: s,
        connectBackend: () => VhostUserFrontend.connect(join(p.dir, "b.sock")),
      });
    });
    servers.push(dest.server);
    const chunks: Buffer[] = [];
    const proxy = await listen((up) => {
      void connect(dest.port).then((down) => {
        up.on("data", (c: Buffer) => {
          chunks.push(Buffer.from(c));
          down.write(c);
        });
        up.on("end", () => down.end());
        down.on("data", (c: Buffer) => up.write(c));
        down.on("end", () => up.end());
      });
    });
    servers.push(proxy.server);
    await migrateSource({ frontend: p.fe, stream: await connect(proxy.port), guest: p.gen });
    const inc = await (incoming as unknown as ReturnType<typeof receiveMigration>);
    inc.frontend.close();
    inc.ram.close();
    const bytes = Buffer.concat(chunks);
    const marks = stageOffsets(bytes);
    assert.deepEqual(
      marks.map((m) => m.name),
      HOST_STREAM_STAGES[1],
    );
    // Replay every prefix that ends at a stage boundary (and the header alone) to a fresh
    // destination with a real back-end.
    const cuts = [{ at: 16, before: "header", name: "setup" }];
    marks.forEach((m, i) => {
      if (i > 0)
        cuts.push({ at: m.at, before: (marks[i - 1] as { name: string }).name, name: m.name });
    });
    for (const c of cuts) {
      await until(() => p.srvB.session === null, "the back-end is free", 4000).catch(
        () => undefined,
      );
      const e = await receiveMigration({
        stream: replayDuplex(bytes.subarray(0, c.at)),
        connectBackend: () => VhostUserFrontend.connect(join(p.dir, "b.sock")),
      }).then(
        () => null,
        (x: unknown) => x,
      );
      assert.ok(e instanceof Error, `cut before "${c.name}": ${String(e)}`);
      assert.match(e.message, /truncated/, `cut before "${c.name}"`);
      assert.ok(
        e.message.includes(`stage "${c.before}"`) || e.message.includes(`stage "${c.name}"`),
        `cut before "${c.name}": ${e.message}`,
      );
      assert.equal(incomingRamFds(), 0, `cut before "${c.name}": guest RAM released`);
    }
    // the whole stream replayed starts the device
    await until(() => p.srvB.session === null, "the back-end is free", 4000).catch(() => undefined);
    const whole = await receiveMigration({
      stream: replayDuplex(bytes),
      connectBackend: () => VhostUserFrontend.connect(join(p.dir, "b.sock")),
    });
    whole.frontend.close();
    whole.ram.close();
  } finally {
    for (const s of servers) s.close();
    p.close();
  }
});

test("virtio state: a queue the driver disabled stays disabled on the destination (regression: enabled was hard-coded true)", async () => {
  const p = await pair();
  let server: Server | null = null;
  try {
    // queue 0 (receive, unused by this guest) disabled by the driver before the migration
    await p.fe.setVringEnable(0, false);
    let incoming: ReturnType<typeof receiveMigration> | null = null;
    const l = await listen((s) => {
      incoming = receiveMigration({
        stream: s,
        connectBackend: () => VhostUserFrontend.connect(join(p.dir, "b.sock")),
      });
    });
    server = l.server;
    await migrateSource({ frontend: p.fe, stream: await connect(l.port), guest: p.gen });
    const inc = await (incoming as unknown as ReturnType<typeof receiveMigration>);
    try {
      assert.equal(inc.virtioState.queues.find((q) => q.index === 0)?.enabled, false);
      assert.equal(inc.virtioState.queues.find((q) => q.index === 1)?.enabled, true);
      assert.ok(!(p.devB.enables.get(0) ?? []).includes(true), "queue 0 never enabled");
      assert.ok((p.devB.enables.get(1) ?? []).includes(true), "queue 1 enabled");
      const tx = p.devB.counters[0]?.txPackets ?? 0;
      const g = SeqTrafficGuest.restore(inc.frontend, inc.guestState ?? new Uint8Array(0));
      g.start();
      await until(
        () => (p.devB.counters[0]?.txPackets ?? 0) > tx,
        "traffic on the destination",
        8000,
      );
      g.stop();
    } finally {
      inc.frontend.close();
      inc.ram.close();
    }
  } finally {
    server?.close();
    p.close();
  }
});
