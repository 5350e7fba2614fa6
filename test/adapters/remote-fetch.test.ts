/** Tests for remote-fetch: URL and host checks, the download limits and checksum, and the tar reader's refusals. */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { download, extractTar, isHostAllowed, parseTaskUrl } from "../../src/adapters/remote-fetch.ts";
import { TaskmuxError } from "../../src/errors.ts";
import { type FileServer, makeTar, serveFiles, sha256Hex, type TarInput } from "../helpers/tar.ts";
import { tempDir } from "./formats/fixtures.ts";

const work = tempDir("taskmux-remote-");
let counter = 0;

/** Extract `entries` into a fresh folder; returns the folder. */
function extract(entries: TarInput[] | Buffer): string {
  const n = counter++;
  const file = join(work, `a${n}.tar`);
  writeFileSync(file, Array.isArray(entries) ? makeTar(entries) : entries);
  const into = join(work, `out${n}`);
  mkdirSync(into);
  extractTar(file, into);
  return into;
}

function assertRefused(entries: TarInput[] | Buffer, pattern: RegExp) {
  assert.throws(
    () => extract(entries),
    (e: unknown) => {
      assert.ok(e instanceof TaskmuxError, String(e));
      assert.equal(e.type, "adapter_load_failed");
      assert.match(e.message, pattern);
      return true;
    },
  );
}

describe("task archives", () => {
  test("flat files are written as they are; one top-level folder is stripped; dot-files are skipped", () => {
    const flat = extract([
      { name: "adapter_config.json", data: "{}" },
      { name: "./task.json", data: "[]" },
    ]);
    assert.deepEqual(readdirSync(flat).sort(), ["adapter_config.json", "task.json"]);
    assert.equal(readFileSync(join(flat, "task.json"), "utf8"), "[]");
    const nested = extract([
      { name: "lora-x/", type: "5" },
      { name: "lora-x/adapter_config.json", data: "{}" },
      { name: "lora-x/._adapter_config.json", data: "mac junk" },
      { name: "lora-x/adapter_model.safetensors", data: "x".repeat(1500) },
    ]);
    assert.deepEqual(readdirSync(nested).sort(), ["adapter_config.json", "adapter_model.safetensors"]);
    assert.equal(readFileSync(join(nested, "adapter_model.safetensors"), "utf8").length, 1500);
  });

  test("archives written by tar (gnu, ustar and pax formats) and python's tarfile are read", (t) => {
    const src = join(work, "src-folder");
    mkdirSync(join(src, "support"), { recursive: true });
    writeFileSync(join(src, "support", "adapter_config.json"), "{}");
    writeFileSync(join(src, "support", "adapter_model.safetensors"), Buffer.alloc(3000, 7));
    const makers: [string, string, string[]][] = [
      ["gnu", "tar", ["-cf", "OUT", "-C", src, "support"]],
      ["ustar", "tar", ["--format=ustar", "-cf", "OUT", "-C", src, "support"]],
      ["pax", "tar", ["--format=pax", "-cf", "OUT", "-C", src, "support"]],
      [
        "python",
        "python3",
        [
          "-c",
          "import tarfile,sys; t=tarfile.open(sys.argv[1],'w'); t.add(sys.argv[2],arcname='support'); t.close()",
          "OUT",
          join(src, "support"),
        ],
      ],
    ];
    for (const [label, command, args] of makers) {
      const out = join(work, `${label}.tar`);
      const made = spawnSync(
        command,
        args.map((a) => (a === "OUT" ? out : a)),
      );
      if (made.status !== 0) {
        t.diagnostic(`${command} unavailable: skipped ${label}`);
        continue;
      }
      const dir = extract(readFileSync(out));
      assert.deepEqual(readdirSync(dir).sort(), ["adapter_config.json", "adapter_model.safetensors"], label);
      assert.equal(readFileSync(join(dir, "adapter_model.safetensors")).length, 3000, label);
    }
  });

  test("a pax header's path is honoured", () => {
    const dir = extract([
      { name: "PaxHeader", type: "x", data: "30 path=task.json\n" },
      { name: "truncated-ustar-name", data: "{}" },
    ]);
    assert.deepEqual(readdirSync(dir), ["task.json"]);
  });

  test("absolute paths, .., links, nested folders, duplicates and empty archives are refused", () => {
    assertRefused([{ name: "../../etc/cron.d/x", data: "boom" }], /escapes the folder/);
    assertRefused([{ name: "a/../../x", data: "boom" }], /escapes the folder/);
    assertRefused([{ name: "/etc/passwd", data: "boom" }], /absolute path/);
    assertRefused([{ name: "adapter_config.json", type: "2", linkname: "/etc/passwd" }], /link/);
    assertRefused([{ name: "adapter_config.json", type: "1", linkname: "x" }], /link/);
    assertRefused(
      [
        { name: "a/b/adapter_config.json", data: "{}" },
        { name: "a/c.json", data: "{}" },
      ],
      /nested folder/,
    );
    assertRefused(
      [
        { name: "task.json", data: "{}" },
        { name: "./task.json", data: "{}" },
      ],
      /appears twice/,
    );
    assertRefused([{ name: "only-a-dir/", type: "5" }], /holds no files/);
  });

  test("a corrupt or truncated archive is refused with the byte it failed at", () => {
    const tar = makeTar([{ name: "task.json", data: "x".repeat(2000) }]);
    const corrupt = Buffer.from(tar);
    corrupt[3] = corrupt[3]! ^ 0xff;
    assertRefused(corrupt, /bad checksum/);
    assertRefused(tar.subarray(0, 1024), /truncated/);
    assertRefused(Buffer.from("definitely not a tar archive".repeat(40)), /checksum|octal/);
  });
});

describe("URLs", () => {
  test("only absolute http(s) URLs without credentials", () => {
    assert.equal(parseTaskUrl("https://models.example/x.tar").host, "models.example");
    for (const bad of ["relative/x.tar", "file:///etc/passwd", "ftp://h/x", "https://u:p@h/x.tar"])
      assert.throws(
        () => parseTaskUrl(bad),
        (e: TaskmuxError) => e.type === "invalid_request",
      );
  });

  test("the allow-list matches host names or host:port, case-insensitively", () => {
    const allow = ["Models.Example", "127.0.0.1:9000", "[::1]"];
    assert.ok(isHostAllowed(new URL("https://models.example/x"), allow));
    assert.ok(isHostAllowed(new URL("https://MODELS.example:8443/x"), allow));
    assert.ok(isHostAllowed(new URL("http://127.0.0.1:9000/x"), allow));
    assert.ok(!isHostAllowed(new URL("http://127.0.0.1:9001/x"), allow));
    assert.ok(isHostAllowed(new URL("http://[::1]:5/x"), allow));
    assert.ok(!isHostAllowed(new URL("https://models.example.evil.com/x"), allow));
    assert.ok(!isHostAllowed(new URL("https://models.example/x"), []));
  });
});

describe("download", () => {
  const body = makeTar([{ name: "task.json", data: "{}".padEnd(3000, " ") }]);
  let server: FileServer;
  before(async () => {
    server = await serveFiles({
      "/a.tar": body,
      "/moved": (_req, res) => res.writeHead(302, { Location: "/a.tar" }).end(),
    });
  });
  after(() => server.close());
  const options = { allowHosts: ["127.0.0.1"], maxBytes: 1 << 20 };
  const fetchTo = (path: string, sha = sha256Hex(body), maxBytes = options.maxBytes) =>
    download(new URL(server.origin + path), sha, join(work, `d${counter++}.tar`), { ...options, maxBytes });
  const rejectsWith = (p: Promise<unknown>, type: string, pattern: RegExp) =>
    assert.rejects(p, (e: TaskmuxError) => {
      assert.equal(e.type, type, e.message);
      assert.match(e.message, pattern);
      return true;
    });

  test("writes the body when the checksum matches (upper-case hex accepted)", async () => {
    await fetchTo("/a.tar", sha256Hex(body).toUpperCase());
  });

  test("refuses a checksum mismatch, naming both digests", async () => {
    await rejectsWith(
      fetchTo("/a.tar", "0".repeat(64)),
      "adapter_load_failed",
      /sha256 mismatch.*expected 0{64}, got [0-9a-f]{64}/,
    );
  });

  test("refuses bodies over the cap, announced or streamed", async () => {
    await rejectsWith(
      fetchTo("/a.tar", undefined, 1024),
      "payload_too_large",
      /larger than --adapter-url-max-mb/,
    );
    await rejectsWith(fetchTo("/a.tar?chunked", undefined, 1024), "payload_too_large", /larger/);
  });

  test("does not follow redirects and reports error statuses", async () => {
    await rejectsWith(fetchTo("/moved"), "invalid_request", /answered 302 \(redirects are not followed\)/);
    await rejectsWith(fetchTo("/missing.tar"), "invalid_request", /answered 404/);
  });
});
