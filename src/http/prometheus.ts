/**
 * @module http/prometheus — a hand-written Prometheus text exposition (format 0.0.4) writer: HELP/TYPE lines,
 * escaped labels, cumulative histograms with `le` buckets, `_sum` and `_count`.
 */
import type { Histogram } from "../engine/stats.ts";

export const PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";

export type Labels = Record<string, string>;
export type Sample = [labels: Labels, value: number];

const escapeLabel = (value: string): string =>
  value.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"');
const escapeHelp = (value: string): string => value.replace(/\\/g, "\\\\").replace(/\n/g, "\\n");

function formatLabels(labels: Labels): string {
  const parts = Object.entries(labels).map(([k, v]) => `${k}="${escapeLabel(v)}"`);
  return parts.length === 0 ? "" : `{${parts.join(",")}}`;
}

function formatValue(value: number): string {
  if (Number.isNaN(value)) return "NaN";
  if (value === Number.POSITIVE_INFINITY) return "+Inf";
  if (value === Number.NEGATIVE_INFINITY) return "-Inf";
  return String(value);
}

export class Exposition {
  private readonly lines: string[] = [];

  counter(name: string, help: string, samples: Sample[]): this {
    return this.family(name, "counter", help, samples);
  }

  gauge(name: string, help: string, samples: Sample[]): this {
    return this.family(name, "gauge", help, samples);
  }

  histogram(name: string, help: string, histogram: Histogram, labels: Labels = {}): this {
    return this.histograms(name, help, [[labels, histogram]]);
  }

  /** One histogram family with a series per label set (e.g. step time by step kind). */
  histograms(name: string, help: string, series: [labels: Labels, histogram: Histogram][]): this {
    this.header(name, "histogram", help);
    for (const [labels, histogram] of series) {
      histogram.bounds.forEach((bound, i) => {
        this.sample(`${name}_bucket`, { ...labels, le: formatValue(bound) }, histogram.counts[i]!);
      });
      this.sample(`${name}_bucket`, { ...labels, le: "+Inf" }, histogram.count);
      this.sample(`${name}_sum`, labels, histogram.sum);
      this.sample(`${name}_count`, labels, histogram.count);
    }
    return this;
  }

  toString(): string {
    return `${this.lines.join("\n")}\n`;
  }

  private family(name: string, type: string, help: string, samples: Sample[]): this {
    this.header(name, type, help);
    for (const [labels, value] of samples) this.sample(name, labels, value);
    return this;
  }

  private header(name: string, type: string, help: string): void {
    this.lines.push(`# HELP ${name} ${escapeHelp(help)}`, `# TYPE ${name} ${type}`);
  }

  private sample(name: string, labels: Labels, value: number): void {
    this.lines.push(`${name}${formatLabels(labels)} ${formatValue(value)}`);
  }
}
