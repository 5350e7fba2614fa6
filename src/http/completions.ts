/**
 * @module http/completions — POST /v1/completions (OpenAI legacy completions, plus top_k, ignore_eos and
 * `taskmux.fields`): parse → generate every (prompt, choice) → render, plain or streamed.
 */
import { Hono } from "hono";
import type { GenerationParams } from "../engine/sequence.ts";
import type { GenerationHandle, GenerationService, PromptInput } from "../engine/service.ts";
import { CompletionChoice, type CompletionPiece, joinCompletionPieces, sumUsage } from "./choices.ts";
import type { AppEnv, HttpDeps } from "./deps.ts";
import { GenerationRun } from "./generation.ts";
import { prepareRequest, responseMeta, samplingParams } from "./request.ts";
import { type CompletionRequest, completionRequestSchema, parseBody, readJson } from "./schemas.ts";
import { sseResponse } from "./stream.ts";

/** OpenAI's default for /v1/completions. */
const DEFAULT_MAX_TOKENS = 16;

/** Each entry of `prompt` is one prompt (string, token ids); n choices per prompt. */
function toPrompts(prompt: CompletionRequest["prompt"]): PromptInput[] {
  if (typeof prompt === "string") return [{ kind: "text", text: prompt }];
  if (prompt.every((p) => typeof p === "string")) return prompt.map((text) => ({ kind: "text", text }));
  if (prompt.every((p) => typeof p === "number")) return [{ kind: "tokens", tokens: prompt }];
  return (prompt as number[][]).map((tokens) => ({ kind: "tokens", tokens }));
}

function completionParams(body: CompletionRequest): Partial<GenerationParams> {
  const params = samplingParams(body);
  params.maxTokens = body.max_tokens ?? DEFAULT_MAX_TOKENS;
  if (body.logprobs != null) params.logprobs = body.logprobs;
  // echo + logprobs scores the prompt itself (lm-evaluation-harness loglikelihood requests).
  if (body.echo && body.logprobs != null) params.promptLogprobs = body.logprobs;
  return params;
}

const echoTextOf = (service: GenerationService, prompt: PromptInput): string =>
  prompt.kind === "text" ? prompt.text : prompt.kind === "tokens" ? service.decode(prompt.tokens) : "";

export function completionRoutes(deps: HttpDeps): Hono<AppEnv> {
  const app = new Hono<AppEnv>();
  app.post("/v1/completions", async (c) => {
    const body = parseBody(completionRequestSchema, await readJson(c));
    const prompts = toPrompts(body.prompt);
    const request = prepareRequest(c, deps, body, prompts, completionParams(body));
    const run = new GenerationRun(deps.service, request.inputs, c.req.raw.signal);
    const handles = await run.start();
    const choices = request.inputs.map(
      (input) =>
        new CompletionChoice(deps.service, {
          echoText: body.echo ? echoTextOf(deps.service, input.prompt) : null,
          logprobs: body.logprobs != null,
          promptLogprobs: body.echo === true && body.logprobs != null,
        }),
    );
    const render: RenderContext = {
      meta: { ...responseMeta("cmpl", request.model), object: "text_completion", system_fingerprint: null },
      promptOf: (choice) => Math.floor(choice / request.n),
    };
    const wantLogprobs = body.logprobs != null;
    if (!body.stream) return c.json(await completionResponse(run, handles, choices, render, wantLogprobs));
    const includeUsage = body.stream_options?.include_usage === true;
    const chunks = completionChunks(run, handles, choices, render, includeUsage);
    return sseResponse(c, chunks, {
      onCancel: () => run.cancel(),
      onError: (type) => deps.metrics.errorObserved(type),
    });
  });
  return app;
}

interface RenderContext {
  meta: { id: string; created: number; model: string; object: "text_completion"; system_fingerprint: null };
  promptOf: (choice: number) => number;
}

async function completionResponse(
  run: GenerationRun,
  handles: GenerationHandle[],
  choices: CompletionChoice[],
  { meta, promptOf }: RenderContext,
  wantLogprobs: boolean,
) {
  const pieces = choices.map((choice) => choice.begin());
  for await (const { choice, event } of run.events(handles))
    pieces[choice]!.push(...choices[choice]!.onEvent(event));
  return {
    ...meta,
    choices: pieces.map((list, index) => {
      const { text, logprobs, finishReason } = joinCompletionPieces(list, wantLogprobs);
      return { index, text, logprobs, finish_reason: finishReason };
    }),
    usage: sumUsage(
      choices.map((c) => c.usage),
      promptOf,
    ),
  };
}

async function* completionChunks(
  run: GenerationRun,
  handles: GenerationHandle[],
  choices: CompletionChoice[],
  { meta, promptOf }: RenderContext,
  includeUsage: boolean,
) {
  const usageField = includeUsage ? { usage: null } : {};
  const chunk = (index: number, piece: CompletionPiece) => ({
    ...meta,
    choices: [{ index, text: piece.text, logprobs: piece.logprobs, finish_reason: piece.finishReason }],
    ...usageField,
  });
  for (const [index, choice] of choices.entries())
    for (const piece of choice.begin()) yield chunk(index, piece);
  for await (const { choice, event } of run.events(handles)) {
    for (const piece of choices[choice]!.onEvent(event)) yield chunk(choice, piece);
  }
  if (includeUsage) {
    yield {
      ...meta,
      choices: [],
      usage: sumUsage(
        choices.map((c) => c.usage),
        promptOf,
      ),
    };
  }
}
