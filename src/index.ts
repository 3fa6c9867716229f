/**
 * vhostkit's public API: the vhost-user protocol, guest memory and virtqueues, the back-end
 * framework for writing devices, the front-end that drives any back-end, the virtio-net switch,
 * and the live-migration machinery (state streams, device state, the orchestrator).
 */
export * from "./protocol/index.js";
export * from "./channel.js";
export { native, isNativeError, POLL_READABLE, POLL_WRITABLE } from "./native.js";
export type { NativeError, FdWatcher } from "./native.js";
export * from "./memory/address.js";
export * from "./memory/guest-memory.js";
export * from "./memory/dirty-log.js";
export * from "./memory/mapping.js";
export * from "./virtq/types.js";
export * from "./virtq/layout.js";
export * from "./virtq/split.js";
export * from "./virtq/packed.js";
export * from "./backend/device.js";
export * from "./backend/vring.js";
export * from "./backend/session.js";
export * from "./backend/server.js";
export * from "./backend/worker-queue.js";
export * from "./frontend/index.js";
export * from "./devices/net-test-device.js";
export * from "./testing/mock-driver.js";
export * from "./net/index.js";
export * from "./migration/state-codec.js";
export * from "./migration/transfer.js";
export * from "./migration/staged.js";
export {
  MIGRATION_MAGIC,
  MIGRATION_HEADER_SIZE,
  MAX_STAGE_NAME,
  DEFAULT_MAX_STREAM_BYTES,
  MIGRATION_DIAGNOSTICS_CHANNEL,
  readHeader as readStateStreamHeader,
  inspectStream,
  MigrationFormat,
  defineMigration,
  saveStream,
  loadStream,
} from "./migration/stream.js";
export type {
  ApplyStage,
  MigrationStage,
  MigrationVersion,
  MigrationFormatOptions,
  SaveOptions,
  MigrationHeader,
  PreparedLoad,
  LoadResult,
  SectionInfo,
} from "./migration/stream.js";
export * from "./orchestrator/pages.js";
export * from "./orchestrator/virtio-state.js";
export * from "./orchestrator/source.js";
export * from "./orchestrator/destination.js";
export * from "./orchestrator/traffic.js";
export {
  HOST_STREAM_STAGES,
  SectionType as HostStreamSection,
  MigrationStreamFormatError,
  SectionReader as HostStreamReader,
} from "./orchestrator/stream.js";
