/**
 * @module http/stream — OpenAI server-sent events: `data: {chunk}\n\n` per chunk, then `data: [DONE]`. A failure
 * after the stream began is one `data: {"error": ...}` frame, then close. A client that goes away cancels the
 * body stream, which cancels the generation (its AbortSignal reaches service.generate).
 */
import type { Context } from "hono";
import { sseErrorFrame, toTaskmuxError } from "./errors.ts";

const encoder = new TextEncoder();

export interface SseOptions {
  /** Called when the client cancels the body (disconnect). */
  onCancel: () => void;
  /** Called with the error that ended the stream (for metrics). */
  onError?: (type: string) => void;
}

/** Streams `chunks` as SSE; the generator's thrown error becomes the error frame. */
export function sseResponse(c: Context, chunks: AsyncIterable<unknown>, options: SseOptions): Response {
  const iterator = chunks[Symbol.asyncIterator]();
  let isDone = false;
  const body = new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (isDone) return;
      let frame: string;
      try {
        const { done, value } = await iterator.next();
        frame = done ? "data: [DONE]\n\n" : `data: ${JSON.stringify(value)}\n\n`;
        if (!done) {
          if (!isDone) controller.enqueue(encoder.encode(frame));
          return;
        }
      } catch (error) {
        const failure = toTaskmuxError(error, c.get("requestId") as string | undefined);
        options.onError?.(failure.type);
        frame = sseErrorFrame(failure);
      }
      if (isDone) return; // the client cancelled while we waited
      isDone = true;
      controller.enqueue(encoder.encode(frame));
      controller.close();
    },
    cancel() {
      isDone = true;
      options.onCancel();
      // Not awaited: return() waits for the pending next(), which ends once the cancelled generation finishes.
      iterator.return?.().catch(() => {});
    },
  });
  return c.body(body, 200, {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
  });
}
