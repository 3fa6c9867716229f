/**
 * Issue: a dirty log that covered guest memory when SET_LOG_BASE sent it, followed by memory
 * that grows past it (ADD_MEM_REG, or a larger SET_MEM_TABLE) while logging is still off, was
 * accepted when SET_FEATURES turned VHOST_F_LOG_ALL on: the first device write above the log
 * then changed a guest page with no log bit. Logging must be refused up front, naming the
 * request and the value; growing memory while logging is on is refused too (test/engines).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { native } from "../src/native.js";
import {
  FrontendRequest,
  ProtocolFeature,
  VirtioFeature,
  featureMask,
  featureSet,
} from "../src/protocol/constants.js";
import { VhostUserError } from "../src/protocol/errors.js";
import { serveBackend } from "../src/backend/server.js";
import type { VhostUserDevice } from "../src/backend/device.js";
import { silentLogger } from "../src/backend/device.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";

class NullDevice implements VhostUserDevice {
  readonly deviceId = 1;
  readonly features = 0n;
  readonly queueCount = 1;
  readonly maxQueueSize = 256;
  processQueue(): void {}
}

for (const grow of ["ADD_MEM_REG", "SET_MEM_TABLE"] as const) {
  test(`dirty log: memory grown past the log by ${grow} before LOG_ALL: SET_FEATURES with LOG_ALL is refused, naming the log and memory ends`, async () => {
    const path = join(tmpdir(), `vk-log-grow-${process.pid}-${grow}.sock`);
    const server = serveBackend(new NullDevice(), { path, logger: silentLogger });
    const errors: VhostUserError[] = [];
    server.on("error", (e: VhostUserError) => errors.push(e));
    const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 5000 });
    fe.on("error", () => undefined);
    const ram = GuestRam.create({ regions: [{ gpa: 0, size: 1 << 20 }], name: "vk-log-grow" });
    const big = GuestRam.create({
      regions: [
        { gpa: 0, size: 1 << 20 },
        { gpa: 4 << 20, size: 64 << 10 },
      ],
      name: "vk-log-grow-big",
    });
    const logFd = native.memfdCreate("vk-log-grow");
    try {
      const features = featureSet(VirtioFeature.VERSION_1);
      await fe.negotiate({
        features,
        protocolFeatures: featureSet(
          ProtocolFeature.LOG_SHMFD,
          ProtocolFeature.REPLY_ACK,
          ProtocolFeature.CONFIGURE_MEM_SLOTS,
        ),
      });
      await fe.setMemTable(ram);
      // a log for 1 MiB (256 pages, 32 bytes): it covers guest memory as it is now
      native.ftruncate(logFd, 4096);
      await fe.request(FrontendRequest.SET_LOG_BASE, { mmapSize: 32n, mmapOffset: 0n }, [logFd]);
      assert.equal(errors.length, 0, errors.map((e) => e.message).join("; "));
      // memory grows to 4 MiB + 64 KiB while logging is off: accepted
      if (grow === "ADD_MEM_REG") await fe.addMemRegion(big, 1);
      else await fe.setMemTable(big);
      assert.equal(server.session!.memory()!.end, (4 << 20) + (64 << 10));
      // LOG_ALL on: refused up front, logging stays off
      const all = features | featureMask(VirtioFeature.PROTOCOL_FEATURES);
      await assert.rejects(
        fe.setFeatures(all | featureMask(VirtioFeature.LOG_ALL)),
        (e: unknown) => e instanceof VhostUserError && e.request === "SET_FEATURES",
      );
      const err = errors.find((e) => e.request === "SET_FEATURES");
      assert.match(
        err?.message ?? "",
        /^SET_FEATURES: the dirty log of SET_LOG_BASE is too short: the log covers guest addresses below 0x100000 \(256 pages\) but guest memory ends at 0x410000.*\(features=VHOST_F_LOG_ALL\)/,
      );
      assert.equal(server.session!.memory()!.log, null, "no log attached");
      // a log that covers the memory, then LOG_ALL: taken
      await fe.request(FrontendRequest.SET_LOG_BASE, { mmapSize: 136n, mmapOffset: 0n }, [logFd]);
      await fe.setFeatures(all | featureMask(VirtioFeature.LOG_ALL));
      assert.notEqual(server.session!.memory()!.log, null, "the log is attached");
    } finally {
      fe.close();
      server.close();
      ram.close();
      big.close();
      native.close(logFd);
    }
  });
}
