import assert from "node:assert/strict";
import { test } from "node:test";
import { decoderVariants, llamaGraph } from "../../../src/model/builder/llama-graph.ts";
import type { GraphSpec, NodeSpec } from "../../../src/model/builder/onnx-proto.ts";
import { FULL_PEFT_LAYOUT, type PeftLayout, PROJECTIONS } from "../../../src/model/contract.ts";
import { makeRandomModel } from "../../helpers/random-model.ts";

const NONE: PeftLayout = { loraTargets: [], ia3Targets: [], bottleneck: false };
const names = (layout: PeftLayout) => decoderVariants(layout).map((v) => `${v.name}:${v.serves.join("+")}`);

test("decoder variants: a copy per adapter kind when the layout has several, one with every path last", () => {
  assert.deepEqual(names(NONE), ["base:"]);
  assert.deepEqual(names({ ...NONE, loraTargets: ["q_proj"] }), ["base:", "all:lora"]);
  assert.deepEqual(names({ ...NONE, bottleneck: true }), ["base:", "all:bottleneck"]);
  assert.deepEqual(names(FULL_PEFT_LAYOUT), [
    "base:",
    "lora_attention:lora",
    "ia3_qkv_down:ia3",
    "lora:lora+lora_mlp",
    "ia3:ia3+ia3_wide",
    "all:lora+ia3+bottleneck+lora_mlp+ia3_wide",
  ]);
  // PEFT's default IA3 targets (k, v, down) need no wide copy; o alone is all wide.
  assert.deepEqual(names({ ...NONE, ia3Targets: ["k_proj", "v_proj", "down_proj"] }), ["base:", "all:ia3"]);
  assert.deepEqual(names({ ...NONE, ia3Targets: ["o_proj"] }), ["base:", "all:ia3+ia3_wide"]);
  assert.deepEqual(names({ ...NONE, ia3Targets: ["v_proj", "up_proj"] }), [
    "base:",
    "ia3_qkv_down:ia3",
    "all:ia3+ia3_wide",
  ]);
  assert.deepEqual(names({ ...NONE, ia3Targets: ["k_proj"], bottleneck: true }), [
    "base:",
    "ia3:ia3",
    "all:ia3+bottleneck",
  ]);
  // LoRA on the MLP only, or on attention and MLP without other kinds.
  assert.deepEqual(names({ ...NONE, loraTargets: ["down_proj"] }), ["base:", "all:lora+lora_mlp"]);
  assert.deepEqual(names({ ...NONE, loraTargets: ["v_proj", "up_proj"] }), [
    "base:",
    "lora_attention:lora",
    "all:lora+lora_mlp",
  ]);
  const [, attention, ia3QkvDown, lora, ia3, all] = decoderVariants(FULL_PEFT_LAYOUT);
  assert.deepEqual(attention!.layout, {
    loraTargets: ["q_proj", "k_proj", "v_proj", "o_proj"],
    ia3Targets: [],
    bottleneck: false,
  });
  assert.deepEqual(ia3QkvDown!.layout, {
    loraTargets: [],
    ia3Targets: ["q_proj", "k_proj", "v_proj", "down_proj"],
    bottleneck: false,
  });
  assert.deepEqual(lora!.layout, { loraTargets: [...PROJECTIONS], ia3Targets: [], bottleneck: false });
  assert.deepEqual(ia3!.layout, { loraTargets: [], ia3Targets: [...PROJECTIONS], bottleneck: false });
  assert.deepEqual(all!.layout, FULL_PEFT_LAYOUT);
});

/** Every value a subgraph's nodes read, nested subgraphs included. */
function readsOf(graph: GraphSpec): Set<string> {
  const reads = new Set<string>();
  const visit = (nodes: NodeSpec[]) => {
    for (const node of nodes) {
      for (const input of node.inputs) reads.add(input);
      for (const attr of Object.values(node.attributes ?? {}))
        if (typeof attr === "object" && attr !== null && "graph" in attr) visit(attr.graph.nodes);
    }
  };
  visit(graph.nodes);
  return reads;
}

test("each decoder copy is a top-level If whose branch reads only its own kinds' adapter inputs, one per phase", () => {
  const { spec, weights } = makeRandomModel({}, 3);
  const g = llamaGraph(spec, weights, { peft: FULL_PEFT_LAYOUT, rope: "contrib" }, "w.bin");
  const decoders = g.nodes.filter((n) => n.opType === "If" && n.name.length > 0);
  const branches = new Map<string, Set<string>>();
  for (const node of decoders) {
    const then = node.attributes?.then_branch;
    if (
      typeof then === "object" &&
      then !== null &&
      "graph" in then &&
      then.graph.name.startsWith("decoder_")
    )
      branches.set(then.graph.name, readsOf(then.graph));
  }
  const copies = ["base", "lora_attention", "ia3_qkv_down", "lora", "ia3", "all"].flatMap((v) =>
    ["decode", "prefill"].map((phase) => `decoder_${v}_${phase}_then`),
  );
  assert.deepEqual(
    [...branches.keys()],
    copies,
    "a copy per variant and phase, side by side at the top level",
  );
  const opsIn = (name: string) => {
    const node = decoders.find((n) => {
      const then = n.attributes?.then_branch;
      return typeof then === "object" && then !== null && "graph" in then && then.graph.name === name;
    })!;
    const then = node.attributes!.then_branch as { graph: GraphSpec };
    return new Set(then.graph.nodes.map((n) => n.opType));
  };
  assert.ok(!opsIn("decoder_base_decode_then").has("Attention"), "decode copies read the past in place");
  assert.ok(!opsIn("decoder_base_decode_then").has("If"), "no per-layer If in a copy");
  assert.ok(opsIn("decoder_base_prefill_then").has("Attention"), "prefill copies use the Attention kernel");
  const kindOf = (input: string) =>
    input.startsWith("lora_")
      ? "lora"
      : input.startsWith("ia3.")
        ? "ia3"
        : input.startsWith("bottleneck_")
          ? "bottleneck"
          : null;
  const kindsRead = (name: string) =>
    [...new Set([...branches.get(name)!].map(kindOf).filter((k) => k !== null))].sort();
  for (const phase of ["decode", "prefill"]) {
    assert.deepEqual(kindsRead(`decoder_base_${phase}_then`), []);
    assert.deepEqual(kindsRead(`decoder_lora_attention_${phase}_then`), ["lora"]);
    assert.deepEqual(kindsRead(`decoder_lora_${phase}_then`), ["lora"]);
    assert.deepEqual(kindsRead(`decoder_ia3_qkv_down_${phase}_then`), ["ia3"]);
    const ia3SitesRead = (name: string) =>
      [...branches.get(name)!].filter((i) => i.startsWith("ia3.")).sort();
    assert.deepEqual(ia3SitesRead(`decoder_ia3_qkv_down_${phase}_then`), ["ia3.down_proj", "ia3.qkv"]);
    assert.deepEqual(ia3SitesRead(`decoder_ia3_${phase}_then`), [
      "ia3.down_proj",
      "ia3.gate_up",
      "ia3.o_proj",
      "ia3.qkv",
    ]);
    assert.deepEqual(kindsRead(`decoder_ia3_${phase}_then`), ["ia3"]);
    assert.deepEqual(kindsRead(`decoder_all_${phase}_then`), ["bottleneck", "ia3", "lora"]);
    const loraSitesRead = (name: string) =>
      [
        ...new Set(
          [...branches.get(name)!].filter((i) => i.startsWith("lora_a.")).map((i) => i.split(".")[2]),
        ),
      ].sort();
    assert.deepEqual(loraSitesRead(`decoder_lora_attention_${phase}_then`), ["o_proj", "qkv"]);
    assert.deepEqual(loraSitesRead(`decoder_lora_${phase}_then`), ["down_proj", "gate_up", "o_proj", "qkv"]);
  }
});

test("PEFT inputs are declared per fused product, not per projection (each input costs binding time every step)", () => {
  const { spec, weights } = makeRandomModel({}, 3);
  const inputsOf = (peft: PeftLayout) =>
    llamaGraph(spec, weights, { peft, rope: "contrib" }, "w.bin").inputs.map((i) => i.name);
  const base = inputsOf(NONE).length;
  const full = inputsOf(FULL_PEFT_LAYOUT);
  const lora = full.filter((n) => n.startsWith("lora_a.") || n.startsWith("lora_b."));
  assert.equal(lora.length, 8 * spec.numLayers, "A and B per layer at qkv, o_proj, gate_up and down_proj");
  assert.deepEqual(
    full.filter((n) => n.startsWith("lora_columns.")),
    ["lora_columns.qkv", "lora_columns.gate_up"],
  );
  assert.equal(
    full.length,
    base + 8 * spec.numLayers + 2 + 4 + 1 + 8,
    "plus 4 IA3 pools, ia3_wide and 8 bottleneck inputs",
  );
  const qv = inputsOf({ ...NONE, loraTargets: ["q_proj", "v_proj"] });
  assert.equal(qv.length, base + 2 * spec.numLayers + 1, "q and v share the qkv site's inputs");
});
