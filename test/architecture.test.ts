/**
 * Enforces the layering of style.md "Dependency rules" by reading every import under src/:
 *   main -> http -> engine -> model; engine -> adapters -> model/contract; config, errors, log <- everyone.
 * Each violation is reported as "<file> imports <specifier>".
 */
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve, sep } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import ts from "typescript";

const REPO = fileURLToPath(new URL("..", import.meta.url));

/** One dependency edge: `from` and a resolved `target` are repo-relative posix paths; packages stay bare. */
interface ImportEdge {
  from: string;
  specifier: string;
  /** `src/...` path for relative imports, the package name (`hono`, `hono/route`) otherwise. */
  target: string;
  isTypeOnly: boolean;
}

const toPosix = (path: string) => path.split(sep).join("/");

function listTsFiles(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return listTsFiles(path);
    return entry.isFile() && entry.name.endsWith(".ts") ? [path] : [];
  });
}

/** Every static, re-export, dynamic, `import("…")` type and `new URL("…", import.meta.url)` edge of one file. */
function importsOf(from: string, text: string): ImportEdge[] {
  const source = ts.createSourceFile(from, text, ts.ScriptTarget.Latest, false, ts.ScriptKind.TS);
  const edges: ImportEdge[] = [];
  const add = (specifier: string, isTypeOnly: boolean) => {
    const target = specifier.startsWith(".")
      ? toPosix(relative(REPO, resolve(REPO, dirname(from), specifier)))
      : specifier;
    edges.push({ from, specifier, target, isTypeOnly });
  };
  const visit = (node: ts.Node) => {
    if (ts.isImportDeclaration(node) && ts.isStringLiteral(node.moduleSpecifier)) {
      const clause = node.importClause;
      const named = clause?.namedBindings;
      const allNamedAreTypes =
        named !== undefined && ts.isNamedImports(named) && named.elements.every((e) => e.isTypeOnly);
      add(node.moduleSpecifier.text, !!clause && (clause.isTypeOnly || (!clause.name && allNamedAreTypes)));
    } else if (
      ts.isExportDeclaration(node) &&
      node.moduleSpecifier &&
      ts.isStringLiteral(node.moduleSpecifier)
    ) {
      const clause = node.exportClause;
      const allTypes = !!clause && ts.isNamedExports(clause) && clause.elements.every((e) => e.isTypeOnly);
      add(node.moduleSpecifier.text, node.isTypeOnly || allTypes);
    } else if (
      ts.isCallExpression(node) &&
      node.expression.kind === ts.SyntaxKind.ImportKeyword &&
      node.arguments[0] &&
      ts.isStringLiteral(node.arguments[0])
    ) {
      add(node.arguments[0].text, false);
    } else if (
      ts.isImportTypeNode(node) &&
      ts.isLiteralTypeNode(node.argument) &&
      ts.isStringLiteral(node.argument.literal)
    ) {
      add(node.argument.literal.text, true);
    } else if (
      ts.isNewExpression(node) &&
      ts.isIdentifier(node.expression) &&
      node.expression.text === "URL" &&
      node.arguments?.length === 2 &&
      ts.isStringLiteral(node.arguments[0]!) &&
      node.arguments[1]!.getText(source) === "import.meta.url" &&
      /\.[cm]?[jt]s$/.test(node.arguments[0].text)
    ) {
      add(node.arguments[0].text, false); // a worker entry point is a runtime dependency
    }
    ts.forEachChild(node, visit);
  };
  visit(source);
  return edges;
}

function scanSrc(): ImportEdge[] {
  return listTsFiles(join(REPO, "src")).flatMap((file) => {
    const from = toPosix(relative(REPO, file));
    return importsOf(from, readFileSync(file, "utf8"));
  });
}

const under = (path: string, folder: string) => path.startsWith(`${folder}/`);
const isSrc = (target: string) => target === "src" || under(target, "src");
const isPackage = (target: string, name: string) => target === name || target.startsWith(`${name}/`);
const isHono = (target: string) => isPackage(target, "hono") || target.startsWith("@hono/");

interface Rule {
  name: string;
  appliesTo: (file: string) => boolean;
  forbids: (edge: ImportEdge) => boolean;
}

const CONFIG_FREE_HELPERS = ["src/errors.ts", "src/log.ts"];

const RULES: Rule[] = [
  {
    name: "src/model imports nothing from src/engine, src/http or src/adapters",
    appliesTo: (f) => under(f, "src/model"),
    forbids: (e) => ["src/engine", "src/http", "src/adapters"].some((folder) => under(e.target, folder)),
  },
  {
    // Adapter files are safetensors files validated against the base model's shape, so the format readers
    // may use the safetensors reader and the ModelSpec type; nothing else of src/model, and nothing above.
    name: "src/adapters imports from src/ only itself, model/{contract,model-spec,safetensors}.ts, errors.ts and log.ts",
    appliesTo: (f) => under(f, "src/adapters"),
    forbids: (e) =>
      isSrc(e.target) &&
      !under(e.target, "src/adapters") &&
      !["src/model/contract.ts", "src/model/safetensors.ts", ...CONFIG_FREE_HELPERS].includes(e.target) &&
      !(e.target === "src/model/model-spec.ts" && e.isTypeOnly),
  },
  {
    name: "src/engine never imports src/http or hono",
    appliesTo: (f) => under(f, "src/engine"),
    forbids: (e) => under(e.target, "src/http") || isHono(e.target),
  },
  {
    name: "src/http never imports src/model or onnxruntime-node",
    appliesTo: (f) => under(f, "src/http"),
    forbids: (e) => under(e.target, "src/model") || isPackage(e.target, "onnxruntime-node"),
  },
  {
    name: "only src/model/session.ts imports onnxruntime-node",
    appliesTo: (f) => f !== "src/model/session.ts",
    forbids: (e) => isPackage(e.target, "onnxruntime-node"),
  },
  {
    name: "src/errors.ts, src/log.ts and src/config.ts import nothing from src/",
    appliesTo: (f) => ["src/errors.ts", "src/log.ts", "src/config.ts"].includes(f),
    forbids: (e) => isSrc(e.target),
  },
];

/** "<file> imports <specifier>" for every edge a rule forbids. */
function violations(rule: Rule, edges: readonly ImportEdge[]): string[] {
  return edges
    .filter((e) => rule.appliesTo(e.from) && rule.forbids(e))
    .map((e) => `${e.from} imports ${e.specifier}${e.isTypeOnly ? " (type-only)" : ""}`);
}

const EDGES = scanSrc();

test("the scanner finds every kind of import, resolves relative paths and marks type-only ones", () => {
  const text = [
    'import { a } from "./a.ts";',
    'import type { B } from "../model/b.ts";',
    'import { type C, type D } from "../engine/c.ts";',
    'import E, { type F } from "./e.ts";',
    'import * as ort from "onnxruntime-node";',
    'import "./side-effect.ts";',
    'export { g } from "./g.ts";',
    'export type { H } from "./h.ts";',
    'const lazy = await import("../http/app.ts");',
    'let t: import("../model/contract.ts").StepBatch;',
    'new Worker(new URL("./worker.ts", import.meta.url));',
    '// import { nope } from "./commented.ts";',
    "const s = \"import x from './in-a-string.ts'\";",
  ].join("\n");
  const edges = importsOf("src/adapters/x.ts", text).map((e) => [e.target, e.isTypeOnly]);
  assert.deepEqual(edges, [
    ["src/adapters/a.ts", false],
    ["src/model/b.ts", true],
    ["src/engine/c.ts", true],
    ["src/adapters/e.ts", false],
    ["onnxruntime-node", false],
    ["src/adapters/side-effect.ts", false],
    ["src/adapters/g.ts", false],
    ["src/adapters/h.ts", true],
    ["src/http/app.ts", false],
    ["src/model/contract.ts", true],
    ["src/adapters/worker.ts", false],
  ]);
});

test("each rule reports a back-edge and accepts the edges the layering allows", () => {
  const edge = (from: string, target: string): ImportEdge => ({
    from,
    specifier: target,
    target,
    isTypeOnly: false,
  });
  const cases: { from: string; target: string; rule: number | null }[] = [
    { from: "src/model/runner.ts", target: "src/engine/engine.ts", rule: 0 },
    { from: "src/model/builder/graph.ts", target: "src/adapters/registry.ts", rule: 0 },
    { from: "src/model/runner.ts", target: "src/errors.ts", rule: null },
    { from: "src/adapters/registry.ts", target: "src/model/contract.ts", rule: null },
    { from: "src/adapters/formats/lora.ts", target: "src/adapters/registry.ts", rule: null },
    { from: "src/adapters/registry.ts", target: "src/log.ts", rule: null },
    { from: "src/adapters/registry.ts", target: "src/model/session.ts", rule: 1 },
    { from: "src/adapters/registry.ts", target: "src/engine/engine.ts", rule: 1 },
    { from: "src/adapters/registry.ts", target: "src/config.ts", rule: 1 },
    { from: "src/engine/engine.ts", target: "src/model/runner.ts", rule: null },
    { from: "src/engine/engine.ts", target: "src/adapters/registry.ts", rule: null },
    { from: "src/engine/engine.ts", target: "src/http/app.ts", rule: 2 },
    { from: "src/engine/engine.ts", target: "hono/http-exception", rule: 2 },
    { from: "src/engine/engine.ts", target: "@hono/node-server", rule: 2 },
    { from: "src/http/app.ts", target: "src/engine/service.ts", rule: null },
    { from: "src/http/app.ts", target: "src/model/tokenizer.ts", rule: 3 },
    { from: "src/model/runner.ts", target: "onnxruntime-node", rule: 4 },
    { from: "src/model/session.ts", target: "onnxruntime-node", rule: null },
    { from: "src/log.ts", target: "src/config.ts", rule: 5 },
    { from: "src/main.ts", target: "src/model/load-model.ts", rule: null },
  ];
  for (const c of cases) {
    const fired = RULES.flatMap((rule, i) => (violations(rule, [edge(c.from, c.target)]).length ? [i] : []));
    // onnxruntime-node from src/http breaks two rules; every other case breaks at most one.
    assert.deepEqual(fired, c.rule === null ? [] : [c.rule], `${c.from} -> ${c.target}`);
  }
  assert.deepEqual(
    RULES.flatMap((rule, i) =>
      violations(rule, [edge("src/http/x.ts", "onnxruntime-node")]).length ? [i] : [],
    ),
    [3, 4],
  );
});

test("the scan sees the real source tree", () => {
  assert.ok(EDGES.length > 50, `only ${EDGES.length} imports found`);
  assert.ok(
    EDGES.some((e) => e.from === "src/model/session.ts" && e.target === "onnxruntime-node"),
    "session.ts -> onnxruntime-node not found",
  );
  assert.ok(
    EDGES.every((e) => !e.target.startsWith("..")),
    "a relative import resolved outside the repo",
  );
});

for (const rule of RULES) {
  test(`layering: ${rule.name}`, () => {
    assert.deepEqual(violations(rule, EDGES), []);
  });
}
