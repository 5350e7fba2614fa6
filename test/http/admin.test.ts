/**
 * Tests for the admin API on the real tiny-model stack (in-process): access control (loopback / bearer token),
 * GET/PUT/DELETE /v1/tasks, vLLM's load/unload aliases, and the refusals of bad uploads — truncated files,
 * wrong shapes, path traversal, escaping symlinks, URL host, checksum and size — each with its precise error.
 * URL loads are served by a node:http server on 127.0.0.1; no other address is ever contacted.
 */
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync, symlinkSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { Hono } from "hono";
import { type AdminOptions, adminRoutes } from "../../src/http/admin.ts";
import { createApp } from "../../src/http/app.ts";
import type { AppEnv } from "../../src/http/deps.ts";
import type { ModelSpec } from "../../src/model/model-spec.ts";
import { withTimeout } from "../helpers/server.ts";
import { type FileServer, makeTar, serveFiles, sha256Hex } from "../helpers/tar.ts";
import { makeTaskRoot, writeLoraTask } from "../helpers/task-fixtures.ts";
import { startTestStack, type TestStack } from "../helpers/tiny-model.ts";

const LOOPBACK = { incoming: { socket: { remoteAddress: "127.0.0.1" } } };
const REMOTE = { incoming: { socket: { remoteAddress: "203.0.113.9" } } };
const MAX_URL_BYTES = 64 * 1024;

type App = Hono<AppEnv>;

interface Call {
  env?: object;
  headers?: Record<string, string>;
}

async function call(app: App, method: string, path: string, body?: unknown, o: Call = {}) {
  const init: RequestInit = { method, headers: { "Content-Type": "application/json", ...o.headers } };
  if (body !== undefined) init.body = typeof body === "string" ? body : JSON.stringify(body);
  const res = await app.request(path, init, o.env ?? LOOPBACK);
  const text = await res.text();
  // biome-ignore lint/suspicious/noExplicitAny: response bodies are checked field by field
  let json: any = null;
  try {
    json = JSON.parse(text);
  } catch {
    json = null;
  }
  return { status: res.status, json, text, headers: res.headers };
}

describe("admin API", () => {
  let stack: TestStack;
  let spec: ModelSpec;
  let root: string;
  let cleanup: () => void;
  let outside: { root: string; cleanup: () => void };
  let files: FileServer;
  let app: App;
  const tars: Record<string, Uint8Array> = {};

  const lora = (dir: string, name: string, seed: number) =>
    writeLoraTask(dir, name, spec, { r: 4, alpha: 8, targets: ["q_proj", "v_proj"], seed, bStd: 0.5 });

  const makeApp = (overrides: Partial<AdminOptions> = {}): App => {
    const t = stack.tasks!;
    const admin = adminRoutes({
      registry: t.registry,
      store: t.store,
      residency: t.residency,
      remote: { allowHosts: ["127.0.0.1"], maxBytes: MAX_URL_BYTES },
      ...overrides,
    });
    return createApp({ service: stack.service, routes: [admin] });
  };

  /** Greedy completion text for a task; the status too. */
  const complete = async (task: string, target = app) => {
    const r = await call(
      target,
      "POST",
      "/v1/completions",
      { prompt: "Once upon a time", max_tokens: 8, temperature: 0, ignore_eos: true },
      { headers: { "X-Task": task } },
    );
    return { status: r.status, text: r.json?.choices?.[0]?.text as string | undefined, error: r.json?.error };
  };

  before(async () => {
    ({ root, cleanup } = makeTaskRoot());
    outside = makeTaskRoot("taskmux-outside-");
    stack = await startTestStack({ taskRoots: [root] });
    spec = stack.model.info.spec;
    app = makeApp();
    const staging = makeTaskRoot("taskmux-tar-");
    const fx = lora(staging.root, "from-url", 41);
    const filesOf = (extra: { name: string; data: string }[] = []) => [
      ...["adapter_config.json", "adapter_model.safetensors"].map((f) => ({
        name: `from-url/${f}`,
        data: readFileSync(join(fx.dir, f)),
      })),
      ...extra,
    ];
    tars.good = makeTar(filesOf());
    tars.big = makeTar(filesOf([{ name: "from-url/README.md", data: "x".repeat(MAX_URL_BYTES) }]));
    tars.evil = makeTar([{ name: "../../escape.json", data: "{}" }]);
    staging.cleanup();
    files = await serveFiles({ "/good.tar": tars.good, "/big.tar": tars.big, "/evil.tar": tars.evil });
  });
  after(async () => {
    await files.close();
    await stack.dispose();
    cleanup();
    outside.cleanup();
  });

  test("without a token, admin routes answer loopback clients only", async () => {
    assert.equal((await call(app, "GET", "/v1/tasks")).status, 200);
    for (const address of ["::1", "::ffff:127.0.0.1", "127.1.2.3"]) {
      const env = { incoming: { socket: { remoteAddress: address } } };
      assert.equal((await call(app, "GET", "/v1/tasks", undefined, { env })).status, 200, address);
    }
    const remote = await call(app, "GET", "/v1/tasks", undefined, { env: REMOTE });
    assert.equal(remote.status, 403);
    assert.equal(remote.json.error.code, "forbidden");
    assert.match(remote.json.error.message, /loopback/);
    assert.equal((await call(app, "DELETE", "/v1/tasks/x", undefined, { env: REMOTE })).status, 403);
    assert.equal(
      (await call(app, "GET", "/v1/tasks", undefined, { env: {} })).status,
      403,
      "no address: refused",
    );
  });

  test("with a token, only `Authorization: Bearer <token>` is accepted, from any address", async () => {
    const guarded = makeApp({ adminToken: "s3cret-token" });
    const none = await call(guarded, "GET", "/v1/tasks", undefined, { env: LOOPBACK });
    assert.equal(none.status, 401);
    assert.equal(none.headers.get("WWW-Authenticate"), "Bearer");
    for (const authorization of [
      "Bearer wrong",
      "Bearer s3cret-tokenX",
      "Basic s3cret-token",
      "s3cret-token",
    ]) {
      const r = await call(guarded, "GET", "/v1/tasks", undefined, {
        headers: { Authorization: authorization },
      });
      assert.equal(r.status, 401, authorization);
    }
    const ok = await call(guarded, "GET", "/v1/tasks", undefined, {
      env: REMOTE,
      headers: { Authorization: "Bearer s3cret-token" },
    });
    assert.equal(ok.status, 200);
    assert.equal(
      (await complete("no-such-task", guarded)).status,
      404,
      "other routes are not behind the token",
    );
  });

  test("PUT loads a folder by path, answers once it serves, and replaces it on the next PUT", async () => {
    lora(root, "pv1", 1);
    lora(root, "pv2", 2);
    const first = await call(app, "PUT", "/v1/tasks/put-task", { path: "pv1" });
    assert.equal(first.status, 200, first.text);
    assert.equal(first.json.name, "put-task");
    assert.equal(first.json.status, "ready");
    assert.equal(first.json.version, 1);
    assert.deepEqual(first.json.kinds, ["lora"]);
    const v1 = await complete("put-task");
    assert.equal(v1.status, 200);
    assert.equal((await complete("pv1")).text, v1.text, "the same weights give the same output");
    const second = await call(app, "PUT", "/v1/tasks/put-task", { path: join(root, "pv2") });
    assert.equal(second.json.version, 2);
    const v2 = await complete("put-task");
    assert.notEqual(v2.text, v1.text, "the next request uses the new version");
    assert.equal((await complete("pv2")).text, v2.text);
  });

  test("GET /v1/tasks lists every task with status, version, kinds, source, residency and use", async () => {
    lora(root, "listed", 3);
    await call(app, "PUT", "/v1/tasks/listed", { path: "listed" });
    await complete("listed");
    const bad = lora(root, "listed-bad", 4);
    truncateSync(join(bad.dir, "adapter_model.safetensors"), 64);
    assert.equal((await call(app, "PUT", "/v1/tasks/listed-bad", { path: "listed-bad" })).status, 422);
    const { status, json } = await call(app, "GET", "/v1/tasks");
    assert.equal(status, 200);
    const byName = new Map(json.data.map((t: { name: string }) => [t.name, t]));
    const listed = byName.get("listed") as Record<string, unknown>;
    assert.equal(listed.status, "ready");
    assert.equal(listed.version, 1);
    assert.deepEqual(listed.kinds, ["lora"]);
    assert.equal(listed.source, join(root, "listed"));
    assert.equal(listed.resident, true);
    assert.equal(listed.running_sequences, 0);
    assert.equal(typeof listed.last_used_at, "number");
    const failed = byName.get("listed-bad") as Record<string, unknown>;
    assert.equal(failed.status, "failed");
    assert.match(String(failed.error), /adapter_model\.safetensors/);
    const one = await call(app, "GET", "/v1/tasks/listed");
    assert.equal(one.json.name, "listed");
    assert.equal((await call(app, "GET", "/v1/tasks/never-heard-of")).status, 404);
  });

  test("a malformed task name is 400 and never touches the filesystem", async () => {
    const store = stack.tasks!.store;
    const touched: string[] = [];
    const spy = ["locate", "resolveInsideRoots", "load", "unload", "installRoot"] as const;
    const originals = spy.map((m) => [m, store[m]] as const);
    for (const m of spy) {
      // biome-ignore lint/suspicious/noExplicitAny: spying on the instance
      (store as any)[m] = (...args: unknown[]) => {
        touched.push(m);
        // biome-ignore lint/suspicious/noExplicitAny: spying on the instance
        return (originals.find(([n]) => n === m)![1] as any).apply(store, args);
      };
    }
    try {
      // ("." and ".." never get here: URL parsing resolves /v1/tasks/.. to /v1/, which has no route.)
      for (const name of ["...", ".hidden", "..%2F..%2Fetc", "a%20b", "x".repeat(65), "%C3%A9"]) {
        for (const method of ["PUT", "DELETE", "GET"]) {
          const r = await call(
            app,
            method,
            `/v1/tasks/${name}`,
            method === "PUT" ? { path: "pv1" } : undefined,
          );
          assert.equal(r.status, 400, `${method} ${name}: ${r.text}`);
          assert.equal(r.json.error.param, "name");
        }
      }
      const vllm = await call(app, "POST", "/v1/load_lora_adapter", { lora_name: "../x", lora_path: "pv1" });
      assert.equal(vllm.status, 400);
      assert.equal(vllm.json.error.param, "lora_name");
    } finally {
      for (const [m, f] of originals) (store as unknown as Record<string, unknown>)[m] = f;
    }
    assert.deepEqual(touched, []);
  });

  test("bad folders are refused with the file and the reason; the serving version stays", async () => {
    lora(root, "guarded", 5);
    assert.equal((await call(app, "PUT", "/v1/tasks/guarded", { path: "guarded" })).status, 200);
    const before = await complete("guarded");
    const truncated = lora(root, "truncated", 6);
    truncateSync(join(truncated.dir, "adapter_model.safetensors"), 200);
    const t = await call(app, "PUT", "/v1/tasks/guarded", { path: "truncated" });
    assert.equal(t.status, 422);
    assert.equal(t.json.error.type, "adapter_load_failed");
    assert.match(t.json.error.message, /adapter_model\.safetensors: truncated/);
    writeLoraTask(
      root,
      "wrong-shapes",
      { ...spec, hiddenSize: spec.hiddenSize * 2 },
      {
        r: 4,
        alpha: 8,
        targets: ["q_proj"],
        seed: 7,
      },
    );
    const w = await call(app, "PUT", "/v1/tasks/guarded", { path: "wrong-shapes" });
    assert.equal(w.status, 422);
    assert.equal(w.json.error.type, "adapter_incompatible");
    assert.match(w.json.error.message, /q_proj/);
    assert.match(w.json.error.message, /\[4, 128\]|128/);
    const after = await complete("guarded");
    assert.equal(after.text, before.text, "a rejected replacement never evicts the serving version");
    assert.equal(stack.tasks!.registry.current("guarded")?.version, 1);
  });

  test("paths outside the roots are refused: traversal, absolute paths, escaping symlinks", async () => {
    lora(outside.root, "secret", 8);
    symlinkSync(join(outside.root, "secret"), join(root, "escape-link"));
    writeFileSync(join(root, "plain-file"), "not a folder");
    const cases: [unknown, RegExp][] = [
      [{ path: "../../etc" }, /resolves outside the task roots/],
      [{ path: "/etc" }, /resolves outside the task roots/],
      [{ path: join(outside.root, "secret") }, /resolves outside the task roots/],
      [{ path: "escape-link" }, /resolves outside the task roots/],
      [{ path: "plain-file" }, /is not a task folder/],
      [{ path: "does-not-exist" }, /no task folder/],
      [{}, /exactly one of path or url/],
      [{ path: "pv1", url: "http://127.0.0.1/x.tar" }, /exactly one of path or url/],
      [{ path: "pv1", extra: 1 }, /extra/],
    ];
    for (const [body, pattern] of cases) {
      const r = await call(app, "PUT", "/v1/tasks/escaper", body);
      assert.equal(r.status, 400, JSON.stringify(body));
      assert.match(r.json.error.message, pattern, JSON.stringify(body));
    }
    assert.equal(stack.tasks!.registry.has("escaper"), false);
    assert.equal((await complete("escape-link")).status, 404, "never followed on demand either");
  });

  test("a URL load fetches a tar from an allow-listed host, checks it and moves it into place", async () => {
    const r = await call(app, "PUT", "/v1/tasks/from-url", {
      url: `${files.origin}/good.tar`,
      sha256: sha256Hex(tars.good!),
    });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json.version, 1);
    assert.equal(r.json.source, join(root, "from-url"));
    assert.deepEqual(readdirSync(join(root, "from-url")).sort(), [
      "adapter_config.json",
      "adapter_model.safetensors",
    ]);
    assert.equal((await complete("from-url")).status, 200);
    const again = await call(app, "PUT", "/v1/tasks/from-url", {
      url: `${files.origin}/good.tar`,
      sha256: sha256Hex(tars.good!),
    });
    assert.equal(again.json.version, 2, "loads or replaces");
    assert.deepEqual(
      readdirSync(root).filter((f) => f.startsWith(".")),
      [],
      "no staging folder is left behind",
    );
  });

  test("bad URL loads are refused: host, checksum, size, archive contents, disabled loads", async () => {
    const good = sha256Hex(tars.good!);
    const put = (body: unknown, target = app) => call(target, "PUT", "/v1/tasks/url-task", body);
    const fetched = files.requests.length;
    const host = await put({ url: "https://example.com/x.tar", sha256: good });
    assert.equal(host.status, 403);
    assert.match(host.json.error.message, /host example\.com is not in --adapter-url-allow/);
    const disabled = await put(
      { url: `${files.origin}/good.tar`, sha256: good },
      makeApp({
        remote: { allowHosts: [], maxBytes: MAX_URL_BYTES },
      }),
    );
    assert.equal(disabled.status, 403);
    assert.match(disabled.json.error.message, /URL loads are disabled/);
    assert.equal(files.requests.length, fetched, "refused before any request");
    const mismatch = await put({ url: `${files.origin}/good.tar`, sha256: "ab".repeat(32) });
    assert.equal(mismatch.status, 422);
    assert.equal(mismatch.json.error.type, "adapter_load_failed");
    assert.match(mismatch.json.error.message, /sha256 mismatch .*expected (ab){32}, got [0-9a-f]{64}/);
    const big = await put({ url: `${files.origin}/big.tar`, sha256: sha256Hex(tars.big!) });
    assert.equal(big.status, 413);
    assert.match(big.json.error.message, /larger than --adapter-url-max-mb/);
    const evil = await put({ url: `${files.origin}/evil.tar`, sha256: sha256Hex(tars.evil!) });
    assert.equal(evil.status, 422);
    assert.match(evil.json.error.message, /escapes the folder/);
    const notFound = await put({ url: `${files.origin}/missing.tar`, sha256: good });
    assert.equal(notFound.status, 400);
    assert.match(notFound.json.error.message, /answered 404/);
    const badUrl = await put({ url: "file:///etc/passwd", sha256: good });
    assert.equal(badUrl.status, 400);
    const noSha = await put({ url: `${files.origin}/good.tar` });
    assert.equal(noSha.status, 400);
    assert.equal(noSha.json.error.param, "sha256");
    assert.equal(stack.tasks!.registry.has("url-task"), false);
    assert.equal(existsSync(join(root, "url-task")), false);
    assert.deepEqual(
      readdirSync(root).filter((f) => f.startsWith(".")),
      [],
    );
  });

  test("DELETE stops new requests at once, lets running ones finish, then frees the version", async () => {
    const { registry } = stack.tasks!;
    lora(root, "del-task", 9);
    await call(app, "PUT", "/v1/tasks/del-task", { path: "del-task" });
    const baseline = registry.numLiveVersions;
    const res = await app.request(
      "/v1/completions",
      {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-Task": "del-task" },
        body: JSON.stringify({
          prompt: "Hello",
          max_tokens: 48,
          temperature: 0,
          ignore_eos: true,
          stream: true,
        }),
      },
      LOOPBACK,
    );
    assert.equal(res.status, 200);
    const reader = res.body!.getReader();
    const decoder = new TextDecoder();
    let streamed = decoder.decode((await withTimeout(reader.read(), 10_000, "first chunk")).value);
    const del = await call(app, "DELETE", "/v1/tasks/del-task");
    assert.equal(del.status, 200);
    assert.equal(del.json.status, "unloaded");
    assert.equal(del.json.draining_sequences, 1);
    const refused = await complete("del-task");
    assert.equal(refused.status, 404);
    assert.equal(refused.error.type, "task_not_found");
    const listed = (await call(app, "GET", "/v1/tasks")).json.data.find(
      (t: { name: string }) => t.name === "del-task",
    );
    assert.equal(listed.status, "draining");
    for (;;) {
      const { value, done } = await withTimeout(reader.read(), 10_000, "stream");
      if (done) break;
      streamed += decoder.decode(value);
    }
    assert.match(streamed, /"finish_reason":"length"/);
    assert.doesNotMatch(streamed, /"error"/);
    assert.equal(registry.numLiveVersions, baseline - 1, "freed once the running sequence ended");
    assert.equal((await complete("del-task")).status, 404, "not brought back on demand");
    writeFileSync(join(root, "del-task", "NOTES.md"), "retrained");
    assert.equal((await complete("del-task")).status, 200, "a changed folder is loadable again");
    assert.equal((await call(app, "DELETE", "/v1/tasks/never-existed")).status, 404);
  });

  test("vLLM's load_lora_adapter / unload_lora_adapter load, replace and unload", async () => {
    lora(root, "vllm-a", 10);
    const load = await call(app, "POST", "/v1/load_lora_adapter", {
      lora_name: "vllm-task",
      lora_path: "vllm-a",
    });
    assert.equal(load.status, 200, load.text);
    assert.match(load.text, /Success: LoRA adapter 'vllm-task' added/);
    assert.equal((await complete("vllm-task")).status, 200);
    const bad = await call(app, "POST", "/v1/load_lora_adapter", {
      lora_name: "vllm-task",
      lora_path: "../../etc",
    });
    assert.equal(bad.status, 400);
    const unload = await call(app, "POST", "/v1/unload_lora_adapter", { lora_name: "vllm-task" });
    assert.equal(unload.status, 200);
    assert.match(unload.text, /removed/);
    assert.equal((await complete("vllm-task")).status, 404);
    const again = await call(app, "POST", "/v1/unload_lora_adapter", { lora_name: "vllm-task" });
    assert.equal(again.status, 404);
    assert.equal((await call(app, "POST", "/v1/load_lora_adapter", { lora_name: "x" })).status, 400);
  });
});
