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
  /** Per request, or one figure for all (a per-request figure makes streams end, and new ones join, out of step). */
  maxTokens: number | ((client: number, i: number) => number);
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
      max_tokens: typeof options.maxTokens === "number" ? options.maxTokens : options.maxTokens(client, i),
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

/** A result with nothing recorded yet (runLoad fills it in as responses stream back). */
export function emptyLoadResult(): LoadResult {
  return {
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
}

export async function runLoad(options: LoadOptions): Promise<LoadResult> {
  const result = emptyLoadResult();
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
 * Aggregate decode rate over the window where every stream is decoding. `times[i]` are stream i's token (or
 * chunk) arrival times in ms; `counts[i]`, when given, is how many tokens those timestamps stand for (a chunk
 * may carry several), spread evenly over its chunks.
 */
export function aggregateDecode(
  times: number[][],
  counts?: number[],
): { tokS: number; windowMs: number; tokens: number } {
  const weight = (i: number) => (counts ? counts[i]! / times[i]!.length : 1);
  if (times.length === 1) {
    const t = times[0]!;
    const ms = t[t.length - 1]! - t[0]!;
    const tokens = (counts?.[0] ?? t.length) - 1;
    return { tokS: tokens / (ms / 1000), windowMs: ms, tokens };
  }
  const start = Math.max(...times.map((t) => t[0]!));
  const end = Math.min(...times.map((t) => t[t.length - 1]!));
  let tokens = 0;
  times.forEach((t, i) => {
    for (const x of t) if (x > start && x <= end) tokens += weight(i);
  });
  return { tokS: tokens / ((end - start) / 1000), windowMs: end - start, tokens };
}

/**
 * Aggregate decode rate while every stream of a round is decoding (aggregateDecode per round). A round is the
 * i-th request of each client, so the prefill steps that start its streams fall outside its window. NaN when
 * no round has a window.
 */
export function steadyDecodeTokS(result: LoadResult): number {
  let tokens = 0;
  let ms = 0;
  for (const round of new Set(result.streams.map((s) => s.round))) {
    const times = result.streams
      .filter((s) => s.round === round && s.tokenTimesMs.length > 1)
      .map((s) => s.tokenTimesMs);
    if (times.length === 0) continue;
    const r = aggregateDecode(times);
    if (r.windowMs <= 0) continue;
    tokens += r.tokens;
    ms += r.windowMs;
  }
  return ms > 0 ? tokens / (ms / 1000) : Number.NaN;
}

export function percentile(values: number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}
