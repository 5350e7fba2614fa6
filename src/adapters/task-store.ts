/**
 * @module adapters/task-store — finds task folders in the task roots and loads them into the registry:
 * at start-up (every folder), on demand (a request names a task not loaded yet; concurrent requests share
 * one load) and explicitly (admin API, watcher). A folder that fails validation never replaces a serving
 * version. Paths are resolved with realpath and must stay inside a root (symlinks out are refused).
 */
import { existsSync, readdirSync, realpathSync, statSync } from "node:fs";
import { basename, join, relative, resolve, sep } from "node:path";
import { TaskmuxError } from "../errors.ts";
import { createLogger } from "../log.ts";
import type { ModelSpec } from "../model/model-spec.ts";
import { loadTaskFolder } from "./formats/task-folder.ts";
import type { TaskRef, TaskRegistry } from "./registry.ts";

const log = createLogger({ module: "task-store" });

export const TASK_NAME = /^[A-Za-z0-9._-]{1,64}$/;

export function isValidTaskName(name: string): boolean {
  return TASK_NAME.test(name) && !name.startsWith(".");
}

export interface TaskStoreOptions {
  roots: string[];
  maxLoraRank: number;
  maxBottleneckSize: number;
}

export class TaskStore {
  private readonly inFlight = new Map<string, Promise<TaskRef>>();
  /** Tasks removed through the API: not reloaded (watcher, on demand) until their folder changes. */
  private readonly tombstones = new Map<string, string>();
  readonly roots: string[];

  constructor(
    private readonly registry: TaskRegistry,
    private readonly spec: ModelSpec,
    private readonly options: TaskStoreOptions,
  ) {
    this.roots = options.roots.map((r) => resolve(r));
  }

  /** Resolve a path (absolute, or relative to a root) to a real directory inside a root, or throw. */
  resolveInsideRoots(path: string): string {
    const candidates = path.startsWith("/") ? [path] : this.roots.map((r) => join(r, path));
    for (const candidate of candidates) {
      if (!existsSync(candidate)) continue;
      const real = realpathSync(candidate);
      const insideRoot = this.roots.some((root) => {
        if (!existsSync(root)) return false;
        const rel = relative(realpathSync(root), real);
        return rel !== "" && !rel.startsWith("..") && !rel.startsWith(sep) && !rel.includes(`..${sep}`);
      });
      if (!insideRoot) {
        throw new TaskmuxError(
          "invalid_request",
          `path ${JSON.stringify(path)} resolves outside the task roots`,
          { param: "path" },
        );
      }
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
      if (existsSync(dir)) {
        try {
          return this.resolveInsideRoots(dir);
        } catch {
          return null;
        }
      }
    }
    return null;
  }

  /** Load (or replace) `name` from `dir`; publishes only a fully valid version. */
  load(name: string, dir: string): TaskRef {
    this.tombstones.delete(name);
    this.registry.markLoading(name);
    const started = performance.now();
    try {
      const parts = loadTaskFolder(dir, this.spec, this.options);
      const ref = this.registry.publish(name, parts, dir);
      log.info("task loaded", {
        task: name,
        version: ref.version,
        kinds: ref.kinds.join(","),
        ms: Math.round(performance.now() - started),
      });
      return ref;
    } catch (error) {
      const reason = (error as Error).message;
      this.registry.fail(name, reason);
      log.warn("task failed to load", { task: name, dir, reason });
      if (error instanceof TaskmuxError) throw error;
      throw new TaskmuxError("adapter_load_failed", `task ${name}: ${reason}`, { cause: error });
    }
  }

  /** Load every task folder in the roots (names starting with "." are never tasks). */
  loadAll(): { loaded: string[]; failed: string[] } {
    const loaded: string[] = [];
    const failed: string[] = [];
    for (const root of this.roots) {
      if (!existsSync(root)) continue;
      for (const entry of readdirSync(root, { withFileTypes: true })) {
        if (!isValidTaskName(entry.name) || !(entry.isDirectory() || entry.isSymbolicLink())) continue;
        if (this.registry.has(entry.name)) continue;
        const dir = this.locate(entry.name);
        if (!dir) continue;
        try {
          this.load(entry.name, dir);
          loaded.push(entry.name);
        } catch {
          failed.push(entry.name);
        }
      }
    }
    return { loaded, failed };
  }

  /** A request named a task that is not registered: load it from disk if it exists (one shared load). */
  loadOnDemand(name: string): Promise<TaskRef> {
    const pending = this.inFlight.get(name);
    if (pending) return pending;
    const dir = this.locate(name);
    if (!dir || this.tombstones.has(name)) {
      return Promise.reject(
        new TaskmuxError("task_not_found", `task ${JSON.stringify(name)} does not exist`, {
          param: "X-Task",
        }),
      );
    }
    const promise = Promise.resolve()
      .then(() => this.load(name, dir))
      .finally(() => this.inFlight.delete(name));
    this.inFlight.set(name, promise);
    return promise;
  }

  /** Unload: stop serving at once; remember not to bring it back until its folder changes. */
  unload(name: string, folderSignature = ""): boolean {
    this.tombstones.set(name, folderSignature);
    return this.registry.remove(name);
  }

  tombstoneOf(name: string): string | undefined {
    return this.tombstones.get(name);
  }

  clearTombstone(name: string): void {
    this.tombstones.delete(name);
  }

  static nameOf(dir: string): string {
    return basename(dir);
  }
}
