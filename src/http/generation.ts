/**
 * @module http/generation — runs one request's choices: every (prompt, choice) is one `service.generate`
 * call, started concurrently under one AbortController, so a client disconnect or one choice failing cancels
 * the siblings; their events are merged in arrival order.
 */
import { setMaxListeners } from "node:events";
import type { EngineEvent } from "../engine/events.ts";
import type { GenerationHandle, GenerationInput, GenerationService } from "../engine/service.ts";
import { TaskmuxError } from "../errors.ts";

export interface ChoiceEvent {
  /** Position in the inputs array (= the OpenAI choice `index`). */
  choice: number;
  event: EngineEvent;
}

export class GenerationRun {
  private readonly controller = new AbortController();

  constructor(
    private readonly service: GenerationService,
    private readonly inputs: readonly GenerationInput[],
    requestSignal: AbortSignal,
  ) {
    // Each choice's sequence listens on the shared signal; n may exceed Node's default of 10 listeners.
    setMaxListeners(inputs.length + 10, this.controller.signal);
    if (requestSignal.aborted) this.cancel();
    else requestSignal.addEventListener("abort", () => this.cancel(), { once: true });
  }

  /** The signal every generate call got; aborted on cancel (client gone, sibling failed). */
  get signal(): AbortSignal {
    return this.controller.signal;
  }

  cancel(): void {
    if (!this.controller.signal.aborted) this.controller.abort();
  }

  /** Starts every choice; if any start fails, cancels those that started and throws the first failure. */
  async start(): Promise<GenerationHandle[]> {
    const settled = await Promise.allSettled(
      this.inputs.map((input) => this.service.generate(input, this.controller.signal)),
    );
    const failed = settled.find((s): s is PromiseRejectedResult => s.status === "rejected");
    if (failed) {
      this.cancel();
      throw failed.reason;
    }
    return settled.map((s) => (s as PromiseFulfilledResult<GenerationHandle>).value);
  }

  /** All choices' events in arrival order; an error event cancels the siblings before it is yielded. */
  async *events(handles: readonly GenerationHandle[]): AsyncGenerator<ChoiceEvent> {
    const queue = new ChoiceQueue();
    handles.forEach((handle, choice) => void pump(handle.events, choice, queue));
    let numOpen = handles.length;
    try {
      while (numOpen > 0) {
        const item = await queue.next();
        if (item.event.type === "error") this.cancel();
        if (item.event.type === "error" || item.event.type === "finished") numOpen--;
        yield item;
      }
    } finally {
      if (numOpen > 0) this.cancel();
    }
  }
}

async function pump(events: AsyncIterable<EngineEvent>, choice: number, queue: ChoiceQueue): Promise<void> {
  try {
    for await (const event of events) {
      queue.push({ choice, event });
      if (event.type === "finished" || event.type === "error") return;
    }
    throw new Error("the event stream ended without a finished or error event");
  } catch (error) {
    const failure =
      error instanceof TaskmuxError
        ? error
        : new TaskmuxError("internal", "generation failed", { cause: error });
    queue.push({
      choice,
      event: { type: "error", error: failure, usage: { promptTokens: 0, completionTokens: 0 } },
    });
  }
}

/** Unbounded multi-producer, single-consumer queue. */
class ChoiceQueue {
  private readonly buffer: ChoiceEvent[] = [];
  private wake: (() => void) | null = null;

  push(item: ChoiceEvent): void {
    this.buffer.push(item);
    this.wake?.();
    this.wake = null;
  }

  async next(): Promise<ChoiceEvent> {
    while (this.buffer.length === 0) {
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
    }
    return this.buffer.shift()!;
  }
}
