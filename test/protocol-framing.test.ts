/**
 * Streaming decoder: any chunking of the byte stream gives the same messages, fds attach to the
 * right message, headers are rejected before any body allocation, fds are never lost.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import {
  FrontendRequest as FR,
  HEADER_SIZE,
  MessageDecoder,
  VhostUserError,
  decodeHeader,
  encodeFrontendReply,
  encodeFrontendRequest,
  encodeHeader,
  type DecodedMessage,
} from "../src/protocol/index.js";

interface Sent {
  bytes: Uint8Array;
  fds: number[];
}

/** A stream of several messages, some with fds, as a sender would write them. */
function sampleStream(): Sent[] {
  const region = (i: number) => ({
    guestPhysAddr: BigInt(i) * 0x10000000n,
    memorySize: 0x10000000n,
    userspaceAddr: 0x7f0000000000n + BigInt(i) * 0x10000000n,
    mmapOffset: 0n,
  });
  return [
    { bytes: encodeFrontendRequest(FR.SET_OWNER, null), fds: [] },
    {
      bytes: encodeFrontendRequest(FR.SET_MEM_TABLE, { regions: [region(0), region(1)] }),
      fds: [10, 11],
    },
    { bytes: encodeFrontendRequest(FR.SET_VRING_NUM, { index: 0, num: 256 }), fds: [] },
    { bytes: encodeFrontendRequest(FR.SET_VRING_KICK, { index: 0, noFd: false }), fds: [12] },
    {
      bytes: encodeFrontendRequest(FR.SET_CONFIG, {
        offset: 4,
        size: 3,
        flags: 1,
        payload: Uint8Array.of(1, 2, 3),
      }),
      fds: [],
    },
    { bytes: encodeFrontendRequest(FR.SET_VRING_CALL, { index: 0, noFd: false }), fds: [13] },
    { bytes: encodeFrontendRequest(FR.SET_VRING_CALL, { index: 1, noFd: true }), fds: [] },
    { bytes: encodeFrontendRequest(FR.GET_FEATURES, null, { needReply: true }), fds: [] },
  ];
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

interface Chunk {
  bytes: Uint8Array;
  fds: number[];
}

/**
 * Cut the stream as a Unix stream socket could deliver it: at the given offsets, and also after
 * every message that carries fds (the kernel never merges past an skb that carries fds). Each
 * chunk carries the fds of the messages whose first byte it holds.
 */
function chunked(sent: Sent[], cuts: number[]): Chunk[] {
  const starts: number[] = [];
  let at = 0;
  const bounds = new Set<number>(cuts);
  for (const s of sent) {
    starts.push(at);
    at += s.bytes.length;
    if (s.fds.length > 0) bounds.add(at);
  }
  const total = at;
  const stream = concat(sent.map((s) => s.bytes));
  const sorted = [...bounds].filter((b) => b > 0 && b < total).sort((a, b) => a - b);
  const edges = [0, ...sorted, total];
  const chunks: Chunk[] = [];
  for (let i = 0; i + 1 < edges.length; i++) {
    const from = edges[i] as number;
    const to = edges[i + 1] as number;
    const fds: number[] = [];
    sent.forEach((s, j) => {
      const start = starts[j] as number;
      if (start >= from && start < to) fds.push(...s.fds);
    });
    chunks.push({ bytes: stream.subarray(from, to), fds });
  }
  return chunks;
}

function decodeAll(chunks: Chunk[]): DecodedMessage[] {
  const d = new MessageDecoder({ table: "frontend", expect: "request" });
  const out: DecodedMessage[] = [];
  for (const c of chunks) out.push(...d.push(c.bytes, c.fds));
  assert.equal(d.pendingBytes, 0);
  assert.equal(d.finish(), null);
  return out;
}

function summary(ms: DecodedMessage[]): unknown[] {
  return ms.map((m) => ({ request: m.request, flags: m.flags, payload: m.payload, fds: m.fds }));
}

function assertCode(fn: () => unknown, code: string): VhostUserError {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof VhostUserError, `expected ${code}, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  return caught;
}

describe("header", () => {
  it("encodes and decodes request, flags, size little-endian", () => {
    const h = encodeHeader({ request: 0x0a, flags: 0x9, size: 0x12345678 });
    assert.equal(Buffer.from(h).toString("hex"), "0a0000000900000078563412");
    assert.deepEqual(decodeHeader(h), { request: 10, flags: 9, size: 0x12345678 });
    assert.throws(() => encodeHeader({ request: -1, flags: 1, size: 0 }), RangeError);
    assertCode(() => decodeHeader(h.subarray(0, 11)), "ERR_VHOST_TRUNCATED");
  });
});

describe("chunking", () => {
  const sent = sampleStream();
  const whole = decodeAll(chunked(sent, []));
  const expected = summary(whole);
  const total = sent.reduce((n, s) => n + s.bytes.length, 0);

  it("decodes the whole stream in one chunk with fds on the right messages", () => {
    assert.equal(whole.length, sent.length);
    assert.deepEqual(
      whole.map((m) => m.fds),
      sent.map((s) => s.fds),
    );
    assert.deepEqual(
      whole.map((m) => m.name),
      [
        "SET_OWNER",
        "SET_MEM_TABLE",
        "SET_VRING_NUM",
        "SET_VRING_KICK",
        "SET_CONFIG",
        "SET_VRING_CALL",
        "SET_VRING_CALL",
        "GET_FEATURES",
      ],
    );
    assert.equal(whole[7]?.needReply, true);
  });

  it("gives the same messages with one cut at every byte offset", () => {
    for (let cut = 1; cut < total; cut++) {
      assert.deepEqual(summary(decodeAll(chunked(sent, [cut]))), expected, `cut at ${cut}`);
    }
  });

  it("gives the same messages with two cuts at many offsets", () => {
    for (let a = 1; a < total; a += 7) {
      for (let b = a + 1; b < total; b += 11) {
        assert.deepEqual(summary(decodeAll(chunked(sent, [a, b]))), expected, `cuts ${a},${b}`);
      }
    }
  });

  it("gives the same messages with one-byte chunks", () => {
    const cuts = Array.from({ length: total }, (_, i) => i);
    const chunks = chunked(sent, cuts);
    assert.equal(chunks.length, total);
    assert.deepEqual(summary(decodeAll(chunks)), expected);
  });

  it("attaches fds to the last message that started in the chunk", () => {
    const a = encodeFrontendRequest(FR.SET_VRING_NUM, { index: 0, num: 8 });
    const b = encodeFrontendRequest(FR.SET_VRING_NUM, { index: 1, num: 8 });
    const c = encodeFrontendRequest(FR.SET_VRING_KICK, { index: 1, noFd: false });
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    const out = d.push(concat([a, b, c]), [42]);
    assert.deepEqual(
      out.map((m) => m.fds),
      [[], [], [42]],
    );
  });

  it("attaches fds to the message in progress when no message starts in the chunk", () => {
    const c = encodeFrontendRequest(FR.SET_VRING_KICK, { index: 1, noFd: false });
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    assert.deepEqual(d.push(c.subarray(0, 3)), []);
    assert.deepEqual(d.push(c.subarray(3, 14), [42]), []);
    assert.equal(d.pendingBytes, 14);
    const out = d.push(c.subarray(14));
    assert.deepEqual(out[0]?.fds, [42]);
  });

  it("attaches fds to a message whose header is not complete yet", () => {
    const a = encodeFrontendRequest(FR.SET_VRING_NUM, { index: 0, num: 8 });
    const c = encodeFrontendRequest(FR.SET_VRING_KICK, { index: 1, noFd: false });
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    // the tail of a, then 5 bytes of c's header, with c's fd
    assert.deepEqual(d.push(a.subarray(0, 4)), []);
    const first = d.push(concat([a.subarray(4), c.subarray(0, 5)]), [42]);
    assert.deepEqual(
      first.map((m) => m.fds),
      [[]],
    );
    assert.deepEqual(d.push(c.subarray(5))[0]?.fds, [42]);
  });

  it("returns messages before an error, then the error (feed/next)", () => {
    const good = encodeFrontendRequest(FR.SET_OWNER, null);
    const bad = encodeHeader({ request: 99, flags: 1, size: 0 });
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    d.feed(concat([good, bad]), [5]);
    assert.equal(d.next()?.name, "SET_OWNER");
    assertCode(() => d.next(), "ERR_VHOST_UNKNOWN_REQUEST");
    // poisoned: the same error again, fds pooled
    assertCode(() => d.feed(good, [6]), "ERR_VHOST_UNKNOWN_REQUEST");
    assert.deepEqual(d.drainFds().sort(), [5, 6]);
  });
});

describe("header rejections before allocation", () => {
  const cases: Array<[string, { request: number; flags: number; size: number }, string]> = [
    ["bad version 0", { request: 8, flags: 0, size: 8 }, "ERR_VHOST_BAD_VERSION"],
    ["bad version 2", { request: 8, flags: 2, size: 8 }, "ERR_VHOST_BAD_VERSION"],
    ["reserved flag bit 4", { request: 8, flags: 0x11, size: 8 }, "ERR_VHOST_RESERVED_FLAGS"],
    [
      "reserved flag bit 31",
      { request: 8, flags: 0x80000001, size: 8 },
      "ERR_VHOST_RESERVED_FLAGS",
    ],
    ["unknown id 0", { request: 0, flags: 1, size: 0 }, "ERR_VHOST_UNKNOWN_REQUEST"],
    ["unknown id 44", { request: 44, flags: 1, size: 0 }, "ERR_VHOST_UNKNOWN_REQUEST"],
    [
      "unknown id 0xffffffff",
      { request: 0xffffffff, flags: 1, size: 8 },
      "ERR_VHOST_UNKNOWN_REQUEST",
    ],
    ["size 0xffffffff", { request: 8, flags: 1, size: 0xffffffff }, "ERR_VHOST_PAYLOAD_TOO_LARGE"],
    ["size cap + 1", { request: 26, flags: 1, size: 4097 }, "ERR_VHOST_PAYLOAD_TOO_LARGE"],
    [
      "size outside the request's bounds",
      { request: 8, flags: 1, size: 16 },
      "ERR_VHOST_BAD_PAYLOAD_SIZE",
    ],
    [
      "size below the request's bounds",
      { request: 9, flags: 1, size: 8 },
      "ERR_VHOST_BAD_PAYLOAD_SIZE",
    ],
    ["reply flag on a request", { request: 1, flags: 5, size: 0 }, "ERR_VHOST_UNEXPECTED_REPLY"],
  ];
  for (const [title, header, code] of cases) {
    it(`${title} -> ${code}, on the header alone`, () => {
      const d = new MessageDecoder({ table: "frontend", expect: "request" });
      const e = assertCode(() => d.push(encodeHeader(header), [3]), code);
      assert.equal(e.fatal, true);
      assert.equal(d.largestAllocation, 0);
      assert.deepEqual(d.drainFds(), [3]);
    });
  }

  it("names the request and the value", () => {
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    const e = assertCode(
      () => d.push(encodeHeader({ request: 8, flags: 1, size: 0xffffffff })),
      "ERR_VHOST_PAYLOAD_TOO_LARGE",
    );
    assert.equal(e.message, "SET_VRING_NUM: payload above the 4096-byte cap (size=4294967295)");
    assert.equal(e.request, "SET_VRING_NUM");
    assert.equal(e.value, 0xffffffff);
  });

  it("a reply decoder needs the REPLY flag, and checks reply sizes", () => {
    const d = new MessageDecoder({ table: "frontend", expect: "reply" });
    assertCode(() => d.push(encodeFrontendRequest(FR.GET_FEATURES, null)), "ERR_VHOST_BAD_FIELD");
    const r = new MessageDecoder({ table: "frontend", expect: "reply" });
    // GET_FEATURES reply must be 8 bytes
    assertCode(
      () => r.push(encodeHeader({ request: 1, flags: 5, size: 16 })),
      "ERR_VHOST_BAD_PAYLOAD_SIZE",
    );
    // SET_LOG_BASE replies of any size up to the cap are accepted
    const l = new MessageDecoder({ table: "frontend", expect: "reply" });
    const [m] = l.push(
      concat([encodeHeader({ request: 6, flags: 5, size: 3 }), Uint8Array.of(1, 2, 3)]),
    );
    assert.deepEqual(m?.payload, { value: null, log: null });
  });

  it("a reply decoder uses the replyKind resolver", () => {
    const seen: number[] = [];
    const d = new MessageDecoder({
      table: "frontend",
      expect: "reply",
      replyKind: (request) => {
        seen.push(request);
        return "ack";
      },
    });
    const [m] = d.push(encodeFrontendReply(FR.GET_STATUS, 5n));
    assert.deepEqual(seen, [FR.GET_STATUS]);
    assert.equal(m?.kind, "ack");
    assert.equal(m?.payload, 5n);
  });

  it("the maxPayload option lowers the cap", () => {
    const d = new MessageDecoder({ table: "frontend", expect: "request", maxPayload: 16 });
    assertCode(
      () => d.push(encodeHeader({ request: 24, flags: 1, size: 20 })),
      "ERR_VHOST_PAYLOAD_TOO_LARGE",
    );
  });
});

describe("end of stream and fds", () => {
  it("reports a truncated body naming the request and the missing byte count", () => {
    const m = encodeFrontendRequest(FR.SET_VRING_ADDR, {
      index: 0,
      flags: 0,
      descUserAddr: 0n,
      usedUserAddr: 0n,
      availUserAddr: 0n,
      logGuestAddr: 0n,
    });
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    d.push(m.subarray(0, 30), [7]);
    assert.equal(d.pendingBytes, 30);
    const e = d.finish();
    assert.ok(e);
    assert.equal(e.code, "ERR_VHOST_TRUNCATED");
    assert.equal(
      e.message,
      "SET_VRING_ADDR: peer hung up mid-message, 22 of 40 payload bytes missing (missing=22)",
    );
    assert.deepEqual(d.drainFds(), [7]);
  });

  it("reports a truncated header", () => {
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    d.push(Uint8Array.of(1, 0, 0));
    const e = d.finish();
    assert.equal(e?.code, "ERR_VHOST_TRUNCATED");
    assert.equal(e?.value, HEADER_SIZE - 3);
  });

  it("returns no error at a message boundary", () => {
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    d.push(encodeFrontendRequest(FR.SET_OWNER, null));
    assert.equal(d.finish(), null);
  });

  it("drainFds returns fds of messages framed but not yet returned", () => {
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    const kick = encodeFrontendRequest(FR.SET_VRING_KICK, { index: 0, noFd: false });
    d.feed(kick, [1]);
    d.feed(kick, [2]);
    d.feed(kick.subarray(0, 5), [3]);
    assert.equal(d.pendingMessages, 2);
    assert.deepEqual(d.drainFds().sort(), [1, 2, 3]);
    assertCode(() => d.feed(kick, [4]), "ERR_VHOST_CLOSED");
    assert.deepEqual(d.drainFds(), [4]);
  });

  it("push is all-or-nothing: fds of messages decoded before the error are pooled", () => {
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    const kick = encodeFrontendRequest(FR.SET_VRING_KICK, { index: 0, noFd: false });
    d.push(kick.subarray(0, 4), [1]);
    // kick completes (fd 1), then an unknown request with fd 2
    assertCode(
      () =>
        d.push(concat([kick.subarray(4), encodeHeader({ request: 77, flags: 1, size: 0 })]), [2]),
      "ERR_VHOST_UNKNOWN_REQUEST",
    );
    assert.deepEqual(d.drainFds().sort(), [1, 2]);
  });

  it("non-fatal errors leave the decoder usable", () => {
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    const bad = new Uint8Array(
      encodeFrontendRequest(FR.SET_VRING_ADDR, {
        index: 0,
        flags: 0,
        descUserAddr: 0n,
        usedUserAddr: 0n,
        availUserAddr: 0n,
        logGuestAddr: 0n,
      }),
    );
    bad[12 + 4] = 0x80; // unknown vring address flag
    const e = assertCode(() => d.push(bad), "ERR_VHOST_BAD_FIELD");
    assert.equal(e.fatal, false);
    assert.equal(d.push(encodeFrontendRequest(FR.SET_OWNER, null))[0]?.name, "SET_OWNER");
  });

  it("fds with no bytes and no message in progress are an error, not a leak", () => {
    const d = new MessageDecoder({ table: "frontend", expect: "request" });
    assertCode(() => d.push(new Uint8Array(0), [9]), "ERR_VHOST_UNEXPECTED_FDS");
    assert.deepEqual(d.drainFds(), [9]);
  });
});
