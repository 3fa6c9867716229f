/**
 * A device that is not virtio-net migrating live: the virtio-rng device of
 * `entropy-device.ts` served by two back-ends (the source host's and the destination's), a
 * driver (vhostkit's front-end) taking random bytes from it all along, and the device moved from
 * one back-end to the other with the library's `migrateSource()` / `receiveMigration()` over a
 * local TCP connection. The orchestrator needs nothing device-specific: the device id goes in the
 * stream, guest RAM and the rings move, and the driver goes on on the destination.
 *
 * Run: `node dist/examples/migrate-entropy-device.js`.
 */
import { createConnection, createServer } from "node:net";
import type { AddressInfo, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

import { EntropyDevice } from "./entropy-device.js";
import { serveBackend } from "../src/backend/server.js";
import { silentLogger } from "../src/backend/device.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import type { FrontendQueue } from "../src/frontend/queue.js";
import { migrateSource } from "../src/orchestrator/source.js";
import type { MigratableGuest, MigrationResult } from "../src/orchestrator/source.js";
import { receiveMigration } from "../src/orchestrator/destination.js";

/** virtio device id of an entropy source (VIRTIO 1.2 §5.4). */
const VIRTIO_ID_RNG = 4;

/** The driver: posts 256-byte buffers and takes them back filled, until paused. */
class RngDriver implements MigratableGuest {
  bytes = 0;
  #timer: NodeJS.Timeout | null = null;
  constructor(readonly queue: FrontendQueue) {}

  /** Post and collect every millisecond. */
  start(): void {
    this.#timer = setInterval(() => this.#step(), 1);
  }

  #step(): void {
    for (let u = this.queue.getUsed(); u !== null; u = this.queue.getUsed()) this.bytes += u.len;
    if (this.queue.freeCount > 0) this.queue.postRxBuffers(Math.min(8, this.queue.freeCount), 256);
  }

  /** Stop posting (the VM's vCPUs stop). */
  pause(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
  }

  /** Go on after a failed migration. */
  resume(): void {
    this.start();
  }
}

/** What {@link migrateEntropyDevice} did. */
export interface EntropyMigration {
  /** the source's figures */
  result: MigrationResult;
  /** random bytes the driver took before the switch-over */
  bytesBefore: number;
  /** random bytes taken on the destination after it */
  bytesAfter: number;
  /** the destination checked guest RAM against the source's hash */
  memoryVerified: boolean;
}

/**
 * Serve the entropy device twice, drive it on the first back-end, migrate it to the second and
 * take random bytes there.
 * @returns the migration's figures and the bytes taken on each side
 * @throws MigrationError when the migration fails
 */
export async function migrateEntropyDevice(): Promise<EntropyMigration> {
  const dir = tmpdir();
  const pathA = join(dir, `vk-rng-a-${process.pid}.sock`);
  const pathB = join(dir, `vk-rng-b-${process.pid}.sock`);
  const a = serveBackend(new EntropyDevice(), { path: pathA, logger: silentLogger });
  const b = serveBackend(new EntropyDevice(), { path: pathB, logger: silentLogger });
  const ram = GuestRam.create({ size: 4 << 20, name: "rng-guest" });
  const fe = await VhostUserFrontend.connect(pathA);
  const server = createServer({ noDelay: true });
  try {
    await fe.negotiate();
    const [q] = await fe.start(ram, [64]);
    const driver = new RngDriver(q as FrontendQueue);
    driver.start();
    while (driver.bytes < 64 << 10) await new Promise((r) => setTimeout(r, 5));
    const incoming = new Promise<Awaited<ReturnType<typeof receiveMigration>>>(
      (resolve, reject) => {
        server.once("connection", (s: Socket) => {
          receiveMigration({
            stream: s,
            connectBackend: () => VhostUserFrontend.connect(pathB),
          }).then(resolve, reject);
        });
      },
    );
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const port = (server.address() as AddressInfo).port;
    const stream = await new Promise<Socket>((resolve, reject) => {
      const s = createConnection({ host: "127.0.0.1", port }, () => resolve(s));
      s.once("error", reject);
    });
    const result = await migrateSource({
      frontend: fe,
      stream,
      guest: driver,
      deviceId: VIRTIO_ID_RNG,
      verifyMemory: true,
    });
    const dest = await incoming;
    // The driver goes on on the destination with the migrated ring.
    const d2 = new RngDriver(dest.queues[0] as FrontendQueue);
    d2.start();
    const end = Date.now() + 5000;
    while (d2.bytes < 64 << 10 && Date.now() < end) await new Promise((r) => setTimeout(r, 5));
    d2.pause();
    dest.frontend.close();
    dest.ram.close();
    return {
      result,
      bytesBefore: driver.bytes,
      bytesAfter: d2.bytes,
      memoryVerified: dest.memoryVerified,
    };
  } finally {
    server.close();
    fe.close();
    ram.close();
    a.close();
    b.close();
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const m = await migrateEntropyDevice();
  console.log(
    `virtio-rng migrated: downtime ${m.result.downtimeMs.toFixed(1)} ms, ` +
      `${m.result.iterations} iterations, ${m.result.pagesSent} pages; ` +
      `${m.bytesBefore} random bytes before, ${m.bytesAfter} after; RAM verified: ${m.memoryVerified}`,
  );
}
