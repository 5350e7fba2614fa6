/**
 * LoRA residency under pressure, through the real engine (tiny model, in-process): 2 LoRA pool slots and 5
 * LoRA tasks. Requests in rotation (one at a time, and in bursts of 3 concurrent requests, so the third must
 * wait for a slot) all succeed and equal the same request served by a stack with plenty of slots. The pool
 * table (`residency.table("lora")`) is checked after every request, on every event, at every pin and unpin
 * and at every model step: at most 2 resident, no task twice, the LRU one evicted, at most 2 requests
 * holding pins, and a pinned adapter never evicted (every step, each row's LoRA slot holds that row's task;
 * checked by wrapping the backend's forward, the provider's prepare/release and the engine's submit).
 * Unloading a task while its request runs lets the request finish on that version, then frees the slot;
 * reloading one does the same while new requests get the new version.
 *
 * Tolerance: greedy tokens identical, logprobs (and top-8 logprobs) within 1e-4 of the roomy stack's (the two
 * stacks run the same graph; only the slot numbers differ).
 */
import assert from "node:assert/strict";
import { after, afterEach, before, describe, test } from "node:test";
import type { GenerateRequest } from "../../src/engine/engine.ts";
import type { EngineEvent } from "../../src/engine/events.ts";
import type { PreparedTask } from "../../src/engine/generation-service.ts";
import { TaskmuxError } from "../../src/errors.ts";
import { loadCheckpoint } from "../../src/model/checkpoint.ts";
import type { StepBatch } from "../../src/model/contract.ts";
import {
  compareRuns,
  ErrorLog,
  type LoraFixtureOptions,
  makeTaskRoot,
  type RunOptions,
  runServed,
  type ServedRun,
  startRun,
  writeLoraTask,
} from "../helpers/task-fixtures.ts";
import { madeModelDir, startTestStack, type TestStack } from "../helpers/tiny-model.ts";

const TOL = 1e-4;
const errors = new ErrorLog();

const TASKS = ["ev-0", "ev-1", "ev-2", "ev-3", "ev-4"];
const OPTIONS: LoraFixtureOptions[] = [
  { r: 2, alpha: 4, targets: ["q_proj", "v_proj"], seed: 101 },
  { r: 4, alpha: 8, targets: ["o_proj", "down_proj"], seed: 102 },
  { r: 8, alpha: 8, targets: ["gate_proj", "up_proj"], seed: 103 },
  { r: 3, alpha: 6, targets: ["k_proj", "q_proj", "down_proj"], seed: 104 },
  {
    r: 6,
    alpha: 12,
    targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    seed: 105,
  },
];
const PROMPTS = ["Once upon a time", "the cat sat on the mat", "1 2 3 4 5", "Hello!"];

/**
 * Watches the seams where residency matters, synchronously: the provider's prepare (a pin) and release (an
 * unpin), the engine's submit (sequence -> task) and the backend's forward (which slot each row reads, and
 * what the table says is in it at that moment). Step rows are checked once their sequence is known (the
 * engine may run a sequence's first step inside submit, before submit returns its id).
 */
class ResidencyMonitor {
  readonly log: string[] = [];
  /** requests holding pins now */
  readonly live = new Map<number, string>();
  private nextPin = 0;
  private readonly seqTask = new Map<number, { task: string | null; slot: number }>();
  private readonly steps: { seqId: number; slot: number; occupant: string | null }[] = [];
  stepsChecked = 0;
  maxLive = 0;

  constructor(
    stack: TestStack,
    private readonly check: (where: string) => void,
  ) {
    const provider = stack.tasks!.provider;
    const prepare = provider.prepare.bind(provider);
    provider.prepare = async (name, prompt, fields, budget): Promise<PreparedTask> => {
      const prepared = await prepare(name, prompt, fields, budget);
      const pin = this.nextPin++;
      const slot = prepared.adapters.loraSlot;
      this.live.set(pin, name);
      this.maxLive = Math.max(this.maxLive, this.live.size);
      this.log.push(`pin ${name}`);
      this.check(`pin ${name}`);
      const table = stack.tasks!.residency.table("lora");
      assert.equal(table[slot], name, `pin ${name}: slot ${slot} holds ${table[slot]}`);
      assert.ok(
        this.live.size <= 2,
        `${this.live.size} requests hold pins with 2 slots: ${[...this.live.values()]}`,
      );
      assert.ok(new Set(this.live.values()).size <= 2, "at most 2 distinct pinned tasks");
      const release = prepared.release;
      return {
        ...prepared,
        release: () => {
          if (this.live.delete(pin)) this.log.push(`unpin ${name}`);
          release();
          this.check(`unpin ${name}`);
        },
      };
    };
    const engine = stack.engine;
    const submit = engine.submit.bind(engine);
    engine.submit = (request: GenerateRequest, signal?: AbortSignal) => {
      const submission = submit(request, signal);
      this.seqTask.set(submission.seqId, {
        task: request.taskName ?? null,
        slot: request.adapters?.loraSlot ?? 0,
      });
      return submission;
    };
    const backend = stack.model.backend;
    const forward = backend.forward.bind(backend);
    backend.forward = (batch: StepBatch) => {
      const table = stack.tasks!.residency.table("lora");
      batch.rows.forEach((row, b) => {
        const slot = Number(batch.loraSlots[b]);
        this.steps.push({ seqId: row.seqId, slot, occupant: slot === 0 ? null : table[slot]! });
      });
      return forward(batch);
    };
  }

  /** Every recorded step row read its own task's slot. */
  verifySteps(): void {
    for (const step of this.steps.splice(0)) {
      const seq = this.seqTask.get(step.seqId);
      assert.ok(seq, `step row for unknown sequence ${step.seqId}`);
      assert.equal(step.slot, seq.slot, `sequence ${step.seqId} (${seq.task}) changed slot`);
      if (seq.task !== null)
        assert.equal(
          step.occupant,
          seq.task,
          `sequence ${step.seqId} (${seq.task}) ran on slot ${step.slot} while the table said ${step.occupant}`,
        );
      this.stepsChecked++;
    }
  }
}

describe("LoRA eviction with 2 resident slots and 5 tasks", () => {
  const { root, cleanup } = makeTaskRoot();
  let stack: TestStack;
  let roomy: TestStack;
  let monitor: ResidencyMonitor;
  const expected = new Map<string, ServedRun>();

  before(async () => {
    const spec = loadCheckpoint(madeModelDir()).spec;
    for (const [i, name] of TASKS.entries()) writeLoraTask(root, name, spec, OPTIONS[i]!);
    stack = await startTestStack({ taskRoots: [root], residentSlots: 2 });
    roomy = await startTestStack({ taskRoots: [root], residentSlots: 6 });
    monitor = new ResidencyMonitor(stack, (where) => checkTable(where));
  });

  afterEach(() => {
    monitor.verifySteps();
    assert.equal(monitor.live.size, 0, "every pin released");
  });

  after(async () => {
    console.log(
      `# tasks-eviction: ${monitor?.stepsChecked} step rows checked, max ${monitor?.maxLive} pinned`,
    );
    await stack?.dispose();
    await roomy?.dispose();
    cleanup();
    errors.report("tasks-eviction");
  });

  const request = (task: string, p: number, maxTokens: number): RunOptions => ({
    task,
    prompt: { kind: "text", text: PROMPTS[p % PROMPTS.length]! },
    maxTokens,
  });

  /** The same request on the stack with plenty of slots (memoised). */
  async function expectation(o: RunOptions): Promise<ServedRun> {
    const key = `${o.task}|${JSON.stringify(o.prompt)}|${o.maxTokens}`;
    let run = expected.get(key);
    if (!run) {
      run = await runServed(roomy.service, o);
      expected.set(key, run);
    }
    return run;
  }

  const table = () => stack.tasks!.residency.table("lora");
  const resident = () => table().filter((t, i) => i > 0 && t !== null) as string[];

  /** Set while a replaced version drains beside its successor (the same name in two slots). */
  let twoVersions = false;
  /** Pool invariants; every task holding a pin right now (exact: from the provider's prepare/release) is resident. */
  function checkTable(where: string): void {
    const t = table();
    assert.equal(t.length, 3, `${where}: identity + 2 slots`);
    assert.equal(t[0], "(identity)");
    const r = resident();
    assert.ok(r.length <= 2, `${where}: ${r.length} resident`);
    // a name sits in two slots only while a replaced version drains beside its successor
    if (!twoVersions)
      assert.equal(new Set(r).size, r.length, `${where}: a task resident twice: ${JSON.stringify(t)}`);
    for (const name of monitor?.live.values() ?? [])
      assert.ok(r.includes(name), `${where}: ${name} is pinned but not resident: ${JSON.stringify(t)}`);
  }

  /** Start on the small stack, checking the table on every event; `result` is compared with the roomy stack. */
  async function start(o: RunOptions, label: string, onEvent?: (e: EngineEvent) => void) {
    const want = await expectation(o);
    const started = await startRun(stack.service, {
      ...o,
      onEvent: (e) => {
        checkTable(`${label} ${e.type} event`);
        onEvent?.(e);
      },
    });
    return {
      started,
      result: started.result.then((got) => {
        assert.equal(got.finish?.type, "finished", `${label}: ${JSON.stringify(got.finish)}`);
        errors.add("small pool vs roomy", compareRuns(got, want, TOL, label));
        return got;
      }),
    };
  }

  const served = async (o: RunOptions, label: string) => (await start(o, label)).result;

  test("sequential rotation: every request succeeds, LRU eviction, at most 2 resident", async () => {
    for (let i = 0; i < 12; i++) {
      const task = TASKS[i % TASKS.length]!;
      await served(request(task, i, 4 + (i % 3)), `request ${i} (${task})`);
      checkTable(`after request ${i}`);
      // the least recently used one was evicted: the last two tasks stay
      const want = i === 0 ? [task] : [TASKS[(i - 1) % TASKS.length]!, task];
      assert.deepEqual(resident().sort(), want.sort(), `after request ${i}: ${JSON.stringify(table())}`);
      monitor.verifySteps();
    }
    // a task already resident is reused, not loaded into a second slot
    const last = TASKS[11 % TASKS.length]!;
    const before = table();
    await served(request(last, 0, 3), "reuse");
    assert.deepEqual(table(), before, "reusing a resident adapter keeps the table");
  });

  test("bursts of 3 concurrent requests over 3 tasks: the third waits for a slot", async () => {
    for (let k = 0; k < 5; k++) {
      const burst = [0, 1, 2].map((j) => request(TASKS[(k + j) % TASKS.length]!, k + j, [9, 5, 7][j]!));
      for (const o of burst) await expectation(o);
      const logFrom = monitor.log.length;
      const results = burst.map(
        async (o, j) => (await start(o, `burst ${k} request ${j} (${o.task})`)).result,
      );
      await Promise.all(results);
      checkTable(`after burst ${k}`);
      const log = monitor.log.slice(logFrom);
      const firstUnpin = log.findIndex((l) => l.startsWith("unpin"));
      assert.equal(
        log.slice(0, firstUnpin).filter((l) => l.startsWith("pin")).length,
        2,
        `burst ${k}: two pinned at once, the third waited for a release (${log.join(", ")})`,
      );
      assert.equal(log.length, 6, `burst ${k}: ${log.join(", ")}`);
      monitor.verifySteps();
    }
    assert.equal(monitor.maxLive, 2, "two requests held pins at once");
    assert.equal(stack.engine.kv.numSequences, 0, "every KV reservation released");
  });

  test("a pinned adapter is never evicted: a long request keeps its slot while others rotate", async () => {
    const shorts = ["ev-1", "ev-2", "ev-3", "ev-4", "ev-1"];
    for (const [i, task] of shorts.entries()) await expectation(request(task, i, 3));
    const [ra, rb, rc] = [request("ev-1", 0, 40), request("ev-2", 1, 60), request("ev-3", 2, 5)];
    for (const o of [ra, rb, rc]) await expectation(o);
    let longTokens = 0;
    const longRequest = request("ev-0", 1, 80);
    await expectation(longRequest);
    const long = await start(longRequest, "long request", (e) => {
      if (e.type === "token") longTokens++;
    });
    for (const [i, task] of shorts.entries()) {
      await served(request(task, i, 3), `short ${task} beside the long request`);
      checkTable(`after short ${task}`);
      assert.deepEqual(resident().sort(), ["ev-0", task].sort(), JSON.stringify(table()));
      assert.deepEqual([...monitor.live.values()], ["ev-0"], "the long request is still running");
    }
    assert.ok(longTokens < 80, "the long request was still running during the rotation");
    await long.result;
    monitor.verifySteps();

    // both slots pinned: a third task's request waits (not pinned, not resident) until one finishes
    let cAdmitted = false;
    let checkedWhileBothRan = false;
    const a = await start(ra, "A", (e) => {
      if (e.type === "token" && monitor.live.size === 2 && [...monitor.live.values()].includes("ev-1")) {
        assert.equal(cAdmitted, false, "C is not admitted while A and B hold both slots");
        assert.ok(!resident().includes("ev-3"), "C is not resident while A and B hold both slots");
        checkedWhileBothRan = true;
      }
    });
    const b = await start(rb, "B");
    const c = start(rc, "C").then((started) => {
      cAdmitted = true;
      assert.deepEqual(resident().sort(), ["ev-2", "ev-3"], "C took A's slot; B (running) kept its own");
      assert.deepEqual([...monitor.live.values()].sort(), ["ev-2", "ev-3"]);
      return started.result;
    });
    await Promise.all([a.result, b.result, c]);
    assert.ok(checkedWhileBothRan, "A ran while A and B held both slots and C waited");
    assert.ok(cAdmitted, "C was admitted");
    const log = monitor.log.slice(-6);
    assert.deepEqual(log, ["pin ev-1", "pin ev-2", "unpin ev-1", "pin ev-3", "unpin ev-3", "unpin ev-2"]);
  });

  test("unload while a request runs: it finishes on its version, then the slot is freed", async () => {
    const { store, registry } = stack.tasks!;
    const liveBefore = registry.numLiveVersions;
    let tokens = 0;
    let unloaded = false;
    const run = await start(request("ev-4", 3, 30), "unloaded mid-request", (e) => {
      if (e.type !== "token") return;
      tokens++;
      if (tokens === 3) {
        assert.equal(store.unload("ev-4"), true);
        unloaded = true;
        assert.equal(registry.has("ev-4"), false, "new requests no longer find it");
        assert.equal(registry.list().find((t) => t.name === "ev-4")?.drainingVersions, 1);
        assert.ok(resident().includes("ev-4"), "still resident (pinned) while its request drains");
      }
    });
    await run.result;
    assert.ok(unloaded, "the task was unloaded mid-request");
    assert.ok(!resident().includes("ev-4"), `the slot is freed: ${JSON.stringify(table())}`);
    assert.ok(table().includes(null), "a free slot");
    assert.equal(registry.numLiveVersions, liveBefore - 1, "the unloaded version is freed");
    await assert.rejects(
      stack.service.generate({
        requestId: "gone",
        prompt: { kind: "text", text: "x" },
        task: "ev-4",
        params: {},
      }),
      (error: unknown) => error instanceof TaskmuxError && error.type === "task_not_found",
    );
    // the other tasks still serve, and take the freed slot without evicting anything
    const other = TASKS.find((t) => t !== "ev-4" && !resident().includes(t))!;
    const residentBefore = resident();
    await served(request(other, 0, 3), `after unload (${other})`);
    assert.deepEqual(resident().sort(), [...residentBefore, other].sort());
  });

  test("reload while a request runs: it finishes on the old version, new requests get the new one", async () => {
    const { store, registry } = stack.tasks!;
    const { root: root2, cleanup: cleanup2 } = makeTaskRoot();
    try {
      const spec = loadCheckpoint(madeModelDir()).spec;
      const oldRequest = request("ev-3", 2, 30);
      const wantOld = await expectation(oldRequest);
      // version 2: same name, other weights (in another folder, loaded explicitly like the admin API does)
      const v2 = writeLoraTask(root2, "ev-3", spec, { ...OPTIONS[3]!, seed: 999 }).dir;
      roomy.tasks!.store.load("ev-3", v2);
      const newRequest = request("ev-3", 2, 5);
      const wantNew = await runServed(roomy.service, newRequest);
      assert.notDeepEqual(wantNew.logprobs, wantOld.logprobs.slice(0, 5), "the versions differ");

      const liveBefore = registry.numLiveVersions;
      twoVersions = true;
      let tokens = 0;
      const later: { run?: Promise<ServedRun> } = {};
      let sawBoth = false;
      const old = await start(oldRequest, "old version", (e) => {
        if (e.type === "token" && ++tokens === 3) {
          store.load("ev-3", v2);
          assert.equal(registry.list().find((t) => t.name === "ev-3")?.drainingVersions, 1);
          later.run = runServed(stack.service, {
            ...newRequest,
            onEvent: () => {
              if (resident().filter((t) => t === "ev-3").length === 2) sawBoth = true;
            },
          });
        }
      });
      const gotOld = await old.result;
      errors.add(
        "small pool vs roomy",
        compareRuns(gotOld, wantOld, TOL, "old version, replaced mid-request"),
      );
      assert.ok(later.run, "the new version was requested while the old one ran");
      const gotNew = await later.run;
      assert.ok(sawBoth, "both versions were resident at once (old draining, new serving)");
      errors.add("small pool vs roomy", compareRuns(gotNew, wantNew, TOL, "new version"));
      // the drained version's slot was freed: the name is resident once
      assert.deepEqual(
        resident().filter((t) => t === "ev-3"),
        ["ev-3"],
        JSON.stringify(table()),
      );
      assert.equal(registry.numLiveVersions, liveBefore, "old version freed, new one live");
    } finally {
      twoVersions = false;
      cleanup2();
    }
  });
});

describe("host memory bound (--max-host-adapters)", () => {
  test("beyond the bound the least recently used task's weights leave host memory and come back from disk on use", async () => {
    const { root, cleanup } = makeTaskRoot("taskmux-host-");
    const spec = loadCheckpoint(madeModelDir()).spec;
    for (let i = 0; i < 3; i++) {
      writeLoraTask(root, `host-${i}`, spec, { r: 2, alpha: 4, targets: ["q_proj", "v_proj"], seed: 50 + i });
    }
    const stack = await startTestStack({ taskRoots: [root], residentSlots: 2, maxHostAdapters: 2 });
    try {
      const { registry } = stack.tasks!;
      const ask = (task: string) =>
        runServed(stack.service, {
          task,
          prompt: { kind: "text", text: "hello there" },
          maxTokens: 3,
          scorePrompt: false,
        });
      const first = await ask("host-0");
      await ask("host-1");
      await ask("host-2"); // a third task in host memory: host-0, the least recently used, is offloaded
      const info = (name: string) => registry.list().find((t) => t.name === name)!;
      assert.equal(info("host-0").inHostMemory, false, "host-0 offloaded");
      assert.equal(info("host-0").status, "ready", "still registered");
      assert.ok(stack.service.hasTask("host-0"), "still a task for requests");
      assert.ok(info("host-1").inHostMemory && info("host-2").inHostMemory, "the two most recent stay");
      const again = await ask("host-0"); // reloaded from its folder
      assert.deepEqual(again.tokens, first.tokens, "the reloaded task generates what it did before");
      assert.equal(info("host-0").inHostMemory, true, "host-0 back in host memory");
      assert.equal(info("host-1").inHostMemory, false, "host-1 is now the least recently used");
    } finally {
      await stack.dispose();
      cleanup();
    }
  });
});
