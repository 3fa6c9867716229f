/**
 * The destination side of a live migration: builds guest RAM with the source's layout,
 * connects to its own back-end and tells the source what it offers, loads the pages, checks
 * the virtio device state before applying it, then starts the device: SET_FEATURES, the memory
 * table, each ring with SET_VRING_BASE from the source's values, the back-end state LOAD +
 * CHECK_DEVICE_STATE, rings enabled and kicked, SEND_RARP when the driver lacks GUEST_ANNOUNCE
 * and the back-end offers RARP; finally DONE to the source. On any failure it sends FAIL and
 * releases everything.
 *
 * vhost-user: "Migration", "Migrating back-end state", VHOST_USER_SEND_RARP; load order and
 * sanity checks as QEMU's virtio_load / vmstate_virtio (hw/virtio/virtio.c).
 */
import { timingSafeEqual } from "node:crypto";
import type { Duplex } from "node:stream";
import {
  DeviceStatus,
  FRONTEND_PROTOCOL_FEATURES,
  VhostUserFrontend,
} from "../frontend/frontend.js";
import type { NegotiateOptions } from "../frontend/frontend.js";
import { GuestRam } from "../frontend/guest-ram.js";
import { loadBackendState } from "../frontend/migration.js";
import type { DriverSnapshot, FrontendQueue, TokenSnapshot } from "../frontend/queue.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import {
  ProtocolFeature,
  VirtioFeature,
  featureMask,
  featureSet,
  hasFeature,
} from "../protocol/constants.js";
import { VhostUserError } from "../protocol/errors.js";
import type { QueueBase } from "../virtq/types.js";
import { TouchedPages, applyPages, hashGuestRam } from "./pages.js";
import type { HelloSection, SetupSection } from "./source.js";
import {
  MigrationStreamFormatError,
  SectionReader,
  SectionType,
  StageTable,
  encodeJsonSection,
  encodeSection,
  hostStream,
  hostVersions,
  parseJson,
  runDestinationStages,
  writeAll,
} from "./stream.js";
import type { HostStage, HostVersion, Section } from "./stream.js";
import { decodeVirtioState, validateVirtioState } from "./virtio-state.js";
import type { VirtioDeviceState, VirtioQueueState } from "./virtio-state.js";

/** Options of {@link receiveMigration}. */
export interface DestinationOptions {
  /** the connection from the source (accepted) */
  stream: Duplex;
  /** connect to this destination's back-end (e.g. `() => VhostUserFrontend.connect(path)`) */
  connectBackend: () => Promise<VhostUserFrontend>;
  /** protocol features to ask for (default: the front-end's set plus DEVICE_STATE) */
  protocolFeatures?: bigint;
  /** send SEND_RARP when allowed: "auto" (default: driver lacks GUEST_ANNOUNCE), or never */
  rarp?: "auto" | "never";
  /** the host stream versions this side knows (default {@link DESTINATION_VERSIONS}) */
  streamVersions?: readonly HostVersion<DestinationContext>[];
  /** progress callback: sections as they arrive */
  onProgress?: (p: { section: string; pagesReceived: number; bytesReceived: number }) => void;
}

/** The running device after an incoming migration. */
export interface IncomingResult {
  /** the front-end, connected to this host's back-end, rings running */
  frontend: VhostUserFrontend;
  /** guest RAM (the caller owns it now) */
  ram: GuestRam;
  /** the queues by index */
  queues: FrontendQueue[];
  /** the decoded virtio state */
  virtioState: VirtioDeviceState;
  /** the guest's own state, when the source sent one */
  guestState: Uint8Array | null;
  /** bytes of back-end state loaded (0 when none) */
  backendStateBytes: number;
  /** pages received */
  pagesReceived: number;
  /** whether SEND_RARP was sent */
  rarpSent: boolean;
  /** the memory hash was sent by the source and matched */
  memoryVerified: boolean;
  /** the host stream version chosen to read the source's stream */
  streamVersion: number;
  /** stages of a newer source that this side's version lacks, skipped */
  skippedStages: string[];
}

function fail(field: string, value: unknown, what: string): VhostUserError {
  return new VhostUserError("ERR_VHOST_BAD_FIELD", what, {
    request: "incoming migration",
    field,
    value,
  });
}

/** Most guest RAM regions a SETUP may describe. */
export const MAX_INCOMING_REGIONS = 32;
/** Most guest RAM bytes a SETUP may describe (64 GiB). */
export const MAX_INCOMING_RAM = 64 * 2 ** 30;

function preview(v: unknown): string {
  return (JSON.stringify(v) ?? String(v)).slice(0, 80);
}

function obj(v: unknown, field: string): Record<string, unknown> {
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw fail(field, preview(v), "expected an object");
  }
  return v as Record<string, unknown>;
}

function arr(v: unknown, field: string, max: number): unknown[] {
  if (!Array.isArray(v)) throw fail(field, preview(v), "expected an array");
  if (v.length > max) throw fail(`${field}.length`, v.length, `more than ${max} entries`);
  return v as unknown[];
}

function int(v: unknown, field: string, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0 || v > max) {
    throw fail(field, preview(v), `expected an integer in [0, ${max}]`);
  }
  return v;
}

function bool(v: unknown, field: string): boolean {
  if (typeof v !== "boolean") throw fail(field, preview(v), "expected a boolean");
  return v;
}

function u64(v: unknown, field: string): bigint {
  if (typeof v !== "string" || !/^\d{1,20}$/.test(v) || BigInt(v) >= 1n << 64n) {
    throw fail(field, preview(v), "expected a u64 as a decimal string");
  }
  return BigInt(v);
}

/**
 * Check the SETUP section: types, and the RAM it asks for (at most {@link MAX_INCOMING_REGIONS}
 * regions, {@link MAX_INCOMING_RAM} bytes, page-aligned and not overlapping).
 * @param v the parsed JSON
 * @returns the section
 * @throws VhostUserError naming the field
 */
function checkSetup(v: unknown): SetupSection {
  const s = obj(v, "SETUP");
  const regions = arr(s.regions, "SETUP.regions", MAX_INCOMING_REGIONS);
  if (regions.length === 0) throw fail("SETUP.regions", 0, "no guest RAM regions");
  let total = 0;
  const out: SetupSection["regions"] = regions.map((r, i) => {
    const f = `SETUP.regions[${i}]`;
    const o = obj(r, f);
    const gpa = int(o.gpa, `${f}.gpa`);
    const size = int(o.size, `${f}.size`, MAX_INCOMING_RAM);
    const uaddr = int(o.uaddr, `${f}.uaddr`);
    if (size === 0 || size % 4096 !== 0 || gpa % 4096 !== 0) {
      throw fail(`${f}.size`, `0x${gpa.toString(16)}+${size}`, "region not page-aligned");
    }
    total += size;
    if (total > MAX_INCOMING_RAM) {
      throw fail("SETUP.regions", total, `guest RAM larger than ${MAX_INCOMING_RAM} bytes`);
    }
    return { gpa, size, uaddr };
  });
  const sorted = [...out].sort((a, b) => a.gpa - b.gpa);
  for (let i = 1; i < sorted.length; i++) {
    const a = sorted[i - 1] as (typeof out)[number];
    const b = sorted[i] as (typeof out)[number];
    if (a.gpa + a.size > b.gpa) {
      throw fail("SETUP.regions", `0x${b.gpa.toString(16)}`, "regions overlap");
    }
  }
  if (s.layout !== "fd-per-region" && s.layout !== "shared-fd") {
    throw fail("SETUP.layout", preview(s.layout), "expected fd-per-region or shared-fd");
  }
  u64(s.features, "SETUP.features");
  u64(s.protocolFeatures, "SETUP.protocolFeatures");
  const queues = arr(s.queues, "SETUP.queues", 0x10000).map((q, i) =>
    int(q, `SETUP.queues[${i}]`, 0xffff),
  );
  const deviceId = int(s.deviceId, "SETUP.deviceId", 0xffff);
  const setup: SetupSection = {
    regions: out,
    layout: s.layout,
    features: s.features as string,
    protocolFeatures: s.protocolFeatures as string,
    queues,
    deviceId,
  };
  if (s.rings !== undefined) {
    // Only the sizes are used (SET_VRING_NUM during pre-copy); the addresses come again, final,
    // in the virtio state.
    setup.rings = arr(s.rings, "SETUP.rings", queues.length).map((r, i) => {
      const f = `SETUP.rings[${i}]`;
      const o = obj(r, f);
      const size = int(o.size, `${f}.size`, 0x8000);
      if (size === 0) throw fail(`${f}.size`, 0, "ring size 0");
      return {
        index: int(o.index, `${f}.index`, 0xffff),
        size,
        packed: bool(o.packed, `${f}.packed`),
        desc: int(o.desc, `${f}.desc`),
        avail: int(o.avail, `${f}.avail`),
        used: int(o.used, `${f}.used`),
      };
    });
  }
  return setup;
}

/** The DRIVER_STATE section. */
interface DriverState {
  queues: DriverSnapshot[];
  allocator: number[];
}

function checkToken(v: unknown, f: string, memory: GuestMemory): TokenSnapshot {
  const t = obj(v, f);
  if (t.kind === "none") return { kind: "none" };
  if (t.kind === "value") {
    const x = t.value;
    if (x !== null && typeof x !== "string" && typeof x !== "number" && typeof x !== "boolean") {
      throw fail(`${f}.value`, preview(x), "expected a string, number, boolean or null");
    }
    return { kind: "value", value: x };
  }
  if (t.kind === "pool") {
    const gpa = int(t.gpa, `${f}.gpa`);
    if (memory.tryRegionFor(gpa, 1) === null) {
      throw fail(`${f}.gpa`, `0x${gpa.toString(16)}`, "pool buffer outside guest memory");
    }
    return {
      kind: "pool",
      slot: int(t.slot, `${f}.slot`, 0xffffffff),
      gpa,
      receive: bool(t.receive, `${f}.receive`),
    };
  }
  throw fail(`${f}.kind`, preview(t.kind), "unknown token kind");
}

function inMemory(memory: GuestMemory, gpa: number, len: number, f: string): void {
  if (memory.tryRegionFor(gpa, len) === null) {
    throw fail(f, `0x${gpa.toString(16)}+${len}`, "outside guest memory");
  }
}

/**
 * Check one queue's driver snapshot: types, ring addresses equal to the virtio state's,
 * buffers, pool and indirect tables inside guest memory.
 * @param v the parsed JSON
 * @param q the queue's virtio state (validated)
 * @param memory the destination's guest memory
 * @returns the snapshot
 * @throws VhostUserError naming the field
 */
function checkSnapshot(v: unknown, q: VirtioQueueState, memory: GuestMemory): DriverSnapshot {
  const f = `DRIVER_STATE.queue[${q.index}]`;
  const o = obj(v, f);
  const size = int(o.size, `${f}.size`, 0x8000);
  const packed = bool(o.packed, `${f}.packed`);
  const ring = obj(o.ring, `${f}.ring`);
  const desc = int(ring.desc, `${f}.ring.desc`);
  const avail = int(ring.avail, `${f}.ring.avail`);
  const used = int(ring.used, `${f}.ring.used`);
  if (size !== q.size) throw fail(`${f}.size`, `${size} (virtio ${q.size})`, "states disagree");
  if (desc !== q.desc) throw fail(`${f}.ring.desc`, desc, "driver and virtio state disagree");
  if (avail !== q.avail) throw fail(`${f}.ring.avail`, avail, "driver and virtio state disagree");
  if (used !== q.used) throw fail(`${f}.ring.used`, used, "driver and virtio state disagree");
  let indirectTable: number | null = null;
  if (ring.indirectTable !== null) {
    indirectTable = int(ring.indirectTable, `${f}.ring.indirectTable`);
    inMemory(memory, indirectTable, size * 16 * 16, `${f}.ring.indirectTable`);
  }
  const outstanding = arr(o.outstanding, `${f}.outstanding`, size).map((b, i) => {
    const bf = `${f}.outstanding[${i}]`;
    const ob = obj(b, bf);
    const segments = arr(ob.segments, `${bf}.segments`, size).map((sg, j) => {
      const sf = `${bf}.segments[${j}]`;
      const so = obj(sg, sf);
      const gpa = int(so.gpa, `${sf}.gpa`);
      const len = int(so.len, `${sf}.len`, 0xffffffff);
      inMemory(memory, gpa, len, `${sf}.gpa`);
      return { gpa, len, writable: bool(so.writable, `${sf}.writable`) };
    });
    const token = checkToken(ob.token, `${bf}.token`, memory);
    return ob.id === undefined
      ? { segments, token }
      : { id: int(ob.id, `${bf}.id`, 0xffff), segments, token };
  });
  const ready = arr(o.ready, `${f}.ready`, size).map((r, i) => {
    const rf = `${f}.ready[${i}]`;
    const ro = obj(r, rf);
    return {
      id: int(ro.id, `${rf}.id`, 0xffff),
      len: int(ro.len, `${rf}.len`, 0xffffffff),
      token: checkToken(ro.token, `${rf}.token`, memory),
    };
  });
  const bufferSize = int(o.bufferSize, `${f}.bufferSize`, 1 << 20);
  const freeSlots = arr(o.freeSlots, `${f}.freeSlots`, 0x10000).map((x, i) =>
    int(x, `${f}.freeSlots[${i}]`, 0xffff),
  );
  let pool: number | null = null;
  if (o.pool !== null) {
    pool = int(o.pool, `${f}.pool`);
    const top = freeSlots.reduce((m, x) => Math.max(m, x + 1), 1);
    inMemory(memory, pool, top * bufferSize, `${f}.pool`);
  } else if (freeSlots.length > 0) {
    throw fail(`${f}.freeSlots`, freeSlots.length, "free pool slots without a pool");
  }
  const snap: DriverSnapshot = {
    index: q.index,
    size,
    packed,
    eventIdx: bool(o.eventIdx, `${f}.eventIdx`),
    indirect: bool(o.indirect, `${f}.indirect`),
    ring: { desc, avail, used, indirectTable },
    lastUsedIdx: int(o.lastUsedIdx, `${f}.lastUsedIdx`, 0xffff),
    outstanding,
    ready,
    pool,
    freeSlots,
    bufferSize,
  };
  if (o.packedPosition !== undefined) {
    const pf = `${f}.packedPosition`;
    const p = obj(o.packedPosition, pf);
    const ids = (x: unknown, n: string): number[] =>
      arr(x, `${pf}.${n}`, size).map((y, i) => int(y, `${pf}.${n}[${i}]`, size - 1));
    snap.packedPosition = {
      availIdx: int(p.availIdx, `${pf}.availIdx`, size - 1),
      availWrap: bool(p.availWrap, `${pf}.availWrap`),
      usedIdx: int(p.usedIdx, `${pf}.usedIdx`, size - 1),
      usedWrap: bool(p.usedWrap, `${pf}.usedWrap`),
      inFlight: arr(p.inFlight, `${pf}.inFlight`, size).map((b, i) => {
        const bo = obj(b, `${pf}.inFlight[${i}]`);
        return {
          id: int(bo.id, `${pf}.inFlight[${i}].id`, size - 1),
          count: int(bo.count, `${pf}.inFlight[${i}].count`, size),
        };
      }),
      freeIds: ids(p.freeIds, "freeIds"),
      pendingHeads: arr(p.pendingHeads, `${pf}.pendingHeads`, size).map((h, i) => {
        const ho = obj(h, `${pf}.pendingHeads[${i}]`);
        return {
          pos: int(ho.pos, `${pf}.pendingHeads[${i}].pos`, size - 1),
          flags: int(ho.flags, `${pf}.pendingHeads[${i}].flags`, 0xffff),
        };
      }),
      pendingDescs: int(p.pendingDescs, `${pf}.pendingDescs`, size),
    };
  }
  return snap;
}

/**
 * Check the DRIVER_STATE section against the (validated) virtio state and guest memory.
 * @param v the parsed JSON
 * @param vs the virtio state
 * @param ram the destination's guest RAM
 * @returns the driver state, one snapshot per queue of the virtio state
 * @throws VhostUserError naming the field
 */
function checkDriverState(v: unknown, vs: VirtioDeviceState, ram: GuestRam): DriverState {
  const d = obj(v, "DRIVER_STATE");
  const list = arr(d.queues, "DRIVER_STATE.queues", 0x10000);
  const byIndex = new Map<number, unknown>();
  list.forEach((q, i) => {
    const index = int(obj(q, `DRIVER_STATE.queues[${i}]`).index, `DRIVER_STATE.queues[${i}].index`);
    if (byIndex.has(index)) throw fail(`DRIVER_STATE.queues[${i}].index`, index, "duplicate");
    byIndex.set(index, q);
  });
  const queues = vs.queues.map((q) => {
    if (!byIndex.has(q.index)) {
      throw fail(`queue[${q.index}]`, "missing", "no driver state for this queue");
    }
    return checkSnapshot(byIndex.get(q.index), q, ram.memory);
  });
  const allocator = arr(d.allocator, "DRIVER_STATE.allocator", MAX_INCOMING_REGIONS).map((x, i) =>
    int(x, `DRIVER_STATE.allocator[${i}]`),
  );
  if (allocator.length !== ram.regions.length) {
    throw fail(
      "DRIVER_STATE.allocator",
      allocator.length,
      `expected ${ram.regions.length} cursors (one per region)`,
    );
  }
  return { queues, allocator };
}

/**
 * Check a packed queue's device position (from the virtio state) against the driver's (from its
 * snapshot): the driver has collected every used buffer (its next used position and wrap
 * counter are the device's), and the device had nothing popped and not used at the stop (its
 * avail position is its used position), so the buffers between the device's avail position and
 * the driver's are exactly the ones the destination device must process. A used half of 0 (used
 * idx 0, wrap 0), as DPDK's GET_VRING_BASE sends it, means "used = avail" (as in the back-end).
 * @param q the queue's virtio state
 * @param snap the queue's driver snapshot
 * @throws VhostUserError naming the field when the positions disagree
 * (VIRTIO 1.2 §2.8.21, §2.8.22; vhost-user "vring base, packed")
 */
function checkPackedPosition(q: VirtioQueueState, snap: DriverSnapshot): void {
  const f = `queue[${q.index}]`;
  const pos = snap.packedPosition;
  if (pos === undefined) {
    throw fail(`${f}.packedPosition`, "missing", "packed driver state without its ring position");
  }
  const availWrap = q.availWrap ?? true;
  const usedHalfMissing = q.usedIdx === 0 && q.usedWrap === false;
  const usedIdx = usedHalfMissing ? q.lastAvailIdx : q.usedIdx;
  const usedWrap = usedHalfMissing ? availWrap : (q.usedWrap ?? true);
  if (pos.usedIdx !== usedIdx || pos.usedWrap !== usedWrap) {
    throw fail(
      `${f}.usedIdx`,
      `${usedIdx}/${Number(usedWrap)} (driver ${pos.usedIdx}/${Number(pos.usedWrap)})`,
      "driver has not caught up",
    );
  }
  if (q.lastAvailIdx !== usedIdx || availWrap !== usedWrap) {
    throw fail(
      `${f}.lastAvailIdx`,
      `${q.lastAvailIdx}/${Number(availWrap)} (used ${usedIdx}/${Number(usedWrap)})`,
      "buffers still in flight in the source back-end",
    );
  }
}

/** Everything the destination's stages share (one incoming migration's state). */
export interface DestinationContext {
  options: DestinationOptions;
  stream: Duplex;
  reader: SectionReader;
  ram: GuestRam | null;
  fe: VhostUserFrontend | null;
  setup: SetupSection | null;
  features: bigint;
  offered: bigint;
  queueNum: number | null;
  hello: HelloSection | null;
  statusNegotiated: boolean;
  pagesReceived: number;
  touched: TouchedPages;
  vs: VirtioDeviceState | null;
  backendState: Uint8Array | null;
  driverJson: unknown;
  guestState: Uint8Array | null;
  memoryVerified: boolean;
  queues: FrontendQueue[];
  rarpSent: boolean;
  /** the chosen host stream version */
  version: number;
  report(section: string): void;
}

const LOG_ALL_MASK = featureMask(VirtioFeature.LOG_ALL);

function unexpected(stage: string, s: Section): MigrationStreamFormatError {
  return new MigrationStreamFormatError(
    "section",
    SectionType[s.type] ?? s.type,
    `section not expected in stage "${stage}"`,
  );
}

/**
 * Read the one section a stage consists of (or null when the stage is empty and may be), and
 * check that no other follows in the stage (unless it is the last stage).
 */
async function onlySection(
  c: DestinationContext,
  stage: string,
  type: SectionType,
  optional: boolean,
  last = false,
): Promise<Section | null> {
  const s = await c.reader.nextInStage();
  if (s === null) {
    if (optional) return null;
    throw fail(SectionType[type] as string, "missing", `no ${SectionType[type]} in the stream`);
  }
  if (s.type !== type) throw unexpected(stage, s);
  // The last stage's section ends the source's stream until DONE: no look-ahead there.
  if (!last && (await c.reader.nextInStage()) !== null) {
    throw fail(SectionType[type] as string, "twice", `stage "${stage}" has more than one section`);
  }
  c.report(SectionType[type] as string);
  return s;
}

/**
 * setup: guest RAM with the source's layout, this host's back-end connected and negotiated,
 * HELLO to the source, then the features, status and memory table set before the pages arrive
 * (a back-end slow to map guest RAM, as DPDK without hugepages, does it outside the downtime).
 */
async function destinationSetup(c: DestinationContext): Promise<void> {
  const first = await c.reader.nextInStage();
  if (first === null || first.type !== SectionType.SETUP) {
    throw fail(
      "section",
      first === null ? "none" : (SectionType[first.type] ?? first.type),
      "expected SETUP first",
    );
  }
  const setup = checkSetup(parseJson(first));
  c.setup = setup;
  c.report("SETUP");
  c.ram = GuestRam.create({
    regions: setup.regions,
    layout: setup.layout,
    name: "vhostkit-incoming",
  });
  c.fe = await c.options.connectBackend();
  const fe = c.fe;
  c.features = u64(setup.features, "SETUP.features");
  const negotiateOpts: NegotiateOptions = {
    features: c.features,
    protocolFeatures:
      c.options.protocolFeatures ??
      FRONTEND_PROTOCOL_FEATURES | featureSet(ProtocolFeature.DEVICE_STATE),
  };
  const neg = await fe.negotiate(negotiateOpts);
  c.offered = neg.offeredFeatures;
  c.queueNum = neg.queueNum;
  c.hello = {
    offeredFeatures: neg.offeredFeatures.toString(),
    protocolFeatures: fe.protocolFeatures.toString(),
    deviceState: hasFeature(fe.protocolFeatures, ProtocolFeature.DEVICE_STATE),
  };
  await writeAll(
    c.stream,
    encodeJsonSection(SectionType.HELLO, { ...c.hello, version: c.version }),
  );
  const missing = c.features & ~(neg.offeredFeatures & ~LOG_ALL_MASK);
  if (missing !== 0n) {
    throw fail("features", `0x${missing.toString(16)}`, "source features not offered here");
  }
  await fe.setFeatures(c.features);
  c.statusNegotiated = hasFeature(fe.protocolFeatures, ProtocolFeature.STATUS);
  if (c.statusNegotiated) {
    await fe.setStatus(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK);
  }
  // The contents do not matter to SET_MEM_TABLE: the pages come later.
  await fe.setMemTable(c.ram, { sync: true });
  // Pre-stage each ring's size now, outside the downtime: SET_VRING_NUM starts nothing. The
  // rest of each ring waits for the stop (ORDERING: SET_VRING_BASE before SET_VRING_KICK, a
  // ring starts at its first kick; SET_VRING_ADDR follows the base as in QEMU's
  // vhost_virtqueue_start; CALL at every ring start for libvhost-user). A size that differs
  // in the virtio state is sent again at the switch-over.
  for (const r of setup.rings ?? []) await fe.prestageQueue(r.index, r.size);
  await fe.barrier();
}

/** precopy and final pages: apply the pages of each pass, acknowledge each pass's end. */
async function destinationPages(c: DestinationContext): Promise<void> {
  const ram = c.ram as GuestRam;
  for (;;) {
    // Borrowed: each section is used before the next read (no copy, no allocation per pass).
    const s = await c.reader.nextInStage({ borrow: true });
    if (s === null) return;
    if (s.type === SectionType.PAGES) {
      c.pagesReceived += applyPages(ram.memory, s.payload, c.touched).pages;
      continue;
    }
    if (s.type !== SectionType.ITERATION_END) throw unexpected(c.reader.stage, s);
    c.report("ITERATION_END");
    // Tell the source this pass is in: it paces its passes (and its stop) on these.
    if (s.payload.length !== 8) {
      throw fail("ITERATION_END", s.payload.length, "ITERATION_END must be 8 bytes");
    }
    const ack = Buffer.alloc(4);
    ack.set(s.payload.subarray(0, 4));
    await writeAll(c.stream, encodeSection(SectionType.ITERATION_ACK, ack));
  }
}

/** stop: nothing comes (the source stops its rings). */
async function destinationStop(c: DestinationContext): Promise<void> {
  const s = await c.reader.nextInStage();
  if (s !== null) throw unexpected("stop", s);
}

/** virtio state: decoded in seed 001's load order (checked at switch-over). */
async function destinationVirtioState(c: DestinationContext): Promise<void> {
  const s = (await onlySection(c, "virtio state", SectionType.VIRTIO_STATE, false)) as Section;
  c.vs = decodeVirtioState(s.payload);
}

/** backend state: the back-end's blob, when the source sent one. */
async function destinationBackendState(c: DestinationContext): Promise<void> {
  const s = await onlySection(c, "backend state", SectionType.BACKEND_STATE, true);
  if (s === null) return;
  if (!(c.hello as HelloSection).deviceState) {
    throw fail(
      "BACKEND_STATE",
      s.payload.length,
      "back-end state sent but DEVICE_STATE not negotiated",
    );
  }
  c.backendState = s.payload;
}

/** driver state: the driver side of each ring (checked at switch-over). */
async function destinationDriverState(c: DestinationContext): Promise<void> {
  const s = (await onlySection(c, "driver state", SectionType.DRIVER_STATE, false)) as Section;
  c.driverJson = parseJson(s);
}

/** guest state: the guest's own state, when the source sent one. */
async function destinationGuestState(c: DestinationContext): Promise<void> {
  const s = await onlySection(c, "guest state", SectionType.GUEST_STATE, true);
  c.guestState = s?.payload ?? null;
}

/**
 * switchover: END (the RAM hash checked when sent), every state checked before anything is
 * applied, then the rings set up from the source's bases, the back-end state loaded, the
 * enabled rings enabled and kicked, RARP, and DONE with this side's step timings.
 */
async function destinationSwitchover(c: DestinationContext): Promise<void> {
  const ram = c.ram as GuestRam;
  const fe = c.fe as VhostUserFrontend;
  const s = (await onlySection(c, "switchover", SectionType.END, false, true)) as Section;
  if (s.payload.length !== 33) throw fail("END", s.payload.length, "END must be 33 bytes");
  const steps: { step: string; ms: number }[] = [];
  let t = performance.now();
  const step = (name: string): void => {
    const now = performance.now();
    steps.push({ step: name, ms: now - t });
    t = now;
  };
  if (s.payload[0] === 1) {
    const got = hashGuestRam(ram);
    if (!timingSafeEqual(got, Buffer.from(s.payload.subarray(1)))) {
      throw fail("memoryHash", got.toString("hex"), "guest RAM differs from the source's");
    }
    c.memoryVerified = true;
    step("memory hash");
  }
  const vs = c.vs as VirtioDeviceState;
  // --- check before applying (seed 001's sanitize steps)
  validateVirtioState(vs, {
    offeredFeatures: c.offered & ~LOG_ALL_MASK,
    memory: ram.memory,
    crossEndian: hasFeature(fe.protocolFeatures, ProtocolFeature.CROSS_ENDIAN),
    // MQ's queue count: virtio-net has queue pairs and a control queue; others the count.
    ...(c.queueNum !== null
      ? { maxQueues: vs.deviceId === 1 ? c.queueNum * 2 + 1 : c.queueNum }
      : {}),
  });
  if (vs.features !== c.features) {
    throw fail("features", `0x${vs.features.toString(16)}`, "virtio state and SETUP disagree");
  }
  const driver = checkDriverState(c.driverJson, vs, ram);
  const snaps = new Map(driver.queues.map((q) => [q.index, q]));
  for (const q of vs.queues) {
    const snap = snaps.get(q.index) as DriverSnapshot;
    if (!snap.packed && snap.lastUsedIdx !== q.lastAvailIdx) {
      throw fail(`queue[${q.index}].lastAvailIdx`, q.lastAvailIdx, "driver has not caught up");
    }
    if (snap.packed) checkPackedPosition(q, snap);
  }
  ram.restoreAllocator(driver.allocator);
  step("checks");

  // --- apply: rings (not started), back-end state, then start
  // Each ring's SET_VRING_NUM went during pre-copy (destinationSetup). The rest is sent now,
  // pipelined: every ring's BASE, ADDR, KICK, CALL, ERR back to back in QEMU's order (the
  // ORDERING is the wire's: each setupQueue writes its requests before it first waits), the
  // acks awaited once for all rings.
  const rings: Promise<FrontendQueue>[] = [];
  for (const q of vs.queues) {
    const snap = snaps.get(q.index) as DriverSnapshot;
    // Both formats continue at the source's position: SET_VRING_BASE with the values the
    // source's GET_VRING_BASE returned (packed: avail idx + wrap, used idx + wrap); the driver
    // continues over the migrated ring memory (FrontendQueue.restoreSnapshot), so buffers in
    // flight at the stop are found there by the device.
    const base: QueueBase = snap.packed
      ? {
          availIdx: q.lastAvailIdx,
          availWrap: q.availWrap ?? true,
          usedIdx: q.usedIdx,
          usedWrap: q.usedWrap ?? true,
        }
      : { availIdx: q.lastAvailIdx };
    rings.push(
      fe.setupQueue(q.index, { size: q.size, restore: snap, base, enable: false, pipeline: true }),
    );
  }
  // The state LOAD goes right behind the rings' requests (the back-end takes them in order);
  // its SET_DEVICE_STATE_FD reply comes after their acks, so both are awaited together.
  const load = c.backendState !== null ? loadBackendState(fe, c.backendState) : Promise.resolve();
  const [set, loaded] = await Promise.all([Promise.allSettled(rings), settle(load)]);
  for (const r of set) if (r.status === "fulfilled") c.queues.push(r.value);
  for (const r of set) if (r.status === "rejected") throw r.reason;
  if (loaded !== null) throw loaded;
  await fe.barrier();
  step(c.backendState !== null ? "rings + backend state" : "rings");
  // --- start: every enable, the status and the RARP in one batch (in that order on the wire),
  // the acks awaited together; then each enabled ring is kicked once.
  const pf = hasFeature(fe.features, VirtioFeature.PROTOCOL_FEATURES);
  const enabled = new Map(vs.queues.map((q) => [q.index, q.enabled]));
  // A ring the driver had disabled stays disabled (without F_PROTOCOL_FEATURES every ring
  // starts enabled: there is no SET_VRING_ENABLE).
  const started = c.queues.filter((q) => !pf || enabled.get(q.index) !== false);
  const acks: Promise<void>[] = [];
  if (pf) for (const q of started) acks.push(fe.setVringEnable(q.index, true));
  if (c.statusNegotiated) acks.push(fe.setStatus(vs.status));
  const rarp =
    c.options.rarp !== "never" &&
    !hasFeature(vs.features, VirtioFeature.GUEST_ANNOUNCE) &&
    hasFeature(fe.protocolFeatures, ProtocolFeature.RARP) &&
    vs.deviceId === 1 &&
    vs.device.length >= 6;
  if (rarp) acks.push(fe.sendRarp(vs.device.subarray(0, 6)));
  for (const r of await Promise.allSettled(acks)) if (r.status === "rejected") throw r.reason;
  await fe.barrier();
  // ORDERING: the kicks follow the acks: the back-end has enabled the rings when it sees them.
  for (const q of started) q.forceKick();
  c.rarpSent = rarp;
  step("enable"); // with SET_STATUS and SEND_RARP when sent
  await writeAll(c.stream, encodeJsonSection(SectionType.DONE, { ok: true, steps }));
  c.stream.end();
  c.report("DONE");
}

/** A promise's failure, or null once it fulfilled (never rejects). */
function settle(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => null,
    (err: unknown) => err ?? new Error("rejected"),
  );
}

/** The destination's stage functions, by the names of HOST_STREAM_STAGES. */
const DESTINATION_STAGES: Readonly<Record<string, Omit<HostStage<DestinationContext>, "name">>> = {
  setup: { run: destinationSetup },
  precopy: { run: destinationPages },
  stop: { run: destinationStop },
  "final pages": { run: destinationPages },
  "virtio state": { run: destinationVirtioState },
  "backend state": { run: destinationBackendState },
  "driver state": { run: destinationDriverState },
  "guest state": { run: destinationGuestState },
  switchover: { run: destinationSwitchover },
};

/** The destination's host stream versions (see HOST_STREAM_STAGES). */
export const DESTINATION_VERSIONS: readonly HostVersion<DestinationContext>[] =
  hostVersions(DESTINATION_STAGES);

/**
 * Receive a migration on an accepted connection and start the device here: the stages of the
 * newest host stream version this side knows within the source's [compat_version, version]
 * (HOST_STREAM_STAGES), stages of a newer source that this version lacks skipped.
 * @param options the connection, how to reach the back-end, RARP policy
 * @returns the running device
 * @throws Error (after sending FAIL and releasing the back-end connection and the RAM) when the
 *   stream is malformed or truncated, of no version known here, the state does not validate,
 *   or the back-end refuses
 * (vhost-user: "Migration", "Migrating back-end state"; passt `migrate.h`)
 */
export async function receiveMigration(options: DestinationOptions): Promise<IncomingResult> {
  const stream = options.stream;
  const reader = new SectionReader(stream);
  const c: DestinationContext = {
    options,
    stream,
    reader,
    ram: null,
    fe: null,
    setup: null,
    features: 0n,
    offered: 0n,
    queueNum: null,
    hello: null,
    statusNegotiated: false,
    pagesReceived: 0,
    touched: new TouchedPages(),
    vs: null,
    backendState: null,
    driverJson: null,
    guestState: null,
    memoryVerified: false,
    queues: [],
    rarpSent: false,
    version: 0,
    report: (section) =>
      options.onProgress?.({
        section,
        pagesReceived: c.pagesReceived,
        bytesReceived: reader.bytesRead,
      }),
  };
  const table = new StageTable(hostStream, options.streamVersions ?? DESTINATION_VERSIONS);
  try {
    const r = await runDestinationStages(table, c, reader, {
      onVersion: (v) => {
        c.version = v;
      },
    });
    return {
      frontend: c.fe as VhostUserFrontend,
      ram: c.ram as GuestRam,
      queues: c.queues,
      virtioState: c.vs as VirtioDeviceState,
      guestState: c.guestState,
      backendStateBytes: c.backendState?.length ?? 0,
      pagesReceived: c.pagesReceived,
      rarpSent: c.rarpSent,
      memoryVerified: c.memoryVerified,
      streamVersion: r.version,
      skippedStages: r.skipped,
    };
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    try {
      if (!stream.destroyed) {
        await Promise.race([
          writeAll(stream, encodeJsonSection(SectionType.FAIL, { error: msg })),
          new Promise((resolve) => setTimeout(resolve, 200)),
        ]);
      }
    } catch {
      // the source is gone
    }
    stream.destroy();
    c.fe?.close();
    c.ram?.close();
    throw err;
  }
}
