/**
 * @module test/helpers/tar — write small ustar archives in memory (regular files, directories, links, pax
 * headers) for the URL-load tests, plus a loopback-only HTTP server that serves them.
 */
import { createHash } from "node:crypto";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

export interface TarInput {
  name: string;
  data?: Uint8Array | string;
  /** "0" file (default), "5" directory, "1" hard link, "2" symlink, "x" pax header */
  type?: "0" | "1" | "2" | "5" | "x";
  linkname?: string;
}

const BLOCK = 512;

function header(entry: TarInput, size: number): Buffer {
  const h = Buffer.alloc(BLOCK);
  const put = (text: string, offset: number, length: number) => h.write(text, offset, length, "utf8");
  put(entry.name, 0, 100);
  put("0000644\0", 100, 8);
  put("0000000\0", 108, 8);
  put("0000000\0", 116, 8);
  put(`${size.toString(8).padStart(11, "0")}\0`, 124, 12);
  put(
    `${Math.floor(Date.now() / 1000 - 3600)
      .toString(8)
      .padStart(11, "0")}\0`,
    136,
    12,
  );
  put("        ", 148, 8);
  put(entry.type ?? "0", 156, 1);
  put(entry.linkname ?? "", 157, 100);
  put("ustar\0", 257, 6);
  put("00", 263, 2);
  let sum = 0;
  for (const b of h) sum += b;
  put(`${sum.toString(8).padStart(6, "0")}\0 `, 148, 8);
  return h;
}

/** A tar archive of `entries`, ended by two zero blocks. */
export function makeTar(entries: TarInput[]): Buffer {
  const blocks: Buffer[] = [];
  for (const entry of entries) {
    const data = Buffer.from(entry.data ?? "");
    blocks.push(header(entry, data.length), data, Buffer.alloc((BLOCK - (data.length % BLOCK)) % BLOCK));
  }
  blocks.push(Buffer.alloc(2 * BLOCK));
  return Buffer.concat(blocks);
}

export const sha256Hex = (data: Uint8Array): string => createHash("sha256").update(data).digest("hex");

export interface FileServer {
  /** `http://127.0.0.1:<port>` */
  origin: string;
  /** Paths requested so far. */
  requests: string[];
  close(): Promise<void>;
}

/**
 * Serve `routes` (path → body, or a handler) on 127.0.0.1 only. Bodies are sent with Content-Length unless
 * the path ends in `?chunked`.
 */
export async function serveFiles(
  routes: Record<string, Uint8Array | ((req: IncomingMessage, res: ServerResponse) => void)>,
): Promise<FileServer> {
  const requests: string[] = [];
  const server = createServer((req, res) => {
    requests.push(req.url ?? "");
    const [path, query] = (req.url ?? "").split("?");
    const route = routes[path ?? ""];
    if (route === undefined) {
      res.writeHead(404).end("not found");
    } else if (typeof route === "function") {
      route(req, res);
    } else if (query === "chunked") {
      res.writeHead(200, { "Content-Type": "application/x-tar" });
      for (let i = 0; i < route.length; i += 4096) res.write(route.subarray(i, i + 4096));
      res.end();
    } else {
      res.writeHead(200, { "Content-Type": "application/x-tar", "Content-Length": route.length });
      res.end(route);
    }
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    origin: `http://127.0.0.1:${port}`,
    requests,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
