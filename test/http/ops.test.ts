import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { TaskmuxError } from "../../src/errors.ts";
import { createApp } from "../../src/http/app.ts";
import { Exposition } from "../../src/http/prometheus.ts";
import { FAKE_MODEL_ID, FakeService } from "../helpers/fake-service.ts";
import { postJson } from "../helpers/server.ts";

// biome-ignore lint/suspicious/noExplicitAny: response bodies are checked field by field
type Json = any;

function setup(options: ConstructorParameters<typeof FakeService>[0] = {}) {
  const service = new FakeService({ tasks: ["summarize", "classify"], ...options });
  return { service, app: createApp({ service }) };
}

/** The value of the one sample whose name and labels are given exactly (labels in exposition order). */
function sample(text: string, series: string): number | undefined {
  const line = text.split("\n").find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

describe("GET /health and /ready", () => {
  it("answers /health with 200 ok", async () => {
    const { app } = setup();
    const res = await app.request("/health");
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), { status: "ok" });
  });

  it("answers /ready with 200 when the service is ready and 503 otherwise", async () => {
    const { app, service } = setup({ ready: false });
    const notReady = await app.request("/ready");
    assert.equal(notReady.status, 503);
    assert.equal(notReady.headers.get("Retry-After"), "1");
    const body = (await notReady.json()) as Json;
    assert.equal(body.error.type, "shutting_down");
    assert.equal(body.error.code, "not_ready");
    service.isReady = true;
    const ready = await app.request("/ready");
    assert.equal(ready.status, 200);
    assert.deepEqual(await ready.json(), { status: "ready" });
  });
});

describe("GET /metrics", () => {
  it("serves the Prometheus text format", async () => {
    const { app } = setup();
    const res = await app.request("/metrics");
    assert.equal(res.status, 200);
    assert.equal(res.headers.get("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
    const text = await res.text();
    assert.ok(text.endsWith("\n"));
    for (const line of text.trim().split("\n")) {
      assert.match(
        line,
        /^(# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+|[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? \S+)$/,
        line,
      );
    }
  });

  it("counts requests by method, route, status and task", async () => {
    const { app } = setup();
    await postJson(app, "/v1/completions", { prompt: "x", max_tokens: 1 });
    await postJson(app, "/v1/completions", { prompt: "x", max_tokens: 1 }, { "X-Task": "summarize" });
    await postJson(app, "/v1/completions", { prompt: "x", max_tokens: 1 }, { "X-Task": "summarize" });
    await postJson(app, "/v1/completions", { prompt: "x", temperature: 9 });
    await app.request("/v1/nothing/here");
    const text = await (await app.request("/metrics")).text();
    const series = (route: string, status: number, task: string, method = "POST") =>
      `taskmux_http_requests_total{method="${method}",route="${route}",status="${status}",task="${task}"}`;
    assert.equal(sample(text, series("/v1/completions", 200, "")), 1);
    assert.equal(sample(text, series("/v1/completions", 200, "summarize")), 2);
    assert.equal(sample(text, series("/v1/completions", 400, "")), 1);
    assert.equal(sample(text, series("unmatched", 404, "", "GET")), 1);
    assert.equal(sample(text, 'taskmux_http_errors_total{type="invalid_request"}'), 2);
  });

  it("counts stream error frames by type", async () => {
    const failure = new TaskmuxError("internal", "boom");
    const { app } = setup({ failMidStream: { afterTokens: 1, error: failure } });
    await (await postJson(app, "/v1/completions", { prompt: "x", stream: true })).text();
    const text = await (await app.request("/metrics")).text();
    assert.equal(sample(text, 'taskmux_http_errors_total{type="internal"}'), 1);
  });

  it("exports prompt and generated tokens by task from the engine stats", async () => {
    const { app } = setup();
    await postJson(app, "/v1/completions", { prompt: " the cat", max_tokens: 3 }, { "X-Task": "classify" });
    const text = await (await app.request("/metrics")).text();
    assert.equal(sample(text, 'taskmux_prompt_tokens_total{task="classify"}'), 2);
    assert.equal(sample(text, 'taskmux_generation_tokens_total{task="classify"}'), 3);
    assert.equal(sample(text, `vllm:generation_tokens_total{model_name="${FAKE_MODEL_ID}"}`), 3);
    assert.equal(sample(text, 'taskmux_requests_finished_total{reason="length"}'), 1);
  });

  it("exports latency histograms with cumulative buckets", async () => {
    const { app, service } = setup();
    for (const s of [0.003, 0.02, 0.02, 7]) service.engineStats.timeToFirstToken.observe(s);
    service.engineStats.interTokenLatency.observe(0.04);
    const text = await (await app.request("/metrics")).text();
    const bucket = (le: string) => sample(text, `taskmux_time_to_first_token_seconds_bucket{le="${le}"}`);
    assert.equal(bucket("0.005"), 1);
    assert.equal(bucket("0.025"), 3);
    assert.equal(bucket("5"), 3);
    assert.equal(bucket("10"), 4);
    assert.equal(bucket("+Inf"), 4);
    assert.equal(sample(text, "taskmux_time_to_first_token_seconds_count"), 4);
    assert.ok(Math.abs(sample(text, "taskmux_time_to_first_token_seconds_sum")! - 7.043) < 1e-9);
    assert.equal(sample(text, 'taskmux_inter_token_latency_seconds_bucket{le="0.05"}'), 1);
    assert.equal(
      sample(text, `vllm:time_to_first_token_seconds_bucket{model_name="${FAKE_MODEL_ID}",le="+Inf"}`),
      4,
    );
  });

  it("exports step time per step kind, one family with a series each", async () => {
    const { app, service } = setup();
    service.engineStats.stepDone("decode", 8, 30);
    service.engineStats.stepDone("decode", 8, 40);
    service.engineStats.stepDone("prefill", 2, 300);
    const text = await (await app.request("/metrics")).text();
    assert.equal(sample(text, 'taskmux_step_seconds_count{kind="decode"}'), 2);
    assert.ok(Math.abs(sample(text, 'taskmux_step_seconds_sum{kind="decode"}')! - 0.07) < 1e-9, "decode sum");
    assert.equal(sample(text, 'taskmux_step_seconds_bucket{kind="prefill",le="0.25"}'), 0);
    assert.equal(sample(text, 'taskmux_step_seconds_bucket{kind="prefill",le="0.5"}'), 1);
    assert.equal(text.match(/# TYPE taskmux_step_seconds histogram/g)?.length, 1, "one TYPE line");
    assert.equal(sample(text, "taskmux_steps_total"), 3);
  });

  it("exports queue, running, KV-cache, batch and adapter gauges, also under vLLM's names", async () => {
    const { app, service } = setup();
    service.statsOverride = {
      numRunning: 3,
      numWaiting: 2,
      kvCacheUsage: 0.625,
      lastBatchSize: 3,
      residentAdapters: ["summarize"],
      maxResidentAdapters: 8,
      runningByTask: new Map<string | null, number>([
        [null, 1],
        ["summarize", 1],
        ["classify", 1],
      ]),
      waitingByTask: new Map<string | null, number>([
        ["summarize", 2],
        ["idle", 0],
      ]),
    };
    const before = Date.now() / 1000;
    const text = await (await app.request("/metrics")).text();
    assert.equal(sample(text, "taskmux_queue_depth"), 2);
    assert.equal(sample(text, "taskmux_num_sequences_running"), 3);
    assert.equal(sample(text, 'taskmux_sequences_running{task=""}'), 1);
    assert.equal(sample(text, 'taskmux_sequences_waiting{task="summarize"}'), 2);
    assert.equal(sample(text, "taskmux_kv_cache_usage_ratio"), 0.625);
    assert.equal(sample(text, "taskmux_last_batch_size"), 3);
    assert.equal(sample(text, "taskmux_resident_adapters"), 1);
    assert.equal(sample(text, 'taskmux_adapter_resident{task="summarize"}'), 1);
    const model = `{model_name="${FAKE_MODEL_ID}"}`;
    assert.equal(sample(text, `vllm:num_requests_running${model}`), 3);
    assert.equal(sample(text, `vllm:num_requests_waiting${model}`), 2);
    assert.equal(sample(text, `vllm:gpu_cache_usage_perc${model}`), 0.625);
    const info = sample(
      text,
      'vllm:lora_requests_info{running_lora_adapters="summarize,classify",waiting_lora_adapters="summarize",max_lora="8"}',
    );
    assert.ok(info !== undefined && info >= before - 1 && info <= Date.now() / 1000 + 1);
    assert.match(text, /# TYPE vllm:lora_requests_info gauge/);
  });
});

describe("Exposition", () => {
  it("escapes label values and HELP text", () => {
    const text = new Exposition()
      .gauge("x_info", "help with \\ and\nnewline", [[{ v: 'a"b\\c\nd' }, 1]])
      .toString();
    assert.equal(
      text,
      '# HELP x_info help with \\\\ and\\nnewline\n# TYPE x_info gauge\nx_info{v="a\\"b\\\\c\\nd"} 1\n',
    );
  });
});
