/**
 * @module model/contract — the graph contract: input/output names, shapes and the StepBatch/StepResult
 * types that cross from the engine to the model worker. Types and constants only.
 *
 * One step runs B sequences ("rows"), each with T_b new tokens, padded to T = max T_b:
 *   input_ids         int64 [B, T]   ids < vocab are tokens; id >= vocab addresses virtual_embeddings[id - vocab]
 *   position_ids      int64 [B, T]   absolute positions (virtual tokens are ordinary positions)
 *   virtual_embeddings float [N, D]  soft-prompt rows used by this step; N >= 1 (row 0 may be a zero pad row)
 *   attention_mask    bool  [B, 1, T, P + T]  true = may attend; P = past length fed this step
 *   past_key.{l}, past_value.{l} float [B, KVH, 1, P, HS]  read-only; the graph never returns whole caches.
 *                     The 1 lets a decode step multiply each query head by its KV head's past as a batch of
 *                     M=1 products, which onnxruntime's MLAS runs without packing the past (a grouped M=G product
 *                     packs it first: 1.5x slower at 32 rows, docs/weight-formats.md)
 *   logits_index      int64 [R]      flat row indices (b * T + t) that need logits
 *   lora_slot / ia3_slot / bottleneck_slot  int64 [B]  per-row pool slot; slot 0 is the identity
 * LoRA is fed per layer and per site (a fused product, SITES) as each row's own matrices (model/lora-rows.ts keeps
 * them between steps; the scale is folded into B; B_s = 1 and r_s = 0 when no row of the step targets the site):
 *   one-projection sites (o_proj, down_proj): lora_a.{l}.{s} [B_s, in, r_s], lora_b.{l}.{s} [B_s, r_s, out]
 *   shared-input sites (qkv, gate_up):        lora_a.{l}.{s} [B_s, J_s, in, r_s]   J_s: the site's projections some
 *                                             resident adapter targets ("parts"), each its own A
 *                                             lora_b.{l}.{s} [B_s, 1, r_s, width]  the parts' B side by side, at their
 *                                             columns of the fused output (zeros elsewhere)
 *                                             lora_columns.{s} int64 [width / k_s]  per block of k_s output columns
 *                                             (k_s: SiteLayout.block), the block of the J_s products that holds it
 *                     so (x A_j) B is computed for every part j at once, as one M=J_s product a row and token (B
 *                     read once), and a Gather keeps part j's own columns: two inputs a layer instead of two per
 *                     projection
 * The other pools stack every layer of every slot on axis 0, slot-major: row = slot * numLayers + layer, so one
 * slot is one contiguous block and each layer gathers its rows with a single Gather (no per-layer slicing):
 *   ia3.{site} [S*L, width]       one pool per SITES entry (a fused product): the site's projections' vectors
 *                                 side by side (output scale for qkv, o_proj, gate_up; input scale for down_proj)
 *   ia3_wide bool []             some row's IA3 adapter scales o_proj, gate or up (IA3_WIDE_SITES); only in graphs
 *                                 whose IA3 targets include those and others (hasIa3WideFlag)
 *   bottleneck_down.{p} [S*L, D, rb], bottleneck_down_bias.{p} [S*L, rb],
 *   bottleneck_up.{p} [S*L, rb, D], bottleneck_up_bias.{p} [S*L, D]   p in {attn, mlp}; rb may be 0
 * Outputs:
 *   logits            float [R, V]   fetched only when some row reads logit values (StepBatch.fetchLogits)
 *   greedy_token      int64 [R]      argmax of each logits row (lowest id on ties)
 *   logits_row_sum    float [R]      finite exactly when the row is (a NaN/Inf anywhere makes the sum NaN/Inf)
 *   new_kv               float [2L * B, T, KVH * HS]  this step's (rotated) keys and values of every layer, appended
 *                        by the runner: layer l's keys are rows [2l*B, (2l+1)*B), its values the next B rows
 *                        (one output, not 2L: each fetched output costs ~2 us to bind and copy out)
 */

export const PROJECTIONS = [
  "q_proj",
  "k_proj",
  "v_proj",
  "o_proj",
  "gate_proj",
  "up_proj",
  "down_proj",
] as const;
export type Projection = (typeof PROJECTIONS)[number];

/** IA3 scales the output of these projections (PEFT's attention-style targets)... */
export const IA3_OUTPUT_SCALED: readonly Projection[] = [
  "q_proj",
  "k_proj",
  "v_proj",
  "o_proj",
  "gate_proj",
  "up_proj",
];
/** ...and the input of this one (PEFT's `feedforward_modules`). */
export const IA3_INPUT_SCALED: readonly Projection[] = ["down_proj"];

/**
 * The fused products of a layer, named by their projections: q, k and v (and gate and up) share their input and
 * run as one product. PEFT inputs are pooled or fed per site, not per projection, so a layer runs a few nodes per
 * site and binds a few inputs (each input costs ~2-3 us to bind every step, used or not; each node a few us).
 * A site's projections sit side by side in this order in its fused output.
 */
export const SITES = {
  qkv: ["q_proj", "k_proj", "v_proj"],
  o_proj: ["o_proj"],
  gate_up: ["gate_proj", "up_proj"],
  down_proj: ["down_proj"],
} as const satisfies Record<string, readonly Projection[]>;
export type Site = keyof typeof SITES;

export interface SiteLayout {
  site: Site;
  /** the layout's targets at this site, in site order */
  parts: Projection[];
  /** the sum of the site's projections' widths (targeted or not) */
  width: number;
  /** where each targeted projection starts within the site's width */
  columns: Map<Projection, number>;
  /** the largest width dividing every projection's width at the site: columns are picked in blocks of it */
  block: number;
}

const gcd = (a: number, b: number): number => (b === 0 ? a : gcd(b, a % b));

/** The sites `targets` fall in, in SITES order, each projection `widthOf` wide. */
function siteLayouts(targets: readonly Projection[], widthOf: (m: Projection) => number): SiteLayout[] {
  const sites: SiteLayout[] = [];
  for (const [site, projections] of Object.entries(SITES) as [Site, readonly Projection[]][]) {
    const parts = projections.filter((m) => targets.includes(m));
    if (parts.length === 0) continue;
    const columns = new Map<Projection, number>();
    let width = 0;
    let block = 0;
    for (const m of projections) {
      if (parts.includes(m)) columns.set(m, width);
      width += widthOf(m);
      block = gcd(widthOf(m), block);
    }
    sites.push({ site, parts, width, columns, block });
  }
  return sites;
}

/**
 * IA3 sites: a site's pool holds every projection of the site (its output scale; down_proj's input scale), side
 * by side; projections no adapter scales stay all-ones.
 */
export function ia3Sites(
  spec: Parameters<typeof projectionDims>[0],
  targets: readonly Projection[],
): SiteLayout[] {
  return siteLayouts(targets, (m) => ia3Dim(spec, m));
}

/** LoRA sites: each targeted projection's B occupies its output columns of the site's fused product. */
export function loraSites(
  spec: Parameters<typeof projectionDims>[0],
  targets: readonly Projection[],
): SiteLayout[] {
  return siteLayouts(targets, (m) => projectionDims(spec, m).outDim);
}

/** Whether a site's LoRA runs as parts of a shared-input product (lora_columns, 4-D A) or plainly. */
export const isSharedInputSite = (site: Site): boolean => SITES[site].length > 1;

/** The shapes of a site's LoRA inputs (the contract above): symbolic in the graph, numbers in a step's feeds. */
export function loraInputDims<D extends number | string>(
  layout: SiteLayout,
  d: { rows: D; parts: D; inDim: number; rank: D },
): { a: (D | number)[]; b: (D | number)[]; columns: number[] | null } {
  const { site, width, block } = layout;
  if (!isSharedInputSite(site))
    return { a: [d.rows, d.inDim, d.rank], b: [d.rows, d.rank, width], columns: null };
  return {
    a: [d.rows, d.parts, d.inDim, d.rank],
    b: [d.rows, 1, d.rank, width],
    columns: [width / block],
  };
}

export const BOTTLENECK_PLACES = ["attn", "mlp"] as const;
export type BottleneckPlace = (typeof BOTTLENECK_PLACES)[number];

export const INPUT = {
  inputIds: "input_ids",
  positionIds: "position_ids",
  virtualEmbeddings: "virtual_embeddings",
  attentionMask: "attention_mask",
  logitsIndex: "logits_index",
  loraSlot: "lora_slot",
  ia3Slot: "ia3_slot",
  bottleneckSlot: "bottleneck_slot",
  pastKey: (layer: number) => `past_key.${layer}`,
  pastValue: (layer: number) => `past_value.${layer}`,
  loraA: (layer: number, site: Site) => `lora_a.${layer}.${site}`,
  loraB: (layer: number, site: Site) => `lora_b.${layer}.${site}`,
  loraColumns: (site: Site) => `lora_columns.${site}`,
  ia3: (site: Site) => `ia3.${site}`,
  ia3Wide: "ia3_wide",
  bottleneckDown: (p: BottleneckPlace) => `bottleneck_down.${p}`,
  bottleneckDownBias: (p: BottleneckPlace) => `bottleneck_down_bias.${p}`,
  bottleneckUp: (p: BottleneckPlace) => `bottleneck_up.${p}`,
  bottleneckUpBias: (p: BottleneckPlace) => `bottleneck_up_bias.${p}`,
} as const;

export const OUTPUT = {
  logits: "logits",
  greedyToken: "greedy_token",
  logitsRowSum: "logits_row_sum",
  newKv: "new_kv",
} as const;

/** Which PEFT paths the built graph carries (a path not built costs nothing at run time). */
export interface PeftLayout {
  loraTargets: Projection[];
  ia3Targets: Projection[];
  bottleneck: boolean;
}

/** The site a projection's product belongs to. */
export const siteOfProjection = (m: Projection): Site =>
  (Object.keys(SITES) as Site[]).find((site) => (SITES[site] as readonly Projection[]).includes(m))!;

/**
 * IA3 sites beyond PEFT's default targets for Llama (k_proj and v_proj's outputs, down_proj's input): the graph
 * has a decoder copy without them for steps whose IA3 adapters scale only q, k, v and down (the ia3_wide input).
 */
export const IA3_WIDE_SITES: readonly Site[] = ["o_proj", "gate_up"];

/** Whether a graph of `layout` has the ia3_wide input: its IA3 targets fall in wide sites and in others. */
export function hasIa3WideFlag(layout: PeftLayout): boolean {
  const wide = layout.ia3Targets.map((m) => IA3_WIDE_SITES.includes(siteOfProjection(m)));
  return wide.includes(true) && wide.includes(false);
}

export const FULL_PEFT_LAYOUT: PeftLayout = {
  loraTargets: [...PROJECTIONS],
  ia3Targets: [...PROJECTIONS],
  bottleneck: true,
};

/** Input and output widths of each projection for a given model shape. */
export function projectionDims(
  spec: {
    hiddenSize: number;
    numHeads: number;
    numKvHeads: number;
    headDim: number;
    intermediateSize: number;
  },
  m: Projection,
): { inDim: number; outDim: number } {
  const d = spec.hiddenSize;
  const q = spec.numHeads * spec.headDim;
  const kv = spec.numKvHeads * spec.headDim;
  const ff = spec.intermediateSize;
  switch (m) {
    case "q_proj":
      return { inDim: d, outDim: q };
    case "k_proj":
    case "v_proj":
      return { inDim: d, outDim: kv };
    case "o_proj":
      return { inDim: q, outDim: d };
    case "gate_proj":
    case "up_proj":
      return { inDim: d, outDim: ff };
    case "down_proj":
      return { inDim: ff, outDim: d };
  }
}

/** Width of an IA3 vector for a projection: its output, or its input for feed-forward targets. */
export function ia3Dim(spec: Parameters<typeof projectionDims>[0], m: Projection): number {
  const { inDim, outDim } = projectionDims(spec, m);
  return IA3_INPUT_SCALED.includes(m) ? inDim : outDim;
}

/**
 * One sequence's PEFT weights in HF layout, as parsed from files (before they enter a pool).
 * Keys are `${layer}.${projection}` (LoRA, IA3) or `${layer}.${place}` (bottleneck).
 */
export interface LoraModuleWeights {
  rank: number;
  /** [rank, in] */
  a: Float32Array;
  /** [out, rank], with the LoRA scale (alpha/r or alpha/sqrt(r)) already folded in. */
  b: Float32Array;
}

export interface BottleneckModuleWeights {
  size: number;
  /** [size, D] (HF Linear layout) */
  down: Float32Array;
  /** [size] */
  downBias: Float32Array;
  /** [D, size] */
  up: Float32Array;
  /** [D] */
  upBias: Float32Array;
}

export interface SequenceAdapterWeights {
  lora?: Map<string, LoraModuleWeights>;
  ia3?: Map<string, Float32Array>;
  bottleneck?: Map<string, BottleneckModuleWeights>;
}

export const moduleKey = (layer: number, name: string): string => `${layer}.${name}`;

/** Per-row bookkeeping the runner needs to assemble past K/V and append this step's K/V. */
export interface StepRow {
  seqId: number;
  /** Tokens already in this sequence's cache (its past length). */
  pastLength: number;
  /** Real (unpadded) new tokens of this row this step. */
  numNewTokens: number;
}

/** Everything one forward step needs, as typed arrays laid out for the graph (built by engine/step-builder). */
export interface StepBatch {
  rows: StepRow[];
  /** T: new tokens per row after padding. */
  seqLen: number;
  /** P: past length fed (max over rows). */
  pastLength: number;
  /** [B*T] */
  inputIds: BigInt64Array;
  /** [B*T] */
  positionIds: BigInt64Array;
  /** [B*T*(P+T)], 1 = may attend */
  attentionMask: Uint8Array;
  /** [R] flat indices b*T+t whose logits are returned, in this order */
  logitsIndex: BigInt64Array;
  /** [N*D], N >= 1 */
  virtualEmbeddings: Float32Array;
  /** [B] per kind; 0 = identity */
  loraSlots: BigInt64Array;
  ia3Slots: BigInt64Array;
  bottleneckSlots: BigInt64Array;
  /**
   * Whether to fetch the [R, V] logits. A step whose rows all decode greedily without logprobs needs only
   * greedy_token: not fetching spares the binding's copy of R x V floats and the sampler's pass over them.
   */
  fetchLogits: boolean;
}

export interface StepResult {
  /** [R, vocab] in logitsIndex order; null when the batch did not fetch them */
  logits: Float32Array | null;
  numLogitRows: number;
  /** [R] the argmax of each logits row (lowest id on ties): the greedy token */
  greedyTokens: Int32Array;
  /** [R] 1 when every logit of the row is finite */
  finiteRows: Uint8Array;
}

export type AdapterPoolKind = "lora" | "ia3" | "bottleneck";

export const ADAPTER_POOL_KINDS: readonly AdapterPoolKind[] = ["lora", "ia3", "bottleneck"];

/** The graph layout for the PEFT kinds a server serves: every projection for LoRA and IA3 when on. */
export function peftLayoutOf(kinds: readonly AdapterPoolKind[]): PeftLayout {
  return {
    loraTargets: kinds.includes("lora") ? [...PROJECTIONS] : [],
    ia3Targets: kinds.includes("ia3") ? [...PROJECTIONS] : [],
    bottleneck: kinds.includes("bottleneck"),
  };
}

/** The compute seam the engine drives: in-process (tests) or in the model worker thread (server). */
export interface ModelBackend {
  forward(batch: StepBatch): Promise<StepResult>;
  /** Free the K/V of finished sequences. */
  release(seqIds: readonly number[]): void;
  /** Put prefix-tuning keys/values (per layer [KVH, n, HS]) at positions 0..n-1 of a new sequence. */
  seedPrefix(seqId: number, length: number, keys: Float32Array[], values: Float32Array[]): Promise<void>;
  writeAdapterSlot(kind: AdapterPoolKind, slot: number, weights: SequenceAdapterWeights): Promise<void>;
  clearAdapterSlot(kind: AdapterPoolKind, slot: number): Promise<void>;
  dispose(): Promise<void>;
}
