/** @module http/models — GET /v1/models and GET /v1/models/:id: the base model and every registered task. */
import { Hono } from "hono";
import type { GenerationService, TaskSummary } from "../engine/service.ts";
import { TaskmuxError } from "../errors.ts";
import type { AppEnv, HttpDeps } from "./deps.ts";

export interface ModelCard {
  id: string;
  object: "model";
  created: number;
  owned_by: "taskmux";
  root: string;
  parent: string | null;
  max_model_len: number;
  taskmux: { kinds: string[]; version?: number };
}

/** TaskSummary.createdAt may be milliseconds or seconds; OpenAI's `created` is unix seconds. */
const toUnixSeconds = (t: number): number => Math.floor(t > 1e11 ? t / 1000 : t);

function baseCard(service: GenerationService, createdS: number): ModelCard {
  const id = service.modelId;
  return {
    id,
    object: "model",
    created: createdS,
    owned_by: "taskmux",
    root: id,
    parent: null,
    max_model_len: service.contextLength,
    taskmux: { kinds: ["base"] },
  };
}

function taskCard(service: GenerationService, task: TaskSummary): ModelCard {
  return {
    id: task.name,
    object: "model",
    created: toUnixSeconds(task.createdAt),
    owned_by: "taskmux",
    root: service.modelId,
    parent: service.modelId,
    max_model_len: service.contextLength,
    taskmux: { kinds: task.kinds, version: task.version },
  };
}

export function modelRoutes(deps: HttpDeps): Hono<AppEnv> {
  const app = new Hono<AppEnv>();
  const { service } = deps;
  const cards = () => [
    baseCard(service, deps.startedAtS),
    ...service.listTasks().map((t) => taskCard(service, t)),
  ];
  app.get("/v1/models", (c) => c.json({ object: "list", data: cards() }));
  app.get("/v1/models/:id{.+}", (c) => {
    const id = c.req.param("id");
    const card = cards().find((m) => m.id === id);
    if (!card) throw new TaskmuxError("model_not_found", `model '${id}' does not exist`, { param: "model" });
    return c.json(card);
  });
  return app;
}
