/** Tests for PEFT prefix tuning: PEFT's view/permute/split order on a hand-made tensor, GQA width, rejections. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { parsePeftConfig } from "../../../src/adapters/formats/peft-config.ts";
import { parsePrefix } from "../../../src/adapters/formats/prefix.ts";
import { assertRejects, smallSpec, tensor } from "./fixtures.ts";

// 2 layers, 2 KV heads of width 3 (4 query heads), 3 virtual tokens: each row is 2 * 2 * 2 * 3 = 24 wide.
const spec = smallSpec({ hiddenSize: 12, numHeads: 4, numKvHeads: 2, headDim: 3 });
const FILE = "prompt-tables/prefix/adapter_model.safetensors";
const config = (extra: Record<string, unknown> = {}) =>
  parsePeftConfig(
    {
      peft_type: "PREFIX_TUNING",
      num_virtual_tokens: 3,
      num_layers: 2,
      num_attention_heads: 2,
      token_dim: 6,
      ...extra,
    },
    "prompt-tables/prefix/adapter_config.json",
  );

/** Value = tok * 1000 + j * 100 + h * 10 + d, where row tok viewed as [L * 2 = j, KVH = h, HS = d] (PEFT's view). */
const code = (tok: number, j: number, h: number, d: number) => tok * 1000 + j * 100 + h * 10 + d;
function handMade() {
  return tensor([3, 24], (i) => {
    const tok = Math.floor(i / 24);
    const r = i % 24;
    return code(tok, Math.floor(r / 6), Math.floor((r % 6) / 3), r % 3);
  });
}

describe("PEFT prefix tuning", () => {
  test("layer l's key is slice 2l and its value slice 2l+1, laid out [KVH, n, HS]", () => {
    const prefix = parsePrefix(new Map([["prompt_embeddings", handMade()]]), FILE, config(), spec);
    assert.equal(prefix.length, 3);
    assert.equal(prefix.keys.length, 2);
    for (let l = 0; l < 2; l++) {
      for (let h = 0; h < 2; h++) {
        for (let tok = 0; tok < 3; tok++) {
          for (let d = 0; d < 3; d++) {
            const at = (h * 3 + tok) * 3 + d;
            assert.equal(prefix.keys[l]![at], code(tok, 2 * l, h, d), `key l${l} h${h} t${tok} d${d}`);
            assert.equal(
              prefix.values[l]![at],
              code(tok, 2 * l + 1, h, d),
              `value l${l} h${h} t${tok} d${d}`,
            );
          }
        }
      }
    }
  });

  test("accepts prefix_projection: the saved table is the projection's output", () => {
    assert.equal(
      parsePrefix(
        new Map([["prompt_embeddings", handMade()]]),
        FILE,
        config({ prefix_projection: true }),
        spec,
      ).length,
      3,
    );
  });

  describe("rejects", () => {
    const one = () => new Map([["prompt_embeddings", handMade()]]);
    test("a config counting query heads (made without GQA support)", () =>
      assertRejects(
        () => parsePrefix(one(), FILE, config({ num_attention_heads: 4, token_dim: 12 }), spec),
        "adapter_incompatible",
        /num_attention_heads 4 .* 2 key\/value heads .*grouped-query/,
      ));
    test("a row width other than layers x 2 x KVH x head_dim, naming both shapes", () =>
      assertRejects(
        () =>
          parsePrefix(
            new Map([["prompt_embeddings", tensor([3, 48])]]),
            FILE,
            config({ token_dim: null, num_attention_heads: null }),
            spec,
          ),
        "adapter_incompatible",
        /prompt_embeddings has shape \[3, 48\], expected \[n, 24\]/,
      ));
    test("a row count other than num_virtual_tokens", () =>
      assertRejects(
        () => parsePrefix(one(), FILE, config({ num_virtual_tokens: 5 }), spec),
        "adapter_load_failed",
        /shape \[3, 24\], expected \[5, 24\]/,
      ));
    test("another layer count", () =>
      assertRejects(
        () => parsePrefix(one(), FILE, config({ num_layers: 3 }), spec),
        "adapter_incompatible",
        /num_layers 3/,
      ));
    test("non-finite rows", () => {
      const t = handMade();
      t.data[30] = Number.NaN;
      assertRejects(
        () => parsePrefix(new Map([["prompt_embeddings", t]]), FILE, config(), spec),
        "adapter_load_failed",
        /non-finite value \(NaN\) in row 1/,
      );
    });
    test("a missing table", () =>
      assertRejects(
        () => parsePrefix(new Map(), FILE, config(), spec),
        "adapter_load_failed",
        /prompt_embeddings is missing/,
      ));
  });
});
