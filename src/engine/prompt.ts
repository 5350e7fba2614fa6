/**
 * @module engine/prompt — renders a request into the token ids a task's sequence starts with: system prompt,
 * few-shot examples, the `{field}` template, chain-of-thought instruction, and `<|VIRTUAL_PROMPT_n|>` groups
 * that become ids >= vocab (rows of the task's soft prompt). Placeholders are split out of the rendered text
 * before tokenizing, so virtual tokens never reach the tokenizer.
 */
import { invalidRequest } from "../errors.ts";
import type { ChatMessage, PromptInput } from "./service.ts";

/** The part of a task definition rendering needs (adapters/formats/task-definition.ts parses the file). */
export interface PromptTemplate {
  promptTemplate?: string;
  virtualTokenSplits?: number[];
  fields?: string[];
  queryField?: string;
  systemPrompt?: string;
  fewShot?: { input: Record<string, string>; output: string }[];
  chainOfThought?: string;
  truncateField?: string;
}

/** The tokenizer calls rendering needs (TextTokenizer satisfies it). */
export interface PromptTokenizer {
  encode(text: string, options?: { addSpecialTokens?: boolean }): number[];
  decode(ids: number[]): string;
  applyChatTemplate(messages: readonly ChatMessage[], options?: { addGenerationPrompt?: boolean }): string;
}

export interface RenderOptions {
  vocabSize: number;
  /** Rows of the task's soft prompt (0 = none). */
  numVirtualTokens: number;
  /** The longest prompt allowed (context minus room for at least one new token). */
  maxPromptTokens: number;
}

const PLACEHOLDER = /<\|VIRTUAL_PROMPT_(\d+)\|>/g;
const SLOT = /\{([A-Za-z_][A-Za-z0-9_]*)\}/g;

/** Ids of soft-prompt rows [from, from + count) as virtual token ids. */
const virtualIds = (vocabSize: number, from: number, count: number) =>
  Array.from({ length: count }, (_, i) => vocabSize + from + i);

/**
 * A task without a template serves its soft prompt as PEFT's PeftModelForCausalLM does: all virtual tokens
 * first, then the whole tokenized prompt (BOS included).
 */
function renderPlain(tokenizer: PromptTokenizer, prompt: PromptInput, options: RenderOptions): number[] {
  const ids =
    prompt.kind === "tokens"
      ? prompt.tokens
      : prompt.kind === "text"
        ? tokenizer.encode(prompt.text)
        : tokenizer.encode(tokenizer.applyChatTemplate(prompt.messages), { addSpecialTokens: false });
  return [...virtualIds(options.vocabSize, 0, options.numVirtualTokens), ...ids];
}

function fillSlots(template: string, values: Record<string, string>, where: string): string {
  return template.replace(SLOT, (_, name: string) => {
    const value = values[name];
    if (value === undefined)
      throw invalidRequest(`${where}: the task's template needs field "${name}"`, `taskmux.fields.${name}`);
    return value;
  });
}

/** Text with placeholders still in it: system prompt, few-shot examples, the query, chain of thought. */
function renderText(t: PromptTemplate, fields: Record<string, string>): { system: string; user: string } {
  const template = t.promptTemplate ?? `{${t.queryField ?? "prompt"}}`;
  const examples = (t.fewShot ?? []).map(
    (ex, i) => `${fillSlots(template.replace(PLACEHOLDER, ""), ex.input, `few_shot[${i}]`)}${ex.output}`,
  );
  let query = fillSlots(template, fields, "request");
  if (t.chainOfThought)
    query = `${query}${query.endsWith(" ") || query.endsWith("\n") ? "" : " "}${t.chainOfThought}`;
  return { system: t.systemPrompt ?? "", user: [...examples, query].join("\n\n") };
}

/** Split at placeholders; tokenize text pieces; insert each placeholder's group of virtual ids. */
function tokenizeWithPlaceholders(
  tokenizer: PromptTokenizer,
  text: string,
  splits: number[],
  options: RenderOptions,
  addSpecialTokens: boolean,
): number[] {
  const offsets = splits.map((_, i) => splits.slice(0, i).reduce((a, b) => a + b, 0));
  const ids: number[] = [];
  let last = 0;
  let first = true;
  const pushText = (piece: string) => {
    if (piece.length === 0 && !(first && addSpecialTokens)) return;
    ids.push(...tokenizer.encode(piece, { addSpecialTokens: first && addSpecialTokens }));
    first = false;
  };
  for (const match of text.matchAll(PLACEHOLDER)) {
    pushText(text.slice(last, match.index));
    const group = Number(match[1]);
    if (group >= splits.length)
      throw invalidRequest(`prompt contains <|VIRTUAL_PROMPT_${group}|>, which the task does not define`);
    ids.push(...virtualIds(options.vocabSize, offsets[group]!, splits[group]!));
    last = match.index! + match[0].length;
  }
  pushText(text.slice(last));
  return ids;
}

function fieldsFor(
  t: PromptTemplate,
  prompt: PromptInput,
  fields: Record<string, string>,
): Record<string, string> {
  const query = t.queryField ?? "prompt";
  const values = { ...fields };
  if (prompt.kind === "text") values[query] ??= prompt.text;
  if (prompt.kind === "chat") {
    const lastUser = [...prompt.messages].reverse().find((m) => m.role === "user");
    if (lastUser) values[query] ??= lastUser.content;
  }
  for (const name of t.fields ?? []) {
    if (values[name] === undefined)
      throw invalidRequest(
        `the task needs field "${name}" (send it in taskmux.fields)`,
        `taskmux.fields.${name}`,
      );
  }
  return values;
}

function renderOnce(
  tokenizer: PromptTokenizer,
  t: PromptTemplate,
  prompt: PromptInput,
  values: Record<string, string>,
  options: RenderOptions,
) {
  const splits = t.virtualTokenSplits ?? (options.numVirtualTokens > 0 ? [options.numVirtualTokens] : []);
  const { system, user } = renderText(t, values);
  if (prompt.kind === "chat") {
    // Earlier turns stay as they were; the last user turn becomes the rendered query.
    const lastUserIndex = prompt.messages.map((m) => m.role).lastIndexOf("user");
    const messages: ChatMessage[] = prompt.messages.map((m, i) =>
      i === lastUserIndex ? { role: m.role, content: user } : m,
    );
    if (system && !messages.some((m) => m.role === "system"))
      messages.unshift({ role: "system", content: system });
    const text = tokenizer.applyChatTemplate(messages);
    return tokenizeWithPlaceholders(tokenizer, text, splits, options, false);
  }
  const text = system ? `${system}\n\n${user}` : user;
  return tokenizeWithPlaceholders(tokenizer, text, splits, options, true);
}

/** Render a request for a task; cuts `truncateField` (from its end) when the prompt would not fit. */
export function renderTaskPrompt(
  tokenizer: PromptTokenizer,
  template: PromptTemplate | null,
  prompt: PromptInput,
  fields: Record<string, string>,
  options: RenderOptions,
): number[] {
  if (!template) return renderPlain(tokenizer, prompt, options);
  if (prompt.kind === "tokens") {
    throw invalidRequest(
      "this task renders a text template: send the prompt as text, not token ids",
      "prompt",
    );
  }
  const values = fieldsFor(template, prompt, fields);
  let ids = renderOnce(tokenizer, template, prompt, values, options);
  const cut = template.truncateField;
  if (ids.length > options.maxPromptTokens && cut && values[cut] !== undefined) {
    const fieldIds = tokenizer.encode(values[cut]!, { addSpecialTokens: false });
    const excess = ids.length - options.maxPromptTokens;
    // Re-tokenizing can shift a boundary by a token or two; trim a little more until it fits.
    for (let extra = 0; extra < 8 && ids.length > options.maxPromptTokens; extra++) {
      const keep = Math.max(0, fieldIds.length - excess - extra);
      ids = renderOnce(
        tokenizer,
        template,
        prompt,
        { ...values, [cut]: tokenizer.decode(fieldIds.slice(0, keep)) },
        options,
      );
    }
  }
  return ids;
}
