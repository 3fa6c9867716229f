/**
 * A complete vhost-user device in a few lines: virtio-rng (VIRTIO 1.2 §5.4), one request queue
 * whose buffers the device fills with random bytes. vhostkit owns the socket, the protocol,
 * guest memory and the ring; the device only says what it is and handles a kicked queue.
 *
 * Run: `node dist/examples/entropy-device.js /tmp/rng.sock`, then attach QEMU with
 * `-chardev socket,id=rng0,path=/tmp/rng.sock -device vhost-user-rng-pci,chardev=rng0`
 * (guest memory shared: `-object memory-backend-memfd,id=mem,size=512M,share=on
 * -machine memory-backend=mem`).
 */
import { randomFillSync } from "node:crypto";
import { pathToFileURL } from "node:url";

import type { BackendQueue, VhostUserDevice } from "../src/backend/device.js";
import { serveBackend } from "../src/backend/server.js";
import type { BackendServer } from "../src/backend/server.js";

/** virtio-rng: the device fills every writable buffer the driver posts with random bytes. */
export class EntropyDevice implements VhostUserDevice {
  readonly deviceId = 4; // VIRTIO_ID_RNG
  readonly features = 0n; // no device-specific features; the framework adds VERSION_1 etc.
  readonly queueCount = 1;
  readonly maxQueueSize = 1024;
  /** bytes handed to the guest so far */
  bytesServed = 0;
  readonly #scratch = new Uint8Array(4096);

  /**
   * Fill each available buffer with random bytes and return it.
   * @param queue the request queue (kicked or started)
   */
  processQueue(queue: BackendQueue): void {
    // A started but disabled ring is processed without side effects: leave its buffers.
    if (!queue.enabled) return;
    for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
      let written = 0;
      while (written < chain.writableLength) {
        const n = Math.min(this.#scratch.length, chain.writableLength - written);
        randomFillSync(this.#scratch, 0, n);
        written += queue.write(chain, this.#scratch.subarray(0, n), written);
      }
      queue.pushUsed(chain, written);
      this.bytesServed += written;
    }
  }
}

/**
 * Serve an {@link EntropyDevice} on a socket path.
 * @param path the Unix socket to listen on
 * @returns the server (`close()` stops it and removes the socket)
 */
export function serveEntropy(path: string): BackendServer {
  return serveBackend(new EntropyDevice(), { path, logger: console });
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const server = serveEntropy(process.argv[2] ?? "/tmp/vhostkit-rng.sock");
  const stop = (): void => {
    server.close();
    process.exit(0);
  };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
}
