/** Tests for TaskWatcher on real folders: event-driven loads, debounce, completeness, replace, remove, safety nets. */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdirSync, readFileSync, renameSync, rmSync, symlinkSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterEach, describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { TaskRegistry } from "../../src/adapters/registry.ts";
import { type FolderSync, TaskStore } from "../../src/adapters/task-store.ts";
import { TaskWatcher } from "../../src/adapters/watcher.ts";
import { type Projection, projectionDims } from "../../src/model/contract.ts";
import type { FloatTensor } from "../../src/model/safetensors.ts";
import { safetensors, smallSpec, tempDir, tensor, writeFolder } from "./formats/fixtures.ts";

const spec = smallSpec();
const DEBOUNCE_MS = 150;

function loraFiles(seed: number) {
  const t: Record<string, FloatTensor> = {};
  for (const layer of [0, 1]) {
    for (const p of ["q_proj", "v_proj"] as Projection[]) {
      const { inDim, outDim } = projectionDims(spec, p);
      const key = `base_model.model.model.layers.${layer}.self_attn.${p}`;
      t[`${key}.lora_A.weight`] = tensor([2, inDim], (i) => Math.sin(i + seed));
      t[`${key}.lora_B.weight`] = tensor([outDim, 2], (i) => Math.cos(i * seed));
    }
  }
  return {
    "adapter_config.json": { peft_type: "LORA", r: 2, lora_alpha: 4, target_modules: ["q_proj", "v_proj"] },
    "adapter_model.safetensors": safetensors(t),
  };
}

/** Write a folder and age its files past the debounce window (as a folder prepared earlier would be). */
function writeAged(root: string, name: string, seed: number): string {
  const dir = writeFolder(root, name, loraFiles(seed));
  const past = new Date(Date.now() - 10_000);
  for (const f of ["adapter_config.json", "adapter_model.safetensors", "."])
    utimesSync(join(dir, f), past, past);
  return dir;
}

/** renameat2(RENAME_EXCHANGE) through python's ctypes; false where unavailable. */
function exchange(a: string, b: string): boolean {
  const script =
    "import ctypes,sys; libc=ctypes.CDLL(None, use_errno=True); f=libc.renameat2; " +
    "sys.exit(0 if f(-100, sys.argv[1].encode(), -100, sys.argv[2].encode(), 2) == 0 else 1)";
  return spawnSync("python3", ["-c", script, a, b]).status === 0;
}

const stops: (() => void)[] = [];
afterEach(() => {
  for (const stop of stops.splice(0)) stop();
});

function setup(options: { rescanIntervalMs?: number; roots?: string[] } = {}) {
  const roots = options.roots ?? [tempDir()];
  const registry = new TaskRegistry();
  const store = new TaskStore(registry, spec, { roots, maxLoraRank: 8, maxBottleneckSize: 16 });
  store.loadAll();
  const syncs: [string, FolderSync][] = [];
  const watcher = new TaskWatcher(store, {
    debounceMs: DEBOUNCE_MS,
    rescanIntervalMs: options.rescanIntervalMs ?? 0,
    onSync: (name, result) => syncs.push([name, result]),
  });
  stops.push(() => watcher.stop());
  return { root: roots[0]!, registry, store, watcher, syncs };
}

async function waitFor(what: string, predicate: () => boolean, timeoutMs = 3000): Promise<number> {
  const started = performance.now();
  while (!predicate()) {
    if (performance.now() - started > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms: ${what}`);
    await sleep(5);
  }
  return performance.now() - started;
}

describe("task watcher", () => {
  test("a prepared folder renamed into place loads from the event, without waiting for a rescan", async () => {
    const { root, registry, watcher } = setup();
    watcher.start();
    writeAged(root, ".tmp-fresh", 1);
    await sleep(50);
    assert.equal(registry.has("fresh"), false, "dot-folders are never tasks");
    renameSync(join(root, ".tmp-fresh"), join(root, "fresh"));
    const ms = await waitFor("fresh loaded", () => registry.has("fresh"));
    assert.ok(ms < 1000, `took ${ms} ms`);
  });

  test("a folder written in place is loaded once, complete, after the writes go quiet", async () => {
    const { root, registry, watcher, syncs } = setup();
    watcher.start();
    const files = loraFiles(3);
    const dir = join(root, "inplace");
    mkdirSync(dir);
    writeFileSync(join(dir, "adapter_config.json"), JSON.stringify(files["adapter_config.json"]));
    const weights = files["adapter_model.safetensors"];
    for (let cut = 64; cut < weights.length; cut += 64) {
      writeFileSync(join(dir, "adapter_model.safetensors"), weights.subarray(0, cut)); // still being written
      await sleep(DEBOUNCE_MS / 5);
    }
    writeFileSync(join(dir, "adapter_model.safetensors"), weights);
    await waitFor("inplace loaded", () => registry.has("inplace"));
    await sleep(DEBOUNCE_MS * 2);
    assert.equal(registry.current("inplace")?.version, 1, "never published half-written");
    assert.deepEqual(
      syncs.filter(([, r]) => r === "failed"),
      [],
    );
  });

  test("a truncated file left alone is reported; the serving version stays until the fix lands", async () => {
    const { root, registry, watcher, syncs } = setup();
    writeAged(root, "t", 1);
    watcher.start();
    await waitFor("t loaded", () => registry.has("t"));
    const file = join(root, "t", "adapter_model.safetensors");
    const good = readFileSync(file);
    writeFileSync(file, good.subarray(0, good.length - 10));
    await waitFor("failure reported", () => syncs.some(([n, r]) => n === "t" && r === "failed"));
    const info = registry.list().find((x) => x.name === "t")!;
    assert.equal(info.version, 1);
    assert.equal(info.status, "ready");
    assert.match(info.error ?? "", /adapter_model\.safetensors/);
    writeFileSync(file, loraFiles(2)["adapter_model.safetensors"]);
    await waitFor("v2", () => registry.current("t")?.version === 2);
    assert.equal(registry.list().find((x) => x.name === "t")!.error, null);
  });

  test("an exchanged or re-renamed folder replaces the task; a removed folder unloads it", async () => {
    const { root, registry, watcher } = setup();
    writeAged(root, "swap", 1);
    watcher.start();
    await waitFor("v1", () => registry.current("swap")?.version === 1);
    writeAged(root, ".tmp-swap", 2);
    if (!exchange(join(root, ".tmp-swap"), join(root, "swap"))) {
      renameSync(join(root, "swap"), join(root, ".old-swap"));
      renameSync(join(root, ".tmp-swap"), join(root, "swap"));
    }
    await waitFor("v2", () => registry.current("swap")?.version === 2);
    rmSync(join(root, "swap"), { recursive: true });
    await waitFor("unloaded", () => !registry.has("swap"));
    assert.equal(registry.numLiveVersions, 0);
  });

  test("a folder moved aside and replaced a moment later is never unloaded in between", async () => {
    const { root, registry, watcher, syncs } = setup();
    writeAged(root, "gap", 1);
    watcher.start();
    await waitFor("v1", () => registry.current("gap")?.version === 1);
    writeAged(root, ".tmp-gap", 2);
    renameSync(join(root, "gap"), join(root, ".old-gap"));
    await sleep(DEBOUNCE_MS / 3);
    assert.equal(registry.current("gap")?.version, 1, "still serving while the folder is briefly gone");
    renameSync(join(root, ".tmp-gap"), join(root, "gap"));
    await waitFor("v2", () => registry.current("gap")?.version === 2);
    assert.deepEqual(
      syncs.filter(([n, r]) => n === "gap" && r === "removed"),
      [],
    );
  });

  test("a symlink that points outside the roots is never followed", async () => {
    const outside = tempDir();
    writeAged(outside, "secret", 1);
    const { root, registry, watcher, syncs } = setup();
    watcher.start();
    symlinkSync(join(outside, "secret"), join(root, "secret"));
    await sleep(DEBOUNCE_MS * 3);
    assert.equal(registry.has("secret"), false);
    assert.deepEqual(
      syncs.filter(([, r]) => r === "loaded"),
      [],
    );
  });

  test("an unloaded task is not brought back by the watcher until its folder changes", async () => {
    const { root, registry, store, watcher } = setup();
    writeAged(root, "keep-off", 1);
    watcher.start();
    await waitFor("loaded", () => registry.has("keep-off"));
    store.unload("keep-off");
    watcher.rescan();
    await sleep(DEBOUNCE_MS * 2);
    assert.equal(registry.has("keep-off"), false);
    writeFileSync(join(root, "keep-off", "notes.txt"), "retrained");
    await waitFor("reloaded after a change", () => registry.has("keep-off"));
  });

  test("the start-up rescan picks up folders that appeared before the watches existed", async () => {
    const { root, registry, watcher } = setup();
    writeAged(root, "early", 1);
    assert.equal(registry.has("early"), false);
    watcher.start();
    await waitFor("early loaded", () => registry.has("early"));
  });

  test("the periodic rescan catches what no watch could see (a root created after start)", async () => {
    const root = join(tempDir(), "created-later");
    const { registry, watcher } = setup({ rescanIntervalMs: 100, roots: [root] });
    watcher.start();
    mkdirSync(root);
    writeAged(root, "late", 1);
    await waitFor("late loaded", () => registry.has("late"));
    writeAged(root, ".tmp-later", 2);
    renameSync(join(root, ".tmp-later"), join(root, "later"));
    await waitFor("the root is watched from then on", () => registry.has("later"));
  });
});
