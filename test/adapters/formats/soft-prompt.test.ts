/**
 * Tests for soft prompts: PROMPT_TUNING / P_TUNING tables, half-precision files, and the p-tuning prompt encoder
 * (MLP and bidirectional LSTM) checked against a separate, deliberately plain implementation written here.
 */
import assert from "node:assert/strict";
import { truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { parsePeftConfig } from "../../../src/adapters/formats/peft-config.ts";
import { loadSoftPrompt, parseSoftPrompt } from "../../../src/adapters/formats/soft-prompt.ts";
import type { FloatTensor } from "../../../src/model/safetensors.ts";
import {
  assertRejects,
  halfSafetensors,
  maxAbsDiff,
  safetensors,
  smallSpec,
  tempDir,
  tensor,
} from "./fixtures.ts";

const spec = smallSpec(); // hidden 8
const FILE = "prompt-tables/t/adapter_model.safetensors";
const config = (peftType: string, extra: Record<string, unknown> = {}) =>
  parsePeftConfig(
    { peft_type: peftType, num_virtual_tokens: 4, token_dim: 8, task_type: "CAUSAL_LM", ...extra },
    "prompt-tables/t/adapter_config.json",
  );
const table = () => tensor([4, 8], (i) => Math.cos(i) * 0.7);

// ---- an independent reference: plain nested arrays, one gate at a time ----
type Matrix = number[][];
const toMatrix = (t: FloatTensor): Matrix =>
  Array.from({ length: t.shape[0]! }, (_, r) =>
    Array.from(t.data.subarray(r * t.shape[1]!, (r + 1) * t.shape[1]!)),
  );
const dense = (x: number[], w: Matrix, b: number[] | null) =>
  w.map((row, o) => row.reduce((s, wi, i) => s + wi * x[i]!, b ? b[o]! : 0));
const relu = (v: number[]) => v.map((a) => Math.max(a, 0));
const sig = (v: number) => 1 / (1 + Math.exp(-v));

function refMlp(x: Matrix, linears: { w: Matrix; b: number[] }[]): Matrix {
  return x.map((row) =>
    linears.reduce((h, l, i) => (i === 0 ? dense(h, l.w, l.b) : dense(relu(h), l.w, l.b)), row),
  );
}

function refLstmDirection(
  x: Matrix,
  wih: Matrix,
  whh: Matrix,
  bih: number[],
  bhh: number[],
  H: number,
  backwards: boolean,
): Matrix {
  const order = x.map((_, t) => t);
  if (backwards) order.reverse();
  const out: Matrix = [];
  let h = new Array<number>(H).fill(0);
  let c = new Array<number>(H).fill(0);
  for (const t of order) {
    const gate = (k: number) => {
      const rows = (m: Matrix) => m.slice(k * H, (k + 1) * H);
      const a = dense(x[t]!, rows(wih), bih.slice(k * H, (k + 1) * H));
      const r = dense(h, rows(whh), bhh.slice(k * H, (k + 1) * H));
      return a.map((v, j) => v + r[j]!);
    };
    const [i, f, g, o] = [gate(0).map(sig), gate(1).map(sig), gate(2).map(Math.tanh), gate(3).map(sig)];
    c = c.map((cj, j) => f[j]! * cj + i[j]! * g[j]!);
    h = c.map((cj, j) => o[j]! * Math.tanh(cj));
    out[t] = h;
  }
  return out;
}

// ---- encoder checkpoints as PEFT's PromptEncoder names them ----
const PRE = "prompt_encoder.default.";
function mlpEncoder(): Record<string, FloatTensor> {
  return {
    [`${PRE}embedding.weight`]: tensor([4, 8], (i) => Math.sin(i * 0.37)),
    [`${PRE}mlp_head.0.weight`]: tensor([5, 8], (i) => Math.cos(i * 0.91) * 0.5),
    [`${PRE}mlp_head.0.bias`]: tensor([5], (i) => 0.1 * i - 0.2),
    [`${PRE}mlp_head.2.weight`]: tensor([5, 5], (i) => Math.sin(i * 1.3) * 0.6),
    [`${PRE}mlp_head.2.bias`]: tensor([5], (i) => 0.05 * i),
    [`${PRE}mlp_head.4.weight`]: tensor([8, 5], (i) => Math.cos(i * 0.41) * 0.8),
    [`${PRE}mlp_head.4.bias`]: tensor([8], (i) => -0.03 * i),
  };
}

function lstmEncoder(H = 3): Record<string, FloatTensor> {
  const out: Record<string, FloatTensor> = { "embedding.weight": tensor([4, 8], (i) => Math.sin(i * 0.53)) };
  let seed = 1;
  for (const l of [0, 1]) {
    for (const dir of ["", "_reverse"]) {
      const inDim = l === 0 ? 8 : 2 * H;
      const s = seed++;
      out[`lstm_head.weight_ih_l${l}${dir}`] = tensor([4 * H, inDim], (i) => Math.sin(i * 0.7 + s) * 0.5);
      out[`lstm_head.weight_hh_l${l}${dir}`] = tensor([4 * H, H], (i) => Math.cos(i * 1.1 + s) * 0.5);
      out[`lstm_head.bias_ih_l${l}${dir}`] = tensor([4 * H], (i) => 0.02 * i - s * 0.01);
      out[`lstm_head.bias_hh_l${l}${dir}`] = tensor([4 * H], (i) => -0.01 * i);
    }
  }
  out["mlp_head.0.weight"] = tensor([2 * H, 2 * H], (i) => Math.cos(i * 0.3) * 0.7);
  out["mlp_head.0.bias"] = tensor([2 * H], (i) => 0.1 * i);
  out["mlp_head.2.weight"] = tensor([8, 2 * H], (i) => Math.sin(i * 0.9) * 0.7);
  out["mlp_head.2.bias"] = tensor([8], (i) => 0.01 * i);
  return out;
}

const map = (t: Record<string, FloatTensor>) => new Map(Object.entries(t));
const flat = (m: Matrix) => m.flat();

describe("soft prompts", () => {
  test("PROMPT_TUNING: prompt_embeddings rows as stored", () => {
    const t = table();
    const sp = parseSoftPrompt(map({ prompt_embeddings: t }), FILE, config("PROMPT_TUNING"), spec);
    assert.equal(sp.source, "prompt_tuning");
    assert.equal(sp.numVirtualTokens, 4);
    assert.deepEqual(sp.rows, t.data);
  });

  test("P_TUNING as PEFT saves it (encoder output in prompt_embeddings)", () => {
    assert.equal(
      parseSoftPrompt(map({ prompt_embeddings: table() }), FILE, config("P_TUNING"), spec).source,
      "p_tuning",
    );
  });

  test("F16 and BF16 files are widened", () => {
    const dir = tempDir();
    for (const dtype of ["F16", "BF16"] as const) {
      const file = join(dir, `${dtype}.safetensors`);
      writeFileSync(file, halfSafetensors({ prompt_embeddings: table() }, dtype));
      const sp = loadSoftPrompt(file, config("PROMPT_TUNING"), spec);
      assert.ok(maxAbsDiff(sp.rows, table().data) < 0.01, dtype);
    }
  });

  test("the p-tuning MLP encoder's table equals a plain evaluation within 1e-5 and keeps no encoder weights", () => {
    const w = mlpEncoder();
    const sp = parseSoftPrompt(
      map(w),
      FILE,
      config("P_TUNING", { encoder_hidden_size: 5, encoder_reparameterization_type: "MLP" }),
      spec,
    );
    const linears = [0, 2, 4].map((k) => ({
      w: toMatrix(w[`${PRE}mlp_head.${k}.weight`]!),
      b: Array.from(w[`${PRE}mlp_head.${k}.bias`]!.data),
    }));
    const expected = flat(refMlp(toMatrix(w[`${PRE}embedding.weight`]!), linears));
    assert.equal(sp.source, "p_tuning_encoder");
    assert.equal(sp.numVirtualTokens, 4);
    assert.ok(maxAbsDiff(sp.rows, expected) < 1e-5);
    assert.deepEqual(Object.keys(sp).sort(), ["numVirtualTokens", "rows", "source"]);
    assert.equal(sp.rows.buffer.byteLength, 4 * 8 * 4, "rows own their buffer (no view into the checkpoint)");
  });

  test("the p-tuning LSTM encoder's table equals a plain bidirectional 2-layer LSTM + MLP within 1e-5", () => {
    const w = lstmEncoder();
    const sp = parseSoftPrompt(
      map(w),
      FILE,
      config("P_TUNING", {
        encoder_hidden_size: 3,
        encoder_reparameterization_type: "LSTM",
        encoder_num_layers: 2,
      }),
      spec,
    );
    const H = 3;
    let x = toMatrix(w["embedding.weight"]!);
    for (const l of [0, 1]) {
      const run = (dir: string, back: boolean) =>
        refLstmDirection(
          x,
          toMatrix(w[`lstm_head.weight_ih_l${l}${dir}`]!),
          toMatrix(w[`lstm_head.weight_hh_l${l}${dir}`]!),
          Array.from(w[`lstm_head.bias_ih_l${l}${dir}`]!.data),
          Array.from(w[`lstm_head.bias_hh_l${l}${dir}`]!.data),
          H,
          back,
        );
      const fwd = run("", false);
      const bwd = run("_reverse", true);
      x = fwd.map((f, t) => [...f, ...bwd[t]!]);
    }
    const head = [0, 2].map((k) => ({
      w: toMatrix(w[`mlp_head.${k}.weight`]!),
      b: Array.from(w[`mlp_head.${k}.bias`]!.data),
    }));
    assert.ok(maxAbsDiff(sp.rows, flat(refMlp(x, head))) < 1e-5);
    assert.equal(sp.source, "p_tuning_encoder");
  });

  describe("rejects", () => {
    test("a hidden size other than the base's, naming both shapes", () =>
      assertRejects(
        () =>
          parseSoftPrompt(
            map({ prompt_embeddings: tensor([4, 16]) }),
            FILE,
            config("PROMPT_TUNING", { token_dim: null }),
            spec,
          ),
        "adapter_incompatible",
        /adapter_model\.safetensors/,
        /shape \[4, 16\], expected \[4, 8\]/,
      ));
    test("a token_dim other than the base's hidden size", () =>
      assertRejects(
        () =>
          parseSoftPrompt(
            map({ prompt_embeddings: table() }),
            FILE,
            config("PROMPT_TUNING", { token_dim: 16 }),
            spec,
          ),
        "adapter_incompatible",
        /token_dim 16/,
      ));
    test("a row count other than num_virtual_tokens", () =>
      assertRejects(
        () =>
          parseSoftPrompt(
            map({ prompt_embeddings: table() }),
            FILE,
            config("PROMPT_TUNING", { num_virtual_tokens: 6 }),
            spec,
          ),
        "adapter_load_failed",
        /shape \[4, 8\], expected \[6, 8\]/,
      ));
    test("a NaN row, naming the row", () => {
      const t = table();
      t.data[8 * 2 + 3] = Number.NaN;
      assertRejects(
        () => parseSoftPrompt(map({ prompt_embeddings: t }), FILE, config("PROMPT_TUNING"), spec),
        "adapter_load_failed",
        /prompt_embeddings holds a non-finite value \(NaN\) in row 2/,
      );
    });
    test("a missing table", () =>
      assertRejects(
        () => parseSoftPrompt(map({}), FILE, config("PROMPT_TUNING"), spec),
        "adapter_load_failed",
        /prompt_embeddings is missing/,
      ));
    test("a truncated file, naming it", () => {
      const file = join(tempDir(), "adapter_model.safetensors");
      writeFileSync(file, safetensors({ prompt_embeddings: table() }));
      truncateSync(file, 100);
      assertRejects(
        () => loadSoftPrompt(file, config("PROMPT_TUNING"), spec),
        "adapter_load_failed",
        new RegExp(`${file.replaceAll(".", "\\.")}: truncated`),
      );
    });
    test("a dtype the reader does not widen (F64)", () => {
      const file = join(tempDir(), "adapter_model.safetensors");
      const header = Buffer.from(
        JSON.stringify({ prompt_embeddings: { dtype: "F64", shape: [4, 8], data_offsets: [0, 256] } }),
      );
      const bytes = new Uint8Array(8 + header.length + 256);
      new DataView(bytes.buffer).setBigUint64(0, BigInt(header.length), true);
      bytes.set(header, 8);
      writeFileSync(file, bytes);
      assertRejects(
        () => loadSoftPrompt(file, config("PROMPT_TUNING"), spec),
        "adapter_incompatible",
        /prompt_embeddings: dtype F64 is not supported/,
      );
    });
    test("an encoder whose type disagrees with the config", () =>
      assertRejects(
        () =>
          parseSoftPrompt(
            map(lstmEncoder()),
            FILE,
            config("P_TUNING", { encoder_reparameterization_type: "MLP" }),
            spec,
          ),
        "adapter_load_failed",
        /MLP but the checkpoint holds LSTM/,
      ));
    test("an encoder whose output is not the base's hidden size", () => {
      const w = mlpEncoder();
      w[`${PRE}mlp_head.4.weight`] = tensor([6, 5]);
      w[`${PRE}mlp_head.4.bias`] = tensor([6]);
      assertRejects(
        () => parseSoftPrompt(map(w), FILE, config("P_TUNING"), spec),
        "adapter_incompatible",
        /mlp_head\.4\.weight has shape \[6, 5\]/,
      );
    });
    test("an encoder layer whose width does not chain", () => {
      const w = mlpEncoder();
      w[`${PRE}mlp_head.2.weight`] = tensor([5, 4]);
      assertRejects(
        () => parseSoftPrompt(map(w), FILE, config("P_TUNING"), spec),
        "adapter_load_failed",
        /mlp_head\.2\.weight has shape \[5, 4\], expected \[5, 5\]/,
      );
    });
    test("a non-finite encoder weight", () => {
      const w = mlpEncoder();
      w[`${PRE}mlp_head.0.weight`]!.data[3] = Number.NaN;
      assertRejects(
        () => parseSoftPrompt(map(w), FILE, config("P_TUNING"), spec),
        "adapter_load_failed",
        /mlp_head\.0\.weight holds a non-finite value/,
      );
    });
    test("an encoder checkpoint under PROMPT_TUNING", () =>
      assertRejects(
        () => parseSoftPrompt(map(mlpEncoder()), FILE, config("PROMPT_TUNING"), spec),
        "adapter_load_failed",
        /prompt_embeddings is missing/,
      ));
    test("encoder-decoder prompt learning", () =>
      assertRejects(
        () =>
          parseSoftPrompt(
            map({ prompt_embeddings: table() }),
            FILE,
            config("PROMPT_TUNING", { num_transformer_submodules: 2 }),
            spec,
          ),
        "adapter_incompatible",
        /encoder-decoder/,
      ));
  });
});
