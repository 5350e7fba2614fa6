/** @module test/helpers/tiny-model — the `tiny` preset made once per test process, loaded in-process. */
import { existsSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { TaskRegistry } from "../../src/adapters/registry.ts";
import { AdapterResidency } from "../../src/adapters/residency.ts";
import { TaskStore } from "../../src/adapters/task-store.ts";
import { Engine, type EngineOptions } from "../../src/engine/engine.ts";
import { EngineGenerationService } from "../../src/engine/generation-service.ts";
import { RegistryTaskProvider } from "../../src/engine/tasks.ts";
import { type LoadedModel, loadModel } from "../../src/model/load-model.ts";
import { makeModel, type PresetName } from "../../src/model/maker/make-model.ts";

const ROOT = join(tmpdir(), `taskmux-test-${process.getuid?.() ?? 0}`);

/** Make (once) a preset model under the OS temp dir; returns its directory. */
export function madeModelDir(preset: PresetName = "tiny", seed = 7): string {
  const dir = join(ROOT, `${preset}-${seed}`);
  if (!existsSync(join(dir, "config.json"))) {
    mkdirSync(ROOT, { recursive: true });
    makeModel({ preset, seed, out: dir });
  }
  return dir;
}

export const TEST_CACHE_DIR = join(ROOT, "graph-cache");

export async function loadTestModel(dir = madeModelDir(), inProcess = true, slots = 4): Promise<LoadedModel> {
  return loadModel({
    modelDir: dir,
    cacheDir: TEST_CACHE_DIR,
    threads: 1,
    inProcess,
    pools: {
      loraSlots: slots,
      maxLoraRank: 8,
      ia3Slots: slots,
      bottleneckSlots: slots,
      maxBottleneckSize: 8,
    },
  });
}

export interface TestStack {
  model: LoadedModel;
  engine: Engine;
  service: EngineGenerationService;
  /** Present when `taskRoots` were given. */
  tasks: {
    registry: TaskRegistry;
    store: TaskStore;
    residency: AdapterResidency;
    provider: RegistryTaskProvider;
  } | null;
  dispose: () => Promise<void>;
}

export interface TestStackOptions extends Partial<EngineOptions> {
  dir?: string;
  inProcess?: boolean;
  /** Task roots (prompt-tables/, adapters/ style folders); none = base model only. */
  taskRoots?: string[];
  /** Pool slots per PEFT kind (default 4). */
  residentSlots?: number;
  /** Tasks whose weights stay in host memory (default: no limit). */
  maxHostAdapters?: number;
}

export async function startTestStack(options: TestStackOptions = {}): Promise<TestStack> {
  const model = await loadTestModel(options.dir, options.inProcess ?? true, options.residentSlots ?? 4);
  const engine = new Engine(
    model.info.spec,
    model.tokenizer,
    model.backend,
    {
      maxNumSeqs: options.maxNumSeqs ?? 32,
      maxBatchedTokens: options.maxBatchedTokens ?? 256,
      maxWaiting: options.maxWaiting ?? 256,
      kvCacheBytes: options.kvCacheBytes ?? 64 * 2 ** 20,
    },
    model.tokenizer.eosIds,
  );
  let tasks: TestStack["tasks"] = null;
  if (options.taskRoots) {
    const spec = model.info.spec;
    const registry = new TaskRegistry();
    const store = new TaskStore(registry, spec, {
      roots: options.taskRoots,
      maxLoraRank: 8,
      maxBottleneckSize: 8,
      maxHostAdapters: options.maxHostAdapters,
    });
    const slots = options.residentSlots ?? 4;
    const residency = new AdapterResidency(model.backend, { lora: slots, ia3: slots, bottleneck: slots });
    const provider = new RegistryTaskProvider(registry, store, residency, model.tokenizer, spec);
    tasks = { registry, store, residency, provider };
  }
  const service = new EngineGenerationService(engine, model.tokenizer, tasks?.provider ?? null, {
    modelId: "tiny",
    generation: model.info.generation,
    requestTimeoutMs: 60_000,
  });
  return { model, engine, service, tasks, dispose: () => engine.dispose() };
}
