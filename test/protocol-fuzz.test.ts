/**
 * Property tests of the decoder: valid messages of every request round-trip; random streams and
 * single-field mutations of valid messages only ever produce VhostUserError, never allocate
 * above the cap, and never lose or duplicate an fd.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  type AnyRequestSpec,
  BACKEND_REQUEST_SPECS,
  FRONTEND_REQUEST_SPECS,
  HEADER_SIZE,
  MAX_PAYLOAD_SIZE,
  MessageDecoder,
  VhostUserError,
  encodeAck,
  encodeHeader,
  encodeReply,
  encodeRequest,
  type Expect,
  type TableName,
} from "../src/protocol/index.js";

const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
// Plain objects (fast-check builds null-prototype records by default).
const rec = <T>(model: { [K in keyof T]: fc.Arbitrary<T[K]> }): fc.Arbitrary<T> =>
  fc.record(model as never, { noNullPrototype: true }) as fc.Arbitrary<T>;
const bytes = (n: number) => fc.uint8Array({ minLength: n, maxLength: n });
const region = rec({
  guestPhysAddr: u64,
  memorySize: u64,
  userspaceAddr: u64,
  mmapOffset: u64,
});

/** A payload arbitrary for each codec, by codec name. */
const PAYLOADS: Record<string, fc.Arbitrary<unknown>> = {
  u64,
  empty: fc.constant(null),
  "vring state": rec({ index: u32, num: u32 }),
  "vring address": rec({
    index: u32,
    flags: fc.constantFrom(0, 1),
    descUserAddr: u64,
    usedUserAddr: u64,
    availUserAddr: u64,
    logGuestAddr: u64,
  }),
  "memory table": rec({ regions: fc.array(region, { minLength: 1, maxLength: 8 }) }),
  "single memory region": region,
  "log description": rec({ mmapSize: u64, mmapOffset: u64 }),
  "inflight description": rec({
    mmapSize: u64,
    mmapOffset: u64,
    numQueues: fc.integer({ min: 0, max: 0xffff }),
    queueSize: fc.integer({ min: 0, max: 0xffff }),
  }),
  "IOTLB message": rec({
    iova: u64,
    size: u64,
    uaddr: u64,
    perm: fc.integer({ min: 0, max: 3 }),
    type: fc.integer({ min: 1, max: 4 }),
  }),
  "config space": fc.uint8Array({ maxLength: 256 }).chain((payload) =>
    rec({
      offset: u32,
      size: fc.constant(payload.length),
      flags: u32,
      payload: fc.constant(payload),
    }),
  ),
  "vring fd": rec({ index: fc.integer({ min: 0, max: 255 }), noFd: fc.boolean() }),
  "vring area": rec({
    index: fc.integer({ min: 0, max: 255 }),
    noFd: fc.boolean(),
    size: u64,
    offset: u64,
  }),
  "shared object": rec({ uuid: bytes(16) }),
  "device state transfer parameters": rec({ direction: u32, phase: u32 }),
  "device state reply": fc.oneof(
    rec({ result: fc.integer({ min: 0, max: 255 }), noFd: fc.constant(true) }),
    rec({ result: fc.constant(0), noFd: fc.constant(false) }),
  ),
  "RARP MAC": rec({ mac: bytes(6) }),
  "crypto session": fc.uint8Array({ minLength: 1, maxLength: 64 }),
  "postcopy advise reply": fc.uint8Array({ maxLength: 8 }),
  "log base reply": fc.oneof(
    fc.constant({ value: null, log: null }),
    u64.map((value) => ({ value, log: null })),
    rec({ mmapSize: u64, mmapOffset: u64 }).map((log) => ({ value: null, log })),
  ),
  "shared object reply": fc.oneof(
    fc.constant({ value: null, uuid: null }),
    u64.map((value) => ({ value, uuid: null })),
    bytes(16).map((uuid) => ({ value: null, uuid })),
  ),
};

/** The fds a valid message carries, as the table and its semantic checks want them. */
function fdsFor(range: { min: number; max: number }, payload: unknown): number[] {
  const p = payload as { regions?: unknown[]; noFd?: boolean } | null;
  let n = range.min;
  if (p && Array.isArray(p.regions) && range.max > 0) n = p.regions.length;
  else if (p && typeof p.noFd === "boolean") n = p.noFd ? 0 : 1;
  return Array.from({ length: n }, (_, i) => 1000 + i);
}

interface Valid {
  table: TableName;
  expect: Expect;
  spec: AnyRequestSpec;
  kind: "request" | "reply" | "ack";
  payload: unknown;
  wire: Uint8Array;
  fds: number[];
}

function validRequest(table: TableName, specs: readonly AnyRequestSpec[]): fc.Arbitrary<Valid> {
  return fc.constantFrom(...specs).chain((spec) => {
    // SET_VRING_ENABLE and SET_VRING_ENDIAN carry a boolean num (their semantic check)
    const arb =
      spec.check && spec.codec.name === "vring state"
        ? rec({ index: u32, num: fc.integer({ min: 0, max: 1 }) })
        : PAYLOADS[spec.codec.name];
    assert.ok(arb, `no arbitrary for ${spec.codec.name}`);
    return fc.tuple(arb, fc.boolean()).map(([payload, needReply]) => ({
      table,
      expect: "request" as const,
      spec,
      kind: "request" as const,
      payload,
      wire: encodeRequest(table, spec.id as never, payload as never, { needReply }),
      fds: fdsFor(spec.fds, payload),
    }));
  });
}

function validReply(table: TableName, specs: readonly AnyRequestSpec[]): fc.Arbitrary<Valid> {
  const withBody = specs.filter((s) => s.replyCodec !== null);
  const body = fc.constantFrom(...withBody).chain((spec) => {
    const arb = PAYLOADS[(spec.replyCodec as { name: string }).name];
    assert.ok(arb, `no arbitrary for ${spec.replyCodec?.name}`);
    return arb.map((payload) => ({
      table,
      expect: "reply" as const,
      spec,
      kind: "reply" as const,
      payload,
      wire: encodeReply(table, spec.id as never, payload as never),
      fds: fdsFor(spec.replyFds, payload),
    }));
  });
  // an ack answers only a request that has no unconditional reply body
  const ackable = specs.filter((s) => s.reply !== "always" || s.replyFeature !== null);
  const ack = fc.tuple(fc.constantFrom(...ackable), u64).map(([spec, value]) => ({
    table,
    expect: "reply" as const,
    spec,
    kind: "ack" as const,
    payload: value,
    wire: encodeAck(table, spec.id, value),
    fds: [],
  }));
  return fc.oneof(body, ack);
}

const anyValid = fc.oneof(
  validRequest("frontend", FRONTEND_REQUEST_SPECS),
  validRequest("backend", BACKEND_REQUEST_SPECS),
  validReply("frontend", FRONTEND_REQUEST_SPECS),
  validReply("backend", BACKEND_REQUEST_SPECS),
);

function decoderFor(v: { table: TableName; expect: Expect; kind?: string }): MessageDecoder {
  return new MessageDecoder({
    table: v.table,
    expect: v.expect,
    ...(v.expect === "reply" ? { replyKind: () => (v.kind === "ack" ? "ack" : "body") } : {}),
  });
}

/**
 * Feed chunks, pull every message, and check the invariants: only VhostUserError, allocation
 * and buffering within the cap, every fd either returned once or drained once.
 */
function run(
  d: MessageDecoder,
  chunks: Array<{ bytes: Uint8Array; fds: number[] }>,
): { error: VhostUserError | null; messages: number } {
  const given: number[] = [];
  const returned: number[] = [];
  let error: VhostUserError | null = null;
  let messages = 0;
  try {
    for (const c of chunks) {
      given.push(...c.fds);
      d.feed(c.bytes, c.fds);
      assert.ok(d.pendingBytes <= HEADER_SIZE + MAX_PAYLOAD_SIZE);
      for (let m = d.next(); m !== undefined; m = d.next()) {
        messages++;
        returned.push(...m.fds);
      }
    }
    error = d.finish();
  } catch (err) {
    if (!(err instanceof VhostUserError)) throw err;
    assert.equal(typeof err.code, "string");
    assert.match(err.message, /^[A-Za-z_-]+: /);
    error = err;
  }
  assert.ok(d.largestAllocation <= MAX_PAYLOAD_SIZE, `allocated ${d.largestAllocation}`);
  returned.push(...d.drainFds());
  assert.deepEqual(
    [...returned].sort((a, b) => a - b),
    [...given].sort((a, b) => a - b),
    "fds lost or duplicated",
  );
  return { error, messages };
}

/** Cut bytes at random offsets; fds ride on the first non-empty chunk. */
function cut(wire: Uint8Array, fds: number[], offsets: number[]) {
  const edges = [
    0,
    ...offsets.map((o) => o % (wire.length + 1)).sort((a, b) => a - b),
    wire.length,
  ];
  const out: Array<{ bytes: Uint8Array; fds: number[] }> = [];
  let fdsSent = false;
  for (let i = 0; i + 1 < edges.length; i++) {
    const bytes = wire.subarray(edges[i] as number, edges[i + 1] as number);
    // fds arrive with the first byte (the kernel never delivers them with zero bytes)
    const withFds = !fdsSent && bytes.length > 0;
    if (withFds) fdsSent = true;
    out.push({ bytes, fds: withFds ? fds : [] });
  }
  return out;
}

const RUNS = { numRuns: 1500 };

describe("decoder properties", () => {
  it("valid messages of every request decode, whatever the chunking, and round-trip", () => {
    fc.assert(
      fc.property(anyValid, fc.array(fc.nat(), { maxLength: 4 }), (v, offsets) => {
        const d = decoderFor(v);
        const out: unknown[] = [];
        for (const c of cut(v.wire, v.fds, offsets)) out.push(...d.push(c.bytes, c.fds));
        assert.equal(out.length, 1);
        const m = out[0] as { kind: string; payload: unknown; fds: number[]; request: number };
        assert.equal(m.kind, v.kind);
        assert.equal(m.request, v.spec.id);
        assert.deepEqual(m.payload, v.payload);
        assert.deepEqual(m.fds, v.fds);
        assert.equal(d.finish(), null);
      }),
      RUNS,
    );
  });

  it("random byte streams only produce VhostUserError", () => {
    const stream = fc.array(
      rec({
        bytes: fc.uint8Array({ maxLength: 300 }),
        fds: fc.array(fc.integer({ min: 0, max: 1 << 20 }), { maxLength: 3 }),
      }),
      { maxLength: 8 },
    );
    const mode = rec({
      table: fc.constantFrom<TableName>("frontend", "backend"),
      expect: fc.constantFrom<Expect>("request", "reply"),
    });
    fc.assert(
      fc.property(mode, stream, (m, chunks) => {
        run(new MessageDecoder(m), chunks);
      }),
      RUNS,
    );
  });

  it("header-shaped random streams only produce VhostUserError", () => {
    const header = rec({
      request: fc.oneof(fc.integer({ min: 0, max: 45 }), u32),
      flags: fc.oneof(fc.constantFrom(1, 5, 9, 13), u32),
      size: fc.oneof(fc.integer({ min: 0, max: 300 }), u32),
    });
    const message = fc.tuple(header, fc.uint8Array({ maxLength: 300 })).map(([h, body]) => {
      const out = new Uint8Array(HEADER_SIZE + body.length);
      out.set(encodeHeader(h));
      out.set(body, HEADER_SIZE);
      return out;
    });
    const mode = rec({
      table: fc.constantFrom<TableName>("frontend", "backend"),
      expect: fc.constantFrom<Expect>("request", "reply"),
    });
    fc.assert(
      fc.property(
        mode,
        fc.array(fc.tuple(message, fc.array(fc.nat(100), { maxLength: 2 })), { maxLength: 5 }),
        (m, msgs) => {
          run(
            new MessageDecoder(m),
            msgs.map(([bytes, fds]) => ({ bytes, fds })),
          );
        },
      ),
      RUNS,
    );
  });

  it("single-field mutations of valid messages only produce VhostUserError", () => {
    const mutation = fc.oneof(
      rec({
        type: fc.constant("header" as const),
        field: fc.integer({ min: 0, max: 2 }),
        value: u32,
      }),
      rec({
        type: fc.constant("byte" as const),
        at: fc.nat(),
        value: fc.integer({ min: 0, max: 255 }),
      }),
      rec({ type: fc.constant("truncate" as const), at: fc.nat() }),
      rec({ type: fc.constant("fds" as const), count: fc.integer({ min: 0, max: 9 }) }),
    );
    fc.assert(
      fc.property(anyValid, mutation, fc.array(fc.nat(), { maxLength: 3 }), (v, mu, offsets) => {
        let wire = new Uint8Array(v.wire);
        let fds = v.fds;
        switch (mu.type) {
          case "header":
            new DataView(wire.buffer).setUint32(mu.field * 4, mu.value, true);
            break;
          case "byte":
            wire[mu.at % wire.length] = mu.value;
            break;
          case "truncate":
            wire = wire.subarray(0, mu.at % (wire.length + 1));
            break;
          case "fds":
            fds = Array.from({ length: mu.count }, (_, i) => 2000 + i);
            break;
        }
        run(decoderFor(v), cut(wire, fds, offsets));
      }),
      RUNS,
    );
  });

  it("a valid message followed by garbage still yields the valid message first", () => {
    fc.assert(
      fc.property(anyValid, fc.uint8Array({ minLength: 1, maxLength: 64 }), (v, garbage) => {
        const d = decoderFor(v);
        d.feed(v.wire, v.fds);
        d.feed(garbage);
        const first = d.next();
        assert.equal(first?.request, v.spec.id);
        const { error } = run(d, []);
        // garbage either forms nothing complete, or is rejected with a coded error
        assert.ok(error === null || error instanceof VhostUserError);
      }),
      RUNS,
    );
  });
});
