/**
 * @module adapters/formats/bottleneck — our Houlsby bottleneck adapter folder (layout in adapters/README.md).
 *
 * Semantics: on the output h of a layer's attention block ("attn") and/or MLP block ("mlp"), before the
 * residual add, h <- h + silu(h down^T + downBias) up^T + upBias, with down [N, D], up [D, N].
 *
 * adapter_config.json: {"peft_type": "BOTTLENECK", "adapter_size": N, "non_linearity": "silu",
 * "placement": ["attn", "mlp"]}; adapter_model.safetensors: for every layer i and every placement p,
 * `layers.{i}.{p}.adapter_down.weight` [N, D], `.adapter_down.bias` [N], `.adapter_up.weight` [D, N],
 * `.adapter_up.bias` [D].
 */
import { z } from "zod";
import {
  BOTTLENECK_PLACES,
  type BottleneckModuleWeights,
  type BottleneckPlace,
  moduleKey,
} from "../../model/contract.ts";
import type { ModelSpec } from "../../model/model-spec.ts";
import type { FloatTensor } from "../../model/safetensors.ts";
import {
  expectFinite,
  expectShape,
  incompatible,
  loadFailed,
  readTensorFile,
  zodIssue,
} from "./format-shared.ts";

export interface BottleneckConfig {
  adapterSize: number;
  placement: BottleneckPlace[];
}

export interface BottleneckAdapter {
  /** `moduleKey(layer, place)` -> weights. */
  modules: Map<string, BottleneckModuleWeights>;
  size: number;
}

const schema = z
  .object({
    peft_type: z.literal("BOTTLENECK"),
    adapter_size: z.number().int().positive(),
    non_linearity: z.string().default("silu"),
    placement: z
      .array(z.enum(BOTTLENECK_PLACES))
      .min(1)
      .default([...BOTTLENECK_PLACES]),
  })
  .loose();

/** Validate a bottleneck adapter_config.json; only silu (alias swish) is served. */
export function parseBottleneckConfig(json: unknown, file: string, maxSize: number): BottleneckConfig {
  const parsed = schema.safeParse(json);
  if (!parsed.success) throw loadFailed(file, zodIssue(parsed.error));
  const c = parsed.data;
  const act = c.non_linearity.toLowerCase();
  if (act !== "silu" && act !== "swish") {
    throw incompatible(
      file,
      `non_linearity ${JSON.stringify(c.non_linearity)} is not supported (only "silu")`,
    );
  }
  if (c.adapter_size > maxSize) {
    throw incompatible(
      file,
      `adapter_size ${c.adapter_size} is above this server's maximum bottleneck size ${maxSize}`,
    );
  }
  if (new Set(c.placement).size !== c.placement.length)
    throw loadFailed(file, "placement: entries must be unique");
  return { adapterSize: c.adapter_size, placement: c.placement };
}

const PARTS = ["adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"] as const;

/** Validate the tensors of a bottleneck adapter against its config and this base. */
export function parseBottleneck(
  tensors: Map<string, FloatTensor>,
  file: string,
  config: BottleneckConfig,
  spec: ModelSpec,
): BottleneckAdapter {
  const n = config.adapterSize;
  const d = spec.hiddenSize;
  const expected = new Set<string>();
  for (let layer = 0; layer < spec.numLayers; layer++) {
    for (const place of config.placement)
      for (const part of PARTS) expected.add(`layers.${layer}.${place}.${part}`);
  }
  for (const key of tensors.keys()) {
    if (expected.has(key)) continue;
    const layer = /^layers\.(\d+)\./.exec(key)?.[1];
    if (layer !== undefined && Number(layer) >= spec.numLayers) {
      throw incompatible(
        file,
        `tensor ${key} is for layer ${layer}, but the base model has ${spec.numLayers} layers`,
      );
    }
    throw loadFailed(file, `unexpected tensor ${key} (placement is ${JSON.stringify(config.placement)})`);
  }
  const modules = new Map<string, BottleneckModuleWeights>();
  for (let layer = 0; layer < spec.numLayers; layer++) {
    for (const place of config.placement) {
      const get = (part: (typeof PARTS)[number], shape: number[], baseDims: boolean[]) => {
        const key = `layers.${layer}.${place}.${part}`;
        const t = tensors.get(key);
        if (!t) throw loadFailed(file, `tensor ${key} is missing`);
        expectShape(file, key, t, shape, baseDims, `adapter_size ${n}, hidden ${d}`);
        expectFinite(file, key, t.data, shape.length === 2 ? shape[1] : t.data.length);
        return t.data;
      };
      modules.set(moduleKey(layer, place), {
        size: n,
        down: get("adapter_down.weight", [n, d], [false, true]),
        downBias: get("adapter_down.bias", [n], [false]),
        up: get("adapter_up.weight", [d, n], [true, false]),
        upBias: get("adapter_up.bias", [d], [true]),
      });
    }
  }
  return { modules, size: n };
}

export function loadBottleneck(file: string, config: BottleneckConfig, spec: ModelSpec): BottleneckAdapter {
  return parseBottleneck(readTensorFile(file), file, config, spec);
}
