/**
 * @module model/builder/llama-graph — builds the taskmux ONNX graph for a Llama-family checkpoint
 * (see model/contract.ts for the inputs and outputs it carries).
 */
import type { BaseWeights } from "../checkpoint.ts";
import {
  ADAPTER_POOL_KINDS,
  type AdapterPoolKind,
  BOTTLENECK_PLACES,
  type BottleneckPlace,
  hasIa3WideFlag,
  IA3_WIDE_SITES,
  INPUT,
  ia3Sites,
  isSharedInputSite,
  loraInputDims,
  loraSites,
  OUTPUT,
  type PeftLayout,
  type Projection,
  projectionDims,
  SITES,
  type Site,
  type SiteLayout,
  siteOfProjection,
} from "../contract.ts";
import { type ModelSpec, ropeTables } from "../model-spec.ts";
import { GraphBuilder } from "./graph.ts";
import { DataType } from "./onnx-proto.ts";
import {
  bitsOf,
  QUANT_BLOCK_SIZE,
  type QuantBlockSize,
  quantizeMatrix,
  toFloat16,
  type WeightFormat,
} from "./quantize.ts";

export type RopeImplementation = "contrib" | "manual";

export interface GraphOptions {
  peft: PeftLayout;
  /** com.microsoft RotaryEmbedding, or plain ops (any head size; used when the contrib op refuses it). */
  rope: RopeImplementation;
  /**
   * How the base projection weights (fused qkv, o, gate_up, down, LM head) are stored and multiplied
   * (default fp32; docs/weight-formats.md):
   *   fp32  MatMul / Gemm on fp32 initializers
   *   fp16  fp16 initializers + Cast to fp32 (onnxruntime folds the Cast at session creation: half the file,
   *         fp32 compute; resident memory a little above fp32's)
   *   int8, int4  com.microsoft MatMulNBits, symmetric blocks of `quantBlockSize`, accuracy_level 4; the LM
   *         head gets its own quantised [V, D] copy, the embedding Gather keeps fp32
   * Norms, biases, rope tables and every PEFT input stay fp32.
   */
  weights?: WeightFormat;
  /** int8/int4 only: values per quantisation block along K (default 32, llama.cpp Q4_0's; QUANT_BLOCK_SIZES). */
  quantBlockSize?: QuantBlockSize;
}

/** MatMulNBits accuracy_level 4: int8 activations (VNNI); never 8-bit with level 0 (ort-facts §2). */
const NBITS_ACCURACY_LEVEL = 4;

/** [rows, cols] row-major -> [cols, rows]: HF Linear [out, in] becomes MatMul's [in, out]. */
export function transpose(w: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(w.length);
  for (let r = 0; r < rows; r++) {
    const base = r * cols;
    for (let c = 0; c < cols; c++) out[c * rows + r] = w[base + c]!;
  }
  return out;
}

/** Stack row-major [rows_i, cols] matrices into [sum(rows_i), cols] (HF Linear [out, in] matrices fuse this way). */
function concatRows(parts: Float32Array[]): Float32Array {
  return concatVectors(parts);
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

/**
 * Decode steps (one new token a row) read the past in place (decodeAttention); other steps run onnxruntime's
 * Attention kernel. Each variant is built once per phase, so no layer needs an If of its own.
 */
type Phase = "decode" | "prefill";
const PHASES: readonly Phase[] = ["decode", "prefill"];

/**
 * What a step may use that a decoder copy must carry paths for: an adapter kind, LoRA on the MLP's products
 * ("lora_mlp": some row's adapter targets gate, up or down; the runner then feeds those sites above rank 0), or
 * IA3 on o, gate or up ("ia3_wide": the ia3_wide input).
 */
export type DecoderNeed = AdapterPoolKind | "lora_mlp" | "ia3_wide";
const DECODER_NEEDS: readonly DecoderNeed[] = [...ADAPTER_POOL_KINDS, "lora_mlp", "ia3_wide"];

/** The sites of the MLP block: LoRA there is a need of its own (DecoderNeed). */
const MLP_SITES: readonly Site[] = ["gate_up", "down_proj"];
const isMlpProjection = (m: Projection) => MLP_SITES.includes(siteOfProjection(m));
const isIa3WideProjection = (m: Projection) => IA3_WIDE_SITES.includes(siteOfProjection(m));

/** One copy of the decoder: the PEFT paths it carries (null: none) and the needs it serves. */
export interface DecoderVariant {
  name: string;
  layout: PeftLayout | null;
  serves: DecoderNeed[];
}

/**
 * The decoder copies a graph with `layout` holds, cheapest first: one without PEFT paths; when the layout has
 * more than one kind, one per kind with only that kind's paths; and one with all of them (steps mixing kinds).
 * When the layout has LoRA on both the attention and the MLP products, a copy with only the attention's LoRA paths
 * comes before the other LoRA copies: adapters on q, k, v and o (PEFT's usual targets) then skip the MLP's
 * zero-rank paths, ~11 nodes a layer and 2-3 ms of a 32-row step. Likewise a copy with IA3 only at q,k,v and
 * down (PEFT's default IA3 targets for Llama are k, v and down) comes before the other IA3 copies: scaling o and
 * gate,up by ones cost 4-5 ms of a 32-row step.
 */
export function decoderVariants(layout: PeftLayout): DecoderVariant[] {
  const only: Record<AdapterPoolKind, PeftLayout> = {
    lora: { loraTargets: layout.loraTargets, ia3Targets: [], bottleneck: false },
    ia3: { loraTargets: [], ia3Targets: layout.ia3Targets, bottleneck: false },
    bottleneck: { loraTargets: [], ia3Targets: [], bottleneck: layout.bottleneck },
  };
  const kinds = ADAPTER_POOL_KINDS.filter((k) =>
    k === "bottleneck"
      ? layout.bottleneck
      : (k === "lora" ? layout.loraTargets : layout.ia3Targets).length > 0,
  );
  const attentionLora = layout.loraTargets.filter((m) => !isMlpProjection(m));
  const mlpLora = layout.loraTargets.length > attentionLora.length;
  const wideIa3 = layout.ia3Targets.some(isIa3WideProjection);
  // A copy with a kind's paths serves that kind's extra needs too.
  const withExtras = (needs: DecoderNeed[]): DecoderNeed[] => [
    ...needs,
    ...(mlpLora && needs.includes("lora") ? (["lora_mlp"] as const) : []),
    ...(wideIa3 && needs.includes("ia3") ? (["ia3_wide"] as const) : []),
  ];
  const variants: DecoderVariant[] = [{ name: "base", layout: null, serves: [] }];
  if (mlpLora && attentionLora.length > 0)
    variants.push({
      name: "lora_attention",
      layout: { loraTargets: attentionLora, ia3Targets: [], bottleneck: false },
      serves: ["lora"],
    });
  if (hasIa3WideFlag(layout))
    variants.push({
      name: "ia3_qkv_down",
      layout: {
        loraTargets: [],
        ia3Targets: layout.ia3Targets.filter((m) => !isIa3WideProjection(m)),
        bottleneck: false,
      },
      serves: ["ia3"],
    });
  if (kinds.length > 1) {
    // Bottleneck-only steps are rare enough (Houlsby adapters) to share the all-paths copy.
    for (const k of kinds.filter((k) => k !== "bottleneck"))
      variants.push({ name: k, layout: only[k], serves: withExtras([k]) });
  }
  if (kinds.length > 0) variants.push({ name: "all", layout, serves: withExtras(kinds) });
  return variants;
}

/** One layer of the PEFT paths: its index (LoRA weights are fed per layer), its pool rows, the paths built. */
interface LayerRows {
  layer: number;
  /** the PEFT paths this decoder copy carries */
  layout: PeftLayout;
  ia3Sites: ReadonlySet<Site>;
  loraSites: ReadonlyMap<Site, SiteLayout>;
  /** slot * numLayers + layer per row, [B, 1] */
  ia3: string;
  bottleneck: string;
  bottleneck1: string;
}

/** Graph-wide tensors every layer reads. */
interface Shared {
  /** slot * numLayers per row, [B] (for Gathers feeding batched MatMuls) */
  bottleneckRow: string;
  /** the same as [B, 1]: Gathers of vectors then yield [B, 1, dim], ready to broadcast over T */
  ia3Row: string;
  bottleneckRow1: string;
  /** per need the layout can have, a bool scalar: this step has it (DecoderNeed) */
  used: Partial<Record<DecoderNeed, string>>;
  cos: string;
  sin: string;
  /** the same tables times 1/sqrt(head size), for queries: attention then needs no scaling node (see rotary) */
  cosQuery: string;
  sinQuery: string;
  /** bool scalar: every row of this step has exactly one new token (a decode step) */
  isDecode: string;
  /** decode steps: the mask as an additive bias [B, 1, 1, 1, P + 1] (0 or -1e30) */
  decodeBias: string;
  /** decode steps: [P, 1], splitting attention weights into past and new-token parts */
  decodeSplit: string;
}

/** A base weight as the graph stores it: a [K, N] fp32 MatMul operand, or MatMulNBits blocks. */
type StoredWeight =
  | { kind: "matmul"; weight: string }
  | { kind: "nbits"; blob: string; scales: string; n: number; k: number; bits: number };

interface Linear {
  weight: StoredWeight;
  bias: string | null;
}

interface LayerParams {
  inputNorm: string;
  postNorm: string;
  qkv: Linear;
  o: Linear;
  gateUp: Linear;
  down: Linear;
}

interface ModelParams {
  layers: LayerParams[];
  finalNorm: string;
  embed: string;
  /** tied fp32/fp16: the embedding table itself (Gemm transB); quantised: its own MatMulNBits copy */
  head: StoredWeight | { kind: "gemm"; table: string };
}

class LlamaGraph {
  private readonly g: GraphBuilder;
  private readonly d: number;
  private readonly qDim: number;
  private readonly kvDim: number;
  private readonly eps: { float: number };
  private readonly format: WeightFormat;
  private readonly blockSize: QuantBlockSize;
  private skipNorms = 0;

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
    this.format = options.weights ?? "fp32";
    this.blockSize = options.quantBlockSize ?? QUANT_BLOCK_SIZE;
  }

  /**
   * The decoder is built once per variant (decoderVariants) and phase (decode or prefill) over the same weights,
   * each copy the `then` branch of its own top-level If; exactly one condition holds per step, and the other Ifs
   * return empty tensors that the final Concats pass over. A step runs only the PEFT nodes its rows' kinds need: a
   * base-only step none of the ~75 a layer that every PEFT path takes even at zero rank (15-25% of a batch-1
   * decode step), an IA3-only step not the LoRA and bottleneck ones (batch 1: 26.3 -> 22.8 ms); and no layer
   * needs an If to pick its attention (batch 1: 1.045x). The copies sit side by side, not nested: onnxruntime
   * prepacks a weight for subgraphs one level below the graph that holds it only, and nested copies ran unpacked
   * (docs/weight-formats.md). Each If costs microseconds; the weights are stored once.
   */
  build(weights: BaseWeights): GraphBuilder {
    const g = this.g;
    const shared = this.declareInputs();
    const params = this.storeWeights(weights);
    const h = this.embeddings(params.embed);
    const x = g.op1("SimplifiedLayerNormalization", [h, params.layers[0]!.inputNorm], {
      axis: -1,
      epsilon: this.eps,
    });
    // [key 0, value 0, key 1, ...] stacked along the batch axis: one output for the runner to fetch.
    const stackKv = (outs: string[]) => g.op1("Concat", outs.slice(1), { axis: 0 });
    const variants = decoderVariants(this.options.peft);
    const chosen = variants.length > 1 ? this.variantConditions(variants, shared) : [null];
    const phaseIs: Record<Phase, string> = {
      decode: shared.isDecode,
      prefill: g.op1("Not", [shared.isDecode]),
    };
    // Gathers, not Slices: onnxruntime's basic optimizations try to drop a Slice to [0, 0) as a no-op (they stop
    // only because the result feeds subgraphs, and log a warning at every session start).
    const emptyHidden = g.op1("Gather", [x, g.int64([], [0])], { axis: 0 }); // [0, T, D]
    const kvColumns = g.int64(Array.from({ length: this.kvDim }, (_, i) => i));
    const emptyKv = g.op1("Gather", [emptyHidden, kvColumns], { axis: 2 }); // [0, T, KVD]
    const results = variants.flatMap((variant, i) =>
      PHASES.map((phase) =>
        this.ifElse(
          chosen[i] ? g.op1("And", [chosen[i], phaseIs[phase]]) : phaseIs[phase],
          () => {
            const outs = this.decoder(params, x, h, shared, variant.layout, phase);
            return [outs[0]!, stackKv(outs)];
          },
          () => [emptyHidden, emptyKv],
          `decoder_${variant.name}_${phase}`,
        ),
      ),
    );
    const final = g.op1(
      "Concat",
      results.map((r) => r[0]!),
      { axis: 0 },
    );
    const newKv = g.op1(
      "Concat",
      results.map((r) => r[1]!),
      { axis: 0 },
    );
    g.output(OUTPUT.newKv, newKv, DataType.FLOAT, ["kv_rows", "seq", this.kvDim]);
    this.logits(final, params);
    return g;
  }

  /**
   * Per variant, a bool scalar: this step runs that copy. A variant serves a step when every kind the step uses
   * is among its kinds; the first such variant (cheapest) is chosen.
   */
  private variantConditions(variants: DecoderVariant[], shared: Shared): string[] {
    const { g } = this;
    const chained = (op: "And" | "Or", values: string[]) => values.reduce((acc, v) => g.op1(op, [acc, v]));
    const taken: string[] = [];
    return variants.map((variant) => {
      const unserved = DECODER_NEEDS.filter((n) => !variant.serves.includes(n))
        .map((n) => shared.used[n])
        .filter((flag): flag is string => flag !== undefined);
      const serves = unserved.length ? g.op1("Not", [chained("Or", unserved)]) : null;
      const earlier = taken.length ? g.op1("Not", [chained("Or", taken)]) : null;
      // Only a single variant would have neither part, and a single variant needs no condition.
      const condition = chained(
        "And",
        [serves, earlier].filter((c): c is string => c !== null),
      );
      taken.push(condition);
      return condition;
    });
  }

  /** All layers, with the PEFT paths of `layout` (null: none); returns [final normed hidden, key 0, value 0, ...]. */
  private decoder(
    params: ModelParams,
    x0: string,
    h0: string,
    shared: Shared,
    layout: PeftLayout | null,
    phase: Phase,
  ): string[] {
    const kv: string[] = [];
    let x = x0;
    let h = h0;
    const sites = {
      ia3: new Set((layout ? ia3Sites(this.spec, layout.ia3Targets) : []).map((s) => s.site)),
      lora: new Map((layout ? loraSites(this.spec, layout.loraTargets) : []).map((s) => [s.site, s])),
    };
    for (let l = 0; l < this.spec.numLayers; l++) {
      const p = params.layers[l]!;
      const rows = layout ? this.layerRows(l, shared, layout, sites) : null;
      const attn = this.attention(l, p, x, rows, shared, phase);
      kv.push(attn.key, attn.value);
      const [x2, h2] = this.skipNorm(attn.out, h, p.postNorm);
      const mlpOut = this.mlp(p, x2, rows);
      const nextNorm = l + 1 < this.spec.numLayers ? params.layers[l + 1]!.inputNorm : params.finalNorm;
      [x, h] = this.skipNorm(mlpOut, h2, nextNorm);
    }
    return [x, ...kv];
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
      g.input(INPUT.pastKey(l), DataType.FLOAT, ["batch", spec.numKvHeads, 1, "past", spec.headDim]);
      g.input(INPUT.pastValue(l), DataType.FLOAT, ["batch", spec.numKvHeads, 1, "past", spec.headDim]);
    }
    const { peft } = this.options;
    const slots = [INPUT.loraSlot, INPUT.ia3Slot, INPUT.bottleneckSlot];
    for (const slot of slots) g.input(slot, DataType.INT64, ["batch"]);
    const slotRow = (slotInput: string) => g.op1("Mul", [slotInput, g.int64([L], [])]);
    const axis1 = g.int64([1]);
    const bottleneckRow = slotRow(INPUT.bottleneckSlot);
    // The runner feeds all-zero slots for a kind no row uses (slot 0 is every kind's identity).
    const anyRow = (slot: string) =>
      g.op1("Greater", [g.op1("ReduceMax", [slot], { keepdims: 0 }), g.int64([0], [])]);
    const shared: Shared = {
      ia3Row: g.op1("Unsqueeze", [slotRow(INPUT.ia3Slot), axis1]),
      bottleneckRow,
      bottleneckRow1: g.op1("Unsqueeze", [bottleneckRow, axis1]),
      used: {
        lora: anyRow(INPUT.loraSlot),
        ia3: anyRow(INPUT.ia3Slot),
        bottleneck: anyRow(INPUT.bottleneckSlot),
      },
      cos: "",
      sin: "",
      cosQuery: "",
      sinQuery: "",
      ...this.decodeAttentionInputs(),
    };
    for (const layout of loraSites(spec, peft.loraTargets)) {
      const { site } = layout;
      const { inDim } = projectionDims(spec, SITES[site][0]);
      // Each row's own A and B, per layer (lora-rows.ts keeps them between steps), so the batched MatMuls read
      // them in place: a Gather from the slot pool would copy them every step. Rows, parts and rank are per
      // site: a site no adapter of the step targets is fed at rank 0 and one row, and onnxruntime plans buffers
      // assuming inputs that share a dim name share its size.
      const dims = loraInputDims(layout, {
        rows: `lora_rows_${site}`,
        parts: `lora_parts_${site}`,
        inDim,
        rank: `lora_rank_${site}`,
      });
      for (let l = 0; l < L; l++) {
        g.input(INPUT.loraA(l, site), DataType.FLOAT, dims.a);
        g.input(INPUT.loraB(l, site), DataType.FLOAT, dims.b);
      }
      if (dims.columns) g.input(INPUT.loraColumns(site), DataType.INT64, dims.columns);
    }
    // The runner feeds a LoRA site above rank 0 exactly when some row's adapter targets it (peft-pools.ts).
    const mlpRanks = loraSites(spec, peft.loraTargets)
      .filter((layout) => MLP_SITES.includes(layout.site))
      .map((layout) => g.op1("Shape", [INPUT.loraA(0, layout.site)], { start: -1 }));
    if (mlpRanks.length > 0) {
      const rank = g.op1("ReduceMax", [g.op1("Concat", mlpRanks, { axis: 0 })], { keepdims: 0 });
      shared.used.lora_mlp = g.op1("Greater", [rank, g.int64([0], [])]);
    }
    for (const { site, width } of ia3Sites(spec, peft.ia3Targets)) {
      g.input(INPUT.ia3(site), DataType.FLOAT, ["ia3_rows", width]);
    }
    if (hasIa3WideFlag(peft)) {
      g.input(INPUT.ia3Wide, DataType.BOOL, []);
      shared.used.ia3_wide = INPUT.ia3Wide;
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
    const dims = [spec.maxPositionEmbeddings, tables.half];
    const scaled = (t: Float32Array) => t.map((c) => c * this.scale);
    // Rotation is linear in cos and sin, so queries rotated by scaled tables come out already multiplied by
    // 1/sqrt(head size): the decode path's products can then run at alpha 1, which MLAS's unpacked M=1
    // kernels require, without a scaling node a layer.
    const stored = {
      cos: g.weight("rope_cos", dims, tables.cos),
      sin: g.weight("rope_sin", dims, tables.sin),
      cosQuery: g.weight("rope_cos_query", dims, scaled(tables.cos)),
      sinQuery: g.weight("rope_sin_query", dims, scaled(tables.sin)),
    };
    if (this.options.rope === "contrib") {
      Object.assign(shared, stored);
    } else {
      // [B, T, 1, half]: gathered once per step, broadcast over heads in every layer.
      const axis2 = g.int64([2]);
      const perStep = (table: string) =>
        g.op1("Unsqueeze", [g.op1("Gather", [table, INPUT.positionIds]), axis2]);
      shared.cos = perStep(stored.cos);
      shared.sin = perStep(stored.sin);
      shared.cosQuery = perStep(stored.cosQuery);
      shared.sinQuery = perStep(stored.sinQuery);
    }
    return shared;
  }

  /** Step-wide tensors the decode attention path reads (see decodeAttention). */
  private decodeAttentionInputs(): Pick<Shared, "isDecode" | "decodeBias" | "decodeSplit"> {
    const { g } = this;
    const dim = (input: string, axis: number) =>
      g.op1("Slice", [g.op1("Shape", [input]), g.int64([axis]), g.int64([axis + 1])]);
    const seqLen = dim(INPUT.inputIds, 1);
    return {
      isDecode: g.op1("Squeeze", [g.op1("Equal", [seqLen, g.int64([1])]), g.int64([0])]),
      // Finite, so a fully masked row could never turn into NaN.
      decodeBias: g.op1("Unsqueeze", [
        g.op1("Where", [INPUT.attentionMask, g.float([0], []), g.float([-1e30], [])]),
        g.int64([1]),
      ]),
      decodeSplit: g.op1("Concat", [dim(INPUT.pastKey(0), 3), g.int64([1])], { axis: 0 }),
    };
  }

  /** Every weight as an initializer of the outer graph (fp16 Casts included), so both branches share them. */
  private storeWeights(weights: BaseWeights): ModelParams {
    const { g, d, qDim, kvDim } = this;
    const ff = this.spec.intermediateSize;
    const vector = (name: string, data: Float32Array) => g.weight(name, [data.length], data);
    const linear = (
      name: string,
      w: Float32Array,
      outDim: number,
      inDim: number,
      bias: Float32Array | null,
    ) => ({
      weight: this.storeMatrix(name, w, outDim, inDim),
      bias: bias ? vector(`${name}.bias`, bias) : null,
    });
    const layers = weights.layers.map((lw, l): LayerParams => {
      const qkvBias = lw.qBias && lw.kBias && lw.vBias ? concatVectors([lw.qBias, lw.kBias, lw.vBias]) : null;
      return {
        inputNorm: vector(`layers.${l}.input_norm`, lw.inputNorm),
        postNorm: vector(`layers.${l}.post_norm`, lw.postNorm),
        qkv: linear(
          `layers.${l}.qkv`,
          concatRows([lw.qProj, lw.kProj, lw.vProj]),
          qDim + 2 * kvDim,
          d,
          qkvBias,
        ),
        o: linear(`layers.${l}.o_proj`, lw.oProj, d, qDim, lw.oBias),
        gateUp: linear(`layers.${l}.gate_up`, concatRows([lw.gateProj, lw.upProj]), 2 * ff, d, null),
        down: linear(`layers.${l}.down_proj`, lw.downProj, d, ff, null),
      };
    });
    const embed = this.table("embed_tokens", weights.embed);
    const tied = weights.lmHead === weights.embed;
    const head: ModelParams["head"] =
      bitsOf(this.format) !== null
        ? // Tied or not, the head gets its own quantised [V, D] copy; the embedding Gather keeps fp32.
          this.storeMatrix("lm_head", weights.lmHead, this.spec.vocabSize, d)
        : { kind: "gemm", table: tied ? embed : this.table("lm_head", weights.lmHead) };
    return { layers, finalNorm: vector("final_norm", weights.finalNorm), embed, head };
  }

  /** A base weight w in HF Linear layout [outDim, inDim], stored as `options.weights` says. */
  private storeMatrix(name: string, w: Float32Array, outDim: number, inDim: number): StoredWeight {
    const { g } = this;
    const bits = bitsOf(this.format);
    if (bits !== null) {
      const q = quantizeMatrix(w, outDim, inDim, bits, this.blockSize);
      const blob = g.externalTensor(
        `${name}.q${bits}`,
        DataType.UINT8,
        [outDim, q.blocksPerRow, (this.blockSize * bits) / 8],
        q.data,
      );
      const scales = g.weight(`${name}.scales`, [outDim * q.blocksPerRow], q.scales);
      return { kind: "nbits", blob, scales, n: outDim, k: inDim, bits };
    }
    const wt = transpose(w, outDim, inDim);
    const dims = [inDim, outDim];
    return {
      kind: "matmul",
      weight: this.format === "fp16" ? this.fp16Weight(name, dims, wt) : g.weight(name, dims, wt),
    };
  }

  /** A [V, D] table as fp32 (or fp16 + Cast when options.weights is fp16). */
  private table(name: string, data: Float32Array): string {
    const dims = [this.spec.vocabSize, this.d];
    return this.format === "fp16" ? this.fp16Weight(name, dims, data) : this.g.weight(name, dims, data);
  }

  /**
   * An fp16 initializer cast to fp32. The Cast is a constant subgraph that onnxruntime folds when the session
   * starts, so the file holds fp16 and the MatMul runs on fp32 (onnxruntime-node 1.30's CPU provider has no fp16
   * MatMul kernel on x86: it inserts Casts around an fp16 MatMul anyway; docs/weight-formats.md).
   */
  private fp16Weight(name: string, dims: number[], data: Float32Array): string {
    const half = toFloat16(data);
    const stored = this.g.externalTensor(
      `${name}.fp16`,
      DataType.FLOAT16,
      dims,
      new Uint8Array(half.buffer, half.byteOffset, half.byteLength),
    );
    return this.g.op("Cast", [stored], { outputs: [name], attrs: { to: DataType.FLOAT } })[0]!;
  }

  /** x [.., K] times a stored weight (+ bias): MatMul, or com.microsoft MatMulNBits at accuracy_level 4. */
  private linear(x: string, p: Linear): string {
    const { g } = this;
    const w = p.weight;
    const y =
      w.kind === "matmul"
        ? g.op1("MatMul", [x, w.weight])
        : g.op1(
            "MatMulNBits",
            [x, w.blob, w.scales],
            {
              K: w.k,
              N: w.n,
              bits: w.bits,
              block_size: this.blockSize,
              accuracy_level: NBITS_ACCURACY_LEVEL,
            },
            "com.microsoft",
          );
    return p.bias ? g.op1("Add", [y, p.bias]) : y;
  }

  /** ids < V read the vocabulary; ids >= V read virtual_embeddings[id - V] (TensorRT-LLM's convention). */
  private embeddings(table: string): string {
    const { g } = this;
    const V = this.spec.vocabSize;
    const ids = INPUT.inputIds;
    const tokens = g.op1("Gather", [table, g.op1("Min", [ids, g.int64([V - 1], [])])]);
    const isVirtual = g.op1("GreaterOrEqual", [ids, g.int64([V], [])]);
    const virtualIndex = g.op1("Max", [g.op1("Sub", [ids, g.int64([V], [])]), g.int64([0], [])]);
    const virtuals = g.op1("Gather", [INPUT.virtualEmbeddings, virtualIndex]);
    return g.op1("Where", [g.op1("Unsqueeze", [isVirtual, g.int64([-1])]), virtuals, tokens]);
  }

  private skipNorm(input: string, skip: string, gamma: string): [string, string] {
    const id = this.skipNorms++;
    const outs = this.g.op("SkipSimplifiedLayerNormalization", [input, skip, gamma], {
      outputs: [`skipnorm_${id}_y`, "", "", `skipnorm_${id}_sum`],
      attrs: { epsilon: this.eps },
      domain: "com.microsoft",
    });
    return [outs[0]!, outs[3]!];
  }

  /** Pool rows of layer l for the PEFT paths `layout` has. */
  private layerRows(
    l: number,
    shared: Shared,
    layout: PeftLayout,
    sites: { ia3: ReadonlySet<Site>; lora: ReadonlyMap<Site, SiteLayout> },
  ): LayerRows {
    const { g } = this;
    const row = (sharedRow: string, on: boolean) => (on ? g.op1("Add", [sharedRow, g.int64([l], [])]) : "");
    return {
      layer: l,
      layout,
      ia3Sites: sites.ia3,
      loraSites: sites.lora,
      ia3: row(shared.ia3Row, layout.ia3Targets.length > 0),
      bottleneck: row(shared.bottleneckRow, layout.bottleneck),
      bottleneck1: row(shared.bottleneckRow1, layout.bottleneck),
    };
  }

  /**
   * If(cond) then `thenBody()` else `elseBody()`: the nodes each body adds become that branch's subgraph. Constants
   * and weights created meanwhile stay initializers of the outer graph, which both branches read.
   */
  private ifElse(cond: string, thenBody: () => string[], elseBody: () => string[], name: string): string[] {
    const { g } = this;
    const branch = (branchName: string, body: () => string[]) => {
      const start = g.nodes.length;
      const outs = body();
      const produced = new Set(g.nodes.slice(start).flatMap((n) => n.outputs));
      // A branch output must be made inside the branch.
      const named = outs.map((o) => (produced.has(o) ? o : g.op1("Identity", [o])));
      const nodes = g.nodes.splice(start);
      return {
        graph: {
          name: branchName,
          nodes,
          initializers: [],
          inputs: [],
          outputs: named.map((o) => ({ name: o, dataType: DataType.FLOAT, dims: null })),
        },
      };
    };
    const thenBranch = branch(`${name}_then`, thenBody);
    const elseBranch = branch(`${name}_else`, elseBody);
    const n = thenBranch.graph.outputs.length;
    if (elseBranch.graph.outputs.length !== n) throw new Error(`${name}: branches differ in outputs`);
    return g.op("If", [cond], { outputs: n, attrs: { then_branch: thenBranch, else_branch: elseBranch } });
  }

  /**
   * The LoRA addition on a site's output y: y + (x A_s) B_s (a no-op without rows, or when the layout targets
   * nothing there). At a shared-input site every part j (a projection some adapter targets) has its own A_j
   * ([B, J, in, r], x broadcast over J) and all parts share one B holding each part's columns ([B, 1, r, width]):
   * with a row's J vectors x A_j as the rows of one [J, r] matrix, (x A_j) B for every j is one M=J product that
   * reads B once, [B, T, J, width]; a Gather then keeps, block by block, part j's own columns (lora_columns). That is
   * 2 inputs a layer for q, k and v instead of 6. Against a mask and a sum over J (B read J times, two passes over
   * the J products) it saves ~30 us a layer at 32 rows.
   */
  private lora(site: Site, x: string, y: string, rows: LayerRows | null): string {
    if (!rows || !rows.loraSites.has(site)) return y;
    const { g } = this;
    const a = INPUT.loraA(rows.layer, site);
    const b = INPUT.loraB(rows.layer, site);
    if (!isSharedInputSite(site)) return g.op1("Add", [y, g.op1("MatMul", [g.op1("MatMul", [x, a]), b])]);
    const layout = rows.loraSites.get(site)!;
    const perToken = g.op1("MatMul", [g.op1("Unsqueeze", [x, g.int64([1])]), a]); // [B, J, T, r]
    const perPart = g.op1("MatMul", [g.op1("Transpose", [perToken], { perm: [0, 2, 1, 3] }), b]); // [B, T, J, width]
    const blocks = g.op1("Reshape", [perPart, g.int64([0, 0, -1, layout.block])]);
    const own = g.op1("Gather", [blocks, INPUT.loraColumns(site)], { axis: 2 }); // [B, T, width / block, block]
    return g.op1("Add", [y, g.op1("Reshape", [own, g.int64([0, 0, layout.width])])]);
  }

  /**
   * y times each row's IA3 vector at `site` (a no-op without rows or when the layout scales nothing there).
   * Output sites are scaled on the fused product, before the split and before LoRA additions: a task carries one
   * adapter (adapters/formats/task-folder.ts), so a row's LoRA addition is zero or its IA3 vector is all-ones, and
   * (y + d) * s = y * s + d either way.
   */
  private ia3(site: Site, y: string, rows: LayerRows | null): string {
    if (!rows || !rows.ia3Sites.has(site)) return y;
    const scale = this.g.op1("Gather", [INPUT.ia3(site), rows.ia3]); // [B, 1, width]
    return this.g.op1("Mul", [y, scale]);
  }

  private attention(
    l: number,
    p: LayerParams,
    x: string,
    rows: LayerRows | null,
    shared: Shared,
    phase: Phase,
  ): { out: string; key: string; value: string } {
    const { g, spec, qDim, kvDim } = this;
    const qkv = this.lora("qkv", x, this.ia3("qkv", this.linear(x, p.qkv), rows), rows);
    const [q0, k0, v0] = g.op("Split", [qkv, g.int64([qDim, kvDim, kvDim])], {
      outputs: 3,
      attrs: { axis: -1 },
    });
    // q comes out scaled by 1/sqrt(head size) (shared.cosQuery), so neither attention path scales again.
    const q = this.rotary(q0!, spec.numHeads, shared.cosQuery, shared.sinQuery);
    const k = this.rotary(k0!, spec.numKvHeads, shared.cos, shared.sin);
    const v = v0!;
    let attn: string;
    if (phase === "decode") {
      attn = this.decodeAttention(l, q, k, v, shared);
    } else {
      // present_key/value are required outputs of the CPU kernel when a past is fed; nothing fetches them.
      const past = (input: string) => g.op1("Squeeze", [input, g.int64([2])]); // the kernel's [B, KVH, P, HS]
      attn = g.op(
        "Attention",
        [q, k, v, INPUT.attentionMask, past(INPUT.pastKey(l)), past(INPUT.pastValue(l))],
        {
          outputs: 3,
          attrs: { q_num_heads: spec.numHeads, kv_num_heads: spec.numKvHeads, scale: { float: 1 } },
        },
      )[0]!;
    }
    const o = this.lora("o_proj", attn, this.ia3("o_proj", this.linear(attn, p.o), rows), rows);
    return { out: this.bottleneck("attn", o, rows), key: k, value: v };
  }

  /**
   * Attention for one new token per row, without joining past and new K/V: the CPU Attention kernel copies
   * the whole past into its present outputs every step, which at 8-32 rows cost more than the attention
   * itself (measured 1.7x slower per layer at B=8 and B=32, past 256). Here the past is read once, in place:
   *   scores = [q·pastK^T, q·newK^T] + bias -> softmax -> split -> w_past·pastV + w_new·newV
   * Each query head is its own M=1 product against its KV head's past ([B, KVH, G, 1, HS] x
   * [B, KVH, 1, P, HS], G = heads per KV head, broadcast over G), so grouped-query attention needs no repeated
   * K/V, and MLAS runs each product with its unpacked M=1 kernels, which read the past once. (Grouping a KV
   * head's G queries into one M=G product made MLAS pack the past first: 30 layers at 32 rows, past 300,
   * 33.5 vs 21.6 ms.) q arrives pre-scaled, since those kernels take alpha 1 only. Prefill steps keep the
   * Attention kernel, which is faster for them.
   */
  private decodeAttention(l: number, q: string, k: string, v: string, shared: Shared): string {
    const { g, spec } = this;
    const kvh = spec.numKvHeads;
    const hs = spec.headDim;
    const group = spec.numHeads / kvh;
    // [B, 1, KVH*HS] -> [B, KVH, 1, 1, HS]: with one token a row, moving the token axis is only a Reshape.
    const perKvHead = (x: string) => g.op1("Reshape", [x, g.int64([0, kvh, 1, 1, hs])]);
    // [B, 1, NH*HS] -> [B, KVH, G, 1, HS]: query head h reads KV head floor(h / G).
    const qh = g.op1("Reshape", [q, g.int64([0, kvh, group, 1, hs])]);
    const scores = (keys: string) => g.op1("FusedMatMul", [qh, keys], { transB: 1 }, "com.microsoft");
    const weights = g.op1(
      "Softmax",
      [
        g.op1("Add", [
          g.op1("Concat", [scores(INPUT.pastKey(l)), scores(perKvHead(k))], { axis: -1 }),
          shared.decodeBias,
        ]),
      ],
      { axis: -1 },
    );
    const [wPast, wNew] = g.op("Split", [weights, shared.decodeSplit], { outputs: 2, attrs: { axis: -1 } });
    const out = g.op1("Add", [
      g.op1("MatMul", [wPast!, INPUT.pastValue(l)]),
      g.op1("MatMul", [wNew!, perKvHead(v)]),
    ]);
    return g.op1("Reshape", [out, g.int64([0, 1, spec.numHeads * hs])]); // [B, KVH, G, 1, HS] -> [B, 1, NH*HS]
  }

  private get scale(): number {
    return 1 / Math.sqrt(this.spec.headDim);
  }

  /** Rotate x by cos/sin (contrib: [maxPos, half] tables; manual: this step's [B, T, 1, half] rows). */
  private rotary(x: string, numHeads: number, cos: string, sin: string): string {
    const { g, spec } = this;
    if (this.options.rope === "contrib") {
      return g.op1(
        "RotaryEmbedding",
        [x, INPUT.positionIds, cos, sin],
        { interleaved: 0, num_heads: numHeads },
        "com.microsoft",
      );
    }
    const half = spec.headDim / 2;
    const x4 = g.op1("Reshape", [x, g.int64([0, 0, numHeads, spec.headDim])]);
    const [x1, x2] = g.op("Split", [x4, g.int64([half, half])], { outputs: 2, attrs: { axis: -1 } });
    const r1 = g.op1("Sub", [g.op1("Mul", [x1!, cos]), g.op1("Mul", [x2!, sin])]);
    const r2 = g.op1("Add", [g.op1("Mul", [x2!, cos]), g.op1("Mul", [x1!, sin])]);
    return g.op1("Reshape", [
      g.op1("Concat", [r1, r2], { axis: -1 }),
      g.int64([0, 0, numHeads * spec.headDim]),
    ]);
  }

  private mlp(p: LayerParams, x: string, rows: LayerRows | null): string {
    const { g } = this;
    const ff = this.spec.intermediateSize;
    const gu = this.lora("gate_up", x, this.ia3("gate_up", this.linear(x, p.gateUp), rows), rows);
    const [gate, up] = g.op("Split", [gu, g.int64([ff, ff])], { outputs: 2, attrs: { axis: -1 } });
    const act = this.ia3(
      "down_proj",
      g.op1("Mul", [g.op1("Mul", [gate!, g.op1("Sigmoid", [gate!])]), up!]),
      rows,
    );
    const down = this.lora("down_proj", act, this.linear(act, p.down), rows);
    return this.bottleneck("mlp", down, rows);
  }

  /** Houlsby adapter on a sublayer output: out + silu(out Wd + bd) Wu + bu (slot 0: zeros = identity). */
  private bottleneck(p: BottleneckPlace, out: string, rows: LayerRows | null): string {
    if (!rows || !rows.layout.bottleneck) return out;
    const { g } = this;
    const down = g.op1("Gather", [INPUT.bottleneckDown(p), rows.bottleneck]); // [B, D, rb]
    const downBias = g.op1("Gather", [INPUT.bottleneckDownBias(p), rows.bottleneck1]); // [B, 1, rb]
    const up = g.op1("Gather", [INPUT.bottleneckUp(p), rows.bottleneck]);
    const upBias = g.op1("Gather", [INPUT.bottleneckUpBias(p), rows.bottleneck1]);
    const z = g.op1("Add", [g.op1("MatMul", [out, down]), downBias]);
    const act = g.op1("Mul", [z, g.op1("Sigmoid", [z])]);
    return g.op1("Add", [out, g.op1("Add", [g.op1("MatMul", [act, up]), upBias])]);
  }

  /** Logits of the requested rows only: [R, D] x head^T. */
  private logits(x: string, params: ModelParams): void {
    const { g, spec } = this;
    const flat = g.op1("Reshape", [x, g.int64([-1, this.d])]);
    const rows = g.op1("Gather", [flat, INPUT.logitsIndex], { axis: 0 });
    const head = params.head;
    const logits =
      head.kind === "gemm"
        ? g.op1("Gemm", [rows, head.table], { transB: 1 })
        : this.linear(rows, { weight: head, bias: null });
    g.output(OUTPUT.logits, logits, DataType.FLOAT, ["num_logits", spec.vocabSize]);
    g.output(
      OUTPUT.greedyToken,
      g.op1("ArgMax", [logits], { axis: -1, keepdims: 0, select_last_index: 0 }),
      DataType.INT64,
      ["num_logits"],
    );
    g.output(
      OUTPUT.logitsRowSum,
      g.op1("ReduceSum", [logits, g.int64([-1])], { keepdims: 0 }),
      DataType.FLOAT,
      ["num_logits"],
    );
  }
}

export const GRAPH_OPSETS = [
  { domain: "", version: 23 },
  { domain: "com.microsoft", version: 1 },
];

/** The graph's nodes, inputs and weights, not yet serialized (buildLlamaGraph writes them). */
export function llamaGraph(
  spec: ModelSpec,
  weights: BaseWeights,
  options: GraphOptions,
  weightsFileName: string,
): GraphBuilder {
  return new LlamaGraph(spec, options, weightsFileName).build(weights);
}

/** Build the graph: writes the external weights file and returns the model proto bytes. */
export function buildLlamaGraph(
  spec: ModelSpec,
  weights: BaseWeights,
  options: GraphOptions,
  out: { weightsPath: string; weightsFileName: string },
): { modelBytes: Uint8Array; weightBytes: number; numNodes: number } {
  const g = llamaGraph(spec, weights, options, out.weightsFileName);
  const modelBytes = g.finish({
    weightsPath: out.weightsPath,
    opsets: GRAPH_OPSETS,
    graphName: "taskmux_llama",
  });
  return { modelBytes, weightBytes: g.totalWeightBytes, numNodes: g.nodes.length };
}
