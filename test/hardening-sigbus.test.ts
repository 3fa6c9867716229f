/**
 * Issue: a front-end that shrinks the file behind guest memory after SET_MEM_TABLE made the
 * switch die with SIGBUS ("Bus error") at the next access. The switch runs as a child process
 * here, so a crash fails the test instead of killing the runner.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { native } from "../src/native.js";
import { SwitchProcess, connectGuest, forward, seqFrame, until } from "./hardening-helpers.js";
import type { TestGuest } from "./hardening-helpers.js";

const here = dirname(fileURLToPath(import.meta.url));

const MAC_A = "52:54:00:00:01:0a";
const MAC_B = "52:54:00:00:01:0b";
const MAC_C = "52:54:00:00:01:0c";

test("sigbus: a front-end that shrinks guest memory loses its connection; the switch survives and the other ports forward", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-sigbus-"));
  const [a, b, c] = ["a.sock", "b.sock", "c.sock"].map((n) => join(dir, n)) as [
    string,
    string,
    string,
  ];
  const sw = new SwitchProcess(["--socket", a, "--socket", b, "--socket", c]);
  const guests: TestGuest[] = [];
  try {
    await sw.ready();
    // A plays a front-end that shrinks its memory: its memfd is left unsealed
    const A = await connectGuest(a, "a", { regions: [{ gpa: 0, size: 1 << 20 }], seal: false });
    guests.push(A);
    const B = await connectGuest(b, "b");
    guests.push(B);
    const C = await connectGuest(c, "c");
    guests.push(C);
    // learn the MACs of B and C
    assert.deepEqual(await forward(B, C, [MAC_B, MAC_C], 4), [0, 1, 2, 3]);
    assert.deepEqual(await forward(C, B, [MAC_C, MAC_B], 4), [0, 1, 2, 3]);

    // A queues a frame in a buffer far above 16 KiB, then shrinks its memfd to 16 KiB and kicks
    let closed = false;
    A.fe.on("close", () => (closed = true));
    const id = A.tx.addFrame(seqFrame(MAC_B, MAC_A, 99));
    assert.notEqual(id, null);
    const fd = A.ram.regionFds[0]!;
    native.ftruncate(fd, 16 << 10);
    A.tx.kick();

    await until(() => closed || !sw.alive, "A's connection to close");
    assert.equal(sw.alive, true, `the switch died: ${sw.stderr.slice(-2000)}`);
    await until(() => /SIGBUS/.test(sw.stderr), "the fault in the log");
    assert.match(
      sw.stderr,
      /memory region 0 \(gpa 0x0, size 0x100000\): SIGBUS at offset 0x[0-9a-f]+ .*shorter than the memory table says.*; closing the connection/,
    );
    assert.match(sw.stderr, /not sealed against shrinking \(F_SEAL_SHRINK\)/);

    // B and C go on: every frame arrives, in order
    const got = await forward(B, C, [MAC_B, MAC_C], 200, 10);
    assert.deepEqual(
      got,
      Array.from({ length: 200 }, (_, i) => 10 + i),
    );
    assert.equal(sw.alive, true);
  } finally {
    for (const g of guests) g.close();
    await sw.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("sigbus: the addon survives a fault inside a mapping, counts it and notifies; a fault elsewhere is still fatal", () => {
  const child = join(here, "fixtures", "sigbus-child.js");
  const ok = spawnSync(process.execPath, [child, "inside"], { encoding: "utf8", timeout: 20_000 });
  assert.equal(ok.status, 0, ok.stderr);
  assert.match(ok.stdout, /faults=1 offset=786432 zeros=true notified=true total=1/);
  assert.match(ok.stdout, /second page faults=2/);
  assert.match(ok.stdout, /sealed=true/);
  // A SIGBUS outside every mapping (here: raised by kill) still ends the process with SIGBUS.
  const bad = spawnSync(process.execPath, [child, "outside"], {
    encoding: "utf8",
    timeout: 20_000,
  });
  assert.equal(bad.signal, "SIGBUS", `status ${bad.status} ${bad.stderr}`);
});
