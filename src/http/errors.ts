/**
 * @module http/errors — THE mapping from errors to HTTP: TaskmuxError type → status, the OpenAI error body
 * `{"error": {message, type, param, code}}`, Retry-After, and the SSE error frame. No other module builds an
 * error response.
 */
import type { Context } from "hono";
import { HTTPException } from "hono/http-exception";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import { isTaskmuxError, TaskmuxError, type TaskmuxErrorType } from "../errors.ts";
import { createLogger } from "../log.ts";

const log = createLogger({ module: "http" });

const STATUS_BY_TYPE: Record<TaskmuxErrorType, ContentfulStatusCode> = {
  invalid_request: 400,
  task_not_found: 404,
  model_not_found: 404,
  adapter_incompatible: 422,
  adapter_load_failed: 422,
  payload_too_large: 413,
  overloaded: 429,
  shutting_down: 503,
  unsupported_model: 500,
  internal: 500,
};

/** Retry-After (seconds) when the error does not say: 429 and 503 always carry one. */
const DEFAULT_RETRY_AFTER_S: Partial<Record<TaskmuxErrorType, number>> = { overloaded: 1, shutting_down: 5 };

/** The OpenAI error body. `type` is our closed label; `code` is the same label or a finer HTTP-level reason. */
export interface OpenAIErrorBody {
  error: { message: string; type: TaskmuxErrorType; param: string | null; code: string };
}

/** An error that only exists at the HTTP level (route not found, method not allowed, invalid JSON). */
class HttpLevelError extends TaskmuxError {
  constructor(
    type: TaskmuxErrorType,
    message: string,
    readonly status: ContentfulStatusCode,
    readonly code: string,
    readonly headers: Record<string, string> = {},
    retryAfterSeconds?: number,
  ) {
    super(type, message, { retryAfterSeconds });
  }
}

export function statusOf(error: TaskmuxError): ContentfulStatusCode {
  return error instanceof HttpLevelError ? error.status : STATUS_BY_TYPE[error.type];
}

/** Anything thrown → a TaskmuxError; unknown errors become a generic `internal` (the stack is logged, not sent). */
export function toTaskmuxError(error: unknown, requestId?: string): TaskmuxError {
  if (isTaskmuxError(error)) return error;
  // The peer closed the connection while its body was being read (or the parser refused the rest of it):
  // the client's doing, not a server fault, and nobody is left to read the answer.
  if ((error as NodeJS.ErrnoException | undefined)?.code === "ECONNRESET") {
    return new HttpLevelError(
      "invalid_request",
      "the client closed the connection mid-request",
      400,
      "client_closed",
    );
  }
  if (error instanceof HTTPException) {
    if (error.status === 413) return new TaskmuxError("payload_too_large", "request body is too large");
    if (error.status < 500)
      return new HttpLevelError("invalid_request", error.message, error.status, "bad_request");
  }
  log.error("unhandled error", { requestId, error, stack: (error as Error | undefined)?.stack });
  return new TaskmuxError("internal", "internal server error");
}

export function errorBody(error: TaskmuxError): OpenAIErrorBody {
  const code = error instanceof HttpLevelError ? error.code : error.type;
  return { error: { message: error.message, type: error.type, param: error.param, code } };
}

/** The response for any thrown value: status from the type, OpenAI body, Retry-After for 429/503. */
export function errorResponse(c: Context, thrown: unknown): Response {
  const error = toTaskmuxError(thrown, c.get("requestId") as string | undefined);
  const status = statusOf(error);
  // 503 is routine while loading or draining (readiness probes); other 5xx deserve a line.
  if (status >= 500 && error.type !== "shutting_down") {
    log.warn("request failed", { requestId: c.get("requestId"), type: error.type, reason: error.message });
  }
  const retryAfter = error.retryAfterSeconds ?? DEFAULT_RETRY_AFTER_S[error.type];
  if (retryAfter !== undefined) c.header("Retry-After", String(Math.max(0, Math.ceil(retryAfter))));
  if (error instanceof HttpLevelError) for (const [k, v] of Object.entries(error.headers)) c.header(k, v);
  return c.json(errorBody(error), status);
}

/** The one SSE frame a stream sends when it fails after it began (then it closes; no `[DONE]`). */
export function sseErrorFrame(thrown: unknown): string {
  return `data: ${JSON.stringify(errorBody(toTaskmuxError(thrown)))}\n\n`;
}

export function routeNotFound(method: string, path: string): TaskmuxError {
  return new HttpLevelError("invalid_request", `no route for ${method} ${path}`, 404, "route_not_found");
}

export function methodNotAllowed(method: string, path: string, allowed: string[]): TaskmuxError {
  const message = `method ${method} is not allowed on ${path} (allowed: ${allowed.join(", ")})`;
  return new HttpLevelError("invalid_request", message, 405, "method_not_allowed", {
    Allow: allowed.join(", "),
  });
}

export function invalidJson(reason: string): TaskmuxError {
  return new HttpLevelError(
    "invalid_request",
    `request body is not valid JSON: ${reason}`,
    400,
    "invalid_json",
  );
}

/** A request Node's HTTP parser refused before it reached the app (see http/client-errors.ts). */
export function malformedRequest(reason: string, status: 400 | 408 | 431 = 400): TaskmuxError {
  const code =
    status === 431 ? "headers_too_large" : status === 408 ? "request_timeout" : "malformed_request";
  return new HttpLevelError("invalid_request", reason, status, code);
}

/** 401: an admin route without the right `Authorization: Bearer` token. */
export function unauthorized(reason: string): TaskmuxError {
  return new HttpLevelError("invalid_request", reason, 401, "unauthorized", { "WWW-Authenticate": "Bearer" });
}

/** 403: an admin route from a non-loopback client without a configured token, or a URL host not allow-listed. */
export function forbidden(reason: string): TaskmuxError {
  return new HttpLevelError("invalid_request", reason, 403, "forbidden");
}

export function notReady(): TaskmuxError {
  const message = "the server is not ready (loading or draining)";
  return new HttpLevelError("shutting_down", message, 503, "not_ready", {}, 1);
}
