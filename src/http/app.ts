/**
 * @module http/app — createApp(deps): the Hono app. Middleware (request id, request metrics, body limit), the
 * route modules, and the two exits every error takes: onError and notFound/405, both via http/errors.ts.
 */
import { Hono } from "hono";
import { bodyLimit } from "hono/body-limit";
import { requestId } from "hono/request-id";
import type { GenerationService } from "../engine/service.ts";
import { TaskmuxError } from "../errors.ts";
import { accessLog, tallyingService } from "./access-log.ts";
import { chatRoutes } from "./chat.ts";
import { completionRoutes } from "./completions.ts";
import type { AppEnv, HttpDeps, RouteModule } from "./deps.ts";
import { errorResponse, methodNotAllowed, routeNotFound, toTaskmuxError } from "./errors.ts";
import { ClientStreamLimit } from "./limits.ts";
import { HttpMetrics } from "./metrics.ts";
import { modelRoutes } from "./models.ts";
import { opsRoutes } from "./ops.ts";

export interface AppOptions {
  service: GenerationService;
  /** Largest accepted request body (default 1 MiB); larger → 413. */
  bodyLimitBytes?: number;
  /** Largest accepted `n` (default 16). */
  maxN?: number;
  /** Log prompt text at debug level (default false). */
  logPrompts?: boolean;
  /** Generation requests in flight per client address (default 0 = unlimited); beyond it → 429. */
  maxStreamsPerClient?: number;
  /** More route modules (e.g. admin.ts's), mounted after the built-in ones. */
  routes?: RouteModule[];
}

export const DEFAULT_BODY_LIMIT_BYTES = 1024 * 1024;
export const DEFAULT_MAX_N = 16;

/** The built-in route modules; a new module (admin.ts) is added here or passed in `routes`. */
const ROUTE_MODULES: readonly RouteModule[] = [completionRoutes, chatRoutes, modelRoutes, opsRoutes];

/**
 * @example
 * const app = createApp({ service });
 * serve({ fetch: app.fetch, port: 8000 });
 */
export function createApp(options: AppOptions): Hono<AppEnv> {
  const deps: HttpDeps = {
    service: tallyingService(options.service),
    bodyLimitBytes: options.bodyLimitBytes ?? DEFAULT_BODY_LIMIT_BYTES,
    maxN: options.maxN ?? DEFAULT_MAX_N,
    logPrompts: options.logPrompts ?? false,
    metrics: new HttpMetrics(),
    startedAtS: Math.floor(Date.now() / 1000),
  };
  const app = new Hono<AppEnv>();
  app.use(requestId());
  app.use(accessLog());
  app.use(deps.metrics.middleware());
  const streamLimit = new ClientStreamLimit(options.maxStreamsPerClient ?? 0);
  for (const path of ["/v1/completions", "/v1/chat/completions"]) app.use(path, streamLimit.middleware());
  app.use(
    bodyLimit({
      maxSize: deps.bodyLimitBytes,
      onError: () => {
        throw new TaskmuxError(
          "payload_too_large",
          `request body exceeds the limit of ${deps.bodyLimitBytes} bytes`,
        );
      },
    }),
  );
  for (const module of [...ROUTE_MODULES, ...(options.routes ?? [])]) app.route("/", module(deps));
  app.notFound((c) => {
    const allowed = allowedMethods(app, c.req.path);
    const error =
      allowed.length > 0
        ? methodNotAllowed(c.req.method, c.req.path, allowed)
        : routeNotFound(c.req.method, c.req.path);
    deps.metrics.errorObserved(error.type);
    return errorResponse(c, error);
  });
  app.onError((thrown, c) => {
    const error = toTaskmuxError(thrown, c.get("requestId"));
    deps.metrics.errorObserved(error.type);
    return errorResponse(c, error);
  });
  return app;
}

/** Methods registered for a path (for 405 + Allow). */
function allowedMethods(app: Hono<AppEnv>, path: string): string[] {
  const methods = new Set<string>();
  for (const route of app.routes) {
    if (route.method === "ALL") continue;
    const pattern = route.path.split("/").map(segmentPattern).join("/");
    if (new RegExp(`^${pattern}$`).test(path)) methods.add(route.method);
  }
  return [...methods].sort();
}

/** A route segment as a regex: `:param` matches one segment, `:param{.+}` the rest, anything else itself. */
function segmentPattern(segment: string): string {
  if (!segment.startsWith(":")) return segment.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  return segment.includes("{") ? ".+" : "[^/]+";
}
