/**
 * @module http/limits — per-client admission at the HTTP edge: at most N generation requests in flight per
 * remote address (--max-streams-per-client; 0 = unlimited), counted from arrival until the response body has
 * been sent or abandoned, so a stream holds its place for as long as it runs. Beyond the limit: 429 with
 * Retry-After. Also `onResponseEnd`, the hook the access log shares.
 */
import type { IncomingMessage } from "node:http";
import type { Context, MiddlewareHandler } from "hono";
import { TaskmuxError } from "../errors.ts";
import type { AppEnv } from "./deps.ts";

/** Seconds a refused client is told to wait. */
const RETRY_AFTER_S = 1;

/** The peer's address when the request came over a socket (@hono/node-server); null under `app.request`. */
export function remoteAddress(c: Context): string | null {
  const env = c.env as { incoming?: IncomingMessage } | undefined;
  return env?.incoming?.socket?.remoteAddress ?? null;
}

/**
 * Returns `res` with a body that calls `done` once, when the body has been read to its end, failed, or been
 * cancelled (the client went away). A response that is not an event stream was complete when it was made
 * (a JSON answer waited for its generation), so `done` runs at once and the body is left as it is.
 */
export function onResponseEnd(res: Response, done: () => void): Response {
  let called = false;
  const once = () => {
    if (called) return;
    called = true;
    done();
  };
  if (!res.body || !res.headers.get("content-type")?.startsWith("text/event-stream")) {
    once();
    return res;
  }
  const reader = res.body.getReader();
  const body = new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        const { done: isDone, value } = await reader.read();
        if (!isDone) return controller.enqueue(value);
        controller.close();
      } catch (error) {
        controller.error(error);
      }
      once();
    },
    cancel(reason) {
      once();
      return reader.cancel(reason);
    },
  });
  return new Response(body, { status: res.status, statusText: res.statusText, headers: res.headers });
}

export class ClientStreamLimit {
  /** remote address → requests in flight */
  private readonly inFlight = new Map<string, number>();

  /** `maxPerClient` 0 = unlimited. */
  constructor(readonly maxPerClient: number) {}

  /** Requests in flight for `address` (0 when none). */
  numInFlight(address: string): number {
    return this.inFlight.get(address) ?? 0;
  }

  /** Addresses with at least one request in flight. */
  get numClients(): number {
    return this.inFlight.size;
  }

  middleware(): MiddlewareHandler<AppEnv> {
    return async (c, next) => {
      const address = this.maxPerClient > 0 ? remoteAddress(c) : null;
      if (address === null) return next();
      const count = this.numInFlight(address);
      if (count >= this.maxPerClient) {
        throw new TaskmuxError(
          "overloaded",
          `this client already has ${count} generation requests in flight (--max-streams-per-client ${this.maxPerClient}); retry later`,
          { retryAfterSeconds: RETRY_AFTER_S },
        );
      }
      this.inFlight.set(address, count + 1);
      const release = () => {
        const left = this.numInFlight(address) - 1;
        if (left > 0) this.inFlight.set(address, left);
        else this.inFlight.delete(address);
      };
      try {
        await next();
      } catch (error) {
        release();
        throw error;
      }
      c.res = onResponseEnd(c.res, release);
    };
  }
}
