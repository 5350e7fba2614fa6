/**
 * @module adapters/remote-fetch — load a task from a URL. The URL must name an allow-listed host; it is fetched
 * with undici (no redirects followed, at most `maxBytes`, its sha256 checked) and must hold a plain tar
 * archive (ustar, pax headers allowed) of the task folder's files — at the top level or in one top-level
 * folder. A small reader extracts it, refusing absolute paths, `..`, links, devices and nested folders; then
 * TaskStore.install validates the folder and renames it into place as `<root>/<name>/`.
 */
import { createHash, randomBytes } from "node:crypto";
import { closeSync, fstatSync, mkdirSync, openSync, readSync, rmSync, writeSync } from "node:fs";
import { join } from "node:path";
import { request } from "undici";
import { TaskmuxError } from "../errors.ts";
import { createLogger } from "../log.ts";
import type { TaskRef } from "./registry.ts";
import type { TaskStore } from "./task-store.ts";

const log = createLogger({ module: "remote-fetch" });

export interface RemoteFetchOptions {
  /** Host names (or host:port) URLs may name; empty = URL loads are disabled. */
  allowHosts: readonly string[];
  maxBytes: number;
  /** Headers and idle-body timeout (default 30 s). */
  timeoutMs?: number;
}

export interface UrlSource {
  url: string;
  /** Lower- or upper-case hex digest of the whole archive. */
  sha256: string;
}

/** Stop reading a response body (destroying it emits an abort error nobody else listens for). */
const discard = (body: NodeJS.ReadableStream & { destroy(): unknown }) => {
  body.on("error", () => {});
  body.destroy();
};
const badUrl = (message: string) => new TaskmuxError("invalid_request", message, { param: "url" });
const badArchive = (message: string) => new TaskmuxError("adapter_load_failed", `task archive: ${message}`);

/** An absolute http(s) URL without credentials, or a 400. */
export function parseTaskUrl(raw: string): URL {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw badUrl(`url ${JSON.stringify(raw.slice(0, 200))} is not an absolute URL`);
  }
  if (url.protocol !== "https:" && url.protocol !== "http:")
    throw badUrl(`url must be http or https (got ${url.protocol})`);
  if (url.username || url.password) throw badUrl("url must not carry credentials");
  return url;
}

/** The host (name, or name:port) is on the allow-list; compared case-insensitively, IPv6 without brackets. */
export function isHostAllowed(url: URL, allowHosts: readonly string[]): boolean {
  const bare = (h: string) => h.toLowerCase().replace(/^\[(.*)\]$/, "$1");
  const hostname = bare(url.hostname);
  const host = url.port ? `${hostname}:${url.port}` : hostname;
  return allowHosts.some((entry) => [hostname, host].includes(bare(entry.trim())));
}

/**
 * Download `source` into a staging folder in the task's root, extract it, validate it and move it into
 * place; returns the published version. The staging folder (a name starting with ".") is always removed.
 */
export async function installFromUrl(
  store: TaskStore,
  name: string,
  source: UrlSource,
  options: RemoteFetchOptions,
): Promise<TaskRef> {
  const url = parseTaskUrl(source.url);
  if (!isHostAllowed(url, options.allowHosts)) throw badUrl(`host ${url.host} is not allow-listed`);
  const root = store.installRoot(name);
  const staging = join(root, `.incoming-${name}-${randomBytes(6).toString("hex")}`);
  mkdirSync(staging, { recursive: true });
  try {
    const archive = join(staging, "archive.tar");
    await download(url, source.sha256, archive, options);
    const folder = join(staging, name);
    mkdirSync(folder);
    const files = extractTar(archive, folder);
    rmSync(archive);
    log.info("task archive fetched", { task: name, url: url.href, files });
    return store.install(name, folder, root);
  } finally {
    rmSync(staging, { recursive: true, force: true });
  }
}

/** GET `url` into `file`: 2xx only, at most maxBytes (413), sha256 must match (422). */
export async function download(
  url: URL,
  sha256: string,
  file: string,
  options: RemoteFetchOptions,
): Promise<void> {
  const limitMiB = (options.maxBytes / 2 ** 20).toFixed(0);
  const tooLarge = () =>
    new TaskmuxError(
      "payload_too_large",
      `the archive at ${url.href} is larger than --adapter-url-max-mb (${limitMiB} MiB)`,
    );
  const timeoutMs = options.timeoutMs ?? 30_000;
  let response: Awaited<ReturnType<typeof request>>;
  try {
    response = await request(url, { method: "GET", headersTimeout: timeoutMs, bodyTimeout: timeoutMs });
  } catch (error) {
    throw badUrl(`could not fetch ${url.href}: ${(error as Error).message}`);
  }
  const { statusCode, headers, body } = response;
  if (statusCode < 200 || statusCode >= 300) {
    discard(body);
    const redirect = statusCode >= 300 && statusCode < 400 ? " (redirects are not followed)" : "";
    throw badUrl(`GET ${url.href} answered ${statusCode}${redirect}`);
  }
  if (Number(headers["content-length"] ?? 0) > options.maxBytes) {
    discard(body);
    throw tooLarge();
  }
  const hash = createHash("sha256");
  const fd = openSync(file, "wx", 0o600);
  let numBytes = 0;
  try {
    for await (const chunk of body) {
      numBytes += (chunk as Buffer).length;
      if (numBytes > options.maxBytes) {
        discard(body);
        throw tooLarge();
      }
      hash.update(chunk as Buffer);
      writeSync(fd, chunk as Buffer);
    }
  } catch (error) {
    if (error instanceof TaskmuxError) throw error;
    throw badUrl(`could not fetch ${url.href}: ${(error as Error).message}`);
  } finally {
    closeSync(fd);
  }
  const actual = hash.digest("hex");
  if (actual !== sha256.toLowerCase()) {
    throw new TaskmuxError(
      "adapter_load_failed",
      `sha256 mismatch for ${url.href}: expected ${sha256.toLowerCase()}, got ${actual}`,
      { param: "sha256" },
    );
  }
}

interface TarEntry {
  path: string;
  isDirectory: boolean;
  offset: number;
  sizeBytes: number;
}

const MAX_ENTRIES = 1024;
const BLOCK = 512;

const field = (h: Buffer, start: number, length: number): string => {
  const raw = h.subarray(start, start + length);
  const end = raw.indexOf(0);
  return raw.subarray(0, end < 0 ? length : end).toString("utf8");
};

function octal(h: Buffer, start: number, length: number, what: string): number {
  if ((h[start]! & 0x80) !== 0) throw badArchive(`${what} uses base-256 encoding (too large)`);
  const text = field(h, start, length).trim();
  if (!/^[0-7]*$/.test(text)) throw badArchive(`${what} is not an octal number (${JSON.stringify(text)})`);
  return text === "" ? 0 : Number.parseInt(text, 8);
}

/** pax extended header records `"<len> key=value\n"`; only `path` and `size` matter here. */
function parsePax(data: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of data.toString("utf8").split("\n")) {
    const match = /^\d+ ([^=]+)=(.*)$/s.exec(line);
    if (match) out[match[1]!] = match[2]!;
  }
  return out;
}

/** Every header of the archive at fd; throws on a bad checksum, truncation, links or special files. */
function readEntries(fd: number, fileSize: number): TarEntry[] {
  const h = Buffer.alloc(BLOCK);
  const entries: TarEntry[] = [];
  let pax: Record<string, string> = {};
  for (let pos = 0; pos + BLOCK <= fileSize; ) {
    readSync(fd, h, 0, BLOCK, pos);
    if (h.every((b) => b === 0)) break;
    let sum = 0;
    for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : h[i]!;
    if (sum !== octal(h, 148, 8, "header checksum"))
      throw badArchive(`header at byte ${pos} has a bad checksum (not a tar file?)`);
    // POSIX ustar ("ustar\0") has a name prefix at 345; GNU's "ustar  " keeps other fields there.
    const prefix = field(h, 257, 6) === "ustar" ? field(h, 345, 155) : "";
    const name = prefix ? `${prefix}/${field(h, 0, 100)}` : field(h, 0, 100);
    const path = pax.path ?? name;
    const sizeBytes = pax.size !== undefined ? Number(pax.size) : octal(h, 124, 12, `size of ${name}`);
    const type = h[156] === 0 ? "0" : String.fromCharCode(h[156]!);
    const offset = pos + BLOCK;
    if (!Number.isSafeInteger(sizeBytes) || offset + sizeBytes > fileSize)
      throw badArchive(`entry ${JSON.stringify(path)} is truncated`);
    pos = offset + Math.ceil(sizeBytes / BLOCK) * BLOCK;
    if (type === "x") {
      const data = Buffer.alloc(sizeBytes);
      readSync(fd, data, 0, sizeBytes, offset);
      pax = parsePax(data);
      continue;
    }
    pax = {};
    if (type === "g") continue;
    if (type === "1" || type === "2")
      throw badArchive(`entry ${JSON.stringify(path)} is a link; links are refused`);
    if (type === "L" || type === "K")
      throw badArchive(
        `entry ${JSON.stringify(path)} uses a GNU long-name header; write the archive as ustar or pax`,
      );
    if (type !== "0" && type !== "7" && type !== "5")
      throw badArchive(`entry ${JSON.stringify(path)} has unsupported type '${type}' (plain files only)`);
    entries.push({ path, isDirectory: type === "5", offset, sizeBytes });
    if (entries.length > MAX_ENTRIES) throw badArchive(`more than ${MAX_ENTRIES} entries`);
  }
  return entries;
}

/** An entry's path as segments; absolute paths and `..` are refused. */
function segmentsOf(path: string): string[] {
  if (path.startsWith("/") || path.includes("\\") || /^[A-Za-z]:/.test(path))
    throw badArchive(`entry ${JSON.stringify(path)} is an absolute path`);
  const segments = path.split("/").filter((s) => s !== "" && s !== ".");
  if (segments.includes("..")) throw badArchive(`entry ${JSON.stringify(path)} escapes the folder (..)`);
  return segments;
}

/** The file name each file entry is written as: one top-level folder is stripped; dot-files are skipped. */
function flatNames(entries: TarEntry[]): Map<string, TarEntry> {
  const files = entries.filter((e) => !e.isDirectory).map((e) => ({ e, segs: segmentsOf(e.path) }));
  for (const e of entries.filter((x) => x.isDirectory)) segmentsOf(e.path);
  const first = files[0]?.segs[0];
  const strip = files.length > 0 && files.every((f) => f.segs.length >= 2 && f.segs[0] === first);
  const out = new Map<string, TarEntry>();
  for (const { e, segs } of files) {
    const rest = strip ? segs.slice(1) : segs;
    if (rest.length !== 1)
      throw badArchive(`entry ${JSON.stringify(e.path)} is in a nested folder; a task folder is flat`);
    if (rest[0]!.startsWith(".")) continue;
    if (out.has(rest[0]!)) throw badArchive(`entry ${JSON.stringify(rest[0])} appears twice`);
    out.set(rest[0]!, e);
  }
  if (out.size === 0) throw badArchive("holds no files");
  return out;
}

/** Extract the tar at `file` into the existing empty folder `into`; returns the file names written. */
export function extractTar(file: string, into: string): string[] {
  const fd = openSync(file, "r");
  try {
    const files = flatNames(readEntries(fd, fstatSync(fd).size));
    const buffer = Buffer.alloc(1 << 20);
    for (const [name, entry] of files) {
      const out = openSync(join(into, name), "wx", 0o644);
      try {
        for (let done = 0; done < entry.sizeBytes; ) {
          const n = readSync(
            fd,
            buffer,
            0,
            Math.min(buffer.length, entry.sizeBytes - done),
            entry.offset + done,
          );
          if (n <= 0) throw badArchive(`entry ${JSON.stringify(entry.path)} is truncated`);
          writeSync(out, buffer, 0, n);
          done += n;
        }
      } finally {
        closeSync(out);
      }
    }
    return [...files.keys()];
  } finally {
    closeSync(fd);
  }
}
