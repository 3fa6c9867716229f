/**
 * The vhost-user front-end: guest RAM in memfds, the driver-side engine and its queues.
 */
export * from "./guest-ram.js";
export * from "./queue.js";
export * from "./frontend.js";
export * from "./migration.js";
