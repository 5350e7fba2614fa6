/** @module model/session — the only importer of onnxruntime-node: create, run, dispose; typed arrays in and out. */
import * as ort from "onnxruntime-node";

/** One input of a step. */
export type FeedValue =
  | { readonly type: "float32"; readonly data: Float32Array; readonly dims: readonly number[] }
  | { readonly type: "int64"; readonly data: BigInt64Array; readonly dims: readonly number[] }
  | { readonly type: "bool"; readonly data: Uint8Array; readonly dims: readonly number[] };

export interface SessionOptions {
  /** onnxruntime intra-op threads; 0 = onnxruntime's default (one per core). */
  threads: number;
  /** "cpu" today; accelerator providers are chosen by the caller. */
  executionProviders?: string[];
  /**
   * Let intra-op threads spin between the ops of a step, and stop them when the step ends. Measured at batch-1
   * decode (smollm2-135m, 2 threads): 4-16% faster on otherwise idle cores, 30-50% slower when another process
   * holds one of them (a spinning thread takes the core the working one needs). Off by default: the
   * blocking threads lose little when alone and much less when shared (docs/weight-formats.md).
   */
  spin?: boolean;
}

/** The fetched outputs of one run, read with the element type the caller expects (checked). */
export class SessionOutputs {
  constructor(private readonly values: Map<string, unknown>) {}

  float32(name: string): Float32Array {
    const v = this.values.get(name);
    if (!(v instanceof Float32Array)) throw new Error(`output ${name} is not a fetched float32 tensor`);
    return v;
  }

  int64(name: string): BigInt64Array {
    const v = this.values.get(name);
    if (!(v instanceof BigInt64Array)) throw new Error(`output ${name} is not a fetched int64 tensor`);
    return v;
  }
}

export class ModelSession {
  /** The run in flight, which dispose waits for: releasing the native session under it is undefined. */
  private running: Promise<unknown> | null = null;
  private disposed = false;
  /** Tensors of each `defaults` object run has seen (made once: a Tensor wraps its array without copying). */
  private readonly defaultTensors = new WeakMap<object, Record<string, ort.Tensor>>();

  private constructor(
    private readonly session: ort.InferenceSession,
    readonly inputNames: readonly string[],
    readonly outputNames: readonly string[],
  ) {}

  /** Load from a file path so external weights are memory-mapped by onnxruntime (ort-facts §8). */
  static async create(modelPath: string, options: SessionOptions): Promise<ModelSession> {
    const session = await ort.InferenceSession.create(modelPath, {
      executionProviders: options.executionProviders ?? ["cpu"],
      graphOptimizationLevel: "all",
      intraOpNumThreads: options.threads > 0 ? options.threads : undefined,
      interOpNumThreads: 1,
      executionMode: "sequential",
      // Spinning threads would burn a core between steps while the engine does JS work (ort-facts §6):
      // with `spin`, force_spinning_stop parks them when each run ends.
      extra: options.spin
        ? { session: { intra_op: { allow_spinning: "1" }, force_spinning_stop: "1" } }
        : { session: { intra_op: { allow_spinning: "0" } } },
    });
    return new ModelSession(session, session.inputNames, session.outputNames);
  }

  /**
   * Run one step; returns only the requested outputs (each one a fresh copy from the binding). `defaults` is a
   * stable object of inputs most steps feed unchanged (the PEFT identities, hundreds of them): they sit on the
   * prototype of the step's feed record, which onnxruntime-node reads by name, so a step pays only for `feeds`.
   * Copying them into every step's record cost about 0.25 ms a step.
   */
  async run(
    feeds: Record<string, FeedValue>,
    outputs: readonly string[],
    defaults?: Readonly<Record<string, FeedValue>>,
  ): Promise<SessionOutputs> {
    if (this.disposed) throw new Error("the onnxruntime session was disposed (the model is shutting down)");
    const tensors: Record<string, ort.Tensor> = defaults
      ? Object.create(this.tensorsOfDefaults(defaults))
      : {};
    for (const [name, value] of Object.entries(feeds)) tensors[name] = toTensor(value);
    const pending = this.session.run(tensors, outputs as string[]);
    this.running = pending;
    let result: Awaited<typeof pending>;
    try {
      result = await pending;
    } finally {
      if (this.running === pending) this.running = null;
    }
    const values = new Map<string, unknown>();
    for (const name of outputs) values.set(name, result[name]!.data);
    return new SessionOutputs(values);
  }

  private tensorsOfDefaults(defaults: Readonly<Record<string, FeedValue>>): Record<string, ort.Tensor> {
    let tensors = this.defaultTensors.get(defaults);
    if (!tensors) {
      tensors = {};
      for (const [name, value] of Object.entries(defaults)) tensors[name] = toTensor(value);
      this.defaultTensors.set(defaults, tensors);
    }
    return tensors;
  }

  /** Waits for a run in flight to end, then releases the session; later runs are refused. */
  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    await this.running?.catch(() => {});
    await this.session.release();
  }
}

function toTensor(value: FeedValue): ort.Tensor {
  return new ort.Tensor(value.type, value.data, value.dims);
}
