/**
 * The `vhostkit` command run as a child process (bin/vhostkit.js): help, bad command lines
 * (clear error, exit status 2), `vhostkit switch` serving two sockets with traffic between two
 * vhostkit front-ends, `vhostkit stats` output, the default port with its QEMU command line,
 * and SIGTERM / SIGINT removing the sockets it created.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { existsSync, lstatSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { native } from "../src/native.js";
import { VirtioFeature, featureSet } from "../src/protocol/constants.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { parseMac } from "../src/net/frame.js";
import { fetchStats } from "../src/cli/stats.js";
import { parseSwitchArgs, qemuCommandLine } from "../src/cli/switch.js";
import { UsageError, formatStats } from "../src/cli/common.js";
import { until } from "./helpers.js";

const here = dirname(fileURLToPath(import.meta.url));
/** bin/vhostkit.js at the repository root (dist/test/ -> ../../bin). */
const BIN = join(here, "..", "..", "bin", "vhostkit.js");

function run(args: string[], env: NodeJS.ProcessEnv = process.env) {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: "utf8", env, timeout: 15_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** A running `vhostkit switch` child with its stderr collected. */
class SwitchProcess {
  stderr = "";
  stdout = "";
  readonly child: ChildProcess;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  constructor(args: string[], env: NodeJS.ProcessEnv = process.env) {
    this.child = spawn(process.execPath, [BIN, "switch", ...args], {
      env,
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.child.stderr?.setEncoding("utf8").on("data", (d: string) => (this.stderr += d));
    this.child.stdout?.setEncoding("utf8").on("data", (d: string) => (this.stdout += d));
    this.exited = new Promise((resolve) =>
      this.child.once("exit", (code, signal) => resolve({ code, signal })),
    );
  }
  async ready(): Promise<void> {
    let exited = false;
    void this.exited.then(() => (exited = true));
    await until(
      () => this.stderr.includes("vhostkit switch: ready\n") || exited,
      `the ready line (stderr so far: ${this.stderr})`,
      8000,
    );
    if (exited) throw new Error(`switch exited before ready: ${this.stderr}`);
  }
  async stop(sig: NodeJS.Signals = "SIGTERM"): Promise<{ code: number | null }> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(sig);
    const timer = setTimeout(() => this.child.kill("SIGKILL"), 10_000);
    const r = await this.exited;
    clearTimeout(timer);
    return r;
  }
}

const FEATURES = featureSet(VirtioFeature.VERSION_1, VirtioFeature.RING_EVENT_IDX);

/** A vhostkit front-end as a guest on `path`, with RX buffers posted. */
async function guest(path: string, name: string) {
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 5000 });
  const ram = GuestRam.create({ size: 4 << 20, name: `cli-${name}` });
  await fe.negotiate({ features: FEATURES });
  const [rx, tx] = await fe.start(ram, [128, 128]);
  assert.ok(rx && tx);
  rx.postRxBuffers(128);
  return {
    fe,
    rx,
    tx,
    close() {
      fe.close();
      ram.close();
    },
  };
}

function eth(dst: string, src: string, seq: number): Uint8Array {
  const f = new Uint8Array(100);
  f.set(parseMac(dst), 0);
  f.set(parseMac(src), 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  f[14] = seq;
  return f;
}

// --- help and bad command lines ------------------------------------------------------------

test("cli: help", () => {
  for (const args of [[], ["help"], ["--help"]]) {
    const r = run(args);
    assert.equal(r.status, 0, args.join(" "));
    assert.match(r.stdout, /usage: vhostkit <command>/);
    assert.match(r.stdout, /switch/);
    assert.match(r.stdout, /stats/);
    assert.match(r.stdout, /migrate/);
  }
  const s = run(["switch", "--help"]);
  assert.equal(s.status, 0);
  assert.match(s.stdout, /--socket PATH/);
  assert.match(s.stdout, /--uplink SPEC/);
  const st = run(["stats", "--help"]);
  assert.equal(st.status, 0);
  assert.match(st.stdout, /--control PATH/);
});

test("cli: bad command lines get a clear error and exit status 2", () => {
  const cases: [string[], RegExp][] = [
    [["frobnicate"], /unknown command "frobnicate"/],
    [["switch", "--nope"], /Unknown option '--nope'/],
    [
      ["switch", "--queues", "0", "--socket", "/tmp/x.sock"],
      /--queues must be an integer in 1\.\.64 \(got 0\)/,
    ],
    [["switch", "--queues", "two"], /--queues .*got two/],
    [["switch", "--socket"], /--socket/],
    [["switch", "--socket", "/tmp/a", "--socket", "/tmp/a"], /--socket \/tmp\/a given twice/],
    [
      ["switch", "--socket", "/tmp/a", "--mac", "52:54:00:zz:00:01"],
      /--mac 52:54:00:zz:00:01: not a MAC/,
    ],
    [["switch", "--socket", "/tmp/a", "--mac", "01:00:5e:00:00:01"], /multicast/],
    [["switch", "--socket", "/tmp/a", "extra"], /positional/i],
    [["switch", "--ageing", "-3"], /--ageing/],
    [["switch", "--mtu", "20"], /--mtu must be an integer in 68\.\.65535 \(got 20\)/],
    [["switch", "--busy-poll", "0"], /--busy-poll must be an integer in 1\.\.1000 .*got 0/],
    [["switch", "--busy-poll", "2000"], /--busy-poll must be .*got 2000/],
    [["stats", "--bogus"], /Unknown option '--bogus'/],
    [["migrate", "--bogus"], /--bogus/],
    [
      ["check", "--bogus"],
      /vhostkit check: Unknown option '--bogus'.*\nTry 'vhostkit check --help'/,
    ],
    [["check"], /vhostkit check: SOCKET \(or --listen PATH\) is required/],
    [["check", "/tmp/a", "/tmp/b"], /one SOCKET expected, got 2/],
    [["switch", "--mtu", "x"], /vhostkit switch: --mtu .*\nTry 'vhostkit switch --help'/],
    [["switch", "--socket", "/tmp/a", "--uplink", "bogus:x"], /--uplink bogus:x: .*kind/],
  ];
  for (const [args, re] of cases) {
    const r = run(args);
    assert.equal(r.status, 2, `${args.join(" ")}: status (stderr: ${r.stderr})`);
    assert.match(r.stderr, re, args.join(" "));
    assert.equal(r.stdout, "", `${args.join(" ")}: nothing on stdout`);
  }
});

test("cli: parseSwitchArgs defaults and the QEMU command line", () => {
  const o = parseSwitchArgs([], { XDG_RUNTIME_DIR: "/run/user/7" });
  assert.deepEqual(o.sockets, ["/run/user/7/vhostkit/vm0.sock"]);
  assert.equal(o.defaultPort, true);
  assert.equal(o.control, "/run/user/7/vhostkit/vm0.sock.ctl");
  assert.equal(parseSwitchArgs([], {}).sockets[0], "/tmp/vhostkit/vm0.sock");
  const t = parseSwitchArgs(
    [
      "--socket",
      "/a",
      "--socket",
      "/b",
      "--client",
      "--queues",
      "2",
      "--mac",
      "52-54-00-AA-BB-CC",
      "--ageing",
      "1.5",
    ],
    {},
  );
  assert.deepEqual(
    { ...t, uplinks: t.uplinks.length },
    {
      sockets: ["/a", "/b"],
      defaultPort: false,
      client: true,
      queues: 2,
      macs: ["52:54:00:aa:bb:cc"],
      mtu: null,
      uplinks: 0,
      control: "/a.ctl",
      ageingMs: 1500,
      busyPollMicros: 0,
      stateTimeoutMs: null,
      requestBacklog: null,
      printQemu: false,
      verbose: false,
      help: false,
    },
  );
  assert.throws(() => parseSwitchArgs(["--mac", "x"], {}), UsageError);
  assert.equal(parseSwitchArgs(["--mtu", "9000"], {}).mtu, 9000);
  assert.equal(parseSwitchArgs(["--busy-poll", "50"], {}).busyPollMicros, 50);
  assert.match(
    qemuCommandLine({
      socket: "/s",
      client: false,
      queues: 1,
      mac: "52:54:00:00:00:01",
      mtu: 9000,
    }),
    /virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,host_mtu=9000/,
  );
  const q = qemuCommandLine({
    socket: "/s.sock",
    client: false,
    queues: 2,
    mac: "52:54:00:12:34:56",
  });
  assert.match(q, /-object memory-backend-memfd,id=mem0,size=1G,share=on -numa node,memdev=mem0/);
  assert.match(q, /-chardev socket,id=chr0,path=\/s\.sock,reconnect=1/);
  assert.match(q, /-netdev vhost-user,id=net0,chardev=chr0,queues=2/);
  assert.match(q, /-device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,mq=on,vectors=6/);
  assert.match(
    qemuCommandLine({ socket: "/s", client: true, queues: 1, mac: "52:54:00:00:00:01" }),
    /server=on,wait=off/,
  );
});

// --- a running switch ------------------------------------------------------------------------

test("cli: switch serves two sockets, forwards, reports stats; SIGTERM removes its sockets", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-cli-"));
  const a = join(dir, "vm1.sock");
  const b = join(dir, "vm2.sock");
  const sw = new SwitchProcess(["--socket", a, "--socket", b, "--mac", "52:54:00:00:00:0a"]);
  const guests: { close(): void }[] = [];
  try {
    await sw.ready();
    assert.ok(existsSync(a) && existsSync(b) && existsSync(`${a}.ctl`), "sockets created");
    assert.match(sw.stderr, new RegExp(`port ${a}: listening on`));
    const A = await guest(a, "a");
    guests.push(A);
    const B = await guest(b, "b");
    guests.push(B);
    // A says hello (broadcast); B answers unicast; A sends 10 unicast frames to B
    assert.notEqual(A.tx.sendFrame(eth("ff:ff:ff:ff:ff:ff", "52:54:00:00:00:0a", 0)), null);
    await B.rx.waitForUsed(5000, 1);
    assert.equal(B.rx.receiveFrames().length, 1);
    assert.notEqual(B.tx.sendFrame(eth("52:54:00:00:00:0a", "52:54:00:00:00:0b", 1)), null);
    await A.rx.waitForUsed(5000, 1);
    for (let i = 0; i < 10; i++)
      A.tx.addFrame(eth("52:54:00:00:00:0b", "52:54:00:00:00:0a", 2 + i));
    A.tx.kick();
    const got: Uint8Array[] = [];
    await until(
      () => {
        got.push(...B.rx.receiveFrames());
        return got.length >= 10;
      },
      "10 frames at B",
      8000,
    );
    assert.deepEqual(
      got.map((f) => f[14]),
      Array.from({ length: 10 }, (_, i) => 2 + i),
    );

    // logs: who connected and what was negotiated
    await until(() => /negotiated .*VERSION_1/.test(sw.stderr), "negotiation log", 8000);
    assert.match(sw.stderr, new RegExp(`${a}: front-end connected`));

    // stats over the control socket, as JSON and as text
    const snap = await fetchStats(`${a}.ctl`);
    const pa = snap.switch.ports.find((p) => p.name === a);
    const pb = snap.switch.ports.find((p) => p.name === b);
    assert.ok(pa && pb);
    assert.equal(pa.counters.rxPackets, 11);
    assert.equal(pa.counters.rxBytes, 1100);
    assert.equal(pb.counters.txPackets, 11);
    assert.equal(pb.counters.rxPackets, 1);
    assert.equal(pa.up && pb.up, true);
    assert.deepEqual(snap.macTable.map((m) => [m.mac, m.port]).sort(), [
      ["52:54:00:00:00:0a", a],
      ["52:54:00:00:00:0b", b],
    ]);
    const va = snap.vhostPorts.find((v) => v.name === a);
    assert.equal(va?.connected, true);
    assert.equal(va?.mac, "52:54:00:00:00:0a");
    assert.match(va?.featureNames ?? "", /VERSION_1/);

    const text = run(["stats", "--control", `${a}.ctl`]);
    assert.equal(text.status, 0, text.stderr);
    assert.match(text.stdout, /PORT\s+LINK\s+RX-PKTS\s+RX-BYTES\s+TX-PKTS\s+TX-BYTES\s+DROPS/);
    const lineA = text.stdout.split("\n").find((l) => l.startsWith(a));
    assert.match(lineA ?? "", /up\s+11\s+1100\s+1\s+100\s+0$/);
    assert.match(text.stdout, /MAC TABLE \(2\)/);
    assert.match(text.stdout, new RegExp(`52:54:00:00:00:0b\\s+${b.replace(/\./g, "\\.")}`));
    const json = run(["stats", "--json", "--control", `${a}.ctl`]);
    assert.equal(JSON.parse(json.stdout).switch.ports.length, 2);
    assert.equal(formatStats(snap).split("\n")[0]?.startsWith("switch pid"), true);

    // a guest leaving is logged and its port goes down
    B.close();
    guests.pop();
    await until(() => /vm2\.sock: link down/.test(sw.stderr), "B's link down", 8000);

    const r = await sw.stop("SIGTERM");
    assert.equal(r.code, 0, sw.stderr);
    assert.match(sw.stderr, /SIGTERM: shutting down/);
    assert.equal(existsSync(a), false, "socket a removed");
    assert.equal(existsSync(b), false, "socket b removed");
    assert.equal(existsSync(`${a}.ctl`), false, "control socket removed");
    const gone = run(["stats", "--control", `${a}.ctl`]);
    assert.equal(gone.status, 1);
    assert.match(gone.stderr, /cannot reach the control socket/);
  } finally {
    for (const g of guests) g.close();
    await sw.stop("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  }
});

test("cli: with no arguments the switch serves the default port and prints the QEMU command line", async () => {
  const runtime = mkdtempSync(join(tmpdir(), "vk-cli-rt-"));
  const env = { ...process.env, XDG_RUNTIME_DIR: runtime };
  const sock = join(runtime, "vhostkit", "vm0.sock");
  const sw = new SwitchProcess([], env);
  try {
    await sw.ready();
    assert.ok(existsSync(sock));
    assert.match(
      sw.stdout,
      new RegExp(`-chardev socket,id=chr0,path=${sock.replace(/\./g, "\\.")},reconnect=1`),
    );
    assert.match(sw.stdout, /memory-backend-memfd,.*share=on/);
    assert.match(sw.stdout, /-netdev vhost-user,id=net0,chardev=chr0,queues=1/);
    assert.match(sw.stdout, /-device virtio-net-pci,netdev=net0/);
    // `vhostkit stats` finds the default control socket by itself
    const st = run(["stats"], env);
    assert.equal(st.status, 0, st.stderr);
    assert.match(st.stdout, new RegExp(`${sock.replace(/\./g, "\\.")}\\s+down`));
    const r = await sw.stop("SIGINT");
    assert.equal(r.code, 0);
    assert.equal(existsSync(sock), false);
    assert.equal(existsSync(`${sock}.ctl`), false);
  } finally {
    await sw.stop("SIGKILL");
    rmSync(runtime, { recursive: true, force: true });
  }
});

test("cli: a switch that cannot start says why and exits 1", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-cli-bad-"));
  try {
    const notDir = join(dir, "file");
    writeFileSync(notDir, "x");
    const r = run(["switch", "--socket", join(notDir, "vm.sock")]);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /cannot start: .*vm\.sock/);
    // a control socket in use by a running switch is refused
    const a = join(dir, "a.sock");
    const first = new SwitchProcess(["--socket", a]);
    try {
      await first.ready();
      const second = run(["switch", "--socket", join(dir, "b.sock"), "--control", `${a}.ctl`]);
      assert.equal(second.status, 1);
      assert.match(second.stderr, /control socket .* is in use/);
      assert.equal(existsSync(join(dir, "b.sock")), false, "the second switch cleaned up");
      // a port socket a running switch serves is refused too, and stays the first one's
      const third = run(["switch", "--socket", a, "--control", join(dir, "c.ctl")]);
      assert.equal(third.status, 1, third.stderr);
      assert.match(third.stderr, /cannot start: .*a\.sock is in use/);
      assert.equal(lstatSync(a).isSocket(), true, "the first switch's socket is still there");
      const probe = native.unixConnect(a);
      native.close(probe);
    } finally {
      await first.stop();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("cli: --client connects to a listening front-end and reconnects after it goes away", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-cli-client-"));
  const path = join(dir, "qemu.sock");
  const sw = new SwitchProcess(["--client", "--socket", path, "--queues", "2"]);
  const open: { close(): void }[] = [];
  try {
    await sw.ready();
    assert.equal(existsSync(path), false, "client mode creates no socket");
    for (const round of [1, 2]) {
      const fe = await VhostUserFrontend.listen(path, { timeoutMs: 8000 });
      open.push(fe);
      const n = await fe.negotiate({ features: FEATURES | featureSet(VirtioFeature.NET_MQ) });
      assert.equal(n.queueNum, 2, `round ${round}: GET_QUEUE_NUM`);
      await until(
        () => (sw.stderr.match(/connected to front-end/g) ?? []).length >= round,
        `round ${round}: connection log`,
        8000,
      );
      const snap = await fetchStats(`${path}.ctl`);
      assert.equal(snap.vhostPorts[0]?.mode, "client");
      assert.equal(snap.vhostPorts[0]?.connected, true);
      assert.equal(snap.vhostPorts[0]?.queuePairs, 2);
      fe.close();
      open.pop();
      await until(
        () => (sw.stderr.match(/front-end disconnected/g) ?? []).length >= round,
        `round ${round}: disconnection log`,
        8000,
      );
    }
    const r = await sw.stop("SIGTERM");
    assert.equal(r.code, 0, sw.stderr);
    assert.equal(existsSync(`${path}.ctl`), false);
  } finally {
    for (const o of open) o.close();
    await sw.stop("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  }
});
