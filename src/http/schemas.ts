/**
 * @module http/schemas — zod schemas for the OpenAI request bodies, JSON body reading, and zod issue →
 * OpenAI `param` (`messages[0].content`) plus a message naming the rule broken. Unknown fields are ignored.
 */
import type { Context } from "hono";
import { z } from "zod";
import { invalidRequest, type TaskmuxError } from "../errors.ts";
import { invalidJson } from "./errors.ts";

/** Optional OpenAI fields: clients send `null` for "unset" as often as they leave the key out. */
const opt = <T extends z.ZodType>(schema: T) => schema.nullish();

const tokenId = z.number().int().nonnegative();
const temperature = z.number().min(0).max(2);
const topP = z.number().gt(0).max(1);
const topK = z.number().int().min(0);
const seed = z.number().int();
const maxTokens = z.number().int().min(0);
const stop = z.preprocess(
  (value) => (typeof value === "string" ? [value] : value),
  z.array(z.string().min(1)).max(4),
);
const streamOptions = z.object({ include_usage: opt(z.boolean()) });
/** `taskmux: {fields}` — template fields for tasks whose prompt_template names {field} slots. */
const taskmuxExtension = z.object({ fields: opt(z.record(z.string(), z.string())) });

const PROMPT_SHAPES =
  "must be a string, an array of strings, an array of token ids, or an array of token-id arrays";

/** Fields /v1/completions and /v1/chat/completions accept alike (sampling, streaming, extensions). */
const sharedFields = {
  temperature: opt(temperature),
  top_p: opt(topP),
  top_k: opt(topK),
  seed: opt(seed),
  stop: opt(stop),
  n: opt(z.number().int().min(1)),
  stream: opt(z.boolean()),
  stream_options: opt(streamOptions),
  user: opt(z.string()),
  ignore_eos: opt(z.boolean()),
  taskmux: opt(taskmuxExtension),
};

export const completionRequestSchema = z.object({
  model: opt(z.string()),
  prompt: z.union(
    [
      z.string(),
      z.array(z.string()).min(1),
      z.array(tokenId).min(1),
      z.array(z.array(tokenId).min(1)).min(1),
    ],
    { error: PROMPT_SHAPES },
  ),
  max_tokens: opt(maxTokens),
  echo: opt(z.boolean()),
  logprobs: opt(z.number().int().min(0).max(5)),
  ...sharedFields,
});
export type CompletionRequest = z.infer<typeof completionRequestSchema>;

const textPart = z.object({ type: z.literal("text"), text: z.string() });
const chatMessage = z.object({
  role: z.string().min(1),
  content: z
    .union([z.string(), z.array(textPart), z.null()], {
      error: 'must be a string, an array of {"type": "text", "text": string} parts, or null',
    })
    .optional(),
});

export const chatRequestSchema = z.object({
  model: opt(z.string()),
  messages: z.array(chatMessage).min(1),
  max_tokens: opt(maxTokens),
  max_completion_tokens: opt(maxTokens),
  logprobs: opt(z.boolean()),
  top_logprobs: opt(z.number().int().min(0).max(20)),
  ...sharedFields,
});
export type ChatRequest = z.infer<typeof chatRequestSchema>;

/** Refuses invalid UTF-8 instead of replacing it with U+FFFD (the model would see text nobody sent). */
const utf8 = new TextDecoder("utf-8", { fatal: true });

/** Reads and parses the JSON body (the body limit was enforced by middleware before this runs). */
export async function readJson(c: Context): Promise<unknown> {
  const bytes = await c.req.arrayBuffer();
  let text: string;
  try {
    text = utf8.decode(bytes);
  } catch {
    throw invalidJson("the body is not valid UTF-8");
  }
  if (text.trim() === "") throw invalidJson("the body is empty");
  try {
    return JSON.parse(text);
  } catch (error) {
    throw invalidJson((error as Error).message);
  }
}

/** Validates a parsed body; the first issue becomes a 400 naming the field (`param`) and the rule. */
export function parseBody<S extends z.ZodType>(schema: S, body: unknown): z.infer<S> {
  const result = schema.safeParse(body);
  if (result.success) return result.data;
  throw issueToError(result.error.issues[0]!);
}

/** Checks a limit that depends on configuration (n <= maxN) with the same message style as the schema. */
export function checkMax(value: number, max: number, param: string): void {
  if (value > max) throw invalidRequest(`${param} must be <= ${max} (got ${value})`, param);
}

/** `["messages", 0, "content"]` → `messages[0].content` (OpenAI's `param` spelling). */
export function formatPath(path: readonly PropertyKey[]): string | null {
  let out = "";
  for (const key of path)
    out += typeof key === "number" ? `[${key}]` : `${out === "" ? "" : "."}${String(key)}`;
  return out === "" ? null : out;
}

function issueToError(issue: z.core.$ZodIssue, prefix: readonly PropertyKey[] = []): TaskmuxError {
  const path = [...prefix, ...issue.path];
  if (issue.code === "invalid_union") {
    // Report the one branch whose type matched (its issues lie below the union) when there is exactly one.
    const deep = issue.errors.filter((branch) => branch.every((i) => i.path.length > 0));
    if (deep.length === 1) return issueToError(deep[0]![0]!, path);
    if (
      issue.errors.flat().every((i) => i.code === "invalid_type" && i.message.endsWith("received undefined"))
    ) {
      return issueToError({ ...issue.errors[0]![0]!, path: [] }, path);
    }
  }
  const param = formatPath(path);
  return invalidRequest(`${param ?? "the request body"} ${describe(issue)}`, param);
}

function describe(issue: z.core.$ZodIssue): string {
  switch (issue.code) {
    case "too_big": {
      const op = issue.inclusive ? "<=" : "<";
      if (issue.origin === "array") return `must have at most ${issue.maximum} items`;
      if (issue.origin === "string") return `must be at most ${issue.maximum} characters long`;
      return `must be ${op} ${issue.maximum}`;
    }
    case "too_small": {
      const op = issue.inclusive ? ">=" : ">";
      if (issue.origin === "array") return `must have at least ${issue.minimum} item(s)`;
      if (issue.origin === "string") return `must be at least ${issue.minimum} character(s) long`;
      return `must be ${op} ${issue.minimum}`;
    }
    case "invalid_type": {
      const received = /received (\w+)/.exec(issue.message)?.[1];
      if (received === "undefined") return "is required";
      const expected = issue.expected === "int" ? "an integer" : `of type ${issue.expected}`;
      return `must be ${expected}${received ? ` (received ${received})` : ""}`;
    }
    case "invalid_union":
      return issue.message === "Invalid input" ? "does not match any accepted shape" : issue.message;
    case "invalid_value":
      return `must be one of ${issue.values.map((v) => JSON.stringify(v)).join(", ")}`;
    default:
      return `is invalid: ${issue.message}`;
  }
}
