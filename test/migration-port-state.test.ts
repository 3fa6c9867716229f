/**
 * The port-state stream of a switch port (src/net/port-state.ts): v2 round trip, a v2 target
 * loading a v1 stream, a v1 target skipping what v2 adds, and refusals that leave the
 * destination port as it was.
 */
import { test } from "node:test";
import assert from "node:assert/strict";

import { VirtioFeature, featureSet } from "../src/protocol/constants.js";
import { Switch } from "../src/net/switch.js";
import { VirtioNetDevice } from "../src/net/virtio-net.js";
import { newRxFilter } from "../src/net/ctrl.js";
import { macKey, parseMac } from "../src/net/frame.js";
import {
  PORT_STATE_VERSION,
  loadPortState,
  portStateFormat,
  savePortState,
} from "../src/net/port-state.js";
import type { MigratablePort } from "../src/net/port-state.js";
import { inspectStream, readHeader } from "../src/migration/stream.js";
import { isMigrationStreamError } from "../src/migration/state-codec.js";

const FEATURES = featureSet(
  VirtioFeature.VERSION_1,
  VirtioFeature.MRG_RXBUF,
  VirtioFeature.NET_F_CSUM,
  VirtioFeature.GUEST_CSUM,
  VirtioFeature.GUEST_TSO4,
  VirtioFeature.GUEST_TSO6,
  VirtioFeature.CTRL_VQ,
  VirtioFeature.CTRL_RX,
  VirtioFeature.CTRL_VLAN,
  VirtioFeature.NET_MQ,
  VirtioFeature.MAC,
);

/** A source port with every kind of state set, on its own switch. */
function busySource(): { dev: VirtioNetDevice; sw: Switch } {
  const sw = new Switch();
  const dev = new VirtioNetDevice({ name: "vm1", queuePairs: 2, mac: "52:54:00:00:00:01" });
  sw.addPort(dev);
  dev.setFeatures(FEATURES);
  assert.ok(dev.setGuestOffloads(featureSet(VirtioFeature.GUEST_CSUM, VirtioFeature.GUEST_TSO4)));
  assert.ok(dev.setActivePairs(2));
  dev.setMtu(9000);
  dev.setPrimaryMac(parseMac("52:54:00:00:00:aa"));
  const f = dev.state.filter;
  f.promisc = false;
  f.allmulti = true;
  f.unicast = [macKey(parseMac("52:54:00:00:00:bb"))];
  f.multicast = [macKey(parseMac("01:00:5e:00:00:01"))];
  f.vlans[3] = 0x10;
  Object.assign(dev.counters, { rxPackets: 10, rxBytes: 1000, txPackets: 20, txBytes: 2000 });
  dev.counters.drops["no-buffer"] = 3;
  dev.pairCounters[0]!.rxFrames = 7;
  dev.pairCounters[1]!.txFrames = 9;
  sw.learnMac("52:54:00:00:00:aa", "vm1");
  sw.learnMac("52:54:00:00:00:bb", "vm1");
  return { dev, sw };
}

function fresh(): { dev: VirtioNetDevice; sw: Switch } {
  const sw = new Switch();
  const dev = new VirtioNetDevice({ name: "vm1", queuePairs: 2, mac: "52:54:00:00:00:01" });
  sw.addPort(dev);
  return { dev, sw };
}

function view(dev: VirtioNetDevice, sw: Switch): unknown {
  return {
    state: {
      ...dev.state,
      filter: { ...dev.state.filter, vlans: Array.from(dev.state.filter.vlans) },
    },
    features: dev.negotiatedFeatures,
    offloads: { ...dev.offloads },
    counters: JSON.parse(JSON.stringify(dev.counters)) as unknown,
    pairs: JSON.parse(JSON.stringify(dev.pairCounters)) as unknown,
    macs: sw
      .macsOnPort(dev.name)
      .map((m) => m.mac)
      .sort(),
  };
}

test("VirtioNetDevice is a MigratablePort and finds its switch by itself", () => {
  const { dev, sw } = busySource();
  const port: MigratablePort = dev;
  assert.equal(port.host ?? null, sw);
  const bytes = savePortState(dev);
  const dst = fresh();
  loadPortState(dst.dev, bytes);
  assert.deepEqual(
    dst.sw
      .macsOnPort("vm1")
      .map((m) => m.mac)
      .sort(),
    ["52:54:00:00:00:aa", "52:54:00:00:00:bb"],
  );
  sw.close();
  dst.sw.close();
});

test("v2 round trip: features, offloads, queue settings, MAC, filter, counters, learned MACs", () => {
  const src = busySource();
  const bytes = savePortState(src.dev, { host: src.sw });
  assert.deepEqual(readHeader(bytes), { version: PORT_STATE_VERSION, compatVersion: 1 });
  const dst = fresh();
  const r = loadPortState(dst.dev, bytes, { host: dst.sw });
  assert.equal(r.version, 2);
  assert.deepEqual(r.skipped, []);
  assert.deepEqual(view(dst.dev, dst.sw), view(src.dev, src.sw));
  assert.equal(dst.dev.offloads.tso4, true);
  assert.equal(dst.dev.offloads.tso6, false, "GUEST_TSO6 negotiated but turned off by the guest");
  src.sw.close();
  dst.sw.close();
});

test("a v2 target loads a v1 stream (it keeps its own filter and pair counters)", () => {
  const src = busySource();
  const v1 = savePortState(src.dev, { host: src.sw, version: 1 });
  assert.deepEqual(readHeader(v1), { version: 1, compatVersion: 1 });
  assert.deepEqual(
    inspectStream(v1).sections.map((s) => s.name),
    ["features", "port", "counters", "macs"],
  );
  const dst = fresh();
  const r = loadPortState(dst.dev, v1, { host: dst.sw });
  assert.equal(r.version, 1);
  assert.deepEqual(dst.dev.counters, src.dev.counters);
  assert.equal(dst.dev.state.mtu, 9000);
  assert.equal(dst.dev.state.activePairs, 2);
  assert.equal(dst.dev.negotiatedFeatures, FEATURES);
  // CTRL_VLAN negotiated: the fresh filter of those features, not the source's.
  assert.deepEqual(dst.dev.state.filter, newRxFilter(true));
  assert.deepEqual(dst.dev.pairCounters, [
    { rxFrames: 0, txFrames: 0 },
    { rxFrames: 0, txFrames: 0 },
  ]);
  src.sw.close();
  dst.sw.close();
});

test("a v1-only target loads a v2 stream, skipping the stages v2 added", () => {
  const src = busySource();
  const v2 = savePortState(src.dev, { host: src.sw });
  const dst = fresh();
  const r = loadPortState(dst.dev, v2, { host: dst.sw, format: portStateFormat([1]) });
  assert.equal(r.version, 1);
  assert.deepEqual(r.skipped, ["rx-filter", "pair-counters"]);
  assert.deepEqual(dst.dev.counters, src.dev.counters);
  src.sw.close();
  dst.sw.close();
});

test("refused at the port stage: a 2-pair stream into a 3-pair port (both offer MQ)", () => {
  const src = busySource();
  const bytes = savePortState(src.dev, { host: src.sw });
  const sw3 = new Switch();
  const three = new VirtioNetDevice({ name: "vm1", queuePairs: 3, mac: "52:54:00:00:00:01" });
  sw3.addPort(three);
  const before = view(three, sw3);
  assert.throws(
    () => loadPortState(three, bytes, { host: sw3 }),
    (e: unknown) =>
      isMigrationStreamError(e, "BAD_VALUE") &&
      e.stage === "port" &&
      e.field === "queue_pairs" &&
      e.value === 2,
  );
  assert.deepEqual(view(three, sw3), before, "nothing changed");
  src.sw.close();
  sw3.close();
});

test("learned MACs keep their age across a save and load", () => {
  let now = 1_000_000;
  const clock = (): number => now;
  const sw = new Switch({ clock, sweepIntervalMs: 0 });
  const dev = new VirtioNetDevice({ name: "vm1", queuePairs: 1, mac: "52:54:00:00:00:01" });
  sw.addPort(dev);
  sw.learnMac("52:54:00:00:00:aa", "vm1");
  now += 200_000;
  sw.learnMac("52:54:00:00:00:bb", "vm1");
  now += 1_000;
  const bytes = savePortState(dev, { host: sw });
  const sw2 = new Switch({ clock, sweepIntervalMs: 0 });
  const dst = new VirtioNetDevice({ name: "vm1", queuePairs: 1, mac: "52:54:00:00:00:01" });
  sw2.addPort(dst);
  loadPortState(dst, bytes, { host: sw2 });
  const ages = (s: Switch): Record<string, number> =>
    Object.fromEntries(s.macsOnPort("vm1").map((m) => [m.mac, m.ageMs]));
  assert.deepEqual(ages(sw2), { "52:54:00:00:00:aa": 201_000, "52:54:00:00:00:bb": 1_000 });
  // the older MAC ages out first, at the ageing time counted from when it was really seen
  now += sw2.ageingMs - 201_000;
  assert.deepEqual(ages(sw2), { "52:54:00:00:00:bb": sw2.ageingMs - 200_000 });
  sw.close();
  sw2.close();
});

test("refused: other queue pairs, other negotiated features, foreign features; nothing changes", () => {
  const src = busySource();
  const bytes = savePortState(src.dev, { host: src.sw });
  // Fewer queue pairs.
  const sw1 = new Switch();
  const one = new VirtioNetDevice({ name: "vm1", queuePairs: 1, mac: "52:54:00:00:00:01" });
  sw1.addPort(one);
  const before1 = view(one, sw1);
  assert.throws(
    () => loadPortState(one, bytes, { host: sw1 }),
    // A one-pair port does not offer MQ: the features stage already refuses the stream.
    (e: unknown) => isMigrationStreamError(e, "BAD_VALUE") && /0x400000/.test(String(e)),
  );
  assert.deepEqual(view(one, sw1), before1);
  // Already negotiated, differently.
  const dst = fresh();
  dst.dev.setFeatures(featureSet(VirtioFeature.VERSION_1));
  const before2 = view(dst.dev, dst.sw);
  assert.throws(
    () => loadPortState(dst.dev, bytes, { host: dst.sw }),
    (e: unknown) => isMigrationStreamError(e, "BAD_VALUE") && /features/.test(String(e)),
  );
  assert.deepEqual(view(dst.dev, dst.sw), before2);
  // A destination that does not offer the guest offloads.
  const sw3 = new Switch();
  const plain = new VirtioNetDevice({ name: "vm1", queuePairs: 2, guestOffloads: false });
  sw3.addPort(plain);
  const before3 = view(plain, sw3);
  assert.throws(
    () => loadPortState(plain, bytes, { host: sw3 }),
    (e: unknown) => isMigrationStreamError(e, "BAD_VALUE") && /does not offer/.test(String(e)),
  );
  assert.deepEqual(view(plain, sw3), before3);
  for (const s of [src.sw, sw1, dst.sw, sw3]) s.close();
});

test("every truncation and every corrupted byte of a port stream leaves the port as it was", () => {
  const src = busySource();
  const bytes = savePortState(src.dev, { host: src.sw });
  const dst = fresh();
  const before = view(dst.dev, dst.sw);
  for (let n = 0; n < bytes.length; n++) {
    assert.throws(() => loadPortState(dst.dev, bytes.subarray(0, n), { host: dst.sw }));
    const bad = bytes.slice();
    bad[n] = (bad[n] as number) ^ 0xa5;
    assert.throws(() => loadPortState(dst.dev, bad, { host: dst.sw }), `byte ${n}`);
  }
  assert.deepEqual(view(dst.dev, dst.sw), before);
  src.sw.close();
  dst.sw.close();
});
