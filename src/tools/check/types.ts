/**
 * Types of the check battery: a check is a row of data (id, section, spec reference, what it
 * checks) with a run function; its outcome is pass, fail or not applicable, with a detail that
 * names the request and the values seen.
 */
import type { VhostUserFrontend } from "../../frontend/frontend.js";
import type { GuestRam } from "../../frontend/guest-ram.js";
import type { CheckTarget } from "./target.js";
import type { Workload } from "./profiles.js";

/** A check's result. */
export type CheckResult = "pass" | "fail" | "n/a";

/** Sections of the battery, in the order they run. */
export const SECTIONS = [
  "handshake",
  "rings",
  "memory",
  "dirty-log",
  "device-state",
  "fs",
  "migration",
  "robustness",
] as const;

/** A section name. */
export type Section = (typeof SECTIONS)[number];

/** What a check found. */
export interface CheckOutcome {
  result: CheckResult;
  /** the request(s) and values seen, or why the check does not apply */
  detail: string;
  /** true when the outcome reports a behaviour (not a verdict), e.g. call fds closed */
  fact?: boolean;
}

/** What a check reads: the target, the workload, what the back-end offers, the options. */
export interface CheckContext {
  /** the back-end under check */
  readonly target: CheckTarget;
  /** a second back-end (`--second`), or null */
  readonly second: CheckTarget | null;
  /** how to make the device work */
  readonly workload: Workload;
  /** GET_FEATURES of the first connection */
  readonly offeredFeatures: bigint;
  /** GET_PROTOCOL_FEATURES of the first connection (0 without F_PROTOCOL_FEATURES) */
  readonly offeredProtocolFeatures: bigint;
  /** the back-end's pid (`--pid`), or null */
  readonly pid: number | null;
  /** connections opened by the fd-count check */
  readonly connections: number;
  /** results shared by the rows of one report (e.g. the migration run), by key */
  readonly memo: Map<string, Promise<unknown>>;
}

/** A started device on one connection (see `startDevice`). */
export interface Started {
  fe: VhostUserFrontend;
  ram: GuestRam;
}

/** One row of the battery. */
export interface CheckSpec {
  /** stable id, `section.name` */
  readonly id: string;
  readonly section: Section;
  /** where the rule comes from (vhost-user spec section, VIRTIO section, seed) */
  readonly spec: string;
  /** one line of what is checked */
  readonly title: string;
  /**
   * Run the check on connections of its own.
   * @param ctx the context
   * @returns the outcome
   */
  run(ctx: CheckContext): Promise<CheckOutcome>;
}

/** One check in a report. */
export interface CheckReportEntry {
  id: string;
  section: Section;
  spec: string;
  title: string;
  result: CheckResult;
  detail: string;
  fact?: boolean;
  /** milliseconds the check took */
  ms: number;
}

/** A whole report (the `--json` output). */
export interface CheckReport {
  /** the socket checked (or `listen:PATH`) */
  target: string;
  /** the profile used (after `auto` was resolved) */
  profile: string;
  offered: { features: string; protocolFeatures: string };
  /** offered bits by name */
  offeredNames: { features: string[]; protocolFeatures: string[] };
  checks: CheckReportEntry[];
  summary: { pass: number; fail: number; na: number };
  /** notes on how the run went (restarts of the back-end, exits) */
  notes: string[];
}
