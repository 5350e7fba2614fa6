import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { createApp } from "../../src/http/app.ts";
import { FAKE_MODEL_ID, FakeService } from "../helpers/fake-service.ts";

// biome-ignore lint/suspicious/noExplicitAny: response bodies are checked field by field
type Json = any;

function setup(tasks: string[] = ["summarize", "classify"]) {
  const service = new FakeService({ tasks });
  return { service, app: createApp({ service }) };
}

describe("GET /v1/models", () => {
  it("lists the base model first and then every task", async () => {
    const { app } = setup();
    const res = await app.request("/v1/models");
    assert.equal(res.status, 200);
    const body = (await res.json()) as Json;
    assert.equal(body.object, "list");
    assert.deepEqual(
      body.data.map((m: Json) => m.id),
      [FAKE_MODEL_ID, "summarize", "classify"],
    );
    const [base, task] = body.data;
    assert.deepEqual(
      { ...base, created: 0 },
      {
        id: FAKE_MODEL_ID,
        object: "model",
        created: 0,
        owned_by: "taskmux",
        root: FAKE_MODEL_ID,
        parent: null,
        max_model_len: 512,
        taskmux: { kinds: ["base"] },
      },
    );
    assert.ok(Math.abs(base.created - Date.now() / 1000) < 5);
    assert.deepEqual(task, {
      id: "summarize",
      object: "model",
      created: 1_700_000_000,
      owned_by: "taskmux",
      root: FAKE_MODEL_ID,
      parent: FAKE_MODEL_ID,
      max_model_len: 512,
      taskmux: { kinds: ["prompt_template", "lora"], version: 1 },
    });
  });

  it("lists only the base model when no task is registered", async () => {
    const { app } = setup([]);
    const body = (await (await app.request("/v1/models")).json()) as Json;
    assert.deepEqual(
      body.data.map((m: Json) => m.id),
      [FAKE_MODEL_ID],
    );
  });

  it("reflects tasks registered after the app was created", async () => {
    const { app, service } = setup([]);
    service.tasks.set("late", { name: "late", kinds: ["lora"], createdAt: 1_800_000_000, version: 2 });
    const body = (await (await app.request("/v1/models")).json()) as Json;
    assert.deepEqual(body.data[1].taskmux, { kinds: ["lora"], version: 2 });
    assert.equal(body.data[1].created, 1_800_000_000);
  });

  it("retrieves one model by id, including a base id with a slash", async () => {
    const { app } = setup();
    const base = (await (await app.request(`/v1/models/${FAKE_MODEL_ID}`)).json()) as Json;
    assert.equal(base.id, FAKE_MODEL_ID);
    const task = (await (await app.request("/v1/models/classify")).json()) as Json;
    assert.equal(task.parent, FAKE_MODEL_ID);
  });

  it("answers an unknown model id with 404 model_not_found", async () => {
    const { app } = setup();
    const res = await app.request("/v1/models/nope");
    assert.equal(res.status, 404);
    assert.equal(((await res.json()) as Json).error.type, "model_not_found");
  });
});
