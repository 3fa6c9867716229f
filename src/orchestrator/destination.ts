/**
 * The destination side of a live migration: builds guest RAM with the source's layout,
 * connects to its own back-end and tells the source what it offers, loads the pages, checks
 * the virtio device state before applying it, then starts the device: SET_FEATURES, the memory
 * table, each ring with SET_VRING_BASE from the source's values, the back-end state LOAD +
 * CHECK_DEVICE_STATE, rings enabled and kicked, SEND_RARP when the driver lacks GUEST_ANNOUNCE
 * and the back-end offers RARP; finally DONE to the source. On any failure it sends FAIL and
 * releases everything.
 *
 * vhost-user: "Migration", "Migrating back-end state", VHOST_USER_SEND_RARP; seed 001 (load
 * order and sanity checks).
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
import type { DriverSnapshot, FrontendQueue } from "../frontend/queue.js";
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
  encodeJsonSection,
  encodeSection,
  parseJson,
  writeAll,
} from "./stream.js";
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
}

function fail(field: string, value: unknown, what: string): VhostUserError {
  return new VhostUserError("ERR_VHOST_BAD_FIELD", what, {
    request: "incoming migration",
    field,
    value,
  });
}

function checkSetup(v: unknown): SetupSection {
  const s = v as SetupSection;
  if (
    typeof s !== "object" ||
    s === null ||
    !Array.isArray(s.regions) ||
    s.regions.length === 0 ||
    !Array.isArray(s.queues) ||
    typeof s.features !== "string"
  ) {
    throw fail("setup", JSON.stringify(v).slice(0, 80), "malformed SETUP section");
  }
  return s;
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

/**
 * Receive a migration on an accepted connection and start the device here.
 * @param options the connection, how to reach the back-end, RARP policy
 * @returns the running device
 * @throws Error (after sending FAIL and releasing the back-end connection and the RAM) when the
 *   stream is malformed or truncated, the state does not validate, or the back-end refuses
 * (vhost-user: "Migration", "Migrating back-end state")
 */
export async function receiveMigration(options: DestinationOptions): Promise<IncomingResult> {
  const stream = options.stream;
  const reader = new SectionReader(stream);
  let ram: GuestRam | null = null;
  let fe: VhostUserFrontend | null = null;
  let pagesReceived = 0;
  const report = (section: string): void =>
    options.onProgress?.({ section, pagesReceived, bytesReceived: reader.bytesRead });
  try {
    await reader.header();
    const first = await reader.next();
    if (first.type !== SectionType.SETUP) {
      throw fail("section", SectionType[first.type] ?? first.type, "expected SETUP first");
    }
    const setup = checkSetup(parseJson(first));
    report("SETUP");
    ram = GuestRam.create({
      regions: setup.regions,
      layout: setup.layout,
      name: "vhostkit-incoming",
    });
    fe = await options.connectBackend();
    const features = BigInt(setup.features);
    const negotiateOpts: NegotiateOptions = {
      features,
      protocolFeatures:
        options.protocolFeatures ??
        FRONTEND_PROTOCOL_FEATURES | featureSet(ProtocolFeature.DEVICE_STATE),
    };
    const neg = await fe.negotiate(negotiateOpts);
    const hello: HelloSection = {
      offeredFeatures: neg.offeredFeatures.toString(),
      protocolFeatures: fe.protocolFeatures.toString(),
      deviceState: hasFeature(fe.protocolFeatures, ProtocolFeature.DEVICE_STATE),
    };
    await writeAll(stream, encodeJsonSection(SectionType.HELLO, hello));
    // Features and the memory layout are known now: set them up before the pages arrive, so
    // that a back-end slow to map guest RAM (DPDK without hugepages walks every page) does it
    // outside the downtime. The contents do not matter to SET_MEM_TABLE.
    const logAll = featureMask(VirtioFeature.LOG_ALL);
    const missing = features & ~(neg.offeredFeatures & ~logAll);
    if (missing !== 0n) {
      throw fail("features", `0x${missing.toString(16)}`, "source features not offered here");
    }
    await fe.setFeatures(features);
    const status = hasFeature(fe.protocolFeatures, ProtocolFeature.STATUS);
    if (status) {
      await fe.setStatus(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK);
    }
    await fe.setMemTable(ram, { sync: true });

    let vs: VirtioDeviceState | null = null;
    let backendState: Uint8Array | null = null;
    let driver: { queues: DriverSnapshot[]; allocator: number[] } | null = null;
    let guestState: Uint8Array | null = null;
    let memoryVerified = false;
    const touched = new TouchedPages();
    for (;;) {
      const s = await reader.next();
      if (s.type === SectionType.PAGES) {
        pagesReceived += applyPages(ram.memory, s.payload, touched).pages;
        continue;
      }
      report(SectionType[s.type] ?? String(s.type));
      if (s.type === SectionType.ITERATION_END) {
        // Tell the source this pass is in: it paces its passes (and its stop) on these.
        const ack = Buffer.alloc(4);
        ack.set(s.payload.subarray(0, 4));
        await writeAll(stream, encodeSection(SectionType.ITERATION_ACK, ack));
        continue;
      }
      if (s.type === SectionType.VIRTIO_STATE) vs = decodeVirtioState(s.payload);
      else if (s.type === SectionType.BACKEND_STATE) backendState = s.payload;
      else if (s.type === SectionType.DRIVER_STATE) {
        driver = parseJson(s) as { queues: DriverSnapshot[]; allocator: number[] };
      } else if (s.type === SectionType.GUEST_STATE) guestState = s.payload;
      else if (s.type === SectionType.END) {
        if (s.payload.length !== 33) throw fail("END", s.payload.length, "END must be 33 bytes");
        if (s.payload[0] === 1) {
          const got = hashGuestRam(ram);
          if (!timingSafeEqual(got, Buffer.from(s.payload.subarray(1)))) {
            throw fail("memoryHash", got.toString("hex"), "guest RAM differs from the source's");
          }
          memoryVerified = true;
        }
        break;
      } else {
        throw new MigrationStreamFormatError("section", s.type, "unknown section type");
      }
    }
    if (vs === null) throw fail("VIRTIO_STATE", "missing", "no virtio state in the stream");
    if (driver === null) throw fail("DRIVER_STATE", "missing", "no driver state in the stream");

    // --- check before applying
    validateVirtioState(vs, {
      offeredFeatures: neg.offeredFeatures & ~logAll,
      memory: ram.memory,
      ...(neg.queueNum !== null ? { maxQueues: neg.queueNum * 2 + 1 } : {}),
    });
    if (vs.features !== features) {
      throw fail("features", `0x${vs.features.toString(16)}`, "virtio state and SETUP disagree");
    }
    const snaps = new Map(driver.queues.map((q) => [q.index, q]));
    for (const q of vs.queues) {
      const snap = snaps.get(q.index);
      if (!snap) throw fail(`queue[${q.index}]`, "missing", "no driver state for this queue");
      if (snap.size !== q.size || snap.ring.desc !== q.desc || snap.ring.used !== q.used) {
        throw fail(`queue[${q.index}].size`, snap.size, "driver state and virtio state disagree");
      }
      if (!snap.packed && snap.lastUsedIdx !== q.lastAvailIdx) {
        throw fail(`queue[${q.index}].lastAvailIdx`, q.lastAvailIdx, "driver has not caught up");
      }
      if (snap.packed) checkPackedPosition(q, snap);
    }
    if (backendState !== null && !hello.deviceState) {
      throw fail(
        "BACKEND_STATE",
        backendState.length,
        "back-end state sent but DEVICE_STATE not negotiated",
      );
    }
    ram.restoreAllocator(driver.allocator);

    // --- apply: rings (not started), back-end state, then start
    const queues: FrontendQueue[] = [];
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
      queues.push(
        await fe.setupQueue(q.index, { size: q.size, restore: snap, base, enable: false }),
      );
    }
    await fe.barrier();
    if (backendState !== null) await loadBackendState(fe, backendState);
    const pf = hasFeature(fe.features, VirtioFeature.PROTOCOL_FEATURES);
    for (const q of queues) {
      if (pf) await fe.setVringEnable(q.index, true);
      q.forceKick();
    }
    if (status) await fe.setStatus(vs.status);
    let rarpSent = false;
    if (
      options.rarp !== "never" &&
      !hasFeature(vs.features, VirtioFeature.GUEST_ANNOUNCE) &&
      hasFeature(fe.protocolFeatures, ProtocolFeature.RARP) &&
      vs.deviceId === 1 &&
      vs.device.length >= 6
    ) {
      await fe.sendRarp(vs.device.subarray(0, 6));
      rarpSent = true;
    }
    await fe.barrier();
    await writeAll(stream, encodeJsonSection(SectionType.DONE, { ok: true }));
    stream.end();
    report("DONE");
    return {
      frontend: fe,
      ram,
      queues,
      virtioState: vs,
      guestState,
      backendStateBytes: backendState?.length ?? 0,
      pagesReceived,
      rarpSent,
      memoryVerified,
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
    fe?.close();
    ram?.close();
    throw err;
  }
}
