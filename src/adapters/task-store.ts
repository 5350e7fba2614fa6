/**
 * @module adapters/task-store — finds task folders in the task roots and loads them into the registry:
 * at start-up (every folder), on demand (a request names a task not loaded yet; concurrent requests share
 * one load), explicitly (admin API) and when a folder changes (watcher.ts calls syncFolder). A folder that
 * fails validation never replaces a serving version. Paths are resolved with realpath and must stay inside a
 * root (symlinks out are refused). Each name remembers the folder signature it last acted on, so the watcher
 * reacts to changes only, and an unloaded task stays unloaded until its folder changes (tombstones).
 */
import { randomBytes } from "node:crypto";
import { existsSync, lstatSync, readdirSync, realpathSync, renameSync, rmSync, statSync } from "node:fs";
import { basename, isAbsolute, join, relative, resolve, sep } from "node:path";
import { LRUCache } from "lru-cache";
import { TaskmuxError } from "../errors.ts";
import { createLogger } from "../log.ts";
import type { ModelSpec } from "../model/model-spec.ts";
import { loadTaskFolder, type TaskLimits, type TaskParts } from "./formats/task-folder.ts";
import type { TaskRef, TaskRegistry } from "./registry.ts";

const log = createLogger({ module: "task-store" });

export const TASK_NAME = /^[A-Za-z0-9._-]{1,64}$/;

export function isValidTaskName(name: string): boolean {
  return TASK_NAME.test(name) && !name.startsWith(".");
}

/**
 * What a folder looks like now, as one string (null: no such directory): the directory's inode and each
 * entry's name, size, mtime and inode. Any write, rename, exchange or retargeted symlink changes it.
 */
export function folderSignature(dir: string): string | null {
  try {
    const st = statSync(dir);
    if (!st.isDirectory()) return null;
    const parts = [`${st.dev}:${st.ino}`];
    for (const entry of readdirSync(dir).sort()) {
      const s = statSync(join(dir, entry), { throwIfNoEntry: false });
      if (s) parts.push(`${entry}:${s.size}:${s.mtimeMs}:${s.ino}`);
    }
    return parts.join("|");
  } catch {
    return null;
  }
}

const isInside = (root: string, path: string): boolean => {
  const rel = relative(root, path);
  return rel !== "" && rel !== ".." && !rel.startsWith(`..${sep}`) && !isAbsolute(rel);
};

const outsideRoots = (path: string) =>
  new TaskmuxError("invalid_request", `path ${JSON.stringify(path)} resolves outside the task roots`, {
    param: "path",
  });

export interface TaskStoreOptions extends TaskLimits {
  roots: string[];
  /** Tasks whose weights stay in host memory; beyond it the least recently used are offloaded (0 = no limit). */
  maxHostAdapters?: number;
}

/** What syncFolder did: nothing changed, (re)loaded, rejected, unloaded, kept unloaded, or saw a folder still being written. */
export type FolderSync = "unchanged" | "loaded" | "failed" | "removed" | "tombstoned" | "unsettled";

/** Whether a task holds tensors worth bounding host memory for (a task.json alone costs nothing). */
function hasWeights(parts: TaskParts): boolean {
  return Boolean(parts.lora || parts.ia3 || parts.bottleneck || parts.softPrompt || parts.prefix);
}

export class TaskStore {
  private readonly inFlight = new Map<string, Promise<TaskRef>>();
  /** Tasks unloaded through the API -> their folder's signature then: not reloaded until it changes. */
  private readonly tombstones = new Map<string, string | null>();
  /** The signature of `<root>/<name>` when this store last loaded, failed or unloaded it. */
  private readonly seen = new Map<string, string | null>();
  /** Names whose serving version came from their own folder (unloaded when that folder disappears). */
  private readonly folderBacked = new Set<string>();
  /** The last rejection per name and the signature it was for (on-demand loads do not re-parse it). */
  private readonly failures = new Map<string, { signature: string | null; error: TaskmuxError }>();
  /** Tasks holding weights in host memory, least recently used first out (their eviction offloads them). */
  private readonly inHostMemory: LRUCache<string, true> | null;
  readonly roots: string[];

  constructor(
    private readonly registry: TaskRegistry,
    private readonly spec: ModelSpec,
    private readonly options: TaskStoreOptions,
  ) {
    this.roots = options.roots.map((r) => resolve(r));
    this.inHostMemory = options.maxHostAdapters
      ? new LRUCache<string, true>({
          max: options.maxHostAdapters,
          dispose: (_value, name, reason) => {
            if (reason === "evict") this.registry.offload(name);
          },
        })
      : null;
  }

  /** A request used `name`: it becomes the most recently used task in host memory. */
  touch(name: string): void {
    this.inHostMemory?.get(name);
  }

  /** Resolve a path (absolute, or relative to a root) to a real directory inside a root, or throw (400). */
  resolveInsideRoots(path: string): string {
    const candidates = isAbsolute(path) ? [resolve(path)] : this.roots.map((r) => resolve(r, path));
    const realRoots = this.roots.filter((r) => existsSync(r)).map((r) => realpathSync(r));
    // Lexical check first: `../../etc` is refused without looking at the filesystem.
    const lexical = candidates.filter((c) => [...this.roots, ...realRoots].some((root) => isInside(root, c)));
    if (lexical.length === 0) throw outsideRoots(path);
    for (const candidate of lexical) {
      if (!existsSync(candidate)) continue;
      const real = realpathSync(candidate);
      if (!realRoots.some((root) => isInside(root, real))) throw outsideRoots(path);
      if (!statSync(real).isDirectory()) {
        throw new TaskmuxError("invalid_request", `path ${JSON.stringify(path)} is not a task folder`, {
          param: "path",
        });
      }
      return real;
    }
    throw new TaskmuxError("invalid_request", `no task folder at ${JSON.stringify(path)} in the task roots`, {
      param: "path",
    });
  }

  /** The folder a task name refers to, if one exists in a root (first root wins). */
  locate(name: string): string | null {
    if (!isValidTaskName(name)) return null;
    for (const root of this.roots) {
      const dir = join(root, name);
      if (lstatSync(dir, { throwIfNoEntry: false })) {
        try {
          return this.resolveInsideRoots(dir);
        } catch {
          return null;
        }
      }
    }
    return null;
  }

  /** The signature of the folder `name` refers to now (null: none, or it resolves outside the roots). */
  signatureOf(name: string): string | null {
    const dir = this.locate(name);
    return dir ? folderSignature(dir) : null;
  }

  /** The signature this store last acted on for `name` (null: no folder, or never seen). */
  seenSignature(name: string): string | null {
    return this.seen.get(name) ?? null;
  }

  /** Names with a folder in some root (valid names only) and names this store has acted on. */
  knownNames(): string[] {
    const names = new Set<string>([...this.seen.keys(), ...this.folderBacked]);
    for (const root of this.roots) {
      if (!existsSync(root)) continue;
      for (const entry of readdirSync(root, { withFileTypes: true })) {
        if (isValidTaskName(entry.name) && (entry.isDirectory() || entry.isSymbolicLink()))
          names.add(entry.name);
      }
    }
    return [...names].sort();
  }

  /** Load (or replace) `name` from `dir`; publishes only a fully valid version. */
  load(name: string, dir: string): TaskRef {
    const signature = this.signatureOf(name);
    this.registry.markLoading(name);
    const started = performance.now();
    try {
      return this.publish(name, loadTaskFolder(dir, this.spec, this.options), dir, signature, started);
    } catch (error) {
      throw this.rejected(name, dir, error, signature);
    }
  }

  /** Load every task folder in the roots (names starting with "." are never tasks). */
  loadAll(): { loaded: string[]; failed: string[] } {
    const loaded: string[] = [];
    const failed: string[] = [];
    for (const name of this.knownNames()) {
      const dir = this.locate(name);
      if (!dir || this.registry.has(name) || this.isTombstoned(name)) continue;
      try {
        this.load(name, dir);
        loaded.push(name);
      } catch {
        failed.push(name);
      }
    }
    return { loaded, failed };
  }

  /** A request named a task that is not registered: load it from disk if it exists (one shared load). */
  loadOnDemand(name: string): Promise<TaskRef> {
    const pending = this.inFlight.get(name);
    if (pending) return pending;
    const dir = this.registry.offloadedSource(name) ?? this.locate(name);
    if (!dir || this.isTombstoned(name)) {
      return Promise.reject(
        new TaskmuxError("task_not_found", `task ${JSON.stringify(name)} does not exist`, {
          param: "X-Task",
        }),
      );
    }
    const failure = this.failures.get(name);
    if (failure && failure.signature === folderSignature(dir)) return Promise.reject(failure.error);
    const promise = Promise.resolve()
      .then(() => this.load(name, dir))
      .finally(() => this.inFlight.delete(name));
    this.inFlight.set(name, promise);
    return promise;
  }

  /**
   * Bring `name` in line with its folder (the watcher's one operation): load it when the folder is new or
   * changed, unload it when the folder is gone, leave it when nothing changed or it was unloaded explicitly.
   * A folder that changes while being parsed is "unsettled" (nothing recorded; try again later).
   */
  syncFolder(name: string): FolderSync {
    const dir = this.locate(name);
    const signature = dir ? folderSignature(dir) : null;
    if (signature === this.seenSignature(name)) return "unchanged";
    if (dir === null || signature === null) {
      this.folderGone(name);
      return "removed";
    }
    if (this.tombstones.has(name) && this.tombstones.get(name) === signature) {
      this.seen.set(name, signature);
      return "tombstoned";
    }
    const started = performance.now();
    let parts: TaskParts;
    try {
      parts = loadTaskFolder(dir, this.spec, this.options);
    } catch (error) {
      if (folderSignature(dir) !== signature) return "unsettled";
      this.rejected(name, dir, error, signature);
      return "failed";
    }
    if (folderSignature(dir) !== signature) return "unsettled";
    this.publish(name, parts, dir, signature, started);
    return "loaded";
  }

  /** Where a folder for `name` is installed: the root that holds one already, else the first root. */
  installRoot(name: string): string {
    return (
      this.roots.find((root) => lstatSync(join(root, name), { throwIfNoEntry: false })) ?? this.roots[0]!
    );
  }

  /**
   * Validate the folder `staged` (named `name`, on the same filesystem as `root`), move it into place as
   * `<root>/<name>` — the old folder is renamed aside first, then removed — and publish it.
   */
  install(name: string, staged: string, root = this.installRoot(name)): TaskRef {
    const started = performance.now();
    let parts: TaskParts;
    try {
      parts = loadTaskFolder(staged, this.spec, this.options);
    } catch (error) {
      throw this.rejected(name, staged, error, this.signatureOf(name));
    }
    const target = join(root, name);
    if (lstatSync(target, { throwIfNoEntry: false })) {
      const aside = join(root, `.replaced-${name}-${randomBytes(4).toString("hex")}`);
      renameSync(target, aside);
      try {
        renameSync(staged, target);
      } catch (error) {
        renameSync(aside, target);
        throw error;
      }
      rmSync(aside, { recursive: true, force: true });
    } else {
      renameSync(staged, target);
    }
    return this.publish(name, parts, realpathSync(target), this.signatureOf(name), started);
  }

  /** Unload: stop serving at once; remember not to bring it back until its folder changes. */
  unload(name: string): boolean {
    const signature = this.signatureOf(name);
    this.tombstones.set(name, signature);
    this.seen.set(name, signature);
    this.folderBacked.delete(name);
    this.failures.delete(name);
    return this.registry.remove(name);
  }

  /** The tombstone of a task unloaded through the API, while its folder is unchanged (else undefined). */
  tombstoneOf(name: string): string | null | undefined {
    return this.isTombstoned(name) ? this.tombstones.get(name) : undefined;
  }

  isTombstoned(name: string): boolean {
    return this.tombstones.has(name) && this.tombstones.get(name) === this.signatureOf(name);
  }

  clearTombstone(name: string): void {
    this.tombstones.delete(name);
  }

  static nameOf(dir: string): string {
    return basename(dir);
  }

  private publish(
    name: string,
    parts: TaskParts,
    source: string,
    signature: string | null,
    startedMs: number,
  ): TaskRef {
    this.tombstones.delete(name);
    this.failures.delete(name);
    this.seen.set(name, signature);
    const ref = this.registry.publish(name, parts, source);
    if (hasWeights(parts)) this.inHostMemory?.set(name, true);
    else this.inHostMemory?.delete(name);
    if (source === this.locate(name)) this.folderBacked.add(name);
    else this.folderBacked.delete(name);
    log.info("task loaded", {
      task: name,
      version: ref.version,
      kinds: ref.kinds.join(","),
      source,
      ms: Math.round(performance.now() - startedMs),
    });
    return ref;
  }

  /** Record a rejected load (the serving version, if any, stays) and return it as a typed error. */
  private rejected(name: string, dir: string, error: unknown, signature: string | null): TaskmuxError {
    const reason = (error as Error).message;
    const typed =
      error instanceof TaskmuxError
        ? error
        : new TaskmuxError("adapter_load_failed", `task ${name}: ${reason}`, { cause: error });
    this.seen.set(name, signature);
    this.failures.set(name, { signature, error: typed });
    this.registry.fail(name, reason);
    log.warn("task failed to load", { task: name, dir, reason });
    return typed;
  }

  /** The folder of `name` disappeared (or now resolves outside the roots): unload what it served. */
  private folderGone(name: string): void {
    this.seen.delete(name);
    this.failures.delete(name);
    const outside = this.roots.some((root) => lstatSync(join(root, name), { throwIfNoEntry: false }));
    if (outside) log.warn("task folder resolves outside the task roots; not followed", { task: name });
    if (this.registry.current(name) === null) {
      this.registry.remove(name);
      return;
    }
    if (!this.folderBacked.delete(name)) return;
    log.info("task folder removed; unloading", { task: name });
    this.registry.remove(name);
  }
}
