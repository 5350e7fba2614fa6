/**
 * @module engine/tasks — the TaskProvider the generation service uses: resolves a task name to its serving
 * version (loading it on demand from the task roots), renders the prompt with the task's template and soft
 * prompt, pins pool slots for its PEFT weights, and hands back a release that undoes all of it.
 */

import type { TaskRef, TaskRegistry } from "../adapters/registry.ts";
import type { AdapterResidency } from "../adapters/residency.ts";
import type { TaskStore } from "../adapters/task-store.ts";
import { TaskmuxError } from "../errors.ts";
import type { AdapterPoolKind } from "../model/contract.ts";
import type { ModelSpec } from "../model/model-spec.ts";
import type { PreparedTask, TaskProvider } from "./generation-service.ts";
import { type PromptTokenizer, renderTaskPrompt } from "./prompt.ts";
import type { GenerationParams, SequenceAdapters } from "./sequence.ts";
import type { PromptInput, TaskSummary } from "./service.ts";

export class RegistryTaskProvider implements TaskProvider {
  constructor(
    private readonly registry: TaskRegistry,
    private readonly store: TaskStore,
    private readonly residency: AdapterResidency,
    private readonly tokenizer: PromptTokenizer,
    private readonly spec: ModelSpec,
  ) {
    registry.onFree = (ref) => residency.forget(ref.id);
  }

  get maxResidentAdapters(): number {
    return this.residency.capacity("lora");
  }

  has(name: string): boolean {
    return (
      this.registry.has(name) ||
      (this.store.locate(name) !== null && this.store.tombstoneOf(name) === undefined)
    );
  }

  list(): TaskSummary[] {
    return this.registry
      .list()
      .filter((t) => t.status === "ready" && t.version !== null)
      .map((t) => ({
        name: t.name,
        kinds: [...t.kinds],
        createdAt: Math.floor((t.loadedAt ?? 0) / 1000),
        version: t.version!,
      }));
  }

  residentAdapters(): string[] {
    return this.residency.residentNames();
  }

  private async acquire(name: string): Promise<TaskRef> {
    this.store.touch(name);
    const ref = this.registry.acquire(name);
    if (ref) return ref;
    await this.store.loadOnDemand(name);
    const loaded = this.registry.acquire(name);
    if (!loaded)
      throw new TaskmuxError("task_not_found", `task ${JSON.stringify(name)} does not exist`, {
        param: "X-Task",
      });
    return loaded;
  }

  async prepare(
    name: string,
    prompt: PromptInput,
    fields: Record<string, string>,
    promptBudget: number,
  ): Promise<PreparedTask> {
    const ref = await this.acquire(name);
    const pinned: AdapterPoolKind[] = [];
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      for (const kind of pinned) this.residency.release(kind, ref.id);
      this.registry.release(ref);
    };
    try {
      const { parts } = ref;
      const prefixLength = parts.prefix?.length ?? 0;
      const promptTokens = renderTaskPrompt(this.tokenizer, parts.definition ?? null, prompt, fields, {
        vocabSize: this.spec.vocabSize,
        numVirtualTokens: parts.softPrompt?.numVirtualTokens ?? 0,
        maxPromptTokens: Math.min(promptBudget, this.spec.maxPositionEmbeddings - 1) - prefixLength,
      });
      const adapters: SequenceAdapters = {
        loraSlot: 0,
        ia3Slot: 0,
        bottleneckSlot: 0,
        virtualTable: parts.softPrompt?.rows,
      };
      const pin = async (
        kind: AdapterPoolKind,
        weights: () => import("../model/contract.ts").SequenceAdapterWeights,
      ) => {
        const slot = await this.residency.acquire(kind, ref.id, name, weights);
        pinned.push(kind);
        return slot;
      };
      if (parts.lora) adapters.loraSlot = await pin("lora", () => ({ lora: parts.lora!.modules }));
      if (parts.ia3) adapters.ia3Slot = await pin("ia3", () => ({ ia3: parts.ia3! }));
      if (parts.bottleneck)
        adapters.bottleneckSlot = await pin("bottleneck", () => ({ bottleneck: parts.bottleneck!.modules }));
      return { promptTokens, adapters, defaults: taskDefaults(ref), prefix: parts.prefix, release };
    } catch (error) {
      release();
      throw error;
    }
  }
}

/** task.json defaults are already parsed into the engine's names (only the fields the file set). */
function taskDefaults(ref: TaskRef): Partial<GenerationParams> {
  return { ...ref.parts.definition?.defaults };
}
