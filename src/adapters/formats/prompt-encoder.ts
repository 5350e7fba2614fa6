/**
 * @module adapters/formats/prompt-encoder — run a p-tuning prompt encoder checkpoint once, in float64, to get
 * the virtual-token table; nothing of the encoder is kept (NeMo and PEFT do the same at inference).
 *
 * PEFT `tuners/p_tuning/model.py` PromptEncoder, evaluated on indices 0..n-1 (dropout off):
 *   MLP:  out = L4(relu(L2(relu(L0(E)))))         E = embedding.weight [n, token_dim]
 *   LSTM: out = L2(relu(L0(BiLSTM(E))))            BiLSTM: `encoder_num_layers` layers, hidden H, batch_first,
 *                                                  output [n, 2H] = [forward h_t, backward h_t]
 * where Lk = mlp_head.{k} (nn.Linear, y = x W^T + b). Any number of Linear layers at even indices with ReLU
 * between is accepted (NeMo's MLP encoder uses the same `mlp_head` layout with 2+ layers).
 * PyTorch LSTM cell, gates in order i, f, g, o: [i f g o] = W_ih x + b_ih + W_hh h + b_hh;
 * c = sigmoid(f) c + sigmoid(i) tanh(g); h = sigmoid(o) tanh(c).
 */
import type { ModelSpec } from "../../model/model-spec.ts";
import type { FloatTensor } from "../../model/safetensors.ts";
import { expectFinite, expectShape, incompatible, loadFailed, shapeText } from "./format-shared.ts";
import type { PeftConfig } from "./peft-config.ts";

const ENCODER_KEY =
  /^(?:base_model\.)?(?:prompt_encoder\.)?(?:[A-Za-z0-9_-]+\.)?(embedding\.weight|mlp_head\.\d+\.(?:weight|bias)|lstm_head\.(?:weight|bias)_(?:ih|hh)_l\d+(?:_reverse)?)$/;

/** The encoder's tensors under canonical names (`embedding.weight`, `mlp_head.0.weight`, ...), or null if none. */
export function promptEncoderTensors(
  file: string,
  tensors: Map<string, FloatTensor>,
): Map<string, FloatTensor> | null {
  const out = new Map<string, FloatTensor>();
  for (const [key, tensor] of tensors) {
    const canonical = ENCODER_KEY.exec(key)?.[1];
    if (!canonical)
      throw loadFailed(file, `unexpected tensor ${key} (not a prompt encoder weight nor prompt_embeddings)`);
    if (out.has(canonical)) throw loadFailed(file, `two tensors map to the prompt encoder's ${canonical}`);
    out.set(canonical, tensor);
  }
  return out.has("embedding.weight") ? out : null;
}

type Rows = Float64Array[];

/** y = x W^T + b over rows; W [out, in]. */
function linear(x: Rows, w: Float32Array, b: Float32Array | null, outDim: number): Rows {
  return x.map((row) => {
    const y = new Float64Array(outDim);
    for (let o = 0; o < outDim; o++) {
      let acc = b ? b[o]! : 0;
      for (let i = 0; i < row.length; i++) acc += row[i]! * w[o * row.length + i]!;
      y[o] = acc;
    }
    return y;
  });
}

const sigmoid = (v: number) => 1 / (1 + Math.exp(-v));

interface Direction {
  wIh: Float32Array;
  wHh: Float32Array;
  bIh: Float32Array | null;
  bHh: Float32Array | null;
}

/** One direction of one LSTM layer over the whole sequence (reversed when `reverse`). */
function lstmDirection(x: Rows, d: Direction, hidden: number, reverse: boolean): Rows {
  const n = x.length;
  const out: Rows = new Array(n);
  let h = new Float64Array(hidden);
  const c = new Float64Array(hidden);
  for (let step = 0; step < n; step++) {
    const t = reverse ? n - 1 - step : step;
    const gates = linear([x[t]!], d.wIh, d.bIh, 4 * hidden)[0]!;
    const recurrent = linear([h], d.wHh, d.bHh, 4 * hidden)[0]!;
    const next = new Float64Array(hidden);
    for (let j = 0; j < hidden; j++) {
      const i = sigmoid(gates[j]! + recurrent[j]!);
      const f = sigmoid(gates[hidden + j]! + recurrent[hidden + j]!);
      const g = Math.tanh(gates[2 * hidden + j]! + recurrent[2 * hidden + j]!);
      const o = sigmoid(gates[3 * hidden + j]! + recurrent[3 * hidden + j]!);
      c[j] = f * c[j]! + i * g;
      next[j] = o * Math.tanh(c[j]!);
    }
    h = next;
    out[t] = next;
  }
  return out;
}

function lstmLayers(
  file: string,
  w: Map<string, FloatTensor>,
  input: Rows,
  tokenDim: number,
  config: PeftConfig,
): Rows {
  const numLayers = 1 + Math.max(...[...w.keys()].map((k) => Number(/_l(\d+)/.exec(k)?.[1] ?? -1)));
  if (config.encoderNumLayers !== null && config.encoderNumLayers !== numLayers) {
    throw loadFailed(
      file,
      `encoder_num_layers is ${config.encoderNumLayers} but the checkpoint has ${numLayers} LSTM layers`,
    );
  }
  const hh = w.get("lstm_head.weight_hh_l0");
  if (hh?.shape.length !== 2) throw loadFailed(file, "lstm_head.weight_hh_l0 is missing or not 2-D");
  const hidden = hh.shape[1]!;
  if (config.encoderHiddenSize !== null && config.encoderHiddenSize !== hidden) {
    throw loadFailed(
      file,
      `encoder_hidden_size is ${config.encoderHiddenSize} but lstm_head.weight_hh_l0 is ${shapeText(hh.shape)}`,
    );
  }
  let x = input;
  for (let l = 0; l < numLayers; l++) {
    const inDim = l === 0 ? tokenDim : 2 * hidden;
    const direction = (suffix: string): Direction => {
      const get = (name: string, shape: number[], optional: boolean) => {
        const t = w.get(`lstm_head.${name}_l${l}${suffix}`);
        if (!t) {
          if (optional) return null;
          throw loadFailed(file, `prompt encoder tensor lstm_head.${name}_l${l}${suffix} is missing`);
        }
        expectShape(
          file,
          `lstm_head.${name}_l${l}${suffix}`,
          t,
          shape,
          [],
          `LSTM hidden ${hidden}, input ${inDim}`,
        );
        expectFinite(file, `lstm_head.${name}_l${l}${suffix}`, t.data);
        return t.data;
      };
      return {
        wIh: get("weight_ih", [4 * hidden, inDim], false)!,
        wHh: get("weight_hh", [4 * hidden, hidden], false)!,
        bIh: get("bias_ih", [4 * hidden], true),
        bHh: get("bias_hh", [4 * hidden], true),
      };
    };
    const forward = lstmDirection(x, direction(""), hidden, false);
    const backward = lstmDirection(x, direction("_reverse"), hidden, true);
    x = forward.map((f, t) => {
      const row = new Float64Array(2 * hidden);
      row.set(f, 0);
      row.set(backward[t]!, hidden);
      return row;
    });
  }
  return x;
}

function mlpHead(
  file: string,
  w: Map<string, FloatTensor>,
  input: Rows,
  inDim: number,
  outDim: number,
): Rows {
  const indices = [...w.keys()]
    .map((k) => /^mlp_head\.(\d+)\.weight$/.exec(k)?.[1])
    .filter((i): i is string => i !== undefined)
    .map(Number)
    .sort((a, b) => a - b);
  if (indices.length === 0) throw loadFailed(file, "prompt encoder has no mlp_head.{k}.weight tensors");
  indices.forEach((k, i) => {
    if (k !== 2 * i)
      throw loadFailed(
        file,
        `prompt encoder mlp_head Linear layers must sit at indices 0, 2, 4, ... (found ${indices.join(", ")})`,
      );
  });
  for (const key of w.keys()) {
    const bias = /^mlp_head\.(\d+)\.bias$/.exec(key)?.[1];
    if (bias !== undefined && !indices.includes(Number(bias)))
      throw loadFailed(file, `tensor ${key} has no matching weight`);
  }
  let x = input;
  let width = inDim;
  indices.forEach((k, i) => {
    const weight = w.get(`mlp_head.${k}.weight`)!;
    const isLast = i === indices.length - 1;
    const out = weight.shape[0]!;
    if (isLast && out !== outDim) {
      throw incompatible(
        file,
        `tensor mlp_head.${k}.weight has shape ${shapeText(weight.shape)}, but the prompt encoder must output rows of the base's hidden size ${outDim}`,
      );
    }
    expectShape(file, `mlp_head.${k}.weight`, weight, [out, width], [], `input width ${width}`);
    expectFinite(file, `mlp_head.${k}.weight`, weight.data, width);
    const bias = w.get(`mlp_head.${k}.bias`) ?? null;
    if (bias) {
      expectShape(file, `mlp_head.${k}.bias`, bias, [out], []);
      expectFinite(file, `mlp_head.${k}.bias`, bias.data);
    }
    x = linear(x, weight.data, bias?.data ?? null, out);
    if (!isLast) x = x.map((row) => row.map((v) => Math.max(v, 0)));
    width = out;
  });
  return x;
}

/** Evaluate the encoder on its n virtual tokens -> rows [n, hidden] (a fresh array; no weights retained). */
export function evaluatePromptEncoder(
  file: string,
  w: Map<string, FloatTensor>,
  config: PeftConfig,
  spec: ModelSpec,
): Float32Array {
  const emb = w.get("embedding.weight")!;
  if (emb.shape.length !== 2)
    throw loadFailed(
      file,
      `prompt encoder embedding.weight has shape ${shapeText(emb.shape)}, expected [n, token_dim]`,
    );
  const [n, tokenDim] = emb.shape as [number, number];
  if (tokenDim !== spec.hiddenSize) {
    throw incompatible(
      file,
      `prompt encoder embedding.weight has shape ${shapeText(emb.shape)}; token_dim must be the base's hidden size ${spec.hiddenSize}`,
    );
  }
  if (config.numVirtualTokens !== null && config.numVirtualTokens !== n) {
    throw loadFailed(
      file,
      `prompt encoder embedding.weight has ${n} rows (${shapeText(emb.shape)}) but num_virtual_tokens is ${config.numVirtualTokens}`,
    );
  }
  expectFinite(file, "embedding.weight", emb.data, tokenDim);
  const isLstm = [...w.keys()].some((k) => k.startsWith("lstm_head."));
  const declared = config.encoderReparameterizationType;
  if (declared !== null && declared !== (isLstm ? "LSTM" : "MLP")) {
    throw loadFailed(
      file,
      `encoder_reparameterization_type is ${declared} but the checkpoint holds ${isLstm ? "LSTM" : "MLP"} weights`,
    );
  }
  const input: Rows = Array.from({ length: n }, (_, t) =>
    Float64Array.from(emb.data.subarray(t * tokenDim, (t + 1) * tokenDim)),
  );
  const encoded = isLstm ? lstmLayers(file, w, input, tokenDim, config) : input;
  const inDim = encoded[0]?.length ?? tokenDim;
  if (!isLstm && config.encoderHiddenSize !== null) {
    const first = w.get("mlp_head.0.weight");
    if (first && first.shape[0] !== config.encoderHiddenSize) {
      throw loadFailed(
        file,
        `encoder_hidden_size is ${config.encoderHiddenSize} but mlp_head.0.weight is ${shapeText(first.shape)}`,
      );
    }
  }
  const out = mlpHead(file, w, encoded, inDim, spec.hiddenSize);
  const rows = new Float32Array(n * spec.hiddenSize);
  out.forEach((row, t) => {
    rows.set(row, t * spec.hiddenSize);
  });
  expectFinite(file, "the prompt encoder's output", rows, spec.hiddenSize);
  return rows;
}
