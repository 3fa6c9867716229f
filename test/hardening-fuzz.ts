/**
 * The hostile-guest fuzz target and the soak loop, shared by test/hardening-fuzz.test.ts
 * (bounded CI runs) and bench/fuzz-guest.ts / bench/soak.ts (long runs printing counts).
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { native } from "../src/native.js";
import { FrontendRequest, VirtioFeature, featureSet } from "../src/protocol/constants.js";
import { encodeRequest } from "../src/protocol/framing.js";
import { gpa as toGpa } from "../src/memory/address.js";
import { GUEST_FEATURES, SwitchProcess, connectGuest, forward } from "./hardening-helpers.js";
import type { TestGuest } from "./hardening-helpers.js";

const MAC_A = "52:54:00:00:03:0a";
const MAC_B = "52:54:00:00:03:0b";
const MAC_C = "52:54:00:00:03:0c";

/** A small deterministic PRNG (xorshift32), so a failing seed can be replayed. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

/** Counts of a fuzz or soak run. */
export interface RunFigures {
  /** inputs written (fuzz) or cycles done (soak) */
  inputs: number;
  /** the hostile guest's connection was closed by the switch and made again (it is also
   * made again every 200 inputs, for a fresh ring, which is not counted here) */
  reconnects: number;
  /** frames of known traffic between the other two ports, sent and received */
  knownSent: number;
  knownReceived: number;
  /** the switch's fd count and RSS (KiB) at start and end */
  fds: [number, number];
  rssKiB: [number, number];
  /** the switch process was alive at the end */
  alive: boolean;
}

/**
 * Hostile guest: a front-end on port A writes random or mutated descriptors, indices, flags,
 * lengths and indirect tables into its TX ring (split and packed, alternately per connection)
 * and kicks, while B and C forward known traffic that must all arrive.
 * @param inputs ring mutations to write
 * @param seed PRNG seed
 * @returns the figures
 */
export async function runGuestFuzz(inputs: number, seed = 1): Promise<RunFigures> {
  const dir = mkdtempSync(join(tmpdir(), "vk-fuzz-"));
  const [a, b, c] = ["a", "b", "c"].map((n) => join(dir, `${n}.sock`)) as [string, string, string];
  const sw = new SwitchProcess(["--socket", a, "--socket", b, "--socket", c]);
  const next = rng(seed);
  const figures: RunFigures = {
    inputs: 0,
    reconnects: 0,
    knownSent: 0,
    knownReceived: 0,
    fds: [0, 0],
    rssKiB: [0, 0],
    alive: false,
  };
  let A: TestGuest | null = null;
  const others: TestGuest[] = [];
  try {
    await sw.ready();
    const B = await connectGuest(b, "fuzz-b");
    others.push(B);
    const C = await connectGuest(c, "fuzz-c");
    others.push(C);
    figures.fds[0] = sw.fdCount();
    figures.rssKiB[0] = sw.rssKiB();
    let packed = false;
    const connectA = async (): Promise<TestGuest> => {
      packed = !packed;
      const features = packed
        ? GUEST_FEATURES | featureSet(VirtioFeature.RING_PACKED)
        : GUEST_FEATURES | featureSet(VirtioFeature.RING_INDIRECT_DESC);
      return connectGuest(a, "fuzz-a", undefined, features);
    };
    A = await connectA();
    const u8 = new Uint8Array(16);
    const dv = new DataView(u8.buffer);
    let seq = 0;
    while (figures.inputs < inputs) {
      if (A.fe.closed) {
        A.close();
        figures.reconnects++;
        A = await connectA();
      } else if (figures.inputs % 200 === 0 && figures.inputs > 0) {
        // a fresh ring (the last one is likely broken by now), split and packed in turn
        A.close();
        A = await connectA();
      }
      const ram = A.ram;
      const ring = A.tx.ring;
      const size = A.tx.size;
      // one input: a few random writes into the descriptor area and the driver area, then a kick
      const writes = 1 + (next() % 4);
      for (let w = 0; w < writes; w++) {
        const r = next() % 8;
        const slot = next() % size;
        // addresses mostly inside guest memory, sometimes anywhere
        const addr = r === 0 ? next() * 4096 + next() : next() % (1 << 20);
        dv.setUint32(0, addr >>> 0, true);
        dv.setUint32(4, r === 0 ? next() : 0, true);
        dv.setUint32(8, r === 1 ? next() : next() % 70_000, true); // len
        dv.setUint16(12, next() & 0xffff, true); // split: flags; packed: id
        dv.setUint16(14, next() & 0xffff, true); // split: next; packed: flags
        if (r < 6) {
          ram.write(toGpa(ring.desc + slot * 16), u8);
        } else {
          // split: flags/idx and ring entries; packed: the driver event suppression area
          const off = packed ? 0 : next() % (4 + 2 * size);
          const v = new Uint8Array(2);
          new DataView(v.buffer).setUint16(0, next() & 0xffff, true);
          ram.write(toGpa(ring.avail + (packed ? next() % 4 : off) - (off & 1)), v);
        }
      }
      if (!A.fe.closed) A.tx.forceKick();
      figures.inputs++;
      if (figures.inputs % 500 === 0) {
        // known traffic between B and C must all arrive, in order
        const got = await forward(B, C, [MAC_B, MAC_C], 16, seq);
        figures.knownSent += 16;
        figures.knownReceived += got.length;
        assert.deepEqual(
          got,
          Array.from({ length: 16 }, (_, i) => seq + i),
        );
        seq = (seq + 16) & 0xffff;
        assert.equal(sw.alive, true, `the switch died: ${sw.stderr.slice(-2000)}`);
      } else if (figures.inputs % 50 === 0) {
        await new Promise((r) => setImmediate(r));
      }
    }
    const got = await forward(B, C, [MAC_B, MAC_C], 16, seq);
    figures.knownSent += 16;
    figures.knownReceived += got.length;
    void MAC_A;
    A.close();
    A = null;
    await new Promise((r) => setTimeout(r, 200));
    figures.fds[1] = sw.fdCount();
    figures.rssKiB[1] = sw.rssKiB();
    figures.alive = sw.alive;
  } finally {
    A?.close();
    for (const g of others) g.close();
    await sw.stop();
    rmSync(dir, { recursive: true, force: true });
  }
  return figures;
}

/**
 * Soak: `cycles` times connect a guest to port A, set it up, forward 8 frames to B, disconnect.
 * @param cycles cycles to run
 * @returns the figures (fds and RSS of the switch at start and end)
 */
export async function runSoak(cycles: number): Promise<RunFigures> {
  const dir = mkdtempSync(join(tmpdir(), "vk-soak-"));
  const [a, b] = ["a", "b"].map((n) => join(dir, `${n}.sock`)) as [string, string];
  const sw = new SwitchProcess(["--socket", a, "--socket", b]);
  const figures: RunFigures = {
    inputs: 0,
    reconnects: 0,
    knownSent: 0,
    knownReceived: 0,
    fds: [0, 0],
    rssKiB: [0, 0],
    alive: false,
  };
  const guests: TestGuest[] = [];
  try {
    await sw.ready();
    const B = await connectGuest(b, "soak-b");
    guests.push(B);
    for (let i = 0; i < cycles; i++) {
      const A = await connectGuest(a, "soak-a");
      try {
        const got = await forward(A, B, [MAC_A, MAC_B], 8, (i * 8) & 0xffff);
        figures.knownSent += 8;
        figures.knownReceived += got.length;
      } finally {
        A.close();
      }
      figures.inputs++;
      // the first cycles warm up (code paths, caches); measure from there
      if (i === Math.min(9, cycles - 1)) {
        await new Promise((r) => setTimeout(r, 100));
        figures.fds[0] = sw.fdCount();
        figures.rssKiB[0] = sw.rssKiB();
      }
    }
    await new Promise((r) => setTimeout(r, 200));
    figures.fds[1] = sw.fdCount();
    figures.rssKiB[1] = sw.rssKiB();
    figures.alive = sw.alive;
  } finally {
    for (const g of guests) g.close();
    await sw.stop();
    rmSync(dir, { recursive: true, force: true });
  }
  return figures;
}

/** Valid requests the hostile front-end starts from (then mutates). */
function seedMessages(): Uint8Array[] {
  const enc = (r: FrontendRequest, p: unknown): Uint8Array =>
    encodeRequest("frontend", r as never, p as never, {});
  return [
    enc(FrontendRequest.GET_FEATURES, null),
    enc(FrontendRequest.SET_OWNER, null),
    enc(FrontendRequest.GET_PROTOCOL_FEATURES, null),
    enc(FrontendRequest.SET_FEATURES, 0x1_0000_0000n),
    enc(FrontendRequest.SET_VRING_NUM, { index: 0, num: 256 }),
    enc(FrontendRequest.SET_VRING_BASE, { index: 1, num: 0 }),
    enc(FrontendRequest.SET_VRING_ENABLE, { index: 0, num: 1 }),
    enc(FrontendRequest.SET_VRING_CALL, { index: 0, noFd: false }),
    enc(FrontendRequest.SET_VRING_KICK, { index: 1, noFd: false }),
    enc(FrontendRequest.GET_VRING_BASE, { index: 0, num: 0 }),
    enc(FrontendRequest.GET_QUEUE_NUM, null),
    enc(FrontendRequest.SET_STATUS, 0xfn),
  ];
}

/**
 * Hostile front-end: random sequences of valid and mutated messages, with fds (eventfds and
 * memfds), on connections to a switch port that are made again every 50 messages (or when the
 * switch closes one). Replies are read and dropped.
 * @param inputs messages to send
 * @param seed PRNG seed
 * @returns the figures (fds and RSS of the switch at start and end)
 */
export async function runFrontendFuzz(inputs: number, seed = 1): Promise<RunFigures> {
  const dir = mkdtempSync(join(tmpdir(), "vk-fefuzz-"));
  const path = join(dir, "a.sock");
  const sw = new SwitchProcess(["--socket", path]);
  const next = rng(seed);
  const seeds = seedMessages();
  const figures: RunFigures = {
    inputs: 0,
    reconnects: 0,
    knownSent: 0,
    knownReceived: 0,
    fds: [0, 0],
    rssKiB: [0, 0],
    alive: false,
  };
  const sink = new Uint8Array(65536);
  let fd = -1;
  try {
    await sw.ready();
    figures.fds[0] = sw.fdCount();
    figures.rssKiB[0] = sw.rssKiB();
    let onConn = 0;
    while (figures.inputs < inputs) {
      if (fd < 0 || onConn >= 50) {
        if (fd >= 0) native.close(fd);
        fd = -1;
        // the switch serves one front-end at a time: let it see the hang-up
        for (let t = 0; t < 100 && fd < 0; t++) {
          try {
            fd = native.unixConnect(path);
          } catch {
            await new Promise((r) => setTimeout(r, 2));
          }
        }
        figures.reconnects++;
        onConn = 0;
      }
      const base = seeds[next() % seeds.length]!;
      const msg = base.slice();
      const mode = next() % 4;
      if (mode === 1) {
        for (let k = 0; k < 1 + (next() % 3); k++) msg[next() % msg.length] = next() & 0xff;
      } else if (mode === 2 && msg.length > 12) {
        for (let k = 12; k < msg.length; k++) msg[k] = next() & 0xff; // random payload
      } else if (mode === 3) {
        msg[0] = next() % 60; // another request id with this payload
      }
      const fds: number[] = [];
      const nfds = next() % 3;
      for (let k = 0; k < nfds; k++) {
        fds.push(next() % 2 === 0 ? native.eventfd(0) : native.memfdCreate("fuzz"));
      }
      try {
        native.sendmsg(fd, msg, 0, msg.length, fds);
      } catch {
        native.close(fd);
        fd = -1;
      } finally {
        for (const f of fds) native.close(f);
      }
      figures.inputs++;
      onConn++;
      if (fd >= 0) {
        for (;;) {
          let r;
          try {
            r = native.recvmsg(fd, sink, 0, sink.length);
          } catch {
            r = { bytes: 0, fds: [] as number[], fdsTruncated: false };
          }
          if (r === null) break;
          for (const f of r.fds) native.close(f);
          if (r.bytes === 0) {
            native.close(fd);
            fd = -1;
            break;
          }
        }
      }
      if (figures.inputs % 100 === 0) await new Promise((r) => setImmediate(r));
      if (figures.inputs % 5000 === 0) {
        assert.equal(sw.alive, true, `the switch died: ${sw.stderr.slice(-2000)}`);
      }
    }
    if (fd >= 0) native.close(fd);
    fd = -1;
    const end = Date.now() + 3000;
    while (sw.fdCount() > figures.fds[0] && Date.now() < end) {
      await new Promise((r) => setTimeout(r, 20));
    }
    figures.fds[1] = sw.fdCount();
    figures.rssKiB[1] = sw.rssKiB();
    figures.alive = sw.alive;
  } finally {
    if (fd >= 0) native.close(fd);
    await sw.stop();
    rmSync(dir, { recursive: true, force: true });
  }
  return figures;
}
