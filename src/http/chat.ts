/**
 * @module http/chat — POST /v1/chat/completions: parse → generate n choices of the chat prompt (the service
 * renders the template) → render, plain or streamed (first delta `{role: "assistant", content: ""}`).
 */
import { Hono } from "hono";
import type { GenerationParams } from "../engine/sequence.ts";
import type { GenerationHandle, PromptInput } from "../engine/service.ts";
import { invalidRequest } from "../errors.ts";
import { ChatChoice, type ChatPiece, joinChatPieces, sumUsage } from "./choices.ts";
import type { AppEnv, HttpDeps } from "./deps.ts";
import { GenerationRun } from "./generation.ts";
import { prepareRequest, responseMeta, samplingParams } from "./request.ts";
import { type ChatRequest, chatRequestSchema, parseBody, readJson } from "./schemas.ts";
import { sseResponse } from "./stream.ts";

/** Text parts are joined with newlines (as vLLM does); null content is empty. */
function toChatPrompt(messages: ChatRequest["messages"]): PromptInput {
  return {
    kind: "chat",
    messages: messages.map(({ role, content }) => ({
      role,
      content: typeof content === "string" ? content : (content ?? []).map((part) => part.text).join("\n"),
    })),
  };
}

function chatParams(body: ChatRequest): Partial<GenerationParams> {
  const params = samplingParams(body);
  const maxTokens = body.max_completion_tokens ?? body.max_tokens;
  if (maxTokens != null) params.maxTokens = maxTokens;
  if (body.top_logprobs != null && body.top_logprobs > 0 && body.logprobs !== true) {
    throw invalidRequest("top_logprobs requires logprobs to be true", "top_logprobs");
  }
  if (body.logprobs === true) params.logprobs = body.top_logprobs ?? 0;
  return params;
}

interface RenderContext {
  meta: { id: string; created: number; model: string; system_fingerprint: null };
  promptOf: (choice: number) => number;
}

export function chatRoutes(deps: HttpDeps): Hono<AppEnv> {
  const app = new Hono<AppEnv>();
  app.post("/v1/chat/completions", async (c) => {
    const body = parseBody(chatRequestSchema, await readJson(c));
    const request = prepareRequest(c, deps, body, [toChatPrompt(body.messages)], chatParams(body));
    const run = new GenerationRun(deps.service, request.inputs, c.req.raw.signal);
    const handles = await run.start();
    const wantLogprobs = body.logprobs === true;
    const choices = handles.map(() => new ChatChoice(deps.service, wantLogprobs));
    const render: RenderContext = {
      meta: { ...responseMeta("chatcmpl", request.model), system_fingerprint: null },
      promptOf: () => 0,
    };
    if (!body.stream) return c.json(await chatResponse(run, handles, choices, render, wantLogprobs));
    const chunks = chatChunks(run, handles, choices, render, body.stream_options?.include_usage === true);
    return sseResponse(c, chunks, {
      onCancel: () => run.cancel(),
      onError: (type) => deps.metrics.errorObserved(type),
    });
  });
  return app;
}

async function chatResponse(
  run: GenerationRun,
  handles: GenerationHandle[],
  choices: ChatChoice[],
  { meta, promptOf }: RenderContext,
  wantLogprobs: boolean,
) {
  const pieces: ChatPiece[][] = choices.map(() => []);
  for await (const { choice, event } of run.events(handles))
    pieces[choice]!.push(...choices[choice]!.onEvent(event));
  return {
    ...meta,
    object: "chat.completion",
    choices: pieces.map((list, index) => {
      const { content, logprobs, finishReason } = joinChatPieces(list, wantLogprobs);
      return { index, message: { role: "assistant", content }, logprobs, finish_reason: finishReason };
    }),
    usage: sumUsage(
      choices.map((c) => c.usage),
      promptOf,
    ),
  };
}

async function* chatChunks(
  run: GenerationRun,
  handles: GenerationHandle[],
  choices: ChatChoice[],
  { meta, promptOf }: RenderContext,
  includeUsage: boolean,
) {
  const base = { ...meta, object: "chat.completion.chunk", ...(includeUsage ? { usage: null } : {}) };
  const chunk = (index: number, delta: Record<string, string>, piece: Omit<ChatPiece, "content"> | null) => ({
    ...base,
    choices: [
      {
        index,
        delta,
        logprobs: piece?.logprobs ? { content: piece.logprobs } : null,
        finish_reason: piece?.finishReason ?? null,
      },
    ],
  });
  for (let index = 0; index < choices.length; index++)
    yield chunk(index, { role: "assistant", content: "" }, null);
  for await (const { choice, event } of run.events(handles)) {
    for (const piece of choices[choice]!.onEvent(event)) {
      const delta: Record<string, string> =
        piece.content === "" && piece.finishReason !== null ? {} : { content: piece.content };
      yield chunk(choice, delta, piece);
    }
  }
  if (includeUsage) {
    const usage = sumUsage(
      choices.map((c) => c.usage),
      promptOf,
    );
    yield { ...base, choices: [], usage };
  }
}
