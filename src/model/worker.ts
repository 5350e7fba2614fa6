/**
 * @module model/worker — the model worker thread: owns the onnxruntime session, the KV store and the PEFT
 * pools, so session.run (synchronous inside, ort-facts §6) never blocks the HTTP thread.
 */
import { parentPort, workerData } from "node:worker_threads";
import { ModelRunner, type RunnerOptions } from "./runner.ts";
import type { WorkerRequest, WorkerResponse } from "./worker-protocol.ts";

const port = parentPort;
if (!port) throw new Error("model/worker.ts must run in a worker_thread");

const runnerPromise = ModelRunner.create(workerData as RunnerOptions);

function reply(message: WorkerResponse, transfer: ArrayBuffer[] = []) {
  port!.postMessage(message, transfer);
}

runnerPromise.then(
  () => reply({ id: 0, ok: true, kind: "ready" }),
  (error: Error) => reply({ id: 0, ok: false, error: { message: error.message, stack: error.stack } }),
);

port.on("message", async (request: WorkerRequest) => {
  try {
    const runner = await runnerPromise;
    switch (request.kind) {
      case "forward": {
        const result = await runner.forward(request.batch);
        const buffers = [result.greedyTokens.buffer, result.finiteRows.buffer];
        if (result.logits) buffers.push(result.logits.buffer);
        reply({ id: request.id, ok: true, kind: "forward", result }, buffers as ArrayBuffer[]);
        return;
      }
      case "release":
        runner.release(request.seqIds);
        return;
      case "seedPrefix":
        await runner.seedPrefix(request.seqId, request.length, request.keys, request.values);
        break;
      case "writeAdapterSlot":
        await runner.writeAdapterSlot(request.pool, request.slot, request.weights);
        break;
      case "clearAdapterSlot":
        await runner.clearAdapterSlot(request.pool, request.slot);
        break;
      case "dispose":
        await runner.dispose();
        break;
    }
    reply({ id: request.id, ok: true, kind: "done" });
  } catch (error) {
    const e = error as Error;
    reply({ id: request.id, ok: false, error: { message: e.message, stack: e.stack } });
  }
});
