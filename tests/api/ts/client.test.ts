// A client generated from schemas/openapi.json (openapi-typescript types +
// openapi-fetch) makes every call the document describes against a live
// server (RMLX_BASE, the tiny chat model RMLX_MODEL). `tsc` type-checks each
// request body against the generated types first, so a schema that values
// cannot match fails the build.
import { test } from "node:test";
import assert from "node:assert/strict";
import createClient from "openapi-fetch";
import type { components, paths } from "./gen/schema.js";

// JSON answers (the 200s also document `text/event-stream` for `stream: true`).
type S = components["schemas"];

const base = process.env.RMLX_BASE;
const model = process.env.RMLX_MODEL ?? "tiny-chat";
const embedModel = process.env.RMLX_EMBED_MODEL ?? "tiny-embed";
if (!base) throw new Error("set RMLX_BASE to a running rmlx server");
const client = createClient<paths>({ baseUrl: base });

test("every operation answers 200 with its documented shape", async () => {
  const done = new Set<string>();

  const health = await client.GET("/health");
  assert.equal(health.response.status, 200);
  assert.equal(health.data?.status, "ok");
  done.add("GET /health");

  const list = await client.GET("/v1/models");
  assert.deepEqual(list.data?.data.map((m) => m.id).sort(), [model, embedModel].sort());
  done.add("GET /v1/models");

  const one = await client.GET("/v1/models/{id}", { params: { path: { id: model } } });
  assert.equal(one.data?.id, model);
  done.add("GET /v1/models/{id}");

  const load = await client.POST("/v1/models/{id}/load", { params: { path: { id: model } }, body: { keep_alive: "5m" } });
  assert.equal(load.data?.loaded, true);
  assert.equal(typeof load.data?.expires_at, "number");
  done.add("POST /v1/models/{id}/load");

  const unload = await client.POST("/v1/models/{id}/unload", { params: { path: { id: model } } });
  assert.equal(unload.response.status, 200);
  assert.equal(unload.data?.expires_at, null);
  done.add("POST /v1/models/{id}/unload");

  const chat = await client.POST("/v1/chat/completions", {
    body: {
      model,
      max_tokens: 3,
      stop: ["\n"],
      keep_alive: 30,
      tool_choice: "none",
      tools: [{ type: "function", function: { name: "f", parameters: { type: "object" } } }],
      messages: [
        { role: "system", content: "be brief" },
        { role: "developer", content: [{ type: "text", text: "really" }] },
        { role: "user", content: "hi" },
      ],
    },
  });
  assert.equal(chat.response.status, 200, JSON.stringify(chat.error));
  const completion = chat.data as S["ChatCompletion"];
  assert.equal(completion.choices[0].message.refusal, null);
  assert.equal(completion.system_fingerprint, null);
  done.add("POST /v1/chat/completions");

  for (const prompt of ["hello", ["a", "b"], [1, 2, 3], [[1, 2], [3]]] as const) {
    const comp = await client.POST("/v1/completions", {
      body: { model, prompt: prompt as string | string[] | number[] | number[][], max_tokens: 2, stop: "x" },
    });
    assert.equal(comp.response.status, 200, JSON.stringify(comp.error));
    assert.ok((comp.data as S["Completion"]).choices.length >= 1);
  }
  done.add("POST /v1/completions");

  const msg = await client.POST("/v1/messages", {
    body: {
      model,
      max_tokens: 3,
      system: [{ type: "text", text: "s" }],
      messages: [{ role: "user", content: [{ type: "text", text: "hi" }] }],
    },
  });
  assert.equal(msg.response.status, 200, JSON.stringify(msg.error));
  assert.ok((msg.data as S["AnthropicMessage"]).usage.output_tokens <= 3);
  done.add("POST /v1/messages");

  const count = await client.POST("/v1/messages/count_tokens", {
    body: { model, system: "s", messages: [{ role: "user", content: "hi" }] },
  });
  assert.ok((count.data?.input_tokens ?? 0) > 0);
  done.add("POST /v1/messages/count_tokens");

  for (const input of ["hello", ["a", "b"], [2, 30, 3], [[2, 30, 3], [2, 3]]] as const) {
    const emb = await client.POST("/v1/embeddings", {
      body: { model: embedModel, input: input as string | string[] | number[] | number[][], encoding_format: "float" },
    });
    assert.equal(emb.response.status, 200, JSON.stringify(emb.error));
    assert.equal(emb.data?.object, "list");
    assert.ok((emb.data?.data.length ?? 0) >= 1);
  }
  done.add("POST /v1/embeddings");

  // The audio routes take multipart forms and need a Whisper model; the tiny
  // chat model gets the documented 400 naming `model` (their 200 path is
  // tested with tiny.en in host/tests/arch_whisper.rs).
  for (const route of ["/v1/audio/transcriptions", "/v1/audio/translations"] as const) {
    const form = new FormData();
    form.append("file", new Blob([new Uint8Array(64)], { type: "audio/wav" }), "a.wav");
    form.append("model", model);
    const r: Response = await fetch(base + route, { method: "POST", body: form });
    assert.equal(r.status, 400);
    const err = (await r.json()) as S["ErrorResponse"];
    assert.equal(err.error.param, "model");
    done.add(`POST ${route}`);
  }

  const bad = await client.POST("/v1/completions", { body: { model: "nope", prompt: "x" } });
  assert.equal(bad.response.status, 404);
  assert.equal(bad.error?.error.code, "model_not_found");

  const documented = Object.entries(await (await fetch(base + "/openapi.json")).json().then((d: any) => d.paths))
    .flatMap(([p, ops]) => Object.keys(ops as object).map((m) => `${m.toUpperCase()} ${p}`));
  assert.deepEqual([...done].sort(), documented.sort());
});
