/** @module engine/stopping — stop strings over streamed text: hold back what may still become a stop, cut at one. */

export interface StopPush {
  /** Text that is safe to send: it can no longer be part of a stop string. */
  emit: string;
  /** A stop string completed; `emit` is the text before it and the stream is over. */
  stopped: boolean;
}

/**
 * Text arrives in chunks and a stop string may straddle them, so the matcher keeps back the longest tail that
 * is still a prefix of some stop string. On a match it cuts at the earliest stop in the text, so nothing sent
 * ever contains a stop, and (as OpenAI does) the stop string itself is not sent.
 */
export class StopStringMatcher {
  private readonly stops: string[];
  private held = "";
  private done = false;

  /** Empty strings are ignored: they would match before any text. */
  constructor(stops: readonly string[]) {
    this.stops = [...new Set(stops)].filter((s) => s.length > 0);
  }

  get stopped(): boolean {
    return this.done;
  }

  push(text: string): StopPush {
    if (this.done) return { emit: "", stopped: true };
    const buffer = this.held + text;
    const cut = this.earliestStop(buffer);
    if (cut !== -1) {
      this.done = true;
      this.held = "";
      return { emit: buffer.slice(0, cut), stopped: true };
    }
    const keep = this.longestPartialStop(buffer);
    this.held = buffer.slice(buffer.length - keep);
    return { emit: buffer.slice(0, buffer.length - keep), stopped: false };
  }

  /** Releases held-back text at the end of generation (it never completed a stop). */
  flush(): string {
    const rest = this.held;
    this.held = "";
    return rest;
  }

  private earliestStop(buffer: string): number {
    let best = -1;
    for (const stop of this.stops) {
      const at = buffer.indexOf(stop);
      if (at !== -1 && (best === -1 || at < best)) best = at;
    }
    return best;
  }

  /** Length of the longest suffix of `buffer` that is a proper prefix of a stop string. */
  private longestPartialStop(buffer: string): number {
    let longest = 0;
    for (const stop of this.stops) {
      for (let k = Math.min(stop.length - 1, buffer.length); k > longest; k--) {
        if (buffer.endsWith(stop.slice(0, k))) {
          longest = k;
          break;
        }
      }
    }
    return longest;
  }
}
