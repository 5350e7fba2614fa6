/**
 * @module adapters/watcher — keeps the registry in line with the task roots without polling delays:
 * fs.watch on each root (folders appearing, disappearing, renamed, exchanged) and on each task folder (files
 * written), a periodic rescan as the safety net for missed events. A name is synced through
 * TaskStore.syncFolder once it has been quiet for `debounceMs`: no event for it and no file in it modified
 * in that window (file mtimes count, so a folder written earlier and renamed into place loads at once).
 * A bad folder never evicts a good task (the store keeps the serving version and records the reason).
 */
import { type FSWatcher, readdirSync, statSync, watch } from "node:fs";
import { join } from "node:path";
import { createLogger } from "../log.ts";
import { type FolderSync, isValidTaskName, type TaskStore } from "./task-store.ts";

const log = createLogger({ module: "watcher" });

export interface TaskWatcherOptions {
  /** Quiet time before a changed folder is loaded (default 150 ms). */
  debounceMs?: number;
  /** Full rescan period, the safety net for missed events (default 5000 ms; 0 = none). */
  rescanIntervalMs?: number;
  /** Called after each sync (tests and metrics). */
  onSync?: (name: string, result: FolderSync) => void;
}

interface Watch {
  /** `dev:ino` of the watched directory: a different inode under the same path is watched afresh. */
  key: string;
  watcher: FSWatcher;
}

const inodeKey = (dir: string): string | null => {
  const st = statSync(dir, { throwIfNoEntry: false });
  return st?.isDirectory() ? `${st.dev}:${st.ino}` : null;
};

/** Newest mtime (ms) of a folder and its entries, ignoring times in the future (clock skew); 0 if none. */
function newestMtimeMs(dir: string | null, nowMs: number): number {
  if (!dir) return 0;
  let newest = 0;
  const consider = (path: string) => {
    const m = statSync(path, { throwIfNoEntry: false })?.mtimeMs ?? 0;
    if (m <= nowMs && m > newest) newest = m;
  };
  consider(dir);
  try {
    for (const entry of readdirSync(dir)) consider(join(dir, entry));
  } catch {
    // gone meanwhile: the sync will see it
  }
  return newest;
}

export class TaskWatcher {
  private readonly debounceMs: number;
  private readonly rescanIntervalMs: number;
  private readonly rootWatches = new Map<string, Watch>();
  private readonly folderWatches = new Map<string, Watch>();
  private readonly timers = new Map<string, NodeJS.Timeout>();
  /** Last event per name, Date.now() ms: "content" (a file in the folder) or "root" (the folder itself). */
  private readonly lastEventMs = new Map<string, { content: number; root: number }>();
  private rescanTimer: NodeJS.Timeout | null = null;
  private isRunning = false;

  constructor(
    private readonly store: TaskStore,
    private readonly options: TaskWatcherOptions = {},
  ) {
    this.debounceMs = options.debounceMs ?? 150;
    this.rescanIntervalMs = options.rescanIntervalMs ?? 5000;
  }

  start(): void {
    if (this.isRunning) return;
    this.isRunning = true;
    this.rescan();
    if (this.rescanIntervalMs > 0) {
      this.rescanTimer = setInterval(() => this.rescan(), this.rescanIntervalMs);
      this.rescanTimer.unref();
    }
    log.info("watching task roots", {
      roots: this.store.roots,
      debounceMs: this.debounceMs,
      rescanIntervalMs: this.rescanIntervalMs,
    });
  }

  stop(): void {
    this.isRunning = false;
    if (this.rescanTimer) clearInterval(this.rescanTimer);
    this.rescanTimer = null;
    for (const timer of this.timers.values()) clearTimeout(timer);
    this.timers.clear();
    for (const w of [...this.rootWatches.values(), ...this.folderWatches.values()]) w.watcher.close();
    this.rootWatches.clear();
    this.folderWatches.clear();
  }

  /** (Re)watch every root and folder; schedule each name whose folder differs from what the store last saw. */
  rescan(): void {
    if (!this.isRunning) return;
    for (const root of this.store.roots) this.watchRoot(root);
    for (const name of this.store.knownNames()) {
      this.watchFolder(name);
      if (!this.timers.has(name) && this.store.signatureOf(name) !== this.store.seenSignature(name)) {
        this.schedule(name, null);
      }
    }
  }

  /** Something happened to `name` (or a rescan saw a difference): sync it once it has been quiet for debounceMs. */
  private schedule(name: string, event: "content" | "root" | null): void {
    if (!this.isRunning) return;
    if (event) {
      const last = this.lastEventMs.get(name) ?? { content: 0, root: 0 };
      last[event] = Date.now();
      this.lastEventMs.set(name, last);
    }
    clearTimeout(this.timers.get(name));
    this.watchFolder(name);
    const timer = setTimeout(() => this.sync(name), this.quietWaitMs(name));
    timer.unref();
    this.timers.set(name, timer);
  }

  /**
   * How long until `name` has been quiet for debounceMs (0 = now), never more than debounceMs. A folder that is
   * there is quiet when no file event came and no file (nor the folder) was modified for debounceMs, so a folder
   * renamed into place after it was written loads at once. A folder that is gone must stay gone for debounceMs
   * after its last event (`mv x .old && mv .tmp-x x` never unloads x in between).
   */
  private quietWaitMs(name: string): number {
    const now = Date.now();
    const last = this.lastEventMs.get(name) ?? { content: 0, root: 0 };
    const dir = this.store.locate(name);
    const quietSince = dir
      ? Math.max(last.content, newestMtimeMs(dir, now))
      : Math.max(last.content, last.root);
    return Math.min(this.debounceMs, Math.max(0, quietSince + this.debounceMs - now));
  }

  private sync(name: string): void {
    this.timers.delete(name);
    if (!this.isRunning) return;
    if (this.quietWaitMs(name) > 0) {
      this.schedule(name, null);
      return;
    }
    let result: FolderSync;
    try {
      result = this.store.syncFolder(name);
    } catch (error) {
      log.error("task folder sync failed", { task: name, error: (error as Error).message });
      return;
    }
    this.lastEventMs.delete(name);
    this.watchFolder(name);
    if (result === "unsettled") {
      log.debug("task folder changed while loading; retrying", { task: name });
      this.schedule(name, "content");
    }
    this.options.onSync?.(name, result);
  }

  private watchRoot(root: string): void {
    const key = inodeKey(root);
    const existing = this.rootWatches.get(root);
    if (existing && existing.key === key) return;
    existing?.watcher.close();
    this.rootWatches.delete(root);
    if (!key) return;
    const watcher = this.open(root, (filename) => {
      if (filename === null) this.rescan();
      else if (isValidTaskName(filename)) this.schedule(filename, "root");
    });
    if (watcher) this.rootWatches.set(root, { key, watcher });
  }

  private watchFolder(name: string): void {
    const dir = this.store.locate(name);
    const key = dir ? inodeKey(dir) : null;
    const existing = this.folderWatches.get(name);
    if (existing && existing.key === key) return;
    existing?.watcher.close();
    this.folderWatches.delete(name);
    if (!dir || !key) return;
    const watcher = this.open(dir, () => this.schedule(name, "content"));
    if (watcher) this.folderWatches.set(name, { key, watcher });
  }

  /** fs.watch that never throws: on failure (inotify limits, a folder gone) the rescan covers it. */
  private open(dir: string, onEvent: (filename: string | null) => void): FSWatcher | null {
    try {
      const watcher = watch(dir, { persistent: false }, (_event, filename) =>
        onEvent(filename === null ? null : String(filename)),
      );
      watcher.on("error", () => {
        watcher.close();
        for (const map of [this.rootWatches, this.folderWatches])
          for (const [k, w] of map) if (w.watcher === watcher) map.delete(k);
      });
      return watcher;
    } catch (error) {
      log.warn("cannot watch; relying on the periodic rescan", { dir, reason: (error as Error).message });
      return null;
    }
  }
}
