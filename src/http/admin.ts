/**
 * @module http/admin — task administration: GET /v1/tasks[/{name}], PUT /v1/tasks/{name} (load or replace
 * from a folder inside the task roots, or from an allow-listed URL), DELETE /v1/tasks/{name}, and vLLM's
 * POST /v1/load_lora_adapter and /v1/unload_lora_adapter. Every route needs `Authorization: Bearer <token>`
 * when TASKMUX_ADMIN_TOKEN is set, and a loopback client when it is not.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import type { IncomingMessage } from "node:http";
import { type Context, Hono, type MiddlewareHandler } from "hono";
import { z } from "zod";
import type { TaskInfo, TaskRef, TaskRegistry } from "../adapters/registry.ts";
import {
  installFromUrl,
  isHostAllowed,
  parseTaskUrl,
  type RemoteFetchOptions,
} from "../adapters/remote-fetch.ts";
import type { AdapterResidency } from "../adapters/residency.ts";
import { isValidTaskName, type TaskStore } from "../adapters/task-store.ts";
import { invalidRequest, TaskmuxError } from "../errors.ts";
import { createLogger } from "../log.ts";
import type { AppEnv, RouteModule } from "./deps.ts";
import { forbidden, unauthorized } from "./errors.ts";
import { parseBody, readJson } from "./schemas.ts";

const log = createLogger({ module: "admin" });

export interface AdminOptions {
  registry: TaskRegistry;
  store: TaskStore;
  residency: AdapterResidency;
  /** TASKMUX_ADMIN_TOKEN; unset = loopback clients only. */
  adminToken?: string;
  /** URL loads: allow-listed hosts (empty = disabled) and the size cap. */
  remote: RemoteFetchOptions;
}

/** One task as GET /v1/tasks shows it (times are unix seconds). */
export interface TaskView {
  name: string;
  kinds: string[];
  version: number | null;
  source: string | null;
  status: TaskInfo["status"];
  error: string | null;
  resident: boolean;
  running_sequences: number;
  draining_versions: number;
  last_used_at: number | null;
  loaded_at: number | null;
}

const loadBodySchema = z
  .object({
    path: z.string().min(1).max(4096).optional(),
    url: z.string().min(1).max(4096).optional(),
    sha256: z
      .string()
      .regex(/^[0-9a-fA-F]{64}$/, "must be 64 hex digits")
      .optional(),
  })
  .strict();

const vllmLoadSchema = z.object({ lora_name: z.string(), lora_path: z.string().min(1).max(4096) });
const vllmUnloadSchema = z.object({ lora_name: z.string() });

const seconds = (ms: number | null) => (ms === null ? null : Math.floor(ms / 1000));
const isLoopback = (address: string) => address === "::1" || /^(::ffff:)?127\.\d+\.\d+\.\d+$/.test(address);
const digest = (text: string) => createHash("sha256").update(text).digest();

/** Only the token holder; without a token, only this machine. Compares digests in constant time. */
function adminAuth(token: string | undefined): MiddlewareHandler<AppEnv> {
  const expected = token === undefined ? null : digest(token);
  return async (c, next) => {
    if (expected === null) {
      const incoming = (c.env as { incoming?: IncomingMessage } | undefined)?.incoming;
      const address = incoming?.socket?.remoteAddress ?? "";
      if (!isLoopback(address))
        throw forbidden("admin routes accept loopback clients only unless TASKMUX_ADMIN_TOKEN is set");
    } else {
      const match = /^Bearer (.+)$/.exec(c.req.header("Authorization") ?? "");
      if (!match || !timingSafeEqual(digest(match[1]!), expected))
        throw unauthorized("admin routes need Authorization: Bearer <TASKMUX_ADMIN_TOKEN>");
    }
    await next();
  };
}

function taskName(name: string, param: string): string {
  if (!isValidTaskName(name)) {
    throw invalidRequest(
      `${param} must match [A-Za-z0-9._-]{1,64} and not start with "." (got ${JSON.stringify(name.slice(0, 80))})`,
      param,
    );
  }
  return name;
}

const notFound = (name: string, param: string) =>
  new TaskmuxError("task_not_found", `task '${name}' does not exist`, { param });

export function adminRoutes(options: AdminOptions): RouteModule {
  const { registry, store, residency, remote } = options;
  const auth = adminAuth(options.adminToken);

  const view = (name: string): TaskView | null => {
    const info = registry.list().find((t) => t.name === name);
    return info ? toView(info, new Set(residency.residentNames())) : null;
  };

  /** Load or replace `name` from a folder inside the roots, or from an allow-listed URL. */
  const load = async (name: string, source: z.infer<typeof loadBodySchema>): Promise<TaskRef> => {
    if ((source.path === undefined) === (source.url === undefined))
      throw invalidRequest("the body needs exactly one of path or url", source.path ? "url" : "path");
    if (source.path !== undefined) return store.load(name, store.resolveInsideRoots(source.path));
    if (source.sha256 === undefined) throw invalidRequest("a url load needs sha256", "sha256");
    const url = parseTaskUrl(source.url!);
    if (remote.allowHosts.length === 0)
      throw forbidden("URL loads are disabled (--adapter-url-allow is empty)");
    if (!isHostAllowed(url, remote.allowHosts))
      throw forbidden(`host ${url.host} is not in --adapter-url-allow`);
    return installFromUrl(store, name, { url: url.href, sha256: source.sha256 }, remote);
  };

  const unload = (name: string, param: string): number => {
    const info = registry.list().find((t) => t.name === name);
    if (!info && store.locate(name) === null) throw notFound(name, param);
    store.unload(name);
    return info?.runningSequences ?? 0;
  };

  return () => {
    const app = new Hono<AppEnv>();
    app.get("/v1/tasks", auth, (c) => {
      const resident = new Set(residency.residentNames());
      return c.json({ object: "list", data: registry.list().map((t) => toView(t, resident)) });
    });
    app.get("/v1/tasks/:name", auth, (c) => {
      const name = taskName(c.req.param("name"), "name");
      const task = view(name);
      if (!task) throw notFound(name, "name");
      return c.json(task);
    });
    app.put("/v1/tasks/:name", auth, async (c) => {
      const name = taskName(c.req.param("name"), "name");
      const ref = await load(name, parseBody(loadBodySchema, await readJson(c)));
      audit(c, "task loaded through the admin API", { task: name, version: ref.version, source: ref.source });
      return c.json(view(name));
    });
    app.delete("/v1/tasks/:name", auth, (c) => {
      const name = taskName(c.req.param("name"), "name");
      const draining = unload(name, "name");
      audit(c, "task unloaded through the admin API", { task: name, draining });
      return c.json({ name, status: "unloaded", draining_sequences: draining });
    });
    app.post("/v1/load_lora_adapter", auth, async (c) => {
      const body = parseBody(vllmLoadSchema, await readJson(c));
      const name = taskName(body.lora_name, "lora_name");
      const ref = await load(name, { path: body.lora_path });
      audit(c, "task loaded through the admin API", { task: name, version: ref.version, source: ref.source });
      return c.text(`Success: LoRA adapter '${name}' added successfully.`);
    });
    app.post("/v1/unload_lora_adapter", auth, async (c) => {
      const body = parseBody(vllmUnloadSchema, await readJson(c));
      const name = taskName(body.lora_name, "lora_name");
      const draining = unload(name, "lora_name");
      audit(c, "task unloaded through the admin API", { task: name, draining });
      return c.text(`Success: LoRA adapter '${name}' removed successfully.`);
    });
    return app;
  };
}

function toView(t: TaskInfo, resident: Set<string>): TaskView {
  return {
    name: t.name,
    kinds: [...t.kinds],
    version: t.version,
    source: t.source,
    status: t.status,
    error: t.error,
    resident: resident.has(t.name),
    running_sequences: t.runningSequences,
    draining_versions: t.drainingVersions,
    last_used_at: seconds(t.lastUsedAt),
    loaded_at: seconds(t.loadedAt),
  };
}

function audit(c: Context<AppEnv>, msg: string, fields: Record<string, unknown>): void {
  log.info(msg, { requestId: c.get("requestId"), ...fields });
}
