import assert from "node:assert/strict";
import { describe, it } from "node:test";
import type { GenerationService } from "../../src/engine/service.ts";
import { tokenTextOffsets } from "../../src/http/logprobs.ts";
import { formatPath } from "../../src/http/schemas.ts";
import { decodeIds, encode, FakeService } from "../helpers/fake-service.ts";

/** A SentencePiece-like decoder: "▁" is a space, and the very first space of a text is stripped. */
function sentencePieceService(pieces: string[]): GenerationService {
  const decode = (ids: number[]) =>
    ids
      .map((id) => pieces[id]!.replace(/▁/g, " "))
      .join("")
      .replace(/^ /, "");
  return { decode } as unknown as GenerationService;
}

describe("tokenTextOffsets", () => {
  it("gives each token's start in the decoded text", () => {
    const service = new FakeService();
    const ids = encode("Hello world the cat.é!");
    const offsets = tokenTextOffsets(service, ids);
    const text = decodeIds(ids);
    ids.forEach((id, i) => {
      assert.equal(text.slice(offsets[i]!, offsets[i]! + decodeIds([id]).length), decodeIds([id]));
    });
  });

  it("matches prefix decoding when the decoder strips the first space (SentencePiece)", () => {
    const pieces = ["▁Hello", "▁wor", "ld", "▁", "!", "▁again", "▁and", "▁again", "▁and", "▁more"];
    const service = sentencePieceService(pieces);
    const ids = pieces.map((_, i) => i);
    const expected = ids.map((_, i) => service.decode(ids.slice(0, i)).length);
    assert.deepEqual(tokenTextOffsets(service, ids), expected);
  });

  it("is empty for no tokens", () => {
    assert.deepEqual(tokenTextOffsets(new FakeService(), []), []);
  });
});

describe("formatPath", () => {
  it("spells zod paths the way OpenAI's param does", () => {
    assert.equal(formatPath(["messages", 0, "content"]), "messages[0].content");
    assert.equal(formatPath(["prompt", 1, 1]), "prompt[1][1]");
    assert.equal(formatPath(["taskmux", "fields", "a"]), "taskmux.fields.a");
    assert.equal(formatPath([]), null);
  });
});
