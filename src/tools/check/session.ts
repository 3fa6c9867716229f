/**
 * What the checks share: starting a device on a fresh connection with a profile's rings,
 * restarting a stopped ring as QEMU does (SET_VRING_CALL again), names of feature bits, and a
 * wrapper that runs a body on its own connection.
 */
import { native } from "../../native.js";
import {
  FrontendRequest,
  ProtocolFeature,
  VirtioFeature,
  featureMask,
  featureSet,
  hasFeature,
} from "../../protocol/constants.js";
import { encodePackedVringBase, encodeSplitVringBase } from "../../protocol/codecs.js";
import { DeviceStatus, VhostUserFrontend } from "../../frontend/frontend.js";
import { GuestRam } from "../../frontend/guest-ram.js";
import type { QueueBase } from "../../virtq/types.js";
import type { CheckContext, CheckOutcome, Started } from "./types.js";
import type { CheckTarget } from "./target.js";

/**
 * Names of the bits set in a mask, from a numeric enum (bit number -> name).
 * @param mask the bits
 * @param names the enum
 * @returns the names (`bitN` for unnamed bits)
 */
export function bitNames(mask: bigint, names: Record<number, string>): string[] {
  const out: string[] = [];
  for (let b = 0; b < 64; b++) if ((mask >> BigInt(b)) & 1n) out.push(names[b] ?? `bit${b}`);
  return out;
}

/**
 * A u64 in hex.
 * @param v the value
 * @returns `0x...`
 */
export function hex(v: bigint | number): string {
  return `0x${v.toString(16)}`;
}

/** Options of {@link startDevice}. */
export interface StartOptions {
  /** SET_VRING_ENABLE 1 after each ring is set up (default true) */
  enable?: boolean;
  /** extra virtio features to ask for (e.g. RING_PACKED) */
  features?: bigint;
  /** run the profile's preparation (default: when enabled) */
  prepare?: boolean;
  /** memory table method (default SET_MEM_TABLE) */
  memory?: "set-mem-table" | "add-mem-reg";
  /** guest RAM (default: 8 MiB in two regions) */
  ram?: GuestRam;
}

/**
 * Negotiate and start the profile's rings on a fresh connection (QEMU's order).
 * @param ctx the context
 * @param target which back-end (default the first)
 * @param opts enable, extra features, preparation
 * @returns the front-end and its RAM (close both with {@link finish})
 * @throws Error / VhostUserError when a step fails (the connection is closed first)
 */
export async function startDevice(
  ctx: CheckContext,
  target: CheckTarget = ctx.target,
  opts: StartOptions = {},
): Promise<Started> {
  const fe = await target.open();
  const ram = opts.ram ?? GuestRam.create({ size: 8 << 20, name: "vhostkit-check" });
  try {
    const wanted =
      featureSet(VirtioFeature.VERSION_1) | ctx.workload.features | (opts.features ?? 0n);
    await fe.negotiate({ features: wanted });
    await fe.setFeatures();
    // With STATUS, the device status as a driver sets it (DPDK's vhost waits for DRIVER_OK).
    const status = hasFeature(fe.protocolFeatures, ProtocolFeature.STATUS);
    const s0 = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK;
    if (status) await fe.setStatus(s0);
    await fe.setMemTable(ram, { method: opts.memory ?? "set-mem-table" });
    const enable = opts.enable ?? true;
    for (let i = 0; i < ctx.workload.queueSizes.length; i++) {
      await fe.setupQueue(i, { size: ctx.workload.queueSizes[i] ?? 64, enable });
    }
    if (status) await fe.setStatus(s0 | DeviceStatus.DRIVER_OK);
    await fe.barrier();
    // Watch every call eventfd from now on, so that `stats.calls` counts notifications.
    for (const q of fe.queues.values()) {
      q.setNotification(true);
      q.onCall(() => undefined);
    }
    if (opts.prepare ?? enable) await ctx.workload.prepare(fe);
    return { fe, ram };
  } catch (err) {
    fe.close();
    if (opts.ram === undefined) ram.close();
    throw err;
  }
}

/**
 * Close a started device's connection and RAM and let the back-end notice.
 * @param target the back-end
 * @param s the started device, or null
 */
export async function finish(target: CheckTarget, s: Started | null): Promise<void> {
  if (s === null) return;
  await target.done(s.fe);
  if (!s.ram.closed) s.ram.close();
}

/**
 * Restart a ring stopped with GET_VRING_BASE the way QEMU does: SET_VRING_NUM, SET_VRING_BASE,
 * SET_VRING_ADDR, SET_VRING_KICK (new eventfd), SET_VRING_CALL (the same call eventfd, sent
 * again: libvhost-user back-ends close theirs at GET_VRING_BASE), SET_VRING_ENABLE 1, a kick.
 * @param fe the front-end
 * @param index the ring
 * @param base where to continue (the base GET_VRING_BASE returned)
 * (vhost-user: "Starting and stopping rings")
 */
export async function restartRing(
  fe: VhostUserFrontend,
  index: number,
  base: QueueBase,
): Promise<void> {
  const q = fe.queue(index);
  if (!q) throw new Error(`restartRing: queue ${index} not set up`);
  const call = async <R extends FrontendRequest>(
    r: R,
    p: Parameters<VhostUserFrontend["send"]>[1],
    fds: number[] = [],
  ): Promise<void> => {
    if (fe.channel.replyAck) await fe.request(r, p as never, fds);
    else fe.send(r, p as never, fds);
  };
  const FR = FrontendRequest;
  await call(FR.SET_VRING_NUM, { index, num: q.size });
  const num = q.packed
    ? encodePackedVringBase({
        availIdx: base.availIdx,
        availWrap: base.availWrap ?? true,
        usedIdx: base.usedIdx ?? base.availIdx,
        usedWrap: base.usedWrap ?? base.availWrap ?? true,
      })
    : encodeSplitVringBase(base);
  await call(FR.SET_VRING_BASE, { index, num });
  // SET_VRING_ADDR as the front-end built it: the same ring addresses.
  await fe.setVringLog(index, false);
  const kick = native.eventfd(0);
  q.replaceKickFd(kick);
  await call(FR.SET_VRING_KICK, { index, noFd: false }, [kick]);
  if (q.callFd >= 0) await call(FR.SET_VRING_CALL, { index, noFd: false }, [q.callFd]);
  if (hasFeature(fe.features, VirtioFeature.PROTOCOL_FEATURES)) {
    await fe.setVringEnable(index, true);
  }
  q.stoppedBase = null;
  q.stopped = false;
  await fe.barrier();
  q.forceKick();
}

/**
 * Run a body on a started device, closing everything after; an error becomes a failure that
 * names it.
 * @param ctx the context
 * @param opts start options
 * @param body the check
 * @returns the body's outcome, or a failure naming the error
 */
export async function withDevice(
  ctx: CheckContext,
  opts: StartOptions,
  body: (s: Started) => Promise<CheckOutcome>,
): Promise<CheckOutcome> {
  let s: Started | null = null;
  try {
    s = await startDevice(ctx, ctx.target, opts);
    return await body(s);
  } catch (err) {
    return { result: "fail", detail: errorText(err) };
  } finally {
    await finish(ctx.target, s);
  }
}

/**
 * Run a body on a fresh connection (not started), closing it after.
 * @param ctx the context
 * @param body the check
 * @returns the body's outcome, or a failure naming the error
 */
export async function withConnection(
  ctx: CheckContext,
  body: (fe: VhostUserFrontend) => Promise<CheckOutcome>,
): Promise<CheckOutcome> {
  let fe: VhostUserFrontend | null = null;
  try {
    fe = await ctx.target.open();
    return await body(fe);
  } catch (err) {
    return { result: "fail", detail: errorText(err) };
  } finally {
    await ctx.target.done(fe);
  }
}

/**
 * The message of an error, one line.
 * @param err anything thrown
 * @returns its text
 */
export function errorText(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).replace(/\s+/g, " ");
}

/**
 * True when the back-end offers a protocol feature.
 * @param ctx the context
 * @param bit the feature
 * @returns whether it is offered
 */
export function offersProtocol(ctx: CheckContext, bit: ProtocolFeature): boolean {
  return hasFeature(ctx.offeredProtocolFeatures, bit);
}

/**
 * True when the back-end offers a virtio feature.
 * @param ctx the context
 * @param bit the feature
 * @returns whether it is offered
 */
export function offers(ctx: CheckContext, bit: VirtioFeature): boolean {
  return hasFeature(ctx.offeredFeatures, bit);
}

/** The mask of VHOST_F_LOG_ALL. */
export const LOG_ALL_MASK = featureMask(VirtioFeature.LOG_ALL);

/**
 * A "not applicable" outcome.
 * @param why the reason
 * @returns the outcome
 */
export function na(why: string): CheckOutcome {
  return { result: "n/a", detail: why };
}
