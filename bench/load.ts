/**
 * @module bench/load — an undici load generator for /v1/completions (streaming): each client sends its
 * requests back to back; records time to first token and the gaps between tokens per request.
 */
import { request } from "undici";

export interface LoadOptions {
  baseUrl: string;
  concurrency: number;
  requestsPerClient: number;
  /** Prompt as token ids (exact length, no tokenizer round trip). */
  prompt: (client: number, i: number) => number[];
  maxTokens: number;
  headers?: (client: number, i: number) => Record<string, string>;
  timeoutMs?: number;
}

export interface LoadResult {
  wallS: number;
  completionTokens: number;
  promptTokens: number;
  ttftMs: number[];
  itlMs: number[];
  /** Per request: tokens after the first / time from first to last token (a stream's decode rate). */
  decodeRates: number[];
  /** Per request: its round (the i-th request of each client) and when each streamed token arrived (ms). */
  streams: { round: number; tokenTimesMs: number[] }[];
  errors: number;
  requests: number;
}

async function oneRequest(
  options: LoadOptions,
  client: number,
  i: number,
  result: LoadResult,
): Promise<void> {
  const started = performance.now();
  const { statusCode, body } = await request(`${options.baseUrl}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", ...(options.headers?.(client, i) ?? {}) },
    body: JSON.stringify({
      prompt: options.prompt(client, i),
      max_tokens: options.maxTokens,
      temperature: 0,
      ignore_eos: true,
      stream: true,
      stream_options: { include_usage: true },
    }),
    bodyTimeout: options.timeoutMs ?? 600_000,
    headersTimeout: options.timeoutMs ?? 600_000,
  });
  if (statusCode !== 200) {
    result.errors++;
    await body.text();
    return;
  }
  let last = 0;
  let first = 0;
  let chunks = 0;
  let buffer = "";
  const times: number[] = [];
  result.streams.push({ round: i, tokenTimesMs: times });
  for await (const chunk of body) {
    buffer += chunk.toString();
    let nl = buffer.indexOf("\n\n");
    while (nl >= 0) {
      const frame = buffer.slice(0, nl);
      buffer = buffer.slice(nl + 2);
      nl = buffer.indexOf("\n\n");
      if (!frame.startsWith("data: ") || frame === "data: [DONE]") continue;
      const data = JSON.parse(frame.slice(6)) as {
        choices?: { text?: string }[];
        usage?: { completion_tokens: number; prompt_tokens: number };
        error?: unknown;
      };
      if (data.error) result.errors++;
      if (data.usage) {
        result.completionTokens += data.usage.completion_tokens;
        result.promptTokens += data.usage.prompt_tokens;
      }
      if (data.choices?.length) {
        const now = performance.now();
        if (last === 0) {
          result.ttftMs.push(now - started);
          first = now;
        } else result.itlMs.push(now - last);
        last = now;
        chunks++;
        times.push(now);
      }
    }
  }
  if (chunks > 1) result.decodeRates.push((chunks - 1) / ((last - first) / 1000));
  result.requests++;
}

export async function runLoad(options: LoadOptions): Promise<LoadResult> {
  const result: LoadResult = {
    wallS: 0,
    completionTokens: 0,
    promptTokens: 0,
    ttftMs: [],
    itlMs: [],
    decodeRates: [],
    streams: [],
    errors: 0,
    requests: 0,
  };
  const started = performance.now();
  await Promise.all(
    Array.from({ length: options.concurrency }, async (_, client) => {
      for (let i = 0; i < options.requestsPerClient; i++) {
        try {
          await oneRequest(options, client, i, result);
        } catch {
          result.errors++;
        }
      }
    }),
  );
  result.wallS = (performance.now() - started) / 1000;
  return result;
}

/**
 * Aggregate decode rate while every stream of a round is decoding. A round is the i-th request of each client;
 * its window runs from the round's last first token to its first last token, so the prefill steps that start
 * the streams fall outside it; every token delivered inside the window counts. NaN when no round has a window.
 */
export function steadyDecodeTokS(result: LoadResult): number {
  let tokens = 0;
  let ms = 0;
  const rounds = new Set(result.streams.map((s) => s.round));
  for (const round of rounds) {
    const streams = result.streams.filter((s) => s.round === round && s.tokenTimesMs.length > 1);
    if (streams.length === 0) continue;
    const from = Math.max(...streams.map((s) => s.tokenTimesMs[0]!));
    const to = Math.min(...streams.map((s) => s.tokenTimesMs.at(-1)!));
    if (to <= from) continue;
    ms += to - from;
    for (const s of result.streams) for (const t of s.tokenTimesMs) if (t > from && t <= to) tokens++;
  }
  return ms > 0 ? tokens / (ms / 1000) : Number.NaN;
}

export function percentile(values: number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}
