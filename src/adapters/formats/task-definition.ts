/**
 * @module adapters/formats/task-definition — our `task.json`: a prompt template with `{field}` slots and
 * `<|VIRTUAL_PROMPT_n|>` placeholders, system prompt, few-shot examples, chain-of-thought instruction and
 * sampling defaults. Validated with zod, returned camelCase. A template without placeholders is a valid
 * pure prompt-engineering task; whether the folder's soft prompt fits the placeholders is checked by
 * task-folder.ts, which knows the row count.
 */
import { z } from "zod";
import { loadFailed, zodIssue } from "./format-shared.ts";

export interface FewShotExample {
  /** Field values the template's slots are filled with. */
  input: Record<string, string>;
  /** Text that follows the rendered example (the answer). */
  output: string;
}

export interface SamplingDefaults {
  temperature?: number;
  topP?: number;
  topK?: number;
  maxTokens?: number;
  stop?: string[];
}

export interface TaskDefinition {
  description?: string;
  promptTemplate?: string;
  /** Virtual tokens per placeholder, in placeholder order (sums to the soft prompt's rows). */
  virtualTokenSplits?: number[];
  /** Fields a request must supply; always includes `queryField`. */
  fields: string[];
  /** The field the request's `prompt` (or last user message) fills. */
  queryField: string;
  systemPrompt?: string;
  fewShot: FewShotExample[];
  chainOfThought?: string;
  defaults: SamplingDefaults;
  truncateField?: string;
  /** How many `<|VIRTUAL_PROMPT_n|>` placeholders the template holds (0..n-1, each once). */
  numPlaceholders: number;
}

/** The same slot and placeholder syntax engine/prompt.ts renders. */
export const SLOT_PATTERN = /\{([A-Za-z_][A-Za-z0-9_]*)\}/g;
export const PLACEHOLDER_PATTERN = /<\|VIRTUAL_PROMPT_(\d+)\|>/g;

const FIELD_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;
const fieldName = z.string().regex(FIELD_NAME, "must be an identifier ([A-Za-z_][A-Za-z0-9_]*)");

const schema = z
  .object({
    name: z.string().optional(),
    description: z.string().optional(),
    prompt_template: z.string().min(1).optional(),
    virtual_token_splits: z.array(z.number().int().positive()).min(1).optional(),
    fields: z.array(fieldName).min(1).optional(),
    query_field: fieldName.default("prompt"),
    system_prompt: z.string().optional(),
    few_shot: z
      .array(z.object({ input: z.record(z.string(), z.string()), output: z.string() }).strict())
      .default([]),
    chain_of_thought: z.string().optional(),
    defaults: z
      .object({
        temperature: z.number().min(0).max(2).optional(),
        top_p: z.number().gt(0).max(1).optional(),
        top_k: z.number().int().min(0).optional(),
        max_tokens: z.number().int().positive().optional(),
        stop: z.union([z.string().min(1), z.array(z.string().min(1)).max(16)]).optional(),
      })
      .strict()
      .default({}),
    truncate_field: fieldName.optional(),
  })
  .strict();

/** Slot names in template order (repeats kept once). */
export function templateSlots(template: string): string[] {
  return [...new Set([...template.matchAll(SLOT_PATTERN)].map((m) => m[1]!))];
}

/** Placeholder indices in template order. */
export function templatePlaceholders(template: string): number[] {
  return [...template.matchAll(PLACEHOLDER_PATTERN)].map((m) => Number(m[1]));
}

function checkPlaceholders(file: string, template: string, splits: number[] | undefined): number {
  const found = templatePlaceholders(template);
  const sorted = [...found].sort((a, b) => a - b);
  sorted.forEach((n, i) => {
    if (n !== i) {
      const why =
        sorted.indexOf(n) !== i
          ? `<|VIRTUAL_PROMPT_${n}|> appears twice`
          : `<|VIRTUAL_PROMPT_${i}|> is missing`;
      throw loadFailed(file, `prompt_template: placeholders must be numbered 0..k-1, each once (${why})`);
    }
  });
  if (splits && splits.length !== found.length) {
    throw loadFailed(
      file,
      `virtual_token_splits has ${splits.length} entries but prompt_template has ${found.length} <|VIRTUAL_PROMPT_n|> placeholders`,
    );
  }
  if (!splits && found.length > 1) {
    throw loadFailed(
      file,
      `virtual_token_splits is required when prompt_template has ${found.length} placeholders`,
    );
  }
  return found.length;
}

function checkFields(file: string, raw: z.infer<typeof schema>, fields: string[]): void {
  if (!fields.includes(raw.query_field)) {
    throw loadFailed(file, `fields ${JSON.stringify(fields)} must include query_field "${raw.query_field}"`);
  }
  const slots = raw.prompt_template ? templateSlots(raw.prompt_template) : [raw.query_field];
  for (const slot of slots) {
    if (!fields.includes(slot))
      throw loadFailed(file, `prompt_template slot {${slot}} is not listed in fields`);
  }
  if (raw.truncate_field !== undefined && !fields.includes(raw.truncate_field)) {
    throw loadFailed(file, `truncate_field "${raw.truncate_field}" is not listed in fields`);
  }
  raw.few_shot.forEach((example, i) => {
    for (const key of Object.keys(example.input)) {
      if (!fields.includes(key)) throw loadFailed(file, `few_shot.${i}.input.${key}: not listed in fields`);
    }
    for (const slot of slots) {
      if (example.input[slot] === undefined) {
        throw loadFailed(
          file,
          `few_shot.${i}.input: missing "${slot}", which the template's {${slot}} slot needs`,
        );
      }
    }
  });
}

/** Validate a parsed `task.json`; every rejection is `adapter_load_failed` naming the file and field. */
export function parseTaskDefinition(json: unknown, file: string): TaskDefinition {
  const parsed = schema.safeParse(json);
  if (!parsed.success) throw loadFailed(file, zodIssue(parsed.error));
  const raw = parsed.data;
  const fields = raw.fields ?? [raw.query_field];
  if (new Set(fields).size !== fields.length) throw loadFailed(file, "fields: names must be unique");
  const numPlaceholders = raw.prompt_template
    ? checkPlaceholders(file, raw.prompt_template, raw.virtual_token_splits)
    : 0;
  if (!raw.prompt_template && raw.virtual_token_splits) {
    throw loadFailed(
      file,
      "virtual_token_splits needs a prompt_template with <|VIRTUAL_PROMPT_n|> placeholders",
    );
  }
  checkFields(file, raw, fields);
  const d = raw.defaults;
  const defaults: SamplingDefaults = {};
  if (d.temperature !== undefined) defaults.temperature = d.temperature;
  if (d.top_p !== undefined) defaults.topP = d.top_p;
  if (d.top_k !== undefined) defaults.topK = d.top_k;
  if (d.max_tokens !== undefined) defaults.maxTokens = d.max_tokens;
  if (d.stop !== undefined) defaults.stop = typeof d.stop === "string" ? [d.stop] : d.stop;
  const definition: TaskDefinition = {
    fields,
    queryField: raw.query_field,
    fewShot: raw.few_shot,
    defaults,
    numPlaceholders,
  };
  if (raw.description !== undefined) definition.description = raw.description;
  if (raw.prompt_template !== undefined) definition.promptTemplate = raw.prompt_template;
  if (raw.virtual_token_splits !== undefined) definition.virtualTokenSplits = raw.virtual_token_splits;
  if (raw.system_prompt !== undefined) definition.systemPrompt = raw.system_prompt;
  if (raw.chain_of_thought !== undefined) definition.chainOfThought = raw.chain_of_thought;
  if (raw.truncate_field !== undefined) definition.truncateField = raw.truncate_field;
  return definition;
}
