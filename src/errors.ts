/** @module errors — the closed set of typed errors; no HTTP knowledge lives here (see http/errors.ts). */

export type TaskmuxErrorType =
  | "invalid_request"
  | "task_not_found"
  | "model_not_found"
  | "adapter_incompatible"
  | "adapter_load_failed"
  | "payload_too_large"
  | "overloaded"
  | "shutting_down"
  | "unsupported_model"
  | "internal";

export interface TaskmuxErrorOptions {
  /** The request field (OpenAI `param`) or file/tensor the error is about. */
  param?: string | null;
  /** Seconds a client should wait before retrying (429/503). */
  retryAfterSeconds?: number;
  cause?: unknown;
}

export class TaskmuxError extends Error {
  readonly type: TaskmuxErrorType;
  readonly param: string | null;
  readonly retryAfterSeconds: number | undefined;

  constructor(type: TaskmuxErrorType, message: string, options: TaskmuxErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = "TaskmuxError";
    this.type = type;
    this.param = options.param ?? null;
    this.retryAfterSeconds = options.retryAfterSeconds;
  }
}

export const invalidRequest = (message: string, param: string | null = null): TaskmuxError =>
  new TaskmuxError("invalid_request", message, { param });

/** A checkpoint, config or tokenizer the loader cannot serve; raised at start-up. */
export const unsupportedModel = (message: string, param: string | null = null): TaskmuxError =>
  new TaskmuxError("unsupported_model", message, { param });

export function isTaskmuxError(error: unknown): error is TaskmuxError {
  return error instanceof TaskmuxError;
}
