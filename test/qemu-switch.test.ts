/**
 * The switch with real QEMU 7.2 TCG guests: two guests on two ports ping each other;
 * a guest pings a namespace through the TAP uplink, and TCP streams cross it both ways with
 * TSO frames passed whole (virtio-net header on the TAP); two switch processes joined by VXLAN
 * carry guest-to-guest ping and TCP and reach a Linux vxlan device in a namespace; a guest with
 * mq=on and 2 queue pairs passes traffic on both pairs; QEMU listening with `switch --client`,
 * and QEMU clients with `reconnect=1`, both survive the switch being restarted; a killed guest
 * leaves the switch serving the others.
 *
 * Two guests are booted once in `before` and shared by the scenarios (boots are slow):
 * - G1: eth0 on switch S1 (192.0.2.1/25), eth1 on S2 (192.0.2.129/25)
 * - G2: eth0 on S1 (192.0.2.2/25), eth1 on S3 (192.0.2.130/25)
 * S1 (`--queues 2`) has a TAP uplink into namespace T (192.0.2.100/25 and one more address)
 * and a VXLAN uplink over loopback (VNI 7) to the switch of the multiqueue and client-mode
 * scenarios, which boot their own guest (G3: 2 vCPUs, mq=on; G4: QEMU server=on). S2 and S3
 * are joined by VXLAN (VNI 42) over a host veth, with a Linux vxlan device in namespace V
 * (192.0.2.200/25) on the same segment.
 * The switches are `vhostkit switch` child processes; counters (per port, per queue pair, and
 * the software offload counts) come from `vhostkit stats --control PATH --json`.
 * Needs root.
 */
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { promisify } from "node:util";
import { createHash, randomBytes, randomInt } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";

import { flowHash } from "../src/net/frame.js";
import { buildGuestImage, type GuestImage } from "./peers/guest-image.js";
import { createNetns, ifName, ip, type Netns } from "./peers/netns.js";
import { startGuest, type Guest } from "./peers/qemu.js";
import { icmpEcho } from "./fixtures/switch-frames.js";

const execFileP = promisify(execFile);
const HERE = dirname(fileURLToPath(import.meta.url));
/** `vhostkit switch` / `vhostkit stats` (the CLI). */
const CLI = join(HERE, "..", "..", "bin", "vhostkit.js");

const isRoot = process.getuid?.() === 0;
const skip = isRoot ? false : "needs root (namespaces, TAP)";

interface PairCounters {
  rxFrames: number;
  txFrames: number;
}
interface PortStats {
  name: string;
  up: boolean;
  counters: { rxPackets: number; txPackets: number; rxBytes: number; txBytes: number };
}
interface SwitchStats {
  ports: PortStats[];
  softwareGso: { frames: number; segments: number };
}
/** What `vhostkit stats --json` prints (the fields the tests read). */
interface CliSnapshot {
  switch: SwitchStats;
  vhostPorts: { name: string; connected: boolean; pairCounters: PairCounters[] }[];
}

/** A `vhostkit switch ARGS --control <first socket>.ctl` child process. */
class SwitchProc {
  readonly child: ChildProcess;
  readonly control: string;
  stderr = "";
  #exited: Promise<number | null>;
  #exitCode: number | null | undefined;
  readonly #onExit = (): void => {
    if (this.#exitCode === undefined) this.child.kill("SIGKILL");
  };

  constructor(readonly args: readonly string[]) {
    this.control = `${args[args.indexOf("--socket") + 1] as string}.ctl`;
    this.child = spawn(process.execPath, [CLI, "switch", ...args, "--control", this.control], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.child.stderr?.on("data", (d: Buffer) => {
      this.stderr = (this.stderr + d.toString()).slice(-20_000);
    });
    this.#exited = new Promise((resolve) =>
      this.child.on("exit", (code) => {
        this.#exitCode = code;
        resolve(code);
      }),
    );
    process.on("exit", this.#onExit);
  }

  async ready(timeoutMs = 15_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.stderr.includes("vhostkit switch: ready")) {
      if (this.#exitCode !== undefined || Date.now() > deadline)
        throw new Error(`switch ${this.args.join(" ")} not ready:\n${this.stderr}`);
      await sleep(50);
    }
  }

  /** @returns the snapshot `vhostkit stats --control CTL --json` prints */
  async snapshot(): Promise<CliSnapshot> {
    const { stdout } = await execFileP(
      process.execPath,
      [CLI, "stats", "--control", this.control, "--json"],
      { timeout: 10_000 },
    );
    return JSON.parse(stdout) as CliSnapshot;
  }

  /** @returns the switch's counters */
  async stats(): Promise<SwitchStats> {
    return (await this.snapshot()).switch;
  }

  /** SIGTERM, then SIGKILL after 5 s. @returns the exit code */
  async stop(): Promise<number | null> {
    process.off("exit", this.#onExit);
    if (this.#exitCode === undefined) {
      this.child.kill("SIGTERM");
      const t = setTimeout(() => this.child.kill("SIGKILL"), 5000);
      await this.#exited;
      clearTimeout(t);
    }
    return this.#exitCode ?? null;
  }
}

async function startSwitch(args: string[]): Promise<SwitchProc> {
  const s = new SwitchProc(args);
  await s.ready();
  return s;
}

async function ping(g: Guest, addr: string, count = 3, extra = ""): Promise<string> {
  const r = await g.run(`${extra}ping -c ${count} -W 3 ${addr}`, 30_000);
  assert.equal(r.status, 0, `ping ${addr} from the guest failed:\n${r.output}`);
  const m = /(\d+) packets received/.exec(r.output);
  assert.ok(m !== null && Number(m[1]) >= 1, r.output);
  return r.output;
}

/** The ICMP flow hash the switch computes for a reply from `from` to `to` (rx pair choice). */
function pairOf(from: string, to: string, pairs: number): number {
  const f = icmpEcho({
    srcMac: "52:54:00:00:00:01",
    dstMac: "52:54:00:00:00:02",
    srcIp: from,
    dstIp: to,
    id: 1,
    seq: 1,
  });
  return flowHash(f) % pairs;
}

/** Guest logs to remove when every scenario passed; kept (and named in errors) otherwise. */
const guestLogs: string[] = [];
const outcome = { failed: false };

/**
 * A scenario: a test that names the guests' logs and the switches' stderr when it fails.
 * @param name the test name
 * @param timeout its bound
 * @param fn the body
 */
function scenario(name: string, timeout: number, fn: () => Promise<void>): void {
  test(name, { skip, timeout }, async () => {
    try {
      await fn();
    } catch (e) {
      outcome.failed = true;
      if (e instanceof Error) {
        const sw = world === null ? [] : [world.s1, world.s2, world.s3];
        e.message +=
          `\n(guest logs: ${guestLogs.join(", ")})` +
          sw.map((x) => `\n--- switch ${x.args.join(" ")}\n${x.stderr.slice(-3000)}`).join("");
      }
      throw e;
    }
  });
}

// --- the shared set-up -------------------------------------------------------------------

interface World {
  dir: string;
  s1: SwitchProc;
  s1Args: string[];
  s2: SwitchProc;
  s3: SwitchProc;
  g1: Guest;
  g2: Guest;
  tapNs: Netns;
  tapDev: string;
  vxNs: Netns;
  hostDev: string;
  sockA: string;
  sockB: string;
  sockE: string;
  s4Args: string[];
  image: GuestImage;
  tapAddrs: string[];
}

let world: World | null = null;
const cleanups: (() => Promise<unknown>)[] = [];

before(
  async () => {
    if (!isRoot) return;
    const t0 = Date.now();
    const dir = await mkdtemp(join(tmpdir(), "vk-qsw-"));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const sockA = join(dir, "a.sock");
    const sockB = join(dir, "b.sock");
    const sockC = join(dir, "c.sock");
    const sockD = join(dir, "d.sock");
    const sockE = join(dir, "e.sock");
    const tapDev = ifName("vkqt");

    const w: Partial<World> = { dir, tapDev, sockA, sockB, sockE };
    cleanups.push(async () => {
      for (const s of [w.s1, w.s2, w.s3]) await s?.stop();
    });
    // underlay for VXLAN: host veth with two /32 addresses, namespace V at the other end
    const vxNs = await createNetns("vkqv");
    cleanups.push(() => vxNs.delete());
    const tapNs = await createNetns("vkqt");
    cleanups.push(() => tapNs.delete());
    const hostDev = ifName("vkqh");
    const nsDev = ifName("vkqn");
    const n = randomInt(10, 60) * 4;
    const hostIp = `198.51.100.${n}`;
    const hostIp2 = `198.51.100.${n + 1}`;
    const nsIp = `198.51.100.${n + 2}`;
    await ip(["link", "add", hostDev, "type", "veth", "peer", "name", nsDev, "netns", vxNs.name]);
    cleanups.push(() => ip(["link", "del", hostDev]).catch(() => undefined));
    await ip(["addr", "add", hostIp, "peer", nsIp, "dev", hostDev]);
    await ip(["addr", "add", `${hostIp2}/32`, "dev", hostDev]);
    await ip(["link", "set", hostDev, "up"]);
    await vxNs.ip(["addr", "add", nsIp, "peer", hostIp, "dev", nsDev]);
    await vxNs.ip(["link", "set", nsDev, "up"]);
    await vxNs.ip(["route", "add", `${hostIp2}/32`, "dev", nsDev]);
    const vx = await vxNs.addVxlan({
      vni: 42,
      local: nsIp,
      remote: hostIp,
      dev: nsDev,
      addr: "192.0.2.200/25",
    });
    await vxNs.exec(["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", vx, "dst", hostIp2]);

    // S1 reaches S4 (the multiqueue scenario's switch) over VXLAN on loopback
    const lo1 = `127.${randomInt(1, 250)}.${randomInt(1, 250)}.1`;
    const lo4 = `127.${randomInt(1, 250)}.${randomInt(1, 250)}.4`;
    const loPort = randomInt(20_000, 60_000);
    const s1Args = [
      "--socket",
      sockA,
      "--socket",
      sockB,
      "--queues",
      "2",
      "--uplink",
      `tap:${tapDev}`,
      "--uplink",
      `vxlan:vni=7,local=${lo1},remote=${lo4},port=${loPort},dstport=${loPort + 1}`,
    ];
    w.s4Args = [
      "--socket",
      sockE,
      "--queues",
      "2",
      "--uplink",
      `vxlan:vni=7,local=${lo4},remote=${lo1},port=${loPort + 1},dstport=${loPort}`,
    ];
    const s1 = await startSwitch(s1Args);
    const s2 = await startSwitch([
      "--socket",
      sockC,
      "--uplink",
      `vxlan:vni=42,local=${hostIp},remote=${hostIp2},remote=${nsIp}`,
    ]);
    const s3 = await startSwitch([
      "--socket",
      sockD,
      "--uplink",
      `vxlan:vni=42,local=${hostIp2},remote=${hostIp},remote=${nsIp}`,
    ]);
    Object.assign(w, { s1, s1Args, s2, s3, tapNs, vxNs, hostDev });

    // TAP into namespace T: .100 plus one address whose replies hash to the other RX pair
    await ip(["link", "set", tapDev, "netns", tapNs.name]);
    const first = "192.0.2.100";
    let second = "192.0.2.101";
    for (let i = 101; i < 127; i++) {
      if (pairOf(`192.0.2.${i}`, "192.0.2.3", 2) !== pairOf(first, "192.0.2.3", 2)) {
        second = `192.0.2.${i}`;
        break;
      }
    }
    await tapNs.addAddress(tapDev, `${first}/25`);
    await tapNs.ip(["addr", "add", `${second}/25`, "dev", tapDev]);
    w.tapAddrs = [first, second];

    const image = await buildGuestImage();
    w.image = image;
    const g1 = await startGuest({
      image,
      name: "sw-g1",
      nics: [
        { socketPath: sockA, reconnectS: 1, guestAddrs: ["192.0.2.1/25"] },
        { socketPath: sockC, guestAddrs: ["192.0.2.129/25"], mac: "52:54:00:12:35:01" },
      ],
    });
    cleanups.push(() => g1.kill());
    guestLogs.push(g1.logPath);
    const g2 = await startGuest({
      image,
      name: "sw-g2",
      nics: [
        {
          socketPath: sockB,
          reconnectS: 1,
          guestAddrs: ["192.0.2.2/25"],
          mac: "52:54:00:12:34:02",
        },
        { socketPath: sockD, guestAddrs: ["192.0.2.130/25"], mac: "52:54:00:12:35:02" },
      ],
    });
    cleanups.push(() => g2.kill());
    guestLogs.push(g2.logPath);
    w.g1 = g1;
    w.g2 = g2;
    assert.deepEqual(await g1.ready(120_000), ["eth0", "eth1", "lo"]);
    assert.deepEqual(await g2.ready(120_000), ["eth0", "eth1", "lo"]);
    world = w as World;
    process.stderr.write(`# qemu-switch: set-up (2 guests booted) took ${Date.now() - t0} ms\n`);
  },
  { timeout: 240_000 },
);

after(
  async () => {
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
    if (!outcome.failed) for (const l of guestLogs) await rm(l, { force: true });
  },
  { timeout: 60_000 },
);

function w(): World {
  if (world === null) throw new Error("set-up failed");
  return world;
}

scenario("qemu switch: two guests on two ports of one switch ping each other", 90_000, async () => {
  const { g1, g2, s1, sockA, sockB } = w();
  await ping(g1, "192.0.2.2");
  await ping(g2, "192.0.2.1");
  const st = await s1.stats();
  const a = st.ports.find((p) => p.name === sockA);
  const b = st.ports.find((p) => p.name === sockB);
  assert.ok(a?.up === true && b?.up === true, JSON.stringify(st.ports));
  assert.ok((a?.counters.rxPackets ?? 0) >= 6 && (b?.counters.rxPackets ?? 0) >= 6);
  // the ports offer no PROTOCOL_F_CONFIG, which QEMU's vhost-user-net cannot use (it warned)
  for (const g of [g1, g2]) assert.doesNotMatch(g.tail(), /PROTOCOL_F_CONFIG/, g.tail());
});

scenario(
  "qemu switch: a guest pings an address in a namespace through the TAP uplink",
  60_000,
  async () => {
    const { g1, s1, tapDev } = w();
    await ping(g1, "192.0.2.100");
    const st = await s1.stats();
    const tap = st.ports.find((p) => p.name === `tap:${tapDev}`);
    assert.ok((tap?.counters.txPackets ?? 0) >= 3 && (tap?.counters.rxPackets ?? 0) >= 3);
  },
);

scenario(
  "qemu switch: TCP streams cross the TAP uplink both ways intact, TSO frames unsegmented",
  60_000,
  async () => {
    const { g1, s1, tapNs, tapDev, dir } = w();
    const tapStats = async (): Promise<PortStats> => {
      const p = (await s1.stats()).ports.find((x) => x.name === `tap:${tapDev}`);
      assert.ok(p !== undefined, "the TAP port");
      return p;
    };
    // guest -> namespace: 1 MiB of random bytes, checked by md5 on arrival
    const made = await g1.run(
      "head -c 1048576 /dev/urandom > /tmp/blob && md5sum /tmp/blob",
      20_000,
    );
    assert.equal(made.status, 0, made.output);
    const want = made.output.split(/\s+/)[0] as string;
    const gsoBefore = (await s1.stats()).softwareGso;
    const txBefore = (await tapStats()).counters;
    const listener = tapNs.exec(
      ["busybox", "sh", "-c", "busybox nc -l -p 5001 | busybox md5sum"],
      40_000,
    );
    await sleep(500);
    const sent = await g1.run("nc 192.0.2.100 5001 < /tmp/blob", 40_000);
    assert.equal(sent.status, 0, sent.output);
    const got = await listener;
    assert.equal(got.stdout.split(/\s+/)[0], want, `md5 at the namespace: ${got.stderr}`);
    // the guest's TSO frames went to the TAP whole (virtio-net header), not segmented
    const gso = (await s1.stats()).softwareGso;
    assert.equal(gso.frames, gsoBefore.frames, `software GSO: ${JSON.stringify(gso)}`);
    const txAfter = (await tapStats()).counters;
    const txAvg =
      (txAfter.txBytes - txBefore.txBytes) / Math.max(1, txAfter.txPackets - txBefore.txPackets);
    assert.ok(txAvg > 1514, `average frame to the TAP: ${txAvg} bytes (no TSO frame passed)`);

    // namespace -> guest: the kernel hands the switch TSO frames with a virtio-net header
    const blob = join(dir, "blob-in");
    const data = randomBytes(1 << 20);
    await writeFile(blob, data);
    const wantIn = createHash("md5").update(data).digest("hex");
    const rxBefore = (await tapStats()).counters;
    // the listener's stdin stays open (busybox nc half-closes on stdin EOF, which would end
    // the sender early)
    const l = await g1.run(
      "rm -f /tmp/in; (sleep 60 | nc -l -p 5002 > /tmp/in &) ; sleep 1; echo listening",
      10_000,
    );
    assert.match(l.output, /listening/);
    const push = await tapNs.exec(
      ["busybox", "sh", "-c", `busybox nc 192.0.2.1 5002 < ${blob}`],
      40_000,
    );
    assert.equal(push.status, 0, push.stderr);
    const sum = await g1.run(
      "n=0; while [ $(wc -c < /tmp/in) -lt 1048576 ] && [ $n -lt 100 ]; do sleep 0.2; n=$((n+1)); done; " +
        "killall nc sleep 2>/dev/null; md5sum /tmp/in",
      30_000,
    );
    assert.equal(sum.output.split(/\s+/)[0], wantIn, `md5 in the guest: ${sum.output}`);
    const rxAfter = (await tapStats()).counters;
    const rxAvg =
      (rxAfter.rxBytes - rxBefore.rxBytes) / Math.max(1, rxAfter.rxPackets - rxBefore.rxPackets);
    assert.ok(rxAvg > 1514, `average frame from the TAP: ${rxAvg} bytes (no TSO frame read)`);
  },
);

scenario(
  "qemu switch: two switches joined by VXLAN carry guest-to-guest ping and TCP; a Linux vxlan device is reachable",
  90_000,
  async () => {
    const { g1, g2, s2, s3 } = w();
    await ping(g1, "192.0.2.130");
    await ping(g1, "192.0.2.200");
    await ping(g2, "192.0.2.200");
    for (const s of [s2, s3]) {
      const vx = (await s.stats()).ports.find((p) => p.name === "vxlan:42");
      assert.ok((vx?.counters.rxPackets ?? 0) >= 3 && (vx?.counters.txPackets ?? 0) >= 3);
    }
    // a TCP stream between the guests: their TSO frames are segmented for the VXLAN uplink
    const made = await g1.run(
      "head -c 524288 /dev/urandom > /tmp/vblob && md5sum /tmp/vblob",
      20_000,
    );
    const want = made.output.split(/\s+/)[0] as string;
    const gsoBefore = (await s2.stats()).softwareGso.frames;
    await g2.run("rm -f /tmp/vin; (sleep 60 | nc -l -p 5003 > /tmp/vin &) ; sleep 1", 10_000);
    const sent = await g1.run("nc 192.0.2.130 5003 < /tmp/vblob", 40_000);
    assert.equal(sent.status, 0, sent.output);
    const sum = await g2.run(
      "n=0; while [ $(wc -c < /tmp/vin) -lt 524288 ] && [ $n -lt 100 ]; do sleep 0.2; n=$((n+1)); done; " +
        "killall nc sleep 2>/dev/null; md5sum /tmp/vin",
      30_000,
    );
    assert.equal(sum.output.split(/\s+/)[0], want, `md5 at the other guest: ${sum.output}`);
    assert.ok((await s2.stats()).softwareGso.frames > gsoBefore, "no TSO frame was segmented");
  },
);

scenario(
  "qemu switch: a guest with mq=on and 2 queue pairs passes traffic on both pairs",
  90_000,
  async () => {
    const { sockE, s4Args, tapAddrs, image } = w();
    // a switch joined to S1 by VXLAN over loopback
    const s4 = await startSwitch(s4Args);
    let g3: Guest | null = null;
    try {
      g3 = await startGuest({
        image,
        name: "sw-g3",
        smp: 2,
        nics: [{ socketPath: sockE, queues: 2, guestAddrs: ["192.0.2.3/25"] }],
      });
      guestLogs.push(g3.logPath);
      await g3.ready(120_000);
      const q = await g3.run("ls /sys/class/net/eth0/queues");
      assert.match(q.output, /rx-1/);
      assert.match(q.output, /tx-1/);
      // transmit from each vCPU (XPS maps CPU i to TX queue i); replies from two addresses
      // whose flows the switch hashes to different RX pairs
      await ping(g3, tapAddrs[0] as string, 3, "taskset 1 ");
      await ping(g3, tapAddrs[1] as string, 3, "taskset 2 ");
      const pairs = (await s4.snapshot()).vhostPorts.find((p) => p.name === sockE)?.pairCounters;
      assert.ok(pairs !== undefined, "the multiqueue port in the snapshot");
      assert.equal(pairs.length, 2);
      for (let i = 0; i < 2; i++) {
        const c = pairs[i] as PairCounters;
        assert.ok(c.txFrames > 0, `pair ${i}: no frames from the guest (${JSON.stringify(pairs)})`);
        assert.ok(c.rxFrames > 0, `pair ${i}: no frames to the guest (${JSON.stringify(pairs)})`);
      }
    } catch (e) {
      if (e instanceof Error) e.message += `\n--- switch S4\n${s4.stderr.slice(-3000)}`;
      throw e;
    } finally {
      await g3?.kill();
      await s4.stop();
    }
  },
);

scenario(
  "qemu switch: QEMU listening (server=on) and `vhostkit switch --client`: pings, and resume after the switch restarts",
  120_000,
  async () => {
    const { dir, s4Args } = w();
    const sockF = join(dir, "f.sock");
    // S4's VXLAN link to S1, but one client-mode port on QEMU's socket
    const args = ["--client", "--socket", sockF, ...s4Args.slice(s4Args.indexOf("--uplink"))];
    const g4 = await startGuest({
      image: w().image,
      name: "sw-g4",
      nics: [
        {
          socketPath: sockF,
          mode: "server",
          guestAddrs: ["192.0.2.4/25"],
          mac: "52:54:00:12:34:44",
        },
      ],
    });
    guestLogs.push(g4.logPath);
    let s: SwitchProc | null = null;
    try {
      await g4.listening(30_000);
      s = await startSwitch(args);
      await g4.ready(120_000);
      await ping(g4, "192.0.2.1");
      assert.equal(await s.stop(), 0);
      s = await startSwitch(args);
      const deadline = Date.now() + 60_000;
      for (;;) {
        const r = await g4.run("ping -c 1 -W 2 192.0.2.1", 10_000);
        if (r.status === 0) break;
        if (Date.now() > deadline)
          assert.fail(`no ping after the client-mode switch restarted:\n${r.output}`);
        await sleep(1000);
      }
      const port = (await s.stats()).ports.find((p) => p.name === sockF);
      assert.ok(port?.up === true && port.counters.rxPackets >= 1, JSON.stringify(port));
    } catch (e) {
      if (e instanceof Error && s !== null) e.message += `\n--- switch\n${s.stderr.slice(-3000)}`;
      throw e;
    } finally {
      await g4.kill();
      await s?.stop();
    }
  },
);

scenario(
  "qemu switch: the switch restarted under QEMU clients with reconnect=1; pings resume",
  120_000,
  async () => {
    const world = w();
    const { g1, tapNs, tapDev } = world;
    assert.equal(await world.s1.stop(), 0);
    assert.equal(existsSync(world.sockA), false, "the switch removed its socket");
    world.s1 = await startSwitch(world.s1Args);
    // the new TAP is created in the host namespace: move it again
    await ip(["link", "set", tapDev, "netns", tapNs.name]);
    await tapNs.addAddress(tapDev, `${world.tapAddrs[0] as string}/25`);
    const deadline = Date.now() + 60_000;
    for (;;) {
      const r = await world.g1.run("ping -c 1 -W 2 192.0.2.2", 10_000);
      if (r.status === 0) break;
      if (Date.now() > deadline)
        assert.fail(`no ping after the restart:\n${r.output}\n${world.s1.stderr}`);
      await sleep(1000);
    }
    await ping(g1, "192.0.2.2");
    await ping(g1, "192.0.2.100");
  },
);

scenario(
  "qemu switch: a killed guest leaves the switch serving the other ports",
  60_000,
  async () => {
    const world = w();
    const { g1, g2, sockB } = world;
    const pid = g2.pid;
    assert.ok(pid !== undefined);
    process.kill(pid, "SIGKILL");
    const deadline = Date.now() + 15_000;
    for (;;) {
      const b = (await world.s1.stats()).ports.find((p) => p.name === sockB);
      if (b !== undefined && !b.up) break;
      if (Date.now() > deadline) assert.fail("port B still up after its guest was killed");
      await sleep(200);
    }
    await ping(g1, "192.0.2.100");
    const r = await g1.run("ping -c 1 -W 1 192.0.2.2", 10_000);
    assert.notEqual(r.status, 0, "the killed guest answered");
    assert.equal(world.s1.child.exitCode, null, "the switch process is still running");
  },
);
