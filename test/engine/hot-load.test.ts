/**
 * Hot-loading acceptance on the real tiny-model stack (in-process, real watcher, real admin routes):
 *
 * - Under a steady stream of concurrent requests over several tasks, task folders are added (`.tmp-x` -> `x`),
 *   replaced (renameat2 exchange, or move-aside + rename) and removed, and the admin API loads, unloads and
 *   reloads tasks. No request fails except with 404 task_not_found while its task was removed, and every
 *   output equals the greedy output of a version that was serving at some instant between the request's
 *   start and its end (expected outputs per weight set are computed first, each version run alone).
 * - Ten concurrent requests for a task on disk but not loaded share one load.
 * - 200 load / replace / unload cycles of a LoRA free what they held: live versions and pool slots return to
 *   baseline, and after GC array-buffer memory and RSS barely grow.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { renameSync, rmSync, utimesSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import type { Hono } from "hono";
import type { TaskParts } from "../../src/adapters/formats/task-folder.ts";
import { TaskWatcher } from "../../src/adapters/watcher.ts";
import { adminRoutes } from "../../src/http/admin.ts";
import { createApp } from "../../src/http/app.ts";
import type { AppEnv } from "../../src/http/deps.ts";
import type { ModelSpec } from "../../src/model/model-spec.ts";
import { makeTaskRoot, writeLoraTask } from "../helpers/task-fixtures.ts";
import { startTestStack, type TestStack } from "../helpers/tiny-model.ts";

const LOOPBACK = { incoming: { socket: { remoteAddress: "127.0.0.1" } } };
const PROMPTS = ["Once upon a time", "The little dog", "In a far away land", "She said hello"];
const MAX_TOKENS = 6;
/** One LoRA weight set per seed; a task version is one of them. */
const SEEDS = [101, 102, 103, 104, 105, 106];

type App = Hono<AppEnv>;

/** A weight set's fingerprint, as found in the parts the registry publishes. */
const fingerprint = (parts: TaskParts): string => {
  const first = [...(parts.lora?.modules.values() ?? [])][0];
  return first ? Array.from(first.a.subarray(0, 4)).join(",") : "none";
};

/** renameat2(RENAME_EXCHANGE) through python's ctypes; false where unavailable. */
function exchange(a: string, b: string): boolean {
  const script =
    "import ctypes,sys; libc=ctypes.CDLL(None, use_errno=True); f=libc.renameat2; " +
    "sys.exit(0 if f(-100, sys.argv[1].encode(), -100, sys.argv[2].encode(), 2) == 0 else 1)";
  return spawnSync("python3", ["-c", script, a, b]).status === 0;
}

async function waitFor(what: string, predicate: () => boolean, timeoutMs = 5000): Promise<void> {
  const started = Date.now();
  while (!predicate()) {
    if (Date.now() - started > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms: ${what}`);
    await sleep(5);
  }
}

interface Outcome {
  task: string;
  prompt: number;
  startMs: number;
  endMs: number;
  status: number;
  text?: string;
  errorType?: string;
}

describe("hot-loading under load", () => {
  let stack: TestStack;
  let spec: ModelSpec;
  let app: App;
  let prompts: { root: string; cleanup: () => void };
  let adapters: { root: string; cleanup: () => void };
  /** per task name: [time, seed index or null (removed)], in order */
  const timeline = new Map<string, [number, number | null][]>();
  const seedOf = new Map<string, number>();
  /** expected[seed index][prompt index] = greedy text */
  const expected: string[][] = [];

  /** Write a LoRA folder for seed index `s`, files aged as if prepared earlier. */
  const writeSet = (root: string, name: string, s: number) => {
    const { dir } = writeLoraTask(root, name, spec, {
      r: 4,
      alpha: 8,
      targets: ["q_proj", "k_proj", "v_proj", "o_proj"],
      seed: SEEDS[s]!,
      bStd: 0.6,
    });
    const past = new Date(Date.now() - 5000);
    for (const f of ["adapter_config.json", "adapter_model.safetensors", "."])
      utimesSync(join(dir, f), past, past);
    return dir;
  };

  const complete = async (task: string, prompt: number): Promise<Outcome> => {
    const startMs = performance.now();
    const res = await app.request(
      "/v1/completions",
      {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-Task": task },
        body: JSON.stringify({
          prompt: PROMPTS[prompt],
          max_tokens: MAX_TOKENS,
          temperature: 0,
          ignore_eos: true,
        }),
      },
      LOOPBACK,
    );
    const json = (await res.json()) as { choices?: { text: string }[]; error?: { type: string } };
    return {
      task,
      prompt,
      startMs,
      endMs: performance.now(),
      status: res.status,
      text: json.choices?.[0]?.text,
      errorType: json.error?.type,
    };
  };

  const admin = async (method: string, path: string, body?: unknown) => {
    const res = await app.request(
      path,
      {
        method,
        headers: { "Content-Type": "application/json" },
        body: body ? JSON.stringify(body) : undefined,
      },
      LOOPBACK,
    );
    assert.equal(res.status, 200, `${method} ${path}: ${await res.clone().text()}`);
    return res;
  };

  before(async () => {
    prompts = makeTaskRoot("taskmux-prompt-tables-");
    adapters = makeTaskRoot("taskmux-adapters-");
    stack = await startTestStack({ taskRoots: [prompts.root, adapters.root], residentSlots: 8 });
    spec = stack.model.info.spec;
    const t = stack.tasks!;
    app = createApp({
      service: stack.service,
      routes: [
        adminRoutes({
          registry: t.registry,
          store: t.store,
          residency: t.residency,
          remote: { allowHosts: [], maxBytes: 1 << 20 },
        }),
      ],
    });
    const publish = t.registry.publish.bind(t.registry);
    t.registry.publish = (name, parts, source) => {
      const ref = publish(name, parts, source);
      const list = timeline.get(name) ?? [];
      list.push([performance.now(), seedOf.get(fingerprint(parts)) ?? -1]);
      timeline.set(name, list);
      return ref;
    };
    const remove = t.registry.remove.bind(t.registry);
    t.registry.remove = (name) => {
      timeline.get(name)?.push([performance.now(), null]);
      return remove(name);
    };
  });
  after(async () => {
    await stack.dispose();
    prompts.cleanup();
    adapters.cleanup();
  });

  test("each weight set run alone gives its own greedy outputs (the expectations)", async () => {
    const { store, registry } = stack.tasks!;
    for (let s = 0; s < SEEDS.length; s++) {
      const dir = writeSet(adapters.root, `probe-${s}`, s);
      const ref = store.load(`probe-${s}`, dir);
      seedOf.set(fingerprint(ref.parts), s);
      expected.push([]);
      for (let p = 0; p < PROMPTS.length; p++) {
        const r = await complete(`probe-${s}`, p);
        assert.equal(r.status, 200);
        expected[s]!.push(r.text!);
      }
      store.unload(`probe-${s}`);
      rmSync(dir, { recursive: true });
    }
    for (let p = 0; p < PROMPTS.length; p++) {
      const texts = new Set(expected.map((e) => e[p]));
      assert.ok(
        texts.size >= SEEDS.length - 1,
        `prompt ${p}: weight sets should be told apart by their outputs`,
      );
    }
    assert.equal(registry.numLiveVersions, 0);
  });

  test("ten concurrent requests for a task on disk share one load", async () => {
    writeSet(adapters.root, "lazy", 0);
    const results = await Promise.all(Array.from({ length: 10 }, () => complete("lazy", 1)));
    assert.deepEqual(
      results.map((r) => r.status),
      Array(10).fill(200),
    );
    assert.ok(results.every((r) => r.text === expected[0]![1]));
    assert.equal(timeline.get("lazy")?.length, 1, "one load");
    stack.tasks!.store.unload("lazy");
  });

  test("adds, replaces and removals under a steady stream of requests: no failures, every output from a serving version", async (t) => {
    const { registry, store } = stack.tasks!;
    const A = prompts.root;
    const B = adapters.root;
    writeSet(B, "alpha", 0);
    writeSet(B, "beta", 1);
    writeSet(A, "gamma", 2);
    store.loadAll();
    const watcher = new TaskWatcher(store, { rescanIntervalMs: 1000 });
    watcher.start();
    const tasks = ["alpha", "beta", "gamma", "delta"];
    const outcomes: Outcome[] = [];
    let running = true;
    const clients = Array.from({ length: 8 }, async (_, c) => {
      for (let i = 0; running; i++)
        outcomes.push(await complete(tasks[(c + i) % 4]!, (c * 3 + i) % PROMPTS.length));
    });
    const phase = (ms = 250) => sleep(ms);
    try {
      await phase();
      // add: prepared under a dot-name, renamed into place
      writeSet(B, ".tmp-delta", 3);
      renameSync(join(B, ".tmp-delta"), join(B, "delta"));
      await waitFor("delta added", () => registry.has("delta"));
      await phase();
      // replace alpha atomically (exchange), or by move-aside + rename where renameat2 is unavailable
      writeSet(B, ".tmp-alpha", 4);
      if (!exchange(join(B, ".tmp-alpha"), join(B, "alpha"))) {
        renameSync(join(B, "alpha"), join(B, ".old-alpha"));
        renameSync(join(B, ".tmp-alpha"), join(B, "alpha"));
      }
      await waitFor("alpha replaced", () => registry.current("alpha")?.version === 2);
      await phase();
      // replace beta by move-aside + rename
      writeSet(B, ".tmp-beta", 5);
      renameSync(join(B, "beta"), join(B, ".old-beta"));
      renameSync(join(B, ".tmp-beta"), join(B, "beta"));
      await waitFor("beta replaced", () => registry.current("beta")?.version === 2);
      await phase();
      // admin: load gamma from another folder, unload delta, remove beta's folder
      writeSet(A, "gamma-v2", 0);
      await admin("PUT", "/v1/tasks/gamma", { path: "gamma-v2" });
      await phase();
      await admin("DELETE", "/v1/tasks/delta");
      await phase();
      rmSync(join(B, "beta"), { recursive: true });
      await waitFor("beta removed", () => !registry.has("beta"));
      await phase();
      // admin: bring delta back, load alpha through vLLM's alias, and re-add beta by rename
      await admin("PUT", "/v1/tasks/delta", { path: "delta" });
      await admin("POST", "/v1/load_lora_adapter", { lora_name: "alpha", lora_path: join(A, "gamma-v2") });
      writeSet(B, ".tmp-beta", 1);
      renameSync(join(B, ".tmp-beta"), join(B, "beta"));
      await waitFor("beta re-added", () => registry.has("beta"));
      await phase();
    } finally {
      running = false;
      await Promise.all(clients);
      watcher.stop();
    }

    const stateAt = (name: string, ms: number): (number | null)[] => {
      const events = timeline.get(name) ?? [];
      let current: number | null = null;
      for (const [t, s] of events) if (t <= ms) current = s;
      return [current];
    };
    const candidates = (o: Outcome) => [
      ...stateAt(o.task, o.startMs),
      ...(timeline.get(o.task) ?? []).filter(([t]) => t > o.startMs && t <= o.endMs).map(([, s]) => s),
    ];
    const problems: string[] = [];
    const served = new Map<string, Set<number>>();
    for (const o of outcomes) {
      const c = candidates(o);
      if (o.status === 200) {
        const match = c.find((s) => s !== null && expected[s]?.[o.prompt] === o.text);
        if (match === undefined)
          problems.push(`${o.task}/${o.prompt}: ${JSON.stringify(o.text)} from none of ${c}`);
        else served.set(o.task, (served.get(o.task) ?? new Set()).add(match!));
      } else if (!(o.status === 404 && o.errorType === "task_not_found" && c.includes(null))) {
        problems.push(`${o.task}/${o.prompt}: ${o.status} ${o.errorType} while serving ${c}`);
      }
    }
    const count = (f: (o: Outcome) => boolean) => outcomes.filter(f).length;
    t.diagnostic(
      `${outcomes.length} requests, ${count((o) => o.status === 200)} ok, ${count((o) => o.status === 404)} 404 after removal; ` +
        `weight sets served: ${[...served].map(([k, v]) => `${k}=${[...v].join("/")}`).join(" ")}`,
    );
    assert.deepEqual(problems, [], `${problems.length} bad of ${outcomes.length}`);
    assert.ok(outcomes.length > 50, `only ${outcomes.length} requests`);
    assert.ok((served.get("alpha")?.size ?? 0) >= 2, "alpha served more than one version");
    assert.ok((served.get("beta")?.size ?? 0) >= 2, "beta served more than one version");
    assert.ok(
      outcomes.some((o) => o.task === "delta" && o.status === 404),
      "requests for a removed task got 404",
    );
    const live = registry.list().filter((t) => t.version !== null).length;
    assert.equal(registry.numLiveVersions, live, "every replaced version was freed");
  });

  test("200 load / replace / unload cycles return versions, slots and memory to baseline", async (t) => {
    const { registry, store, residency } = stack.tasks!;
    setFlagsFromString("--expose-gc");
    const gc = runInNewContext("gc") as () => void;
    const dir = writeLoraTask(adapters.root, "churn", spec, {
      r: 8,
      alpha: 16,
      targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
      seed: 7,
    }).dir;
    const cycle = async (i: number) => {
      store.load("churn", dir);
      if (i % 2 === 0) store.load("churn", dir); // a replacement frees the version it replaces
      const r = await complete("churn", i % PROMPTS.length); // resident: takes a pool slot
      assert.equal(r.status, 200);
      store.unload("churn");
    };
    for (let i = 0; i < 20; i++) await cycle(i);
    const baselineVersions = registry.numLiveVersions;
    gc();
    const before = process.memoryUsage();
    for (let i = 0; i < 200; i++) await cycle(i);
    // Freed array buffers are released to the allocator shortly after a collection, not during it.
    await sleep(100);
    gc();
    await sleep(50);
    gc();
    const afterUsage = process.memoryUsage();
    assert.equal(registry.numLiveVersions, baselineVersions);
    assert.ok(!residency.table("lora").includes("churn"), `slots: ${residency.table("lora")}`);
    const growthMiB = (k: "rss" | "arrayBuffers" | "heapUsed") => (afterUsage[k] - before[k]) / 2 ** 20;
    t.diagnostic(
      `growth after 200 cycles: rss ${growthMiB("rss").toFixed(1)} MiB, array buffers ${growthMiB("arrayBuffers").toFixed(2)} MiB, heap ${growthMiB("heapUsed").toFixed(1)} MiB`,
    );
    // One version's LoRA is ~150 KiB of float32; 200 leaked versions would be ~30 MiB of array buffers.
    assert.ok(
      growthMiB("arrayBuffers") < 5,
      `array buffers grew ${growthMiB("arrayBuffers").toFixed(1)} MiB`,
    );
    assert.ok(growthMiB("rss") < 30, `RSS grew ${growthMiB("rss").toFixed(1)} MiB`);
  });
});
