/** @module model/builder/graph — a small graph-assembly helper: named nodes, constants, external weights. */
import { closeSync, openSync, writeSync } from "node:fs";
import {
  type AttributeValue,
  DataType,
  type DataTypeCode,
  encodeModel,
  type NodeSpec,
  type TensorSpec,
  type ValueInfoSpec,
} from "./onnx-proto.ts";

const WEIGHT_ALIGNMENT = 64;

/** Point every node input named `from` at `to`, in If branches too (they read outer values by name). */
function renameUses(nodes: NodeSpec[], from: string, to: string): void {
  for (const node of nodes) {
    node.inputs = node.inputs.map((i) => (i === from ? to : i));
    for (const attr of Object.values(node.attributes ?? {})) {
      if (typeof attr === "object" && attr !== null && "graph" in attr)
        renameUses(attr.graph.nodes, from, to);
    }
  }
}

interface PendingWeight {
  data: Uint8Array;
  offset: number;
}

export class GraphBuilder {
  readonly nodes: NodeSpec[] = [];
  readonly initializers: TensorSpec[] = [];
  readonly inputs: ValueInfoSpec[] = [];
  readonly outputs: ValueInfoSpec[] = [];
  private readonly weights: PendingWeight[] = [];
  private weightBytes = 0;
  private counter = 0;
  private readonly constants = new Map<string, string>();
  /** Values `output` renamed to a graph output name: old name -> new. */
  private readonly renamed = new Map<string, string>();

  constructor(private readonly weightsFileName: string) {}

  /** Add a node; returns its output names (fresh names unless given). */
  op(
    opType: string,
    inputs: string[],
    options: { outputs?: string[] | number; attrs?: Record<string, AttributeValue>; domain?: string } = {},
  ): string[] {
    const id = this.counter++;
    const outputs =
      typeof options.outputs === "number" || options.outputs === undefined
        ? Array.from(
            { length: (options.outputs as number | undefined) ?? 1 },
            (_, i) => `${opType}_${id}_${i}`,
          )
        : options.outputs;
    this.nodes.push({
      opType,
      inputs: inputs.map((i) => this.renamed.get(i) ?? i),
      outputs,
      name: `${opType}_${id}`,
      domain: options.domain,
      attributes: options.attrs,
    });
    return outputs;
  }

  /** Single-output convenience form of `op`. */
  op1(opType: string, inputs: string[], attrs?: Record<string, AttributeValue>, domain?: string): string {
    return this.op(opType, inputs, { attrs, domain })[0]!;
  }

  input(name: string, dataType: DataTypeCode, dims: (number | string)[]): string {
    this.inputs.push({ name, dataType, dims });
    return name;
  }

  /**
   * Declare a graph output. The node that makes `source` writes it under `name` itself where it can, since an
   * Identity copies its input every run (all layers' new K/V, R x vocab logits); every use of
   * `source`, in subgraphs and in nodes added later, follows the rename.
   */
  output(name: string, source: string, dataType: DataTypeCode, dims: (number | string)[]): void {
    const producer = this.nodes.find((n) => n.outputs.includes(source));
    if (producer) {
      producer.outputs = producer.outputs.map((o) => (o === source ? name : o));
      renameUses(this.nodes, source, name);
      this.renamed.set(source, name);
    } else {
      this.op("Identity", [this.renamed.get(source) ?? source], { outputs: [name] });
    }
    this.outputs.push({ name, dataType, dims });
  }

  /** A float32 weight stored in the external data file. */
  weight(name: string, dims: number[], data: Float32Array): string {
    return this.externalTensor(
      name,
      DataType.FLOAT,
      dims,
      new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
    );
  }

  externalTensor(name: string, dataType: DataTypeCode, dims: number[], bytes: Uint8Array): string {
    const offset = Math.ceil(this.weightBytes / WEIGHT_ALIGNMENT) * WEIGHT_ALIGNMENT;
    this.weights.push({ data: bytes, offset });
    this.weightBytes = offset + bytes.byteLength;
    this.initializers.push({
      name,
      dataType,
      dims,
      external: { location: this.weightsFileName, offset, length: bytes.byteLength },
    });
    return name;
  }

  /** Small embedded int64 constant (shapes, axes, indices), deduplicated by value. */
  int64(values: number[], dims: number[] = [values.length]): string {
    const key = `i64:${dims.join("x")}:${values.join(",")}`;
    const existing = this.constants.get(key);
    if (existing) return existing;
    const name = `const_i64_${this.constants.size}`;
    const raw = new Uint8Array(new BigInt64Array(values.map(BigInt)).buffer);
    this.initializers.push({ name, dataType: DataType.INT64, dims, raw });
    this.constants.set(key, name);
    return name;
  }

  float(values: number[], dims: number[] = [values.length]): string {
    const key = `f32:${dims.join("x")}:${values.join(",")}`;
    const existing = this.constants.get(key);
    if (existing) return existing;
    const name = `const_f32_${this.constants.size}`;
    const raw = new Uint8Array(new Float32Array(values).buffer);
    this.initializers.push({ name, dataType: DataType.FLOAT, dims, raw });
    this.constants.set(key, name);
    return name;
  }

  /** Serialize the graph proto and write the weights file; returns the model bytes. */
  finish(options: {
    weightsPath: string;
    opsets: { domain: string; version: number }[];
    graphName: string;
  }): Uint8Array {
    const fd = openSync(options.weightsPath, "w");
    try {
      let written = 0;
      const pad = new Uint8Array(WEIGHT_ALIGNMENT);
      for (const w of this.weights) {
        if (w.offset > written) writeSync(fd, pad, 0, w.offset - written);
        writeSync(fd, w.data);
        written = w.offset + w.data.byteLength;
      }
    } finally {
      closeSync(fd);
    }
    return encodeModel({
      irVersion: 10,
      opsets: options.opsets,
      producerName: "taskmux",
      graph: {
        name: options.graphName,
        nodes: this.nodes,
        initializers: this.initializers,
        inputs: this.inputs,
        outputs: this.outputs,
      },
    });
  }

  get totalWeightBytes(): number {
    return this.weightBytes;
  }
}
