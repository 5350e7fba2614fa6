/** @module test/helpers/tiny-model — the `tiny` preset made once per test process, loaded in-process. */
import { existsSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Engine, type EngineOptions } from "../../src/engine/engine.ts";
import { EngineGenerationService, type TaskProvider } from "../../src/engine/generation-service.ts";
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

export async function loadTestModel(dir = madeModelDir(), inProcess = true): Promise<LoadedModel> {
  return loadModel({
    modelDir: dir,
    cacheDir: TEST_CACHE_DIR,
    threads: 1,
    inProcess,
    pools: { loraSlots: 4, maxLoraRank: 8, ia3Slots: 4, bottleneckSlots: 4, maxBottleneckSize: 8 },
  });
}

export interface TestStack {
  model: LoadedModel;
  engine: Engine;
  service: EngineGenerationService;
  dispose: () => Promise<void>;
}

export async function startTestStack(
  options: Partial<EngineOptions> & { dir?: string; tasks?: TaskProvider | null; inProcess?: boolean } = {},
): Promise<TestStack> {
  const model = await loadTestModel(options.dir, options.inProcess ?? true);
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
  const service = new EngineGenerationService(engine, model.tokenizer, options.tasks ?? null, {
    modelId: "tiny",
    generation: model.info.generation,
    requestTimeoutMs: 60_000,
  });
  return { model, engine, service, dispose: () => engine.dispose() };
}
