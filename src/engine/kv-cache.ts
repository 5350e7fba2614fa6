/**
 * @module engine/kv-cache — KV memory accounting (the buffers themselves live in the model worker).
 * Policy: reserve. A sequence is admitted only when its whole budget (prompt + max_tokens, rounded up to the
 * store's allocation granularity) fits, so an admitted sequence never fails later for lack of KV memory.
 */

export interface KvBudgetOptions {
  /** Total bytes the KV cache may use. */
  capacityBytes: number;
  /** Bytes one token occupies across all layers (K and V). */
  bytesPerToken: number;
}

const GRANULE = 64;

export class KvCacheAccount {
  private readonly reserved = new Map<number, number>();
  private usedTokens = 0;
  readonly capacityTokens: number;

  constructor(private readonly options: KvBudgetOptions) {
    this.capacityTokens = Math.floor(options.capacityBytes / options.bytesPerToken);
  }

  /** Tokens a sequence of `maxTotalTokens` reserves: what the store may allocate for it at most. */
  static reservationFor(maxTotalTokens: number): number {
    return Math.max(GRANULE, 2 ** Math.ceil(Math.log2(Math.max(1, maxTotalTokens))));
  }

  canReserve(maxTotalTokens: number): boolean {
    return this.usedTokens + KvCacheAccount.reservationFor(maxTotalTokens) <= this.capacityTokens;
  }

  /** True if a sequence this long could ever be admitted (otherwise it must be refused, not queued). */
  fitsAtAll(maxTotalTokens: number): boolean {
    return KvCacheAccount.reservationFor(maxTotalTokens) <= this.capacityTokens;
  }

  reserve(seqId: number, maxTotalTokens: number): void {
    if (this.reserved.has(seqId)) return;
    const tokens = KvCacheAccount.reservationFor(maxTotalTokens);
    this.reserved.set(seqId, tokens);
    this.usedTokens += tokens;
  }

  release(seqId: number): void {
    const tokens = this.reserved.get(seqId);
    if (tokens === undefined) return;
    this.reserved.delete(seqId);
    this.usedTokens -= tokens;
  }

  get usedBytes(): number {
    return this.usedTokens * this.options.bytesPerToken;
  }

  get usageFraction(): number {
    return this.capacityTokens === 0 ? 0 : this.usedTokens / this.capacityTokens;
  }

  get numSequences(): number {
    return this.reserved.size;
  }
}
