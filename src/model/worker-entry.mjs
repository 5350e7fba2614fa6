// Entry of the model worker thread. Node 20 does not run the parent's `--import tsx` hooks inside
// worker threads, so the worker registers tsx itself before loading the TypeScript module.
import { register } from "tsx/esm/api";

register();
await import("./worker.ts");
