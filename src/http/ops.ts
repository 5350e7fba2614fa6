/** @module http/ops — operations routes: GET /health (liveness), GET /ready (readiness), GET /metrics (Prometheus). */
import { Hono } from "hono";
import type { AppEnv, HttpDeps } from "./deps.ts";
import { notReady } from "./errors.ts";
import { renderMetrics } from "./metrics.ts";
import { PROMETHEUS_CONTENT_TYPE } from "./prometheus.ts";

export function opsRoutes(deps: HttpDeps): Hono<AppEnv> {
  const app = new Hono<AppEnv>();
  app.get("/health", (c) => c.json({ status: "ok" }));
  app.get("/ready", (c) => {
    if (!deps.service.isReady) throw notReady();
    return c.json({ status: "ready" });
  });
  app.get("/metrics", (c) => {
    return c.body(renderMetrics(deps.service, deps.metrics), 200, {
      "Content-Type": PROMETHEUS_CONTENT_TYPE,
    });
  });
  return app;
}
