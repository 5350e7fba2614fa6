/**
 * @module http/access-log — one structured line per request once its response has been sent (a stream: once
 * it ended or the client left): request id, method, route, status, task, sequences, prompt and completion
 * tokens, duration. Never prompt or output text (request.ts logs prompts at debug, and only with
 * --log-prompts). /v1 routes log at info; /health, /ready and /metrics (probes, scrapes) at debug.
 */
import { AsyncLocalStorage } from "node:async_hooks";
import type { MiddlewareHandler } from "hono";
import { matchedRoutes } from "hono/route";
import type { EngineEvent } from "../engine/events.ts";
import type { GenerationService } from "../engine/service.ts";
import { createLogger } from "../log.ts";
import type { AppEnv } from "./deps.ts";
import { onResponseEnd } from "./limits.ts";

const log = createLogger({ module: "http" });

/** Token counts of one request's sequences (all choices). */
interface RequestTally {
  numSequences: number;
  promptTokens: number;
  completionTokens: number;
}

/** The tally of the request whose handler is running (AsyncLocalStorage follows it into service.generate). */
const current = new AsyncLocalStorage<RequestTally>();

async function* tallied(
  events: AsyncIterable<EngineEvent>,
  tally: RequestTally,
): AsyncGenerator<EngineEvent> {
  for await (const event of events) {
    if (event.type === "finished" || event.type === "error")
      tally.completionTokens += event.usage.completionTokens;
    yield event;
  }
}

/**
 * `service` with `generate` counting each sequence's prompt and completion tokens into the current request's
 * tally; every other member is the service's own.
 */
export function tallyingService(service: GenerationService): GenerationService {
  const generate: GenerationService["generate"] = async (input, signal) => {
    const handle = await service.generate(input, signal);
    const tally = current.getStore();
    if (!tally) return handle;
    tally.numSequences++;
    tally.promptTokens += handle.promptTokens.length;
    return { ...handle, events: tallied(handle.events, tally) };
  };
  return new Proxy(service, {
    get(target, key) {
      if (key === "generate") return generate;
      const value = Reflect.get(target, key, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
}

const QUIET_ROUTES = new Set(["/health", "/ready", "/metrics"]);

export function accessLog(): MiddlewareHandler<AppEnv> {
  return async (c, next) => {
    const started = performance.now();
    const tally: RequestTally = { numSequences: 0, promptTokens: 0, completionTokens: 0 };
    await current.run(tally, next);
    c.res = onResponseEnd(c.res, () => {
      const route = matchedRoutes(c).findLast((r) => r.method !== "ALL")?.path ?? "unmatched";
      const fields = {
        requestId: c.get("requestId"),
        method: c.req.method,
        route,
        status: c.res.status,
        task: c.get("task") ?? null,
        ...(tally.numSequences > 0 ? tally : {}),
        durationMs: Math.round(performance.now() - started),
      };
      if (QUIET_ROUTES.has(route)) log.debug("request", fields);
      else log.info("request", fields);
    });
  };
}
