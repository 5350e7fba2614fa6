/** @module model/worker-backend — ModelBackend that forwards every call to the model worker thread. */
import { Worker } from "node:worker_threads";
import type {
  AdapterPoolKind,
  ModelBackend,
  SequenceAdapterWeights,
  StepBatch,
  StepResult,
} from "./contract.ts";
import type { RunnerOptions } from "./runner.ts";
import type { WorkerRequest, WorkerResponse } from "./worker-protocol.ts";

type Pending = { resolve: (value: WorkerResponse) => void; reject: (error: Error) => void };
type RequestBody = WorkerRequest extends infer R ? (R extends WorkerRequest ? Omit<R, "id"> : never) : never;

export class WorkerBackend implements ModelBackend {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private failure: Error | null = null;

  private constructor(private readonly worker: Worker) {
    worker.on("message", (message: WorkerResponse) => {
      const p = this.pending.get(message.id);
      if (!p) return;
      this.pending.delete(message.id);
      if (message.ok) p.resolve(message);
      else p.reject(Object.assign(new Error(message.error.message), { stack: message.error.stack }));
    });
    const fail = (error: Error) => {
      this.failure = error;
      for (const p of this.pending.values()) p.reject(error);
      this.pending.clear();
    };
    worker.on("error", fail);
    worker.on("exit", (code) => fail(new Error(`model worker exited with code ${code}`)));
  }

  /** Start the worker and wait until its session is created. */
  static async start(options: RunnerOptions): Promise<WorkerBackend> {
    // worker-entry.mjs registers tsx in the worker thread, then loads worker.ts.
    const worker = new Worker(new URL("./worker-entry.mjs", import.meta.url), { workerData: options });
    const backend = new WorkerBackend(worker);
    await new Promise<void>((resolve, reject) => {
      backend.pending.set(0, { resolve: () => resolve(), reject });
    });
    return backend;
  }

  private call(body: RequestBody, transfer: ArrayBuffer[] = []): Promise<WorkerResponse> {
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...body, id } as WorkerRequest, transfer);
    });
  }

  async forward(batch: StepBatch): Promise<StepResult> {
    const response = await this.call({ kind: "forward", batch });
    if (response.ok && response.kind === "forward") return response.result;
    throw new Error("model worker answered a forward step with no result");
  }

  release(seqIds: readonly number[]): void {
    if (this.failure) return;
    this.worker.postMessage({
      id: this.nextId++,
      kind: "release",
      seqIds: [...seqIds],
    } satisfies WorkerRequest);
  }

  async seedPrefix(
    seqId: number,
    length: number,
    keys: Float32Array[],
    values: Float32Array[],
  ): Promise<void> {
    await this.call({ kind: "seedPrefix", seqId, length, keys, values });
  }

  async writeAdapterSlot(
    pool: AdapterPoolKind,
    slot: number,
    weights: SequenceAdapterWeights,
  ): Promise<void> {
    await this.call({ kind: "writeAdapterSlot", pool, slot, weights });
  }

  async clearAdapterSlot(pool: AdapterPoolKind, slot: number): Promise<void> {
    await this.call({ kind: "clearAdapterSlot", pool, slot });
  }

  async dispose(): Promise<void> {
    try {
      await this.call({ kind: "dispose" });
    } finally {
      await this.worker.terminate();
    }
  }
}
