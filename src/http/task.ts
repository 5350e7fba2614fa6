/**
 * @module http/task — which task a request runs: the `X-Task` header, or `model` naming a task (vLLM's
 * convention); `model` = the base id, "default" or absent runs the base. A malformed name never reaches the service.
 */
import type { GenerationService } from "../engine/service.ts";
import { invalidRequest, TaskmuxError } from "../errors.ts";

export const TASK_HEADER = "X-Task";
const TASK_NAME = /^[A-Za-z0-9._-]{1,64}$/;

export function isValidTaskName(name: string): boolean {
  return TASK_NAME.test(name) && name !== "." && name !== "..";
}

function isBaseModel(service: GenerationService, model: string | null | undefined): boolean {
  return model == null || model === service.modelId || model === "default";
}

function taskNotFound(name: string, param: string): TaskmuxError {
  return new TaskmuxError("task_not_found", `task '${name}' does not exist`, { param });
}

function modelNotFound(model: string, service: GenerationService): TaskmuxError {
  const message = `model '${model}' does not exist: use '${service.modelId}' or a task name (GET /v1/models)`;
  return new TaskmuxError("model_not_found", message, { param: "model" });
}

/** The task name to run (null = base). Throws 400 (malformed / conflicting names) or 404 (unknown). */
export function selectTask(
  service: GenerationService,
  header: string | undefined,
  model: string | null | undefined,
): string | null {
  const modelIsTask = (m: string) => isValidTaskName(m) && service.hasTask(m);
  if (header === undefined) {
    if (isBaseModel(service, model)) return null;
    if (modelIsTask(model!)) return model!;
    throw modelNotFound(model!, service);
  }
  if (!isValidTaskName(header)) {
    throw invalidRequest(
      `${TASK_HEADER} must match [A-Za-z0-9._-]{1,64} and not be '.' or '..' (got ${JSON.stringify(header.slice(0, 80))})`,
      TASK_HEADER,
    );
  }
  if (!isBaseModel(service, model) && model !== header) {
    if (!modelIsTask(model!)) throw modelNotFound(model!, service);
    throw invalidRequest(`${TASK_HEADER} names task '${header}' but model names task '${model}'`, "model");
  }
  if (!service.hasTask(header)) throw taskNotFound(header, TASK_HEADER);
  return header;
}
