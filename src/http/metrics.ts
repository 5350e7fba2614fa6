/**
 * @module http/metrics — HTTP request and error counters (a middleware) and the /metrics exposition: ours
 * (`taskmux_*`) plus the vLLM names dashboards and routers already read (`vllm:*`).
 */
import type { MiddlewareHandler } from "hono";
import { matchedRoutes } from "hono/route";
import type { GenerationService, ServingStats } from "../engine/service.ts";
import type { AppEnv } from "./deps.ts";
import { Exposition, type Sample } from "./prometheus.ts";

/** Label value for the base model (no task). */
const BASE_TASK = "";

function countSamples(
  counts: Map<string, number>,
  toLabels: (key: string) => Record<string, string>,
): Sample[] {
  return [...counts].map(([key, value]) => [toLabels(key), value]);
}

export class HttpMetrics {
  /** key: JSON [method, route, status, task] */
  private readonly requests = new Map<string, number>();
  /** key: error type */
  private readonly errors = new Map<string, number>();

  /** Counts every request once it has its status; the route is the matched pattern (bounded cardinality). */
  middleware(): MiddlewareHandler<AppEnv> {
    return async (c, next) => {
      await next();
      const route = matchedRoutes(c).findLast((r) => r.method !== "ALL")?.path ?? "unmatched";
      const task = c.get("task") ?? BASE_TASK;
      const key = JSON.stringify([c.req.method, route, String(c.res.status), task]);
      this.requests.set(key, (this.requests.get(key) ?? 0) + 1);
    };
  }

  errorObserved(type: string): void {
    this.errors.set(type, (this.errors.get(type) ?? 0) + 1);
  }

  render(out: Exposition): void {
    out.counter(
      "taskmux_http_requests_total",
      "HTTP requests by method, route, status and task",
      countSamples(this.requests, (key) => {
        const [method, route, status, task] = JSON.parse(key) as string[];
        return { method: method!, route: route!, status: status!, task: task! };
      }),
    );
    out.counter(
      "taskmux_http_errors_total",
      "Error responses and stream error frames by error type",
      countSamples(this.errors, (type) => ({ type })),
    );
  }
}

const taskLabel = (key: string | null) => ({ task: key ?? BASE_TASK });

/** Task names with at least one sequence in the map, comma-joined (vLLM's lora_requests_info format). */
function taskList(byTask: Map<string | null, number>): string {
  return [...byTask]
    .filter(([task, n]) => task !== null && n > 0)
    .map(([task]) => task)
    .join(",");
}

function sum(values: Iterable<number>): number {
  let total = 0;
  for (const v of values) total += v;
  return total;
}

/** The whole /metrics body. */
export function renderMetrics(service: GenerationService, http: HttpMetrics): string {
  const out = new Exposition();
  http.render(out);
  renderEngine(out, service);
  const stats = service.stats(); // one snapshot, so taskmux_* and vllm:* gauges agree
  renderServing(out, stats);
  renderVllm(out, service, stats);
  return out.toString();
}

/** Counters and histograms from the engine's EngineStats. */
function renderEngine(out: Exposition, service: GenerationService): void {
  const engine = service.engineStats;
  out
    .counter(
      "taskmux_prompt_tokens_total",
      "Prompt tokens processed, by task",
      countSamples(engine.promptTokens, (k) => ({ task: k })),
    )
    .counter(
      "taskmux_generation_tokens_total",
      "Tokens generated, by task",
      countSamples(engine.generatedTokens, (k) => ({ task: k })),
    )
    .counter(
      "taskmux_requests_finished_total",
      "Sequences finished, by finish reason",
      countSamples(engine.finished, (reason) => ({ reason })),
    )
    .counter(
      "taskmux_request_failures_total",
      "Sequences failed, by error type",
      countSamples(engine.failures, (type) => ({ type })),
    )
    .counter("taskmux_requests_queued_total", "Sequences admitted to the queue", [[{}, engine.numQueued]])
    .counter("taskmux_steps_total", "Engine steps run", [[{}, engine.numSteps]])
    .histogram(
      "taskmux_time_to_first_token_seconds",
      "Time from arrival to the first generated token",
      engine.timeToFirstToken,
    )
    .histogram(
      "taskmux_inter_token_latency_seconds",
      "Time between consecutive generated tokens",
      engine.interTokenLatency,
    )
    .histograms("taskmux_step_seconds", "Model time of one engine step, by step kind", [
      [{ kind: "decode" }, engine.stepSeconds.decode],
      [{ kind: "prefill" }, engine.stepSeconds.prefill],
    ])
    .histogram("taskmux_batch_size", "Sequences per engine step", engine.batchSize);
}

/** Gauges from service.stats(): queue, running, KV cache, batch, adapters. */
function renderServing(out: Exposition, stats: ServingStats): void {
  out
    .gauge("taskmux_queue_depth", "Sequences waiting for admission", [[{}, stats.numWaiting]])
    .gauge("taskmux_num_sequences_running", "Sequences running", [[{}, stats.numRunning]])
    .gauge(
      "taskmux_sequences_running",
      "Running sequences by task",
      [...stats.runningByTask].map(([k, n]) => [taskLabel(k), n]),
    )
    .gauge(
      "taskmux_sequences_waiting",
      "Waiting sequences by task",
      [...stats.waitingByTask].map(([k, n]) => [taskLabel(k), n]),
    )
    .gauge("taskmux_kv_cache_usage_ratio", "Fraction of the KV cache in use (0..1)", [
      [{}, stats.kvCacheUsage],
    ])
    .gauge("taskmux_kv_cache_capacity_tokens", "KV cache capacity in tokens", [
      [{}, stats.kvCacheCapacityTokens],
    ])
    .gauge("taskmux_last_batch_size", "Sequences in the most recent engine step", [[{}, stats.lastBatchSize]])
    .gauge("taskmux_resident_adapters", "Adapters resident in device pools", [
      [{}, stats.residentAdapters.length],
    ])
    .gauge("taskmux_max_resident_adapters", "Capacity of the adapter pools", [
      [{}, stats.maxResidentAdapters],
    ])
    .gauge(
      "taskmux_adapter_resident",
      "1 for each resident adapter",
      stats.residentAdapters.map((task) => [{ task }, 1]),
    );
}

/** vLLM's names, so existing dashboards and LoRA-aware routers read taskmux unchanged. */
function renderVllm(out: Exposition, service: GenerationService, stats: ServingStats): void {
  const engine = service.engineStats;
  const model = { model_name: service.modelId };
  out
    .gauge("vllm:num_requests_running", "Number of requests running (vLLM name)", [[model, stats.numRunning]])
    .gauge("vllm:num_requests_waiting", "Number of requests waiting (vLLM name)", [[model, stats.numWaiting]])
    .gauge("vllm:gpu_cache_usage_perc", "KV-cache usage, 1 means 100 percent (vLLM name)", [
      [model, stats.kvCacheUsage],
    ])
    .gauge(
      "vllm:lora_requests_info",
      "Running and waiting adapters; the value is the unix time (vLLM name)",
      [
        [
          {
            running_lora_adapters: taskList(stats.runningByTask),
            waiting_lora_adapters: taskList(stats.waitingByTask),
            max_lora: String(stats.maxResidentAdapters),
          },
          Date.now() / 1000,
        ],
      ],
    )
    .counter("vllm:prompt_tokens_total", "Prompt tokens processed (vLLM name)", [
      [model, sum(engine.promptTokens.values())],
    ])
    .counter("vllm:generation_tokens_total", "Tokens generated (vLLM name)", [
      [model, sum(engine.generatedTokens.values())],
    ])
    .histogram(
      "vllm:time_to_first_token_seconds",
      "Time to first token (vLLM name)",
      engine.timeToFirstToken,
      model,
    );
}
