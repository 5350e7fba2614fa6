/**
 * @module adapters/formats/peft-targets — PEFT's module-selection rules for a Llama-family base, exactly as
 * PEFT applies them: `target_modules` (a regex string is full-matched against the module name such as
 * `model.layers.3.self_attn.q_proj`; a list entry matches the whole name or a `.`-suffix of it;
 * `"all-linear"` is every projection), `exclude_modules`, `layers_to_transform` + `layers_pattern` (list
 * targets only), and `rank_pattern` / `alpha_pattern` (first key in file order with
 * `re.match(rf"(.*\.)?({key})$", name)`) — peft `tuners_utils.check_target_module_exists`,
 * `utils/other.get_pattern_key`.
 */
import { PROJECTIONS, type Projection } from "../../model/contract.ts";
import type { ModelSpec } from "../../model/model-spec.ts";
import { incompatible, loadFailed } from "./format-shared.ts";
import { type PeftConfig, suffixPattern } from "./peft-config.ts";

/** A projection's module name in a HF Llama-family model, as PEFT matches it. */
export function projectionModuleName(layer: number, projection: Projection): string {
  const parent =
    projection === "gate_proj" || projection === "up_proj" || projection === "down_proj"
      ? "mlp"
      : "self_attn";
  return `model.layers.${layer}.${parent}.${projection}`;
}

const fullMatch = (pattern: string, name: string) => new RegExp(`^(?:${pattern})$`).test(name);
const listMatch = (list: readonly string[], name: string) =>
  list.includes(name) || list.some((t) => name.endsWith(`.${t}`));

type Selection = Pick<PeftConfig, "targetModules" | "excludeModules" | "layersToTransform" | "layersPattern">;

/** PEFT's `check_target_module_exists` for one module name. */
export function isTargeted(config: Selection, name: string): boolean {
  const ex = config.excludeModules;
  if (ex !== null && (typeof ex === "string" ? fullMatch(ex, name) : listMatch(ex, name))) return false;
  const t = config.targetModules;
  if (t === null) return false;
  if (typeof t === "string") {
    if (t.toLowerCase() === "all-linear") return /\.(?:self_attn|mlp)\.[a-z_]+_proj$/.test(name);
    return fullMatch(t, name);
  }
  if (t.includes(name)) return true;
  if (!listMatch(t, name)) return false;
  const layers = config.layersToTransform;
  if (layers === null || layers.length === 0) return true;
  const patterns = config.layersPattern?.length ? config.layersPattern : null;
  const match = patterns
    ? patterns.map((p) => new RegExp(`^.*\\.${p}\\.(\\d+)\\.`).exec(name)).find((m) => m !== null)
    : /^.*\.[^.]*\.(\d+)\./.exec(name);
  return match ? layers.includes(Number(match[1])) : false;
}

/** PEFT's `get_pattern_key` lookup: the value of the first pattern key naming this module, else `fallback`. */
export function patternValue(patterns: Record<string, number>, name: string, fallback: number): number {
  for (const [key, value] of Object.entries(patterns)) {
    if (new RegExp(suffixPattern(key)).test(name)) return value;
  }
  return fallback;
}

export interface TargetedModule {
  layer: number;
  projection: Projection;
  name: string;
}

/** Every projection of this base the config selects, layer-major. */
export function targetedModules(config: Selection, spec: ModelSpec): TargetedModule[] {
  const out: TargetedModule[] = [];
  for (let layer = 0; layer < spec.numLayers; layer++) {
    for (const projection of PROJECTIONS) {
      const name = projectionModuleName(layer, projection);
      if (isTargeted(config, name)) out.push({ layer, projection, name });
    }
  }
  return out;
}

/** Llama modules PEFT could target that taskmux does not adapt (everything but the seven projections). */
const UNADAPTABLE = [
  "embed_tokens",
  "lm_head",
  "norm",
  "input_layernorm",
  "post_attention_layernorm",
  "self_attn",
  "mlp",
  "rotary_emb",
];

/** Each `target_modules` list entry must name a projection of this base; else `adapter_incompatible`. */
export function checkTargetEntries(config: PeftConfig, spec: ModelSpec): void {
  const t = config.targetModules;
  if (t === null) throw loadFailed(config.file, `target_modules is missing (${config.peftType} needs it)`);
  if (typeof t === "string") return;
  const names = targetedModules(
    { ...config, targetModules: [...PROJECTIONS], layersToTransform: null, excludeModules: null },
    spec,
  );
  for (const entry of t) {
    if (names.some((m) => m.name === entry || m.name.endsWith(`.${entry}`))) continue;
    const last = entry.split(".").at(-1) ?? entry;
    const why = UNADAPTABLE.includes(last)
      ? `taskmux adapts only ${PROJECTIONS.join(", ")}`
      : `this base (${spec.architecture}) has no such module; its projections are ${PROJECTIONS.join(", ")}`;
    throw incompatible(config.file, `target_modules entry ${JSON.stringify(entry)} cannot be served: ${why}`);
  }
}

const MODULE_NAME = /^(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.([A-Za-z0-9_]+)$/;

/**
 * The projection a tensor's module path names (the path after `base_model.model.`), or why not:
 * `adapter_incompatible` for a module taskmux does not adapt or a layer the base lacks.
 */
export function projectionOfModule(
  file: string,
  tensorName: string,
  modulePath: string,
  spec: ModelSpec,
): { layer: number; projection: Projection; name: string } {
  const m = MODULE_NAME.exec(modulePath);
  const projection = m?.[3] as Projection | undefined;
  if (!m || !projection || !(PROJECTIONS as readonly string[]).includes(projection)) {
    throw incompatible(
      file,
      `tensor ${tensorName} adapts module ${modulePath}, which taskmux cannot adapt (only ${PROJECTIONS.join(", ")})`,
    );
  }
  const layer = Number(m[1]);
  const name = projectionModuleName(layer, projection);
  if (!name.endsWith(`${m[2]}.${projection}`)) {
    throw incompatible(
      file,
      `tensor ${tensorName}: ${m[2]}.${projection} is not a module of ${spec.architecture}`,
    );
  }
  if (layer >= spec.numLayers) {
    throw incompatible(
      file,
      `tensor ${tensorName} is for layer ${layer}, but the base model has ${spec.numLayers} layers`,
    );
  }
  return { layer, projection, name };
}
