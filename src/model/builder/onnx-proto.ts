/**
 * @module model/builder/onnx-proto — a minimal protobuf writer for the ~10 ONNX messages the builder emits.
 * Hand-rolled (ort-facts §0): weights go to an external-data file, so the proto itself stays small.
 */

export const DataType = { FLOAT: 1, UINT8: 2, INT8: 3, INT32: 6, INT64: 7, BOOL: 9, FLOAT16: 10 } as const;
export type DataTypeCode = (typeof DataType)[keyof typeof DataType];

const AttributeType = { FLOAT: 1, INT: 2, STRING: 3, TENSOR: 4, GRAPH: 5, FLOATS: 6, INTS: 7 } as const;

export type AttributeValue =
  | number
  | bigint
  | string
  | number[]
  | { float: number }
  | { floats: number[] }
  /** a subgraph (If branches) */
  | { graph: GraphSpec };

export interface TensorSpec {
  name: string;
  dataType: DataTypeCode;
  dims: number[];
  /** Embedded bytes (small constants). */
  raw?: Uint8Array;
  /** External data reference (weights). */
  external?: { location: string; offset: number; length: number };
}

export interface NodeSpec {
  opType: string;
  inputs: string[];
  outputs: string[];
  name: string;
  domain?: string;
  attributes?: Record<string, AttributeValue>;
}

export interface ValueInfoSpec {
  name: string;
  dataType: DataTypeCode;
  /** number = fixed size, string = symbolic dimension; null = shape left unknown (subgraph outputs) */
  dims: (number | string)[] | null;
}

export interface GraphSpec {
  name: string;
  nodes: NodeSpec[];
  initializers: TensorSpec[];
  inputs: ValueInfoSpec[];
  outputs: ValueInfoSpec[];
}

export interface ModelSpecProto {
  irVersion: number;
  opsets: { domain: string; version: number }[];
  producerName: string;
  graph: GraphSpec;
}

/** Accumulates one message's bytes; nested messages are encoded first and written length-delimited. */
class Writer {
  private chunks: Uint8Array[] = [];
  private current: number[] = [];
  length = 0;

  private flushCurrent() {
    if (this.current.length) {
      this.chunks.push(Uint8Array.from(this.current));
      this.current = [];
    }
  }

  private varint(value: number | bigint) {
    let v = BigInt.asUintN(64, BigInt(value));
    while (v >= 0x80n) {
      this.current.push(Number(v & 0x7fn) | 0x80);
      this.length++;
      v >>= 7n;
    }
    this.current.push(Number(v));
    this.length++;
  }

  private tag(field: number, wireType: number) {
    this.varint((field << 3) | wireType);
  }

  int(field: number, value: number | bigint) {
    this.tag(field, 0);
    this.varint(value);
  }

  float(field: number, value: number) {
    this.tag(field, 5);
    const b = new Uint8Array(4);
    new DataView(b.buffer).setFloat32(0, value, true);
    this.bytes(-1, b);
  }

  /** field -1 writes raw bytes without tag/length (internal use). */
  bytes(field: number, data: Uint8Array) {
    if (field >= 0) {
      this.tag(field, 2);
      this.varint(data.length);
    }
    this.flushCurrent();
    this.chunks.push(data);
    this.length += data.length;
  }

  string(field: number, value: string) {
    this.bytes(field, new TextEncoder().encode(value));
  }

  message(field: number, build: (w: Writer) => void) {
    const child = new Writer();
    build(child);
    this.bytes(field, child.finish());
  }

  packedInts(field: number, values: (number | bigint)[]) {
    const child = new Writer();
    for (const v of values) child.varint(v);
    this.bytes(field, child.finish());
  }

  finish(): Uint8Array {
    this.flushCurrent();
    const out = new Uint8Array(this.length);
    let pos = 0;
    for (const c of this.chunks) {
      out.set(c, pos);
      pos += c.length;
    }
    return out;
  }
}

function writeTensor(w: Writer, t: TensorSpec) {
  w.packedInts(1, t.dims);
  w.int(2, t.dataType);
  w.string(8, t.name);
  if (t.raw) w.bytes(9, t.raw);
  if (t.external) {
    const entries: [string, string][] = [
      ["location", t.external.location],
      ["offset", String(t.external.offset)],
      ["length", String(t.external.length)],
    ];
    for (const [key, value] of entries) {
      w.message(13, (e) => {
        e.string(1, key);
        e.string(2, value);
      });
    }
    w.int(14, 1); // data_location = EXTERNAL
  }
}

function writeAttribute(w: Writer, name: string, value: AttributeValue) {
  w.string(1, name);
  if (typeof value === "string") {
    w.bytes(4, new TextEncoder().encode(value));
    w.int(20, AttributeType.STRING);
  } else if (typeof value === "number" || typeof value === "bigint") {
    w.int(3, value);
    w.int(20, AttributeType.INT);
  } else if (Array.isArray(value)) {
    w.packedInts(8, value);
    w.int(20, AttributeType.INTS);
  } else if ("graph" in value) {
    w.message(6, (g) => writeGraph(g, value.graph));
    w.int(20, AttributeType.GRAPH);
  } else if ("float" in value) {
    w.float(2, value.float);
    w.int(20, AttributeType.FLOAT);
  } else {
    const child = new Writer();
    for (const f of value.floats) {
      const b = new Uint8Array(4);
      new DataView(b.buffer).setFloat32(0, f, true);
      child.bytes(-1, b);
    }
    w.bytes(7, child.finish());
    w.int(20, AttributeType.FLOATS);
  }
}

function writeValueInfo(w: Writer, v: ValueInfoSpec) {
  w.string(1, v.name);
  w.message(2, (type) =>
    type.message(1, (tensor) => {
      tensor.int(1, v.dataType);
      const dims = v.dims;
      if (dims)
        tensor.message(2, (shape) => {
          for (const d of dims) {
            shape.message(1, (dim) => (typeof d === "number" ? dim.int(1, d) : dim.string(2, d)));
          }
        });
    }),
  );
}

function writeNode(w: Writer, n: NodeSpec) {
  for (const i of n.inputs) w.string(1, i);
  for (const o of n.outputs) w.string(2, o);
  w.string(3, n.name);
  w.string(4, n.opType);
  for (const [name, value] of Object.entries(n.attributes ?? {}))
    w.message(5, (a) => writeAttribute(a, name, value));
  if (n.domain) w.string(7, n.domain);
}

function writeGraph(g: Writer, graph: GraphSpec) {
  for (const n of graph.nodes) g.message(1, (m) => writeNode(m, n));
  g.string(2, graph.name);
  for (const t of graph.initializers) g.message(5, (m) => writeTensor(m, t));
  for (const v of graph.inputs) g.message(11, (m) => writeValueInfo(m, v));
  for (const v of graph.outputs) g.message(12, (m) => writeValueInfo(m, v));
}

export function encodeModel(model: ModelSpecProto): Uint8Array {
  const w = new Writer();
  w.int(1, model.irVersion);
  w.string(2, model.producerName);
  w.message(7, (g) => writeGraph(g, model.graph));
  for (const o of model.opsets) {
    w.message(8, (m) => {
      m.string(1, o.domain);
      m.int(2, o.version);
    });
  }
  return w.finish();
}
