/** @module log — structured JSON logger; the only place that writes log lines to stdout/stderr. */

export type LogLevel = "debug" | "info" | "warn" | "error";
const LEVEL_ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  child(fields: Record<string, unknown>): Logger;
}

interface LoggerState {
  level: LogLevel;
  /** "json" for machines (default under CI/containers), "pretty" for a terminal. */
  format: "json" | "pretty";
}

const state: LoggerState = {
  // Quiet under CI and under `node --test` (which sets NODE_TEST_CONTEXT), where info lines would bury results.
  level:
    (process.env.TASKMUX_LOG_LEVEL as LogLevel | undefined) ??
    (process.env.CI || process.env.NODE_TEST_CONTEXT ? "warn" : "info"),
  format: process.stdout.isTTY ? "pretty" : "json",
};

/** Called once by main.ts after config is parsed; tests leave the defaults. */
export function configureLogging(options: Partial<LoggerState>): void {
  Object.assign(state, options);
}

function write(
  level: LogLevel,
  base: Record<string, unknown>,
  msg: string,
  fields?: Record<string, unknown>,
) {
  if (LEVEL_ORDER[level] < LEVEL_ORDER[state.level]) return;
  const record = { time: new Date().toISOString(), level, msg, ...base, ...fields };
  const stream = level === "error" || level === "warn" ? process.stderr : process.stdout;
  if (state.format === "json") {
    stream.write(`${JSON.stringify(record, jsonReplacer)}\n`);
    return;
  }
  const extras = Object.entries({ ...base, ...fields })
    .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v, jsonReplacer)}`)
    .join(" ");
  stream.write(`${record.time} ${level.padEnd(5)} ${msg}${extras ? ` ${extras}` : ""}\n`);
}

function jsonReplacer(_key: string, value: unknown): unknown {
  if (typeof value === "bigint") return value.toString();
  if (value instanceof Error) return { name: value.name, message: value.message };
  return value;
}

export function createLogger(base: Record<string, unknown> = {}): Logger {
  return {
    debug: (msg, fields) => write("debug", base, msg, fields),
    info: (msg, fields) => write("info", base, msg, fields),
    warn: (msg, fields) => write("warn", base, msg, fields),
    error: (msg, fields) => write("error", base, msg, fields),
    child: (fields) => createLogger({ ...base, ...fields }),
  };
}

export const log = createLogger();
