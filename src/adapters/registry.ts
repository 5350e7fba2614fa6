/**
 * @module adapters/registry — task name -> immutable, refcounted TaskRef. A new version is published only
 * after it loaded completely; the version it replaces keeps serving the sequences that hold it and is freed
 * when the last one releases it (SGLang's lora_registry, LoRAX's AdapterStatus). Every transition is logged.
 */
import { createLogger } from "../log.ts";
import type { TaskParts } from "./formats/task-folder.ts";

const log = createLogger({ module: "registry" });

export type TaskStatus = "loading" | "ready" | "failed" | "draining";

export interface TaskRef {
  /** Unique per load (a reload gets a new id); pool slots are keyed by it. */
  readonly id: number;
  readonly name: string;
  readonly version: number;
  readonly parts: TaskParts;
  /** Folder (or URL) it was loaded from. */
  readonly source: string;
  readonly loadedAt: number;
  readonly kinds: readonly string[];
}

export interface TaskInfo {
  name: string;
  status: TaskStatus;
  version: number | null;
  kinds: readonly string[];
  source: string | null;
  error: string | null;
  runningSequences: number;
  /** False while its weights are offloaded (--max-host-adapters); the next request reloads them. */
  inHostMemory: boolean;
  lastUsedAt: number | null;
  loadedAt: number | null;
  /** Older versions still draining (held by running sequences). */
  drainingVersions: number;
}

interface Entry {
  current: TaskRef | null;
  status: TaskStatus;
  error: string | null;
  lastUsedAt: number | null;
  lastVersion: number;
  /** Weights dropped from host memory (--max-host-adapters): still registered, reloaded from here on use. */
  offloaded: { source: string; kinds: readonly string[]; loadedAt: number } | null;
}

/** Which kinds of customisation a task's parts carry (for /v1/models and /v1/tasks). */
export function kindsOf(parts: TaskParts): string[] {
  const kinds: string[] = [];
  if (parts.definition) kinds.push("prompt_template");
  if (parts.softPrompt)
    kinds.push(parts.softPrompt.source === "prompt_tuning" ? "prompt_tuning" : "p_tuning");
  if (parts.prefix) kinds.push("prefix_tuning");
  if (parts.lora) kinds.push("lora");
  if (parts.ia3) kinds.push("ia3");
  if (parts.bottleneck) kinds.push("bottleneck");
  return kinds;
}

export class TaskRegistry {
  private readonly entries = new Map<string, Entry>();
  private readonly holds = new Map<number, { ref: TaskRef; count: number; retired: boolean }>();
  private nextId = 1;
  /** Last version number of names removed from `entries`: versions keep counting up across unload/reload. */
  private readonly removedVersions = new Map<string, number>();
  /** Called once a retired version has no holder left: its memory (pool slots) may be freed. */
  onFree: (ref: TaskRef) => void = () => {};

  private entry(name: string): Entry {
    let e = this.entries.get(name);
    if (!e) {
      const lastVersion = this.removedVersions.get(name) ?? 0;
      e = { current: null, status: "loading", error: null, lastUsedAt: null, lastVersion, offloaded: null };
      this.entries.set(name, e);
    }
    return e;
  }

  markLoading(name: string): void {
    const e = this.entry(name);
    if (!e.current) this.transition(name, e, "loading");
  }

  /** Publish a fully loaded version; the previous one (if any) drains. */
  publish(name: string, parts: TaskParts, source: string): TaskRef {
    const e = this.entry(name);
    const ref: TaskRef = Object.freeze({
      id: this.nextId++,
      name,
      version: ++e.lastVersion,
      parts,
      source,
      loadedAt: Date.now(),
      kinds: kindsOf(parts),
    });
    const previous = e.current;
    e.current = ref;
    e.error = null;
    e.offloaded = null;
    this.holds.set(ref.id, { ref, count: 0, retired: false });
    this.transition(name, e, "ready", { version: ref.version, kinds: ref.kinds.join(",") });
    if (previous) this.retire(previous);
    return ref;
  }

  /** A load failed: record why; a version already serving keeps serving. */
  fail(name: string, reason: string): void {
    const e = this.entry(name);
    e.error = reason;
    if (!e.current) this.transition(name, e, "failed", { reason });
    else
      log.warn("task reload failed; the serving version stays", {
        task: name,
        version: e.current.version,
        reason,
      });
  }

  /** Unregister: new requests stop finding it at once; running sequences finish on their version. */
  remove(name: string): boolean {
    const e = this.entries.get(name);
    if (!e) return false;
    this.entries.delete(name);
    this.removedVersions.set(name, e.lastVersion);
    if (e.current) {
      log.info("task removed", { task: name, version: e.current.version });
      this.retire(e.current);
    }
    return e.current !== null || e.status === "failed";
  }

  has(name: string): boolean {
    const e = this.entries.get(name);
    return e?.current != null || e?.offloaded != null;
  }

  /**
   * Drop the serving version's weights from host memory: the task stays registered (listed, `has`), new
   * requests reload it from `offloadedSource` (acquire answers null meanwhile), running sequences finish
   * on the version they hold.
   */
  offload(name: string): boolean {
    const e = this.entries.get(name);
    if (!e?.current) return false;
    const ref = e.current;
    e.offloaded = { source: ref.source, kinds: ref.kinds, loadedAt: ref.loadedAt };
    e.current = null;
    log.info("task weights offloaded from host memory", { task: name, version: ref.version });
    this.retire(ref);
    return true;
  }

  offloadedSource(name: string): string | null {
    return this.entries.get(name)?.offloaded?.source ?? null;
  }

  current(name: string): TaskRef | null {
    return this.entries.get(name)?.current ?? null;
  }

  /** Take a hold on the serving version (null if none); pair every acquire with release. */
  acquire(name: string): TaskRef | null {
    const e = this.entries.get(name);
    if (!e?.current) return null;
    e.lastUsedAt = Date.now();
    this.holds.get(e.current.id)!.count++;
    return e.current;
  }

  release(ref: TaskRef): void {
    const hold = this.holds.get(ref.id);
    if (!hold) return;
    hold.count--;
    if (hold.count <= 0 && hold.retired) this.free(hold.ref);
  }

  private retire(ref: TaskRef): void {
    const hold = this.holds.get(ref.id);
    if (!hold) return;
    hold.retired = true;
    if (hold.count <= 0) this.free(ref);
    else log.info("task version draining", { task: ref.name, version: ref.version, running: hold.count });
  }

  private free(ref: TaskRef): void {
    this.holds.delete(ref.id);
    log.info("task version freed", { task: ref.name, version: ref.version });
    this.onFree(ref);
  }

  private transition(name: string, e: Entry, status: TaskStatus, fields: Record<string, unknown> = {}): void {
    if (e.status !== status) log.info("task status", { task: name, from: e.status, to: status, ...fields });
    e.status = status;
  }

  list(): TaskInfo[] {
    const drainingByName = new Map<string, number>();
    const runningByName = new Map<string, number>();
    for (const { ref, count, retired } of this.holds.values()) {
      runningByName.set(ref.name, (runningByName.get(ref.name) ?? 0) + count);
      if (retired) drainingByName.set(ref.name, (drainingByName.get(ref.name) ?? 0) + 1);
    }
    const names = new Set([...this.entries.keys(), ...drainingByName.keys()]);
    return [...names].sort().map((name) => {
      const e = this.entries.get(name);
      const c = e?.current ?? null;
      const off = e?.offloaded ?? null;
      return {
        name,
        status: e ? e.status : "draining",
        version: c?.version ?? (off ? e!.lastVersion : null),
        kinds: c?.kinds ?? off?.kinds ?? [],
        source: c?.source ?? off?.source ?? null,
        inHostMemory: c !== null,
        error: e?.error ?? null,
        runningSequences: runningByName.get(name) ?? 0,
        lastUsedAt: e?.lastUsedAt ?? null,
        loadedAt: c?.loadedAt ?? off?.loadedAt ?? null,
        drainingVersions: drainingByName.get(name) ?? 0,
      };
    });
  }

  /** Versions still held (serving or draining): a leak check for tests and metrics. */
  get numLiveVersions(): number {
    return this.holds.size;
  }
}
