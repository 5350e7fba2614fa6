/**
 * @module adapters/formats/format-shared — what every format parser shares: the two typed rejections
 * (`adapter_load_failed` for a file that is unreadable or invalid in itself, `adapter_incompatible` for a
 * valid file that does not fit this base or asks for a feature taskmux does not serve), JSON and
 * safetensors reading that turns every failure into one of them, and tensor checks whose messages name
 * the file, the tensor and both shapes.
 */
import { readFileSync } from "node:fs";
import type { z } from "zod";
import { TaskmuxError } from "../../errors.ts";
import { type FloatTensor, readSafetensors, SafetensorsError } from "../../model/safetensors.ts";

/** The file is unreadable, corrupt, or inconsistent in itself. */
export const loadFailed = (file: string, message: string): TaskmuxError =>
  new TaskmuxError("adapter_load_failed", `${file}: ${message}`, { param: file });

/** The file is valid but does not fit this base model, or needs a feature taskmux does not serve. */
export const incompatible = (file: string, message: string): TaskmuxError =>
  new TaskmuxError("adapter_incompatible", `${file}: ${message}`, { param: file });

export const shapeText = (shape: readonly number[]): string => `[${shape.join(", ")}]`;

/** A JSON file's value; a missing or malformed file is `adapter_load_failed` naming it. */
export function readJsonFile(file: string): unknown {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (error) {
    throw loadFailed(
      file,
      `cannot be read (${(error as NodeJS.ErrnoException).code ?? (error as Error).message})`,
    );
  }
  try {
    return JSON.parse(text);
  } catch (error) {
    throw loadFailed(file, `is not valid JSON (${(error as Error).message})`);
  }
}

/** Every tensor of a safetensors file, widened to float32; truncation and corruption name the file. */
export function readTensorFile(file: string): Map<string, FloatTensor> {
  try {
    return readSafetensors(file).tensors;
  } catch (error) {
    if (error instanceof SafetensorsError) {
      const reason = error.message.replace(`${file}: `, "");
      // A well-formed file in a dtype the reader does not widen (F64, I8, ...) is valid, just not servable.
      throw /dtype \S+ is not supported/.test(reason) ? incompatible(file, reason) : loadFailed(file, reason);
    }
    throw loadFailed(
      file,
      `cannot be read (${(error as NodeJS.ErrnoException).code ?? (error as Error).message})`,
    );
  }
}

/** The first zod issue as `field.path: message` (the path is what the user must fix). */
export function zodIssue(error: z.ZodError): string {
  const issue = error.issues[0]!;
  const path = issue.path.map(String).join(".");
  return path ? `${path}: ${issue.message}` : issue.message;
}

/**
 * Require `tensor` to have exactly `expected` as its shape. A mismatch in a dimension the base model fixes is
 * `adapter_incompatible`; any other mismatch (rank, row count the config promised) is `adapter_load_failed`.
 * `baseDims[i]` says whether dimension i comes from the base model.
 */
export function expectShape(
  file: string,
  name: string,
  tensor: FloatTensor,
  expected: readonly number[],
  baseDims: readonly boolean[],
  why = "",
): void {
  const got = tensor.shape;
  if (got.length === expected.length && got.every((d, i) => d === expected[i])) return;
  const suffix = why ? ` (${why})` : "";
  const message = `tensor ${name} has shape ${shapeText(got)}, expected ${shapeText(expected)}${suffix}`;
  const baseMismatch =
    got.length === expected.length && got.some((d, i) => d !== expected[i] && baseDims[i] === true);
  throw baseMismatch ? incompatible(file, message) : loadFailed(file, message);
}

/** Reject NaN/Inf; names the tensor and the first bad row (rows of `rowWidth` values). */
export function expectFinite(file: string, name: string, data: Float32Array, rowWidth = data.length): void {
  for (let i = 0; i < data.length; i++) {
    const v = data[i]!;
    if (!Number.isFinite(v)) {
      const row = rowWidth > 0 ? Math.floor(i / rowWidth) : 0;
      throw loadFailed(file, `tensor ${name} holds a non-finite value (${v}) in row ${row}`);
    }
  }
}

/** A regex from a config (Python `re` syntax, which JS reads the same for the patterns PEFT configs use). */
export function compilePattern(
  file: string,
  field: string,
  source: string,
  wrap: (s: string) => string,
): RegExp {
  try {
    return new RegExp(wrap(source));
  } catch (error) {
    throw loadFailed(
      file,
      `${field}: ${JSON.stringify(source)} is not a valid regular expression (${(error as Error).message})`,
    );
  }
}
