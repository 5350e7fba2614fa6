/** Table-driven tests for StopStringMatcher: held-back partial matches, cuts at the earliest stop. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { StopStringMatcher } from "../../src/engine/stopping.ts";

interface Case {
  name: string;
  stops: string[];
  chunks: string[];
  /** What each push emits, in order (pushes after a stop are not made). */
  emits: string[];
  stopped: boolean;
  /** What flush returns at the end. */
  rest: string;
}

const CASES: Case[] = [
  {
    name: "no stops",
    stops: [],
    chunks: ["Hello", " world"],
    emits: ["Hello", " world"],
    stopped: false,
    rest: "",
  },
  { name: "empty stop is ignored", stops: [""], chunks: ["a"], emits: ["a"], stopped: false, rest: "" },
  {
    name: "stop inside one chunk",
    stops: ["END"],
    chunks: ["abcENDxyz"],
    emits: ["abc"],
    stopped: true,
    rest: "",
  },
  {
    name: "stop split across chunks",
    stops: ["\n\n"],
    chunks: ["line one\n", "\nline two"],
    emits: ["line one", ""],
    stopped: true,
    rest: "",
  },
  {
    name: "stop split over three chunks",
    stops: ["STOP"],
    chunks: ["go S", "T", "OP now"],
    emits: ["go ", "", ""],
    stopped: true,
    rest: "",
  },
  {
    name: "partial match that fails is released",
    stops: ["STOP"],
    chunks: ["go ST", "AY here"],
    emits: ["go ", "STAY here"],
    stopped: false,
    rest: "",
  },
  {
    name: "held partial match at the end comes out on flush",
    stops: ["STOP"],
    chunks: ["almost ST"],
    emits: ["almost "],
    stopped: false,
    rest: "ST",
  },
  {
    name: "stop at the very start",
    stops: ["###"],
    chunks: ["###", "more"],
    emits: [""],
    stopped: true,
    rest: "",
  },
  {
    name: "several stops: the earliest in the text wins",
    stops: ["world", "lo"],
    chunks: ["hello world"],
    emits: ["hel"],
    stopped: true,
    rest: "",
  },
  {
    name: "overlapping prefixes: holds the longest possible start",
    stops: ["abc", "bcd"],
    chunks: ["xab", "cz"],
    emits: ["x", ""],
    stopped: true,
    rest: "",
  },
  {
    name: "overlapping prefixes: the other stop completes, text before it is released",
    stops: ["abce", "bcd"],
    chunks: ["xab", "cd"],
    emits: ["x", "a"],
    stopped: true,
    rest: "",
  },
  {
    name: "self-overlapping stop (aab in aaab)",
    stops: ["aab"],
    chunks: ["a", "a", "a", "b!"],
    emits: ["", "", "a", ""],
    stopped: true,
    rest: "",
  },
  {
    name: "stop that is a prefix of another: the shorter cuts first",
    stops: ["</s>extra", "</s>"],
    chunks: ["done</", "s>"],
    emits: ["done", ""],
    stopped: true,
    rest: "",
  },
  {
    name: "emoji stop split across chunks",
    stops: ["🙂🙂"],
    chunks: ["hi 🙂", "🙂 there"],
    emits: ["hi ", ""],
    stopped: true,
    rest: "",
  },
  {
    name: "empty chunks",
    stops: ["x"],
    chunks: ["", "ab", "", "x"],
    emits: ["", "ab", "", ""],
    stopped: true,
    rest: "",
  },
];

for (const c of CASES) {
  test(c.name, () => {
    const matcher = new StopStringMatcher(c.stops);
    const emits: string[] = [];
    let stopped = false;
    for (const chunk of c.chunks) {
      const result = matcher.push(chunk);
      emits.push(result.emit);
      stopped = result.stopped;
      if (stopped) break;
    }
    assert.deepEqual(emits, c.emits);
    assert.equal(stopped, c.stopped);
    assert.equal(matcher.flush(), c.rest);
  });
}

test("after a stop, further pushes emit nothing and stay stopped", () => {
  const matcher = new StopStringMatcher(["."]);
  assert.deepEqual(matcher.push("end. tail"), { emit: "end", stopped: true });
  assert.deepEqual(matcher.push("more"), { emit: "", stopped: true });
  assert.equal(matcher.stopped, true);
  assert.equal(matcher.flush(), "");
});

test("emitted text plus flush equals the input when nothing stops, for any chunking", () => {
  const text = "abcabcab aab abc STO STOP";
  for (let size = 1; size <= 5; size++) {
    const matcher = new StopStringMatcher(["abd", "STOPX", "ab c"]);
    let out = "";
    for (let i = 0; i < text.length; i += size) out += matcher.push(text.slice(i, i + size)).emit;
    assert.equal(out + matcher.flush(), text, `chunk size ${size}`);
  }
});
