/**
 * Running the battery against a back-end and rendering the report (a table grouped by section
 * with a summary line, or the JSON object of `vhostkit check --json`).
 */
import {
  FrontendRequest,
  ProtocolFeature,
  VirtioFeature,
  hasFeature,
} from "../../protocol/constants.js";
import { CHECKS } from "./battery.js";
import { WORKLOADS, autoProfile } from "./profiles.js";
import type { ProfileName } from "./profiles.js";
import { CheckTarget } from "./target.js";
import type { TargetOptions } from "./target.js";
import { bitNames, errorText, hex } from "./session.js";
import { SECTIONS } from "./types.js";
import type { CheckContext, CheckReport, CheckReportEntry, CheckSpec } from "./types.js";

/** Options of {@link runChecks}. */
export interface RunChecksOptions extends TargetOptions {
  /** profile (default auto) */
  profile?: ProfileName;
  /** the back-end's pid, for the fd-count check */
  pid?: number | null;
  /** a second back-end (device-state LOAD, live migration) */
  second?: TargetOptions | null;
  /** connections opened by the fd-count check (default 300) */
  connections?: number;
  /** run only checks whose id starts with one of these (default all) */
  only?: readonly string[];
  /** the battery (default {@link CHECKS}) */
  checks?: readonly CheckSpec[];
  /** called after each check (progress) */
  onCheck?: (entry: CheckReportEntry) => void;
}

/** The back-end could not be checked at all (exit status 2). */
export class CheckRunError extends Error {
  /** stable error code */
  readonly code = "ERR_VHOSTKIT_CHECK" as const;
  /**
   * @param message what failed, naming the target
   */
  constructor(message: string) {
    super(message);
    this.name = "CheckRunError";
  }
}

/**
 * Run the battery against one back-end.
 * @param opts target, profile, pid, second target, filter
 * @returns the report
 * @throws CheckRunError when the first connection or GET_FEATURES fails
 */
export async function runChecks(opts: RunChecksOptions): Promise<CheckReport> {
  const target = new CheckTarget(opts);
  const second = opts.second ? new CheckTarget(opts.second) : null;
  try {
    let offered: bigint;
    let offeredPf = 0n;
    try {
      const fe = await target.open();
      try {
        offered = await fe.getFeatures();
        if (hasFeature(offered, VirtioFeature.PROTOCOL_FEATURES)) {
          offeredPf = (await fe.request(FrontendRequest.GET_PROTOCOL_FEATURES, null))
            .payload as bigint;
        }
      } finally {
        await target.done(fe);
      }
    } catch (err) {
      throw new CheckRunError(`${target.name}: cannot check: ${errorText(err)}`);
    }
    const asked = opts.profile ?? "auto";
    const profile = asked === "auto" ? autoProfile(offered) : asked;
    const ctx: CheckContext = {
      target,
      second,
      workload: WORKLOADS[profile],
      offeredFeatures: offered,
      offeredProtocolFeatures: offeredPf,
      pid: opts.pid ?? null,
      connections: opts.connections ?? 300,
      memo: new Map(),
    };
    const checks = (opts.checks ?? CHECKS).filter(
      (c) => opts.only === undefined || opts.only.some((p) => c.id.startsWith(p)),
    );
    const entries: CheckReportEntry[] = [];
    for (const c of checks) {
      const t0 = Date.now();
      let outcome;
      try {
        outcome = await c.run(ctx);
      } catch (err) {
        outcome = { result: "fail" as const, detail: errorText(err) };
      }
      const entry: CheckReportEntry = {
        id: c.id,
        section: c.section,
        spec: c.spec,
        title: c.title,
        result: outcome.result,
        detail: outcome.detail,
        ms: Date.now() - t0,
      };
      if (outcome.fact) entry.fact = true;
      entries.push(entry);
      opts.onCheck?.(entry);
    }
    const notes: string[] = [];
    if (asked === "auto") notes.push(`profile auto chose ${profile}`);
    if (target.spawned > 0) {
      const exits = target.exits.map((e) => (e.signal ? e.signal : `status ${e.code}`));
      notes.push(
        `the back-end was started ${target.spawned} time(s) with the --spawn command ` +
          `(exits: ${exits.length > 0 ? summarize(exits) : "none"})`,
      );
    }
    return {
      target: target.name,
      profile,
      offered: { features: hex(offered), protocolFeatures: hex(offeredPf) },
      offeredNames: {
        features: bitNames(offered, VirtioFeature),
        protocolFeatures: bitNames(offeredPf, ProtocolFeature),
      },
      checks: entries,
      summary: {
        pass: entries.filter((e) => e.result === "pass").length,
        fail: entries.filter((e) => e.result === "fail").length,
        na: entries.filter((e) => e.result === "n/a").length,
      },
      notes,
    };
  } finally {
    await target.stop();
    await second?.stop();
  }
}

function summarize(items: string[]): string {
  const counts = new Map<string, number>();
  for (const i of items) counts.set(i, (counts.get(i) ?? 0) + 1);
  return [...counts].map(([k, n]) => `${n} x ${k}`).join(", ");
}

/**
 * Render a report as text: a header with what is offered, one block per section (result, id,
 * detail), notes, and the summary line.
 * @param r the report
 * @returns the text
 */
export function formatReport(r: CheckReport): string {
  const out: string[] = [];
  out.push(`vhostkit check ${r.target} (profile ${r.profile})`);
  out.push(`  features          ${r.offered.features} (${r.offeredNames.features.join(",")})`);
  out.push(
    `  protocol features ${r.offered.protocolFeatures} (${r.offeredNames.protocolFeatures.join(",")})`,
  );
  const idW = Math.max(...r.checks.map((c) => c.id.length), 10);
  for (const section of SECTIONS) {
    const rows = r.checks.filter((c) => c.section === section);
    if (rows.length === 0) continue;
    out.push("");
    out.push(section);
    for (const c of rows) {
      const mark =
        c.result === "pass" ? (c.fact ? "FACT" : "PASS") : c.result === "fail" ? "FAIL" : "n/a ";
      out.push(`  ${mark}  ${c.id.padEnd(idW)}  ${c.detail}`);
    }
  }
  for (const n of r.notes) out.push(`note: ${n}`);
  out.push("");
  out.push(
    `${r.checks.length} checks: ${r.summary.pass} passed, ${r.summary.fail} failed, ` +
      `${r.summary.na} not applicable`,
  );
  return out.join("\n") + "\n";
}
