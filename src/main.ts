/**
 * @module main — composition root: config -> model -> engine -> http; listen; drain on SIGTERM/SIGINT.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import { serve } from "@hono/node-server";
import { TaskRegistry } from "./adapters/registry.ts";
import { AdapterResidency } from "./adapters/residency.ts";
import { TaskStore } from "./adapters/task-store.ts";
import { TaskWatcher } from "./adapters/watcher.ts";
import { type Config, ConfigError, configSchema, parseConfig } from "./config.ts";
import { Engine } from "./engine/engine.ts";
import { EngineGenerationService } from "./engine/generation-service.ts";
import { RegistryTaskProvider } from "./engine/tasks.ts";
import { isTaskmuxError } from "./errors.ts";
import { adminRoutes } from "./http/admin.ts";
import { createApp } from "./http/app.ts";
import { installClientErrorHandler } from "./http/client-errors.ts";
import { configureLogging, createLogger } from "./log.ts";
import { peftLayoutOf } from "./model/contract.ts";
import { loadModel } from "./model/load-model.ts";
import { makeModel } from "./model/maker/make-model.ts";

const log = createLogger({ module: "main" });

/** The embedded default is made (deterministically, in about a second) the first time it is needed. */
function ensureDefaultModel(config: Config): void {
  const defaultDir = configSchema.parse({}).model;
  if (config.model !== defaultDir || existsSync(join(defaultDir, "config.json"))) return;
  const started = performance.now();
  log.info("making the embedded default model (first start)", { dir: defaultDir });
  makeModel({ preset: "default", seed: 0, out: defaultDir });
  log.info("default model made", { ms: Math.round(performance.now() - started) });
}

async function start(config: Config) {
  configureLogging({ level: config.logLevel });
  ensureDefaultModel(config);
  const started = performance.now();
  const model = await loadModel({
    modelDir: config.model,
    cacheDir: config.cacheDir,
    threads: config.threads,
    spin: config.spin,
    inProcess: config.inProcess,
    weights: config.weights,
    quantBlockSize: config.quantBlockSize,
    peft: peftLayoutOf(config.peft),
    device: config.device,
    pools: {
      loraSlots: config.maxResidentAdapters,
      maxLoraRank: config.maxLoraRank,
      ia3Slots: config.maxResidentAdapters,
      bottleneckSlots: config.maxResidentAdapters,
      maxBottleneckSize: config.maxBottleneckSize,
    },
  });
  const { spec } = model.info;
  log.info("model loaded", {
    model: config.model,
    architecture: spec.architecture,
    parameters: model.report.parameterCount,
    layers: spec.numLayers,
    hidden: spec.hiddenSize,
    vocab: spec.vocabSize,
    context: spec.maxPositionEmbeddings,
    storedDtype: model.report.storedDtypes.join(",") || "cached",
    weights: model.report.weights,
    peft: config.peft.join(",") || "none",
    quantBlockSize: model.report.weights.startsWith("int") ? config.quantBlockSize : undefined,
    device: model.report.device,
    threads: config.threads,
    graph: model.report.graphCacheHit ? "cached" : "built",
    graphBuildMs: Math.round(model.report.graphBuildMs),
    staleGraphsRemoved: model.report.staleGraphsRemoved,
    sessionMs: Math.round(model.report.sessionMs),
    totalMs: Math.round(performance.now() - started),
  });
  const eosIds = [...new Set([...model.tokenizer.eosIds, ...model.info.generation.eosTokenIds])];
  const engine = new Engine(
    spec,
    model.tokenizer,
    model.backend,
    {
      maxNumSeqs: config.maxNumSeqs,
      maxBatchedTokens: config.maxBatchedTokens,
      maxWaiting: config.maxWaiting,
      maxPromptTokens: config.maxPromptTokens,
      kvCacheBytes: config.kvCacheMb * 2 ** 20,
    },
    eosIds,
  );
  const registry = new TaskRegistry();
  const store = new TaskStore(registry, spec, {
    roots: [config.promptTables, config.adapters],
    maxLoraRank: config.maxLoraRank,
    maxBottleneckSize: config.maxBottleneckSize,
    peftKinds: config.peft,
    maxHostAdapters: config.maxHostAdapters,
  });
  const residency = new AdapterResidency(model.backend, {
    lora: config.maxResidentAdapters,
    ia3: config.maxResidentAdapters,
    bottleneck: config.maxResidentAdapters,
  });
  const tasks = new RegistryTaskProvider(registry, store, residency, model.tokenizer, spec);
  const scan = store.loadAll();
  log.info("tasks loaded", { roots: store.roots, loaded: scan.loaded, failed: scan.failed });
  const watcher = config.watch
    ? new TaskWatcher(store, { rescanIntervalMs: config.rescanIntervalS * 1000 })
    : null;
  watcher?.start();
  const service = new EngineGenerationService(engine, model.tokenizer, tasks, {
    modelId: modelIdOf(config.model),
    generation: model.info.generation,
    requestTimeoutMs: config.requestTimeoutS * 1000,
  });
  const app = createApp({
    service,
    bodyLimitBytes: Math.round(config.bodyLimitMb * 2 ** 20),
    maxN: config.maxN,
    logPrompts: config.logPrompts,
    maxStreamsPerClient: config.maxStreamsPerClient,
    routes: [
      adminRoutes({
        registry,
        store,
        residency,
        adminToken: config.adminToken,
        remote: { allowHosts: config.adapterUrlAllow, maxBytes: config.adapterUrlMaxMb * 2 ** 20 },
      }),
    ],
  });
  const server = serve({ fetch: app.fetch, hostname: config.host, port: config.port });
  installClientErrorHandler(server);
  await new Promise<void>((resolve) => server.once("listening", () => resolve()));
  log.info("listening", { url: `http://${config.host}:${config.port}`, modelId: service.modelId });
  installShutdown(config, engine, () => {
    watcher?.stop();
    return new Promise<void>((resolve) => server.close(() => resolve()));
  });
}

function modelIdOf(dir: string): string {
  const parts = dir.replace(/\/+$/, "").split("/");
  return parts[parts.length - 1] || "model";
}

function installShutdown(config: Config, engine: Engine, closeServer: () => Promise<void>) {
  let shuttingDown = false;
  let isForced = false;
  const onSignal = async (signal: string) => {
    if (shuttingDown) {
      if (isForced) return;
      isForced = true;
      log.warn("second signal: exiting now", { signal });
      // Stop the model worker first (it ends its current step, milliseconds): exiting while it is inside
      // session.run aborts the process (SIGABRT in onnxruntime's teardown).
      await Promise.race([engine.dispose().catch(() => {}), new Promise((r) => setTimeout(r, 1000))]);
      process.exit(1);
    }
    shuttingDown = true;
    engine.stopAdmitting();
    log.info("draining", {
      signal,
      running: engine.numRunningSequences,
      waiting: engine.numWaitingSequences,
    });
    // The server keeps serving while draining: running streams go on, new requests get 503.
    const drained = await engine.drain(config.drainTimeoutS * 1000);
    if (isForced) return;
    log.info(drained ? "drained" : "drain deadline passed; cancelling the rest", { signal });
    // Cancel what is left first, so its streams end with a finish frame before the server closes.
    await engine.dispose();
    await Promise.race([closeServer(), new Promise((r) => setTimeout(r, 2000))]);
    process.exit(0);
  };
  process.on("SIGTERM", (s) => void onSignal(s));
  process.on("SIGINT", (s) => void onSignal(s));
}

try {
  await start(parseConfig(process.argv.slice(2)));
} catch (error) {
  if (error instanceof ConfigError || isTaskmuxError(error)) {
    log.error(`cannot start: ${(error as Error).message}`);
    process.exit(2);
  }
  throw error;
}
