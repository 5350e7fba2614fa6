/** @module scripts/make-model — CLI: `npm run make-model -- --preset tiny|default|smollm2-135m --seed N --out DIR [--if-missing]`. */
import { existsSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { makeModel, PRESETS, type PresetName } from "../src/model/maker/make-model.ts";

const { values } = parseArgs({
  options: {
    preset: { type: "string", default: "tiny" },
    seed: { type: "string", default: "0" },
    out: { type: "string" },
    "if-missing": { type: "boolean", default: false },
  },
});
const preset = values.preset as PresetName;
if (!(preset in PRESETS)) {
  console.error(
    `--preset must be one of ${Object.keys(PRESETS).join(", ")}; got ${JSON.stringify(values.preset)}`,
  );
  process.exit(2);
}
const seed = Number(values.seed);
if (!Number.isInteger(seed) || seed < 0) {
  console.error(`--seed must be a non-negative integer; got ${JSON.stringify(values.seed)}`);
  process.exit(2);
}
if (!values.out) {
  console.error("--out DIR is required");
  process.exit(2);
}
if (values["if-missing"] && existsSync(join(values.out, "config.json"))) process.exit(0);
const started = performance.now();
makeModel({ preset, seed, out: values.out });
console.log(
  `made ${preset} (seed ${seed}) in ${values.out} in ${((performance.now() - started) / 1000).toFixed(1)} s`,
);
