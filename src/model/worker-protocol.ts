/** @module model/worker-protocol — messages between the engine thread and the model worker. */
import type { AdapterPoolKind, SequenceAdapterWeights, StepBatch, StepResult } from "./contract.ts";

export type WorkerRequest =
  | { id: number; kind: "forward"; batch: StepBatch }
  | { id: number; kind: "release"; seqIds: number[] }
  | {
      id: number;
      kind: "seedPrefix";
      seqId: number;
      length: number;
      keys: Float32Array[];
      values: Float32Array[];
    }
  | {
      id: number;
      kind: "writeAdapterSlot";
      pool: AdapterPoolKind;
      slot: number;
      weights: SequenceAdapterWeights;
    }
  | { id: number; kind: "clearAdapterSlot"; pool: AdapterPoolKind; slot: number }
  | { id: number; kind: "dispose" };

export type WorkerResponse =
  | { id: number; ok: true; kind: "ready" | "done" }
  | { id: number; ok: true; kind: "forward"; result: StepResult }
  | { id: number; ok: false; error: { message: string; stack?: string } };
