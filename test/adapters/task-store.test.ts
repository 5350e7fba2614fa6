/** Tests for TaskStore: start-up scan, path resolution inside the roots, on-demand loads, syncFolder, tombstones, install. */
import assert from "node:assert/strict";
import { mkdirSync, renameSync, rmSync, symlinkSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { TaskRegistry } from "../../src/adapters/registry.ts";
import { folderSignature, isValidTaskName, TaskStore } from "../../src/adapters/task-store.ts";
import { TaskmuxError } from "../../src/errors.ts";
import { type Projection, projectionDims } from "../../src/model/contract.ts";
import type { FloatTensor } from "../../src/model/safetensors.ts";
import { safetensors, smallSpec, tempDir, tensor, writeFolder } from "./formats/fixtures.ts";

const spec = smallSpec();
const limits = { maxLoraRank: 8, maxBottleneckSize: 16 };

/** A PEFT LoRA folder (r = 2 on q and v) for smallSpec whose weights depend on `seed`. */
function writeLora(root: string, name: string, seed = 1): string {
  const t: Record<string, FloatTensor> = {};
  for (const layer of [0, 1]) {
    for (const p of ["q_proj", "v_proj"] as Projection[]) {
      const { inDim, outDim } = projectionDims(spec, p);
      const key = `base_model.model.model.layers.${layer}.self_attn.${p}`;
      t[`${key}.lora_A.weight`] = tensor([2, inDim], (i) => Math.sin(i + seed));
      t[`${key}.lora_B.weight`] = tensor([outDim, 2], (i) => Math.cos(i * seed));
    }
  }
  return writeFolder(root, name, {
    "adapter_config.json": { peft_type: "LORA", r: 2, lora_alpha: 4, target_modules: ["q_proj", "v_proj"] },
    "adapter_model.safetensors": safetensors(t),
  });
}

function makeStore(roots: string[]) {
  const registry = new TaskRegistry();
  const store = new TaskStore(registry, spec, { roots, ...limits });
  return { registry, store };
}

function assertTaskmuxError(fn: () => unknown, type: string, pattern: RegExp) {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof TaskmuxError, String(e));
    assert.equal(e.type, type, e.message);
    assert.match(e.message, pattern);
    return true;
  });
}

describe("task store", () => {
  test("task names: letters, digits, . _ - up to 64, never starting with a dot", () => {
    for (const ok of ["a", "lora-1", "A.b_c", "x".repeat(64)]) assert.ok(isValidTaskName(ok), ok);
    for (const bad of ["", ".", "..", ".tmp-x", "a/b", "a b", "x".repeat(65), "é"])
      assert.ok(!isValidTaskName(bad), bad);
  });

  test("loadAll loads every folder of every root, skipping dot-folders and recording failures", () => {
    const [a, b] = [tempDir(), tempDir()];
    writeLora(a, "one");
    writeLora(b, "two");
    writeLora(a, ".tmp-three");
    writeFolder(b, "broken", { "adapter_config.json": "{not json" });
    const { registry, store } = makeStore([a, b]);
    const result = store.loadAll();
    assert.deepEqual(result, { loaded: ["one", "two"], failed: ["broken"] });
    assert.deepEqual(
      registry.list().map((t) => [t.name, t.status]),
      [
        ["broken", "failed"],
        ["one", "ready"],
        ["two", "ready"],
      ],
    );
  });

  test("resolveInsideRoots accepts folders inside a root and refuses traversal, escaping symlinks and files", () => {
    const root = tempDir();
    const outside = tempDir();
    const dir = writeLora(root, "inside");
    writeLora(outside, "secret");
    symlinkSync(join(outside, "secret"), join(root, "escape"));
    symlinkSync(dir, join(root, "alias"));
    writeFileSync(join(root, "file.txt"), "x");
    const { store } = makeStore([root]);
    assert.equal(store.resolveInsideRoots("inside"), dir);
    assert.equal(store.resolveInsideRoots(dir), dir);
    assert.equal(store.resolveInsideRoots("alias"), dir);
    assertTaskmuxError(
      () => store.resolveInsideRoots("../../etc"),
      "invalid_request",
      /outside the task roots/,
    );
    assertTaskmuxError(() => store.resolveInsideRoots("/etc"), "invalid_request", /outside the task roots/);
    assertTaskmuxError(() => store.resolveInsideRoots(join(outside, "secret")), "invalid_request", /outside/);
    assertTaskmuxError(() => store.resolveInsideRoots("escape"), "invalid_request", /outside the task roots/);
    assertTaskmuxError(() => store.resolveInsideRoots("."), "invalid_request", /outside the task roots/);
    assertTaskmuxError(() => store.resolveInsideRoots("file.txt"), "invalid_request", /not a task folder/);
    assertTaskmuxError(() => store.resolveInsideRoots("missing"), "invalid_request", /no task folder/);
    assert.equal(store.locate("escape"), null, "a symlink out of the roots is never followed");
  });

  test("ten concurrent on-demand loads share one load", async () => {
    const root = tempDir();
    writeLora(root, "lazy");
    const { registry, store } = makeStore([root]);
    let publishes = 0;
    const publish = registry.publish.bind(registry);
    registry.publish = (...args) => {
      publishes++;
      return publish(...args);
    };
    const refs = await Promise.all(Array.from({ length: 10 }, () => store.loadOnDemand("lazy")));
    assert.equal(publishes, 1);
    assert.ok(refs.every((r) => r === refs[0]));
    await assert.rejects(store.loadOnDemand("nope"), (e: TaskmuxError) => e.type === "task_not_found");
  });

  test("a broken folder is not parsed again on demand until it changes", async () => {
    const root = tempDir();
    const dir = writeLora(root, "bad");
    truncateSync(join(dir, "adapter_model.safetensors"), 40);
    const { store } = makeStore([root]);
    await assert.rejects(store.loadOnDemand("bad"), (e: TaskmuxError) => e.type === "adapter_load_failed");
    const signature = folderSignature(dir);
    await assert.rejects(store.loadOnDemand("bad"), /adapter_model.safetensors/);
    assert.equal(folderSignature(dir), signature);
    writeLora(root, "bad");
    assert.equal((await store.loadOnDemand("bad")).version, 1);
  });

  test("syncFolder loads new folders, reloads changed ones, keeps serving on a bad one and unloads removed ones", () => {
    const root = tempDir();
    const { registry, store } = makeStore([root]);
    assert.equal(store.syncFolder("t"), "unchanged");
    writeLora(root, "t", 1);
    assert.equal(store.syncFolder("t"), "loaded");
    assert.equal(store.syncFolder("t"), "unchanged");
    writeLora(root, "t", 2);
    assert.equal(store.syncFolder("t"), "loaded");
    assert.equal(registry.current("t")?.version, 2);
    truncateSync(join(root, "t", "adapter_model.safetensors"), 100);
    assert.equal(store.syncFolder("t"), "failed");
    const info = registry.list().find((t) => t.name === "t")!;
    assert.equal(info.status, "ready");
    assert.equal(info.version, 2, "the serving version stays");
    assert.match(info.error ?? "", /adapter_model\.safetensors/);
    rmSync(join(root, "t"), { recursive: true });
    assert.equal(store.syncFolder("t"), "removed");
    assert.equal(registry.has("t"), false);
    assert.equal(registry.numLiveVersions, 0);
  });

  test("an unloaded task stays unloaded until its folder changes", async () => {
    const root = tempDir();
    writeLora(root, "gone", 1);
    const { registry, store } = makeStore([root]);
    store.loadAll();
    assert.equal(store.unload("gone"), true);
    assert.equal(registry.has("gone"), false);
    assert.notEqual(store.tombstoneOf("gone"), undefined);
    assert.equal(store.syncFolder("gone"), "unchanged");
    await assert.rejects(store.loadOnDemand("gone"), (e: TaskmuxError) => e.type === "task_not_found");
    writeFileSync(join(root, "gone", "README.md"), "changed");
    assert.equal(store.tombstoneOf("gone"), undefined, "a changed folder lifts the tombstone");
    assert.equal(store.syncFolder("gone"), "loaded");
    assert.equal(registry.current("gone")?.version, 2);
  });

  test("a task loaded from another folder is not unloaded when its own name's folder is absent", () => {
    const root = tempDir();
    const dir = writeLora(root, "weights-v7");
    const { registry, store } = makeStore([root]);
    store.load("alias", store.resolveInsideRoots("weights-v7"));
    assert.equal(registry.current("alias")?.source, dir);
    assert.equal(store.syncFolder("alias"), "unchanged");
    assert.equal(registry.has("alias"), true);
  });

  test("install validates a staged folder, replaces the live one by renaming and publishes it", () => {
    const root = tempDir();
    writeLora(root, "live", 1);
    const { registry, store } = makeStore([root]);
    store.loadAll();
    const staging = join(root, ".incoming-live-1");
    mkdirSync(staging);
    const staged = writeLora(staging, "live", 2);
    const ref = store.install("live", staged);
    assert.equal(ref.version, 2);
    assert.equal(ref.source, join(root, "live"));
    assert.equal(store.syncFolder("live"), "unchanged", "the watcher has nothing left to do");
    const bad = writeFolder(staging, "live", { "adapter_config.json": { peft_type: "LORA", r: 99 } });
    assert.throws(
      () => store.install("live", bad),
      (e: TaskmuxError) => e.type === "adapter_load_failed",
    );
    assert.equal(registry.current("live")?.version, 2);
    renameSync(join(root, "live"), join(root, ".old"));
    assert.equal(store.syncFolder("live"), "removed");
  });
});
