/**
 * @module model/builder/llama-graph — builds the taskmux ONNX graph for a Llama-family checkpoint
 * (see model/contract.ts for the inputs and outputs it carries).
 */
import type { BaseWeights, LayerWeights } from "../checkpoint.ts";
import {
  BOTTLENECK_PLACES,
  type BottleneckPlace,
  IA3_INPUT_SCALED,
  INPUT,
  OUTPUT,
  type PeftLayout,
  type Projection,
  projectionDims,
} from "../contract.ts";
import { type ModelSpec, ropeTables } from "../model-spec.ts";
import { GraphBuilder } from "./graph.ts";
import { DataType } from "./onnx-proto.ts";

export type RopeImplementation = "contrib" | "manual";

export interface GraphOptions {
  peft: PeftLayout;
  /** com.microsoft RotaryEmbedding, or plain ops (any head size; used when the contrib op refuses it). */
  rope: RopeImplementation;
}

/** [rows, cols] row-major -> [cols, rows]: HF Linear [out, in] becomes MatMul's [in, out]. */
export function transpose(w: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(w.length);
  for (let r = 0; r < rows; r++) {
    const base = r * cols;
    for (let c = 0; c < cols; c++) out[c * rows + r] = w[base + c]!;
  }
  return out;
}

/** Column-concatenate several [in, out_i] matrices into [in, sum(out_i)]. */
function concatColumns(parts: { data: Float32Array; cols: number }[], rows: number): Float32Array {
  const total = parts.reduce((a, p) => a + p.cols, 0);
  const out = new Float32Array(rows * total);
  for (let r = 0; r < rows; r++) {
    let offset = r * total;
    for (const p of parts) {
      out.set(p.data.subarray(r * p.cols, (r + 1) * p.cols), offset);
      offset += p.cols;
    }
  }
  return out;
}

function concatVectors(parts: Float32Array[]): Float32Array {
  const out = new Float32Array(parts.reduce((a, p) => a + p.length, 0));
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
}

/** Graph-wide tensors every layer reads. */
interface Shared {
  loraRow: string;
  ia3Row: string;
  bottleneckRow: string;
  cos: string;
  sin: string;
}

class LlamaGraph {
  private readonly g: GraphBuilder;
  private readonly d: number;
  private readonly qDim: number;
  private readonly kvDim: number;
  private readonly eps: { float: number };

  constructor(
    private readonly spec: ModelSpec,
    private readonly options: GraphOptions,
    weightsFileName: string,
  ) {
    this.g = new GraphBuilder(weightsFileName);
    this.d = spec.hiddenSize;
    this.qDim = spec.numHeads * spec.headDim;
    this.kvDim = spec.numKvHeads * spec.headDim;
    this.eps = { float: spec.rmsNormEps };
  }

  build(weights: BaseWeights): GraphBuilder {
    const g = this.g;
    const shared = this.declareInputs();
    let h = this.embeddings(weights.embed);
    let x = g.op1(
      "SimplifiedLayerNormalization",
      [h, g.weight("layers.0.input_norm", [this.d], weights.layers[0]!.inputNorm)],
      {
        axis: -1,
        epsilon: this.eps,
      },
    );
    for (let l = 0; l < this.spec.numLayers; l++) {
      const lw = weights.layers[l]!;
      const attnOut = this.attention(l, lw, x, shared);
      const [x2, h2] = this.skipNorm(attnOut, h, g.weight(`layers.${l}.post_norm`, [this.d], lw.postNorm));
      const mlpOut = this.mlp(l, lw, x2, shared);
      const nextNorm =
        l + 1 < this.spec.numLayers
          ? g.weight(`layers.${l + 1}.input_norm`, [this.d], weights.layers[l + 1]!.inputNorm)
          : g.weight("final_norm", [this.d], weights.finalNorm);
      [x, h] = this.skipNorm(mlpOut, h2, nextNorm);
    }
    this.logits(x, weights);
    return g;
  }

  private declareInputs(): Shared {
    const { g, spec } = this;
    const L = spec.numLayers;
    g.input(INPUT.inputIds, DataType.INT64, ["batch", "seq"]);
    g.input(INPUT.positionIds, DataType.INT64, ["batch", "seq"]);
    g.input(INPUT.virtualEmbeddings, DataType.FLOAT, ["num_virtual", this.d]);
    g.input(INPUT.attentionMask, DataType.BOOL, ["batch", 1, "seq", "total"]);
    g.input(INPUT.logitsIndex, DataType.INT64, ["num_logits"]);
    for (let l = 0; l < L; l++) {
      g.input(INPUT.pastKey(l), DataType.FLOAT, ["batch", spec.numKvHeads, "past", spec.headDim]);
      g.input(INPUT.pastValue(l), DataType.FLOAT, ["batch", spec.numKvHeads, "past", spec.headDim]);
    }
    const { peft } = this.options;
    const slotRow = (slotInput: string) => {
      g.input(slotInput, DataType.INT64, ["batch"]);
      return g.op1("Mul", [slotInput, g.int64([L], [])]);
    };
    const shared: Shared = {
      loraRow: slotRow(INPUT.loraSlot),
      ia3Row: slotRow(INPUT.ia3Slot),
      bottleneckRow: slotRow(INPUT.bottleneckSlot),
      cos: "",
      sin: "",
    };
    for (const m of peft.loraTargets) {
      const { inDim, outDim } = projectionDims(spec, m);
      g.input(INPUT.loraA(m), DataType.FLOAT, ["lora_rows", inDim, "lora_rank"]);
      g.input(INPUT.loraB(m), DataType.FLOAT, ["lora_rows", "lora_rank", outDim]);
    }
    for (const m of peft.ia3Targets) {
      const { inDim, outDim } = projectionDims(spec, m);
      g.input(INPUT.ia3(m), DataType.FLOAT, ["ia3_rows", IA3_INPUT_SCALED.includes(m) ? inDim : outDim]);
    }
    if (peft.bottleneck) {
      for (const p of BOTTLENECK_PLACES) {
        g.input(INPUT.bottleneckDown(p), DataType.FLOAT, ["bottleneck_rows", this.d, "bottleneck_size"]);
        g.input(INPUT.bottleneckDownBias(p), DataType.FLOAT, ["bottleneck_rows", "bottleneck_size"]);
        g.input(INPUT.bottleneckUp(p), DataType.FLOAT, ["bottleneck_rows", "bottleneck_size", this.d]);
        g.input(INPUT.bottleneckUpBias(p), DataType.FLOAT, ["bottleneck_rows", this.d]);
      }
    }
    const tables = ropeTables(spec);
    const cosTable = g.weight("rope_cos", [spec.maxPositionEmbeddings, tables.half], tables.cos);
    const sinTable = g.weight("rope_sin", [spec.maxPositionEmbeddings, tables.half], tables.sin);
    if (this.options.rope === "contrib") {
      shared.cos = cosTable;
      shared.sin = sinTable;
    } else {
      // [B, T, 1, half]: gathered once per step, broadcast over heads in every layer.
      const axis2 = g.int64([2]);
      shared.cos = g.op1("Unsqueeze", [g.op1("Gather", [cosTable, INPUT.positionIds]), axis2]);
      shared.sin = g.op1("Unsqueeze", [g.op1("Gather", [sinTable, INPUT.positionIds]), axis2]);
    }
    return shared;
  }

  /** ids < V read the vocabulary; ids >= V read virtual_embeddings[id - V] (TensorRT-LLM's convention). */
  private embeddings(embed: Float32Array): string {
    const { g } = this;
    const V = this.spec.vocabSize;
    const table = g.weight("embed_tokens", [V, this.d], embed);
    const ids = INPUT.inputIds;
    const isVirtual = g.op1("GreaterOrEqual", [ids, g.int64([V], [])]);
    const tokenIndex = g.op1("Min", [ids, g.int64([V - 1], [])]);
    const virtualIndex = g.op1("Max", [g.op1("Sub", [ids, g.int64([V], [])]), g.int64([0], [])]);
    const tokens = g.op1("Gather", [table, tokenIndex]);
    const virtuals = g.op1("Gather", [INPUT.virtualEmbeddings, virtualIndex]);
    return g.op1("Where", [g.op1("Unsqueeze", [isVirtual, g.int64([-1])]), virtuals, tokens]);
  }

  private skipNorm(input: string, skip: string, gamma: string): [string, string] {
    const outs = this.g.op("SkipSimplifiedLayerNormalization", [input, skip, gamma], {
      outputs: [`skipnorm_${this.g.nodes.length}_y`, "", "", `skipnorm_${this.g.nodes.length}_sum`],
      attrs: { epsilon: this.eps },
      domain: "com.microsoft",
    });
    return [outs[0]!, outs[3]!];
  }

  private layerRow(sharedRow: string, l: number): string {
    return this.g.op1("Add", [sharedRow, this.g.int64([l], [])]);
  }

  /** PEFT additions on one projection: y + (x A_s) B_s, then IA3 output scaling. */
  private peftProjection(l: number, m: Projection, x: string, y: string, shared: Shared): string {
    const { g } = this;
    const { peft } = this.options;
    let out = y;
    if (peft.loraTargets.includes(m)) {
      const row = this.layerRow(shared.loraRow, l);
      const a = g.op1("Gather", [INPUT.loraA(m), row]); // [B, in, r]
      const b = g.op1("Gather", [INPUT.loraB(m), row]); // [B, r, out]
      out = g.op1("Add", [out, g.op1("MatMul", [g.op1("MatMul", [x, a]), b])]);
    }
    if (peft.ia3Targets.includes(m) && !IA3_INPUT_SCALED.includes(m)) {
      out = g.op1("Mul", [out, this.ia3Scale(l, m, shared)]);
    }
    return out;
  }

  /** [B, 1, dim] scale vector for one sequence row. */
  private ia3Scale(l: number, m: Projection, shared: Shared): string {
    const row = this.layerRow(shared.ia3Row, l);
    return this.g.op1("Unsqueeze", [this.g.op1("Gather", [INPUT.ia3(m), row]), this.g.int64([1])]);
  }

  private linear(
    x: string,
    name: string,
    w: Float32Array,
    rows: number,
    cols: number,
    bias: Float32Array | null,
  ) {
    const y = this.g.op1("MatMul", [x, this.g.weight(name, [cols, rows], transpose(w, rows, cols))]);
    return bias ? this.g.op1("Add", [y, this.g.weight(`${name}.bias`, [rows], bias)]) : y;
  }

  private attention(l: number, lw: LayerWeights, x: string, shared: Shared): string {
    const { g, spec, d, qDim, kvDim } = this;
    const wqkv = concatColumns(
      [
        { data: transpose(lw.qProj, qDim, d), cols: qDim },
        { data: transpose(lw.kProj, kvDim, d), cols: kvDim },
        { data: transpose(lw.vProj, kvDim, d), cols: kvDim },
      ],
      d,
    );
    let qkv = g.op1("MatMul", [x, g.weight(`layers.${l}.qkv`, [d, qDim + 2 * kvDim], wqkv)]);
    if (lw.qBias && lw.kBias && lw.vBias) {
      const bias = concatVectors([lw.qBias, lw.kBias, lw.vBias]);
      qkv = g.op1("Add", [qkv, g.weight(`layers.${l}.qkv.bias`, [bias.length], bias)]);
    }
    const [q0, k0, v0] = g.op("Split", [qkv, g.int64([qDim, kvDim, kvDim])], {
      outputs: 3,
      attrs: { axis: -1 },
    });
    const q = this.rotary(this.peftProjection(l, "q_proj", x, q0!, shared), spec.numHeads, shared);
    const k = this.rotary(this.peftProjection(l, "k_proj", x, k0!, shared), spec.numKvHeads, shared);
    const v = this.peftProjection(l, "v_proj", x, v0!, shared);
    g.output(OUTPUT.newKey(l), k, DataType.FLOAT, ["batch", "seq", kvDim]);
    g.output(OUTPUT.newValue(l), v, DataType.FLOAT, ["batch", "seq", kvDim]);
    // present_key/value are required outputs of the CPU kernel when a past is fed; nothing fetches them.
    const [attn] = g.op("Attention", [q, k, v, INPUT.attentionMask, INPUT.pastKey(l), INPUT.pastValue(l)], {
      outputs: 3,
      attrs: {
        q_num_heads: spec.numHeads,
        kv_num_heads: spec.numKvHeads,
        scale: { float: 1 / Math.sqrt(spec.headDim) },
      },
    });
    const o = this.peftProjection(
      l,
      "o_proj",
      attn!,
      this.linear(attn!, `layers.${l}.o_proj`, lw.oProj, d, qDim, lw.oBias),
      shared,
    );
    return this.bottleneck(l, "attn", o, shared);
  }

  private rotary(x: string, numHeads: number, shared: Shared): string {
    const { g, spec } = this;
    if (this.options.rope === "contrib") {
      return g.op1(
        "RotaryEmbedding",
        [x, INPUT.positionIds, shared.cos, shared.sin],
        { interleaved: 0, num_heads: numHeads },
        "com.microsoft",
      );
    }
    const half = spec.headDim / 2;
    const x4 = g.op1("Reshape", [x, g.int64([0, 0, numHeads, spec.headDim])]);
    const [x1, x2] = g.op("Split", [x4, g.int64([half, half])], { outputs: 2, attrs: { axis: -1 } });
    const r1 = g.op1("Sub", [g.op1("Mul", [x1!, shared.cos]), g.op1("Mul", [x2!, shared.sin])]);
    const r2 = g.op1("Add", [g.op1("Mul", [x2!, shared.cos]), g.op1("Mul", [x1!, shared.sin])]);
    return g.op1("Reshape", [
      g.op1("Concat", [r1, r2], { axis: -1 }),
      g.int64([0, 0, numHeads * spec.headDim]),
    ]);
  }

  private mlp(l: number, lw: LayerWeights, x: string, shared: Shared): string {
    const { g, d } = this;
    const ff = this.spec.intermediateSize;
    const wgu = concatColumns(
      [
        { data: transpose(lw.gateProj, ff, d), cols: ff },
        { data: transpose(lw.upProj, ff, d), cols: ff },
      ],
      d,
    );
    const gu = g.op1("MatMul", [x, g.weight(`layers.${l}.gate_up`, [d, 2 * ff], wgu)]);
    const [gate0, up0] = g.op("Split", [gu, g.int64([ff, ff])], { outputs: 2, attrs: { axis: -1 } });
    const gate = this.peftProjection(l, "gate_proj", x, gate0!, shared);
    const up = this.peftProjection(l, "up_proj", x, up0!, shared);
    let act = g.op1("Mul", [g.op1("Mul", [gate, g.op1("Sigmoid", [gate])]), up]);
    if (this.options.peft.ia3Targets.includes("down_proj"))
      act = g.op1("Mul", [act, this.ia3Scale(l, "down_proj", shared)]);
    const down = this.peftProjection(
      l,
      "down_proj",
      act,
      this.linear(act, `layers.${l}.down_proj`, lw.downProj, d, ff, null),
      shared,
    );
    return this.bottleneck(l, "mlp", down, shared);
  }

  /** Houlsby adapter on a sublayer output: out + silu(out Wd + bd) Wu + bu (slot 0: zeros = identity). */
  private bottleneck(l: number, p: BottleneckPlace, out: string, shared: Shared): string {
    if (!this.options.peft.bottleneck) return out;
    const { g } = this;
    const row = this.layerRow(shared.bottleneckRow, l);
    const axis1 = g.int64([1]);
    const down = g.op1("Gather", [INPUT.bottleneckDown(p), row]);
    const downBias = g.op1("Unsqueeze", [g.op1("Gather", [INPUT.bottleneckDownBias(p), row]), axis1]);
    const up = g.op1("Gather", [INPUT.bottleneckUp(p), row]);
    const upBias = g.op1("Unsqueeze", [g.op1("Gather", [INPUT.bottleneckUpBias(p), row]), axis1]);
    const z = g.op1("Add", [g.op1("MatMul", [out, down]), downBias]);
    const act = g.op1("Mul", [z, g.op1("Sigmoid", [z])]);
    return g.op1("Add", [out, g.op1("Add", [g.op1("MatMul", [act, up]), upBias])]);
  }

  private logits(x: string, weights: BaseWeights): void {
    const { g, spec } = this;
    const flat = g.op1("Reshape", [x, g.int64([-1, this.d])]);
    const rows = g.op1("Gather", [flat, INPUT.logitsIndex], { axis: 0 });
    const head =
      weights.lmHead === weights.embed
        ? "embed_tokens"
        : g.weight("lm_head", [spec.vocabSize, this.d], weights.lmHead);
    const logits = g.op1("Gemm", [rows, head], { transB: 1 });
    g.output(OUTPUT.logits, logits, DataType.FLOAT, ["num_logits", spec.vocabSize]);
  }
}

export const GRAPH_OPSETS = [
  { domain: "", version: 23 },
  { domain: "com.microsoft", version: 1 },
];

/** Build the graph: writes the external weights file and returns the model proto bytes. */
export function buildLlamaGraph(
  spec: ModelSpec,
  weights: BaseWeights,
  options: GraphOptions,
  out: { weightsPath: string; weightsFileName: string },
): { modelBytes: Uint8Array; weightBytes: number; numNodes: number } {
  const g = new LlamaGraph(spec, options, out.weightsFileName).build(weights);
  const modelBytes = g.finish({
    weightsPath: out.weightsPath,
    opsets: GRAPH_OPSETS,
    graphName: "taskmux_llama",
  });
  return { modelBytes, weightBytes: g.totalWeightBytes, numNodes: g.nodes.length };
}
