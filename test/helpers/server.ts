/**
 * @module test/helpers/server — serve a Hono app on a loopback port 0 (@hono/node-server) for tests that need a
 * real socket (SSE chunking, client disconnect, the openai client), plus timeouts for every wait and an SSE reader.
 */
import type { AddressInfo } from "node:net";
import { createAdaptorServer } from "@hono/node-server";
import type { Hono } from "hono";
import { installClientErrorHandler } from "../../src/http/client-errors.ts";

// biome-ignore lint/suspicious/noExplicitAny: any Hono env
type AnyHono = Hono<any, any, any>;

export interface TestServer {
  url: string;
  close(): Promise<void>;
}

/** Rejects with a message naming what was awaited if `promise` takes longer than `ms`. */
export async function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export async function startServer(app: AnyHono, timeoutMs = 5000): Promise<TestServer> {
  const server = createAdaptorServer({ fetch: app.fetch, hostname: "127.0.0.1" });
  installClientErrorHandler(server);
  await withTimeout(
    new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => resolve());
    }),
    timeoutMs,
    "server listen",
  );
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    close: async () => {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      if ("closeAllConnections" in server) server.closeAllConnections();
      await withTimeout(closed, timeoutMs, "server close");
    },
  };
}

/** The `data:` payloads of an SSE body, in order ("[DONE]" kept as the string). */
export function parseSse(body: string): unknown[] {
  const frames: unknown[] = [];
  for (const block of body.split("\n\n")) {
    if (block.trim() === "") continue;
    const data = block
      .split("\n")
      .filter((line) => line.startsWith("data: "))
      .map((line) => line.slice(6))
      .join("\n");
    frames.push(data === "[DONE]" ? data : JSON.parse(data));
  }
  return frames;
}

/** POST a JSON body through `app.request` (no socket). */
export function postJson(
  app: AnyHono,
  path: string,
  body: unknown,
  headers: Record<string, string> = {},
): Promise<Response> {
  return Promise.resolve(
    app.request(path, {
      method: "POST",
      body: typeof body === "string" ? body : JSON.stringify(body),
      headers: { "Content-Type": "application/json", ...headers },
    }),
  );
}
