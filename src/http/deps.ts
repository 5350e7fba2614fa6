/** @module http/deps — what every route module receives (HttpDeps) and the Hono context variables (AppEnv). */
import type { Hono } from "hono";
import type { GenerationService } from "../engine/service.ts";
import type { HttpMetrics } from "./metrics.ts";

/** Hono context variables: the request id (X-Request-Id) and the task a generation route resolved. */
export type AppEnv = {
  Variables: {
    requestId: string;
    /** Set by generation routes once the task is validated (null = base); labels the request counter. */
    task: string | null;
  };
};

export interface HttpDeps {
  service: GenerationService;
  bodyLimitBytes: number;
  /** Largest accepted `n` (choices per prompt). */
  maxN: number;
  /** Log prompt text (off by default: prompts may be private). */
  logPrompts: boolean;
  metrics: HttpMetrics;
  /** Unix seconds the app was created (`created` of the base model in /v1/models). */
  startedAtS: number;
}

/** A group of routes; createApp mounts each at "/" (admin.ts adds one, or main.ts passes it in deps.routes). */
export type RouteModule = (deps: HttpDeps) => Hono<AppEnv>;
