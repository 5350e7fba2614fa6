/**
 * @module adapters/formats/ia3 — PEFT IA3 `adapter_model.safetensors` -> per-module scale vectors.
 *
 * Semantics (PEFT `ia3.Linear.forward`): a module in `feedforward_modules` scales its *input*,
 * y = (x * l) W^T with `ia3_l` [1, in]; any other target scales its *output*, y = (x W^T) * l with
 * `ia3_l` [out, 1]. The graph carries output scales for q, k, v, o, gate and up projections and an
 * input scale for down_proj only, so other combinations are rejected.
 *
 * Keys: `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.ia3_l` (PEFT's ParameterDict entry
 * once the adapter name is stripped), also `ia3_l.default`, `ia3_l.weight` or `ia3_l.default.weight`.
 * Feed-forward matching follows PEFT `_check_target_module_feedforward`: a regex string is
 * full-matched, list entries match any name ending with them.
 */
import {
  IA3_INPUT_SCALED,
  IA3_OUTPUT_SCALED,
  moduleKey,
  type Projection,
  projectionDims,
} from "../../model/contract.ts";
import type { ModelSpec } from "../../model/model-spec.ts";
import type { FloatTensor } from "../../model/safetensors.ts";
import { expectFinite, incompatible, loadFailed, readTensorFile, shapeText } from "./format-shared.ts";
import { type PeftConfig, rejectUnsupportedFeatures } from "./peft-config.ts";
import { checkTargetEntries, projectionOfModule, targetedModules } from "./peft-targets.ts";

const IA3_KEY = /^(?:base_model\.model\.)?(.+)\.ia3_l((?:\.[A-Za-z0-9_-]+){0,2})$/;

/** PEFT `IA3Model._check_target_module_feedforward` (list entries match by plain suffix). */
export function isFeedforward(config: Pick<PeftConfig, "feedforwardModules">, name: string): boolean {
  const ff = config.feedforwardModules;
  if (ff === null) return false;
  if (typeof ff === "string") return new RegExp(`^(?:${ff})$`).test(name);
  return ff.some((t) => name.endsWith(t));
}

function checkPlacement(file: string, name: string, projection: Projection, feedforward: boolean): void {
  if (feedforward && !IA3_INPUT_SCALED.includes(projection)) {
    throw incompatible(
      file,
      `${name} is in feedforward_modules (IA3 scales its input); taskmux scales the input of ${IA3_INPUT_SCALED.join(", ")} only and the output of ${IA3_OUTPUT_SCALED.join(", ")}`,
    );
  }
  if (!feedforward && !IA3_OUTPUT_SCALED.includes(projection)) {
    throw incompatible(
      file,
      `${name} is not in feedforward_modules (IA3 would scale its output); taskmux scales ${projection}'s input only — list it in feedforward_modules`,
    );
  }
}

function vector(
  file: string,
  key: string,
  tensor: FloatTensor,
  dim: number,
  feedforward: boolean,
): Float32Array {
  const expected = feedforward ? [1, dim] : [dim, 1];
  const s = tensor.shape;
  const ok =
    (s.length === 2 && s[0] === expected[0] && s[1] === expected[1]) || (s.length === 1 && s[0] === dim);
  if (!ok) {
    const why = feedforward ? `an input scale of width ${dim}` : `an output scale of width ${dim}`;
    throw incompatible(
      file,
      `tensor ${key} has shape ${shapeText(s)}, expected ${shapeText(expected)} (${why})`,
    );
  }
  expectFinite(file, key, tensor.data);
  return tensor.data;
}

/** Validate an IA3 adapter's tensors against its config and this base. */
export function parseIa3(
  tensors: Map<string, FloatTensor>,
  file: string,
  config: PeftConfig,
  spec: ModelSpec,
): Map<string, Float32Array> {
  rejectUnsupportedFeatures(config);
  checkTargetEntries(config, spec);
  const ff = config.feedforwardModules;
  const targets = config.targetModules;
  if (Array.isArray(ff) && Array.isArray(targets)) {
    const stray = ff.find((f) => !targets.includes(f));
    if (stray !== undefined)
      throw loadFailed(config.file, `feedforward_modules entry "${stray}" is not in target_modules`);
  }
  const targeted = targetedModules(config, spec);
  if (targeted.length === 0)
    throw incompatible(config.file, "target_modules selects no projection of this base model");
  for (const t of targeted) checkPlacement(config.file, t.name, t.projection, isFeedforward(config, t.name));

  const found = new Map<string, [string, FloatTensor]>();
  for (const [key, tensor] of tensors) {
    const m = IA3_KEY.exec(key);
    if (!m) throw loadFailed(file, `unexpected tensor ${key} (not an ia3_l vector)`);
    const { name } = projectionOfModule(file, key, m[1]!, spec);
    const previous = found.get(name);
    if (previous) throw loadFailed(file, `tensors ${previous[0]} and ${key} are both the ia3_l of ${name}`);
    found.set(name, [key, tensor]);
  }
  const selected = new Set(targeted.map((t) => t.name));
  for (const [name, [key]] of found) {
    if (!selected.has(name))
      throw loadFailed(
        file,
        `tensor ${key} is for ${name}, which adapter_config.json's target_modules does not select`,
      );
  }
  const out = new Map<string, Float32Array>();
  for (const t of targeted) {
    const entry = found.get(t.name);
    if (!entry) throw loadFailed(file, `${t.name} is targeted but its ia3_l vector is missing`);
    const feedforward = isFeedforward(config, t.name);
    const { inDim, outDim } = projectionDims(spec, t.projection);
    out.set(
      moduleKey(t.layer, t.projection),
      vector(file, entry[0], entry[1], feedforward ? inDim : outDim, feedforward),
    );
  }
  return out;
}

export function loadIa3(file: string, config: PeftConfig, spec: ModelSpec): Map<string, Float32Array> {
  return parseIa3(readTensorFile(file), file, config, spec);
}
