/**
 * @module http/logprobs — engine logprobs → OpenAI's two shapes: the legacy completions object
 * (`tokens`, `token_logprobs`, `top_logprobs` dicts, `text_offset`) and chat's `content` entries with bytes.
 */
import type { PromptLogprobsEvent, TokenEvent } from "../engine/events.ts";
import type { TokenLogprob } from "../engine/sampler.ts";
import type { GenerationService } from "../engine/service.ts";

/** vLLM's floor: -Infinity is not JSON. */
const MIN_LOGPROB = -9999;
/** Tokens of left context re-decoded to measure one token's text (covers a UTF-8 character split over tokens). */
const OFFSET_WINDOW = 4;

export interface LegacyLogprobs {
  tokens: string[];
  token_logprobs: (number | null)[];
  top_logprobs: (Record<string, number> | null)[];
  /** Character offset of each token's text in the choice's text (echoed prompt included). */
  text_offset: number[];
}

export interface ChatTopLogprob {
  token: string;
  logprob: number;
  bytes: number[];
}

export interface ChatTokenLogprob extends ChatTopLogprob {
  top_logprobs: ChatTopLogprob[];
}

const clamp = (logprob: number): number => Math.max(logprob, MIN_LOGPROB);

export function emptyLegacyLogprobs(): LegacyLogprobs {
  return { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
}

export function appendLegacyLogprobs(target: LegacyLogprobs, source: LegacyLogprobs): void {
  target.tokens.push(...source.tokens);
  target.token_logprobs.push(...source.token_logprobs);
  target.top_logprobs.push(...source.top_logprobs);
  target.text_offset.push(...source.text_offset);
}

/** `{token: logprob}`; when two ids share a string the more likely one wins (the list is best-first). */
function topDict(service: GenerationService, top: readonly TokenLogprob[]): Record<string, number> {
  const entries = top.map((t): [string, number] => [service.tokenText(t.token), clamp(t.logprob)]);
  return Object.fromEntries(entries.reverse());
}

/** One generated token whose text starts at `offset` in the choice's text. */
export function tokenLegacyLogprobs(
  service: GenerationService,
  event: TokenEvent,
  offset: number,
): LegacyLogprobs {
  return {
    tokens: [service.tokenText(event.tokenId)],
    token_logprobs: [event.logprob === undefined ? null : clamp(event.logprob)],
    top_logprobs: [topDict(service, event.topLogprobs ?? [])],
    text_offset: [offset],
  };
}

/** The prompt's own tokens (echo scoring); the first has no logprob. Offsets are clamped to the echoed text. */
export function promptLegacyLogprobs(
  service: GenerationService,
  event: PromptLogprobsEvent,
  echoLength: number,
): LegacyLogprobs {
  const offsets = tokenTextOffsets(
    service,
    event.entries.map((e) => e.tokenId),
  );
  return {
    tokens: event.entries.map((e) => service.tokenText(e.tokenId)),
    token_logprobs: event.entries.map((e) => (e.logprob === null ? null : clamp(e.logprob))),
    top_logprobs: event.entries.map((e) => (e.logprob === null ? null : topDict(service, e.topLogprobs))),
    text_offset: offsets.map((o) => Math.min(o, echoLength)),
  };
}

/**
 * Where each token's text starts in decode(tokens): each token's length is measured against a few tokens of
 * left context (decode(ctx + t) - decode(ctx)), so the cost is linear in the prompt and spaces that decoders
 * strip at the start of a text are counted as they are in the whole.
 */
export function tokenTextOffsets(service: GenerationService, tokens: readonly number[]): number[] {
  const offsets: number[] = [];
  let offset = 0;
  for (let i = 0; i < tokens.length; i++) {
    offsets.push(offset);
    const from = Math.max(0, i - OFFSET_WINDOW);
    const before = i > from ? service.decode(tokens.slice(from, i)).length : 0;
    offset += Math.max(0, service.decode(tokens.slice(from, i + 1)).length - before);
  }
  return offsets;
}

function chatTop(service: GenerationService, tokenId: number, logprob: number): ChatTopLogprob {
  return {
    token: service.tokenText(tokenId),
    logprob: clamp(logprob),
    bytes: service.tokenBytes(tokenId),
  };
}

export function chatTokenLogprob(service: GenerationService, event: TokenEvent): ChatTokenLogprob {
  return {
    ...chatTop(service, event.tokenId, event.logprob ?? 0),
    top_logprobs: (event.topLogprobs ?? []).map((t) => chatTop(service, t.token, t.logprob)),
  };
}
