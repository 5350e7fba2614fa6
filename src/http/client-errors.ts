/**
 * @module http/client-errors — answers requests Node's HTTP parser refuses before they reach the app (the
 * server's `clientError` event: a bad request line, control bytes in a header, oversize headers, a bad
 * Content-Length or chunk) with an OpenAI-shaped JSON error instead of Node's bare `400 Bad Request`, then
 * closes the connection: after a parse error the byte stream cannot be trusted for a next request.
 */
import type { EventEmitter } from "node:events";
import { STATUS_CODES } from "node:http";
import type { Duplex } from "node:stream";
import { errorBody, malformedRequest, statusOf } from "./errors.ts";

/** Parser error codes that are not plain 400s (Node's own default handler makes the same split). */
const STATUS_BY_CODE: Record<string, 408 | 431> = {
  HPE_HEADER_OVERFLOW: 431,
  ERR_HTTP_REQUEST_TIMEOUT: 408,
};

const REASON_BY_STATUS = {
  400: "the request is not valid HTTP/1.1",
  408: "the request was not received in time",
  431: "the request headers are too large",
} as const;

/** Give up on a peer that does not read its answer. */
const SOCKET_LINGER_MS = 1000;

/** The raw HTTP/1.1 response for a parser error: status line, JSON headers, `Connection: close`, body. */
export function clientErrorResponse(error: NodeJS.ErrnoException): string {
  const status = STATUS_BY_CODE[error.code ?? ""] ?? 400;
  const detail = error.code?.startsWith("HPE_") ? ` (${error.code.slice(4).toLowerCase()})` : "";
  const failure = malformedRequest(`${REASON_BY_STATUS[status]}${detail}`, status);
  const body = JSON.stringify(errorBody(failure));
  return [
    `HTTP/1.1 ${statusOf(failure)} ${STATUS_CODES[statusOf(failure)]}`,
    "Content-Type: application/json",
    `Content-Length: ${Buffer.byteLength(body)}`,
    "Connection: close",
    "",
    body,
  ].join("\r\n");
}

/** The `clientError` listener: answer when nothing of a response went out on this socket yet, then close. */
export function answerClientError(error: NodeJS.ErrnoException, socket: Duplex): void {
  // A response already under way on this connection (keep-alive) must not get bytes spliced into it.
  const inFlight = (socket as Duplex & { _httpMessage?: { headersSent?: boolean } })._httpMessage;
  if (error.code === "ECONNRESET" || !socket.writable || inFlight?.headersSent) {
    socket.destroy();
    return;
  }
  const timer = setTimeout(() => socket.destroy(), SOCKET_LINGER_MS);
  timer.unref();
  socket.end(clientErrorResponse(error), () => {
    clearTimeout(timer);
    socket.destroy();
  });
}

/**
 * @example
 * const server = serve({ fetch: app.fetch, port });
 * installClientErrorHandler(server);
 */
export function installClientErrorHandler(server: EventEmitter): void {
  server.on("clientError", answerClientError);
}
