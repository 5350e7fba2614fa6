/**
 * @module http/request — what completions and chat share between parsing and generating: OpenAI sampling
 * fields → GenerationParams, prompts × n → GenerationInputs (seed + i per choice), response ids, request logging.
 */
import { randomBytes } from "node:crypto";
import type { Context } from "hono";
import type { GenerationParams } from "../engine/sequence.ts";
import type { GenerationInput, PromptInput } from "../engine/service.ts";
import { createLogger } from "../log.ts";
import type { AppEnv, HttpDeps } from "./deps.ts";
import { checkMax } from "./schemas.ts";
import { selectTask, TASK_HEADER } from "./task.ts";

const log = createLogger({ module: "http" });

/** The sampling fields both endpoints accept (null = unset). */
export interface SamplingFields {
  model?: string | null;
  n?: number | null;
  temperature?: number | null;
  top_p?: number | null;
  top_k?: number | null;
  seed?: number | null;
  stop?: string[] | null;
  ignore_eos?: boolean | null;
  user?: string | null;
  taskmux?: { fields?: Record<string, string> | null } | null;
}

/** Only the fields the request set: the service fills the rest from the task's and the model's defaults. */
export function samplingParams(body: SamplingFields): Partial<GenerationParams> {
  const params: Partial<GenerationParams> = {};
  if (body.temperature != null) params.temperature = body.temperature;
  if (body.top_p != null) params.topP = body.top_p;
  if (body.top_k != null) params.topK = body.top_k;
  if (body.seed != null) params.seed = body.seed;
  if (body.stop != null) params.stop = body.stop;
  if (body.ignore_eos != null) params.ignoreEos = body.ignore_eos;
  return params;
}

export interface PreparedRequest {
  task: string | null;
  /** One input per choice; choice i belongs to prompt floor(i / n). */
  inputs: GenerationInput[];
  n: number;
  /** `model` to echo in responses. */
  model: string;
}

/** Validates n and the task, then fans prompts × n out into inputs; seeds are seed + i within each prompt. */
export function prepareRequest(
  c: Context<AppEnv>,
  deps: HttpDeps,
  body: SamplingFields,
  prompts: PromptInput[],
  params: Partial<GenerationParams>,
): PreparedRequest {
  const n = body.n ?? 1;
  checkMax(n, deps.maxN, "n");
  const task = selectTask(deps.service, c.req.header(TASK_HEADER), body.model);
  c.set("task", task);
  const requestId = c.get("requestId");
  const numChoices = prompts.length * n;
  const inputs: GenerationInput[] = [];
  prompts.forEach((prompt, p) => {
    for (let i = 0; i < n; i++) {
      const seeded = params.seed == null ? params : { ...params, seed: params.seed + i };
      inputs.push({
        requestId: numChoices === 1 ? requestId : `${requestId}-${p * n + i}`,
        prompt,
        task,
        params: seeded,
        ...(body.taskmux?.fields ? { fields: body.taskmux.fields } : {}),
      });
    }
  });
  logRequest(c, deps, { task, n, prompts, params });
  return { task, inputs, n, model: body.model ?? deps.service.modelId };
}

function logRequest(
  c: Context<AppEnv>,
  deps: HttpDeps,
  fields: { task: string | null; n: number; prompts: PromptInput[]; params: Partial<GenerationParams> },
): void {
  const { prompts, ...rest } = fields;
  log.debug("generation request", {
    requestId: c.get("requestId"),
    route: c.req.path,
    numPrompts: prompts.length,
    ...rest,
    ...(deps.logPrompts ? { prompts } : {}),
  });
}

/** `cmpl-…` / `chatcmpl-…` ids, `created` in unix seconds. */
export function responseMeta(prefix: "cmpl" | "chatcmpl", model: string) {
  return {
    id: `${prefix}-${randomBytes(12).toString("hex")}`,
    created: Math.floor(Date.now() / 1000),
    model,
  };
}
