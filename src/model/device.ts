/**
 * @module model/device — choosing the execution provider (`--device cpu|webgpu|cuda|auto`): probes what each
 * provider needs on this machine, so a failure names the missing piece (driver, Vulkan loader, CUDA
 * binaries) and how to get it, instead of onnxruntime's bare initialisation error.
 */
import { existsSync, readdirSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { unsupportedModel } from "../errors.ts";

export const DEVICES = ["cpu", "webgpu", "cuda", "auto"] as const;
export type DeviceChoice = (typeof DEVICES)[number];
export type Device = Exclude<DeviceChoice, "auto">;

export interface DeviceProbe {
  device: Device;
  /** Everything this provider needs was found (the session may still fail; see describeFailure). */
  ready: boolean;
  /** What is missing, and how to get it. */
  missing: string[];
}

/** Facts about the machine the probes read; injectable so the selection logic is tested anywhere. */
export interface MachineFacts {
  /** onnxruntime-node's bin folder for this platform. */
  ortBinDir: string | null;
  fileExists(path: string): boolean;
  /** Shared libraries the dynamic loader can find (names like libvulkan.so.1). */
  hasLibrary(name: string): boolean;
  hasNvidiaDriver: boolean;
  hasGpuDevice: boolean;
}

const LIB_DIRS = [
  "/usr/lib/x86_64-linux-gnu",
  "/usr/lib64",
  "/usr/lib",
  "/usr/local/lib",
  "/usr/local/nvidia/lib64",
];

export function machineFacts(): MachineFacts {
  let ortBinDir: string | null = null;
  try {
    const pkg = createRequire(import.meta.url).resolve("onnxruntime-node/package.json");
    ortBinDir = join(dirname(pkg), "bin", "napi-v6", process.platform, process.arch);
  } catch {
    ortBinDir = null;
  }
  const extraDirs = (process.env.LD_LIBRARY_PATH ?? "").split(":").filter(Boolean);
  return {
    ortBinDir,
    fileExists: existsSync,
    hasLibrary: (name) => [...extraDirs, ...LIB_DIRS].some((d) => existsSync(join(d, name))),
    hasNvidiaDriver: existsSync("/proc/driver/nvidia/version"),
    hasGpuDevice:
      existsSync("/dev/nvidia0") ||
      (existsSync("/dev/dri") && readdirSync("/dev/dri").some((n) => n.startsWith("render"))),
  };
}

export function probeDevice(device: Device, facts: MachineFacts): DeviceProbe {
  const missing: string[] = [];
  if (device === "cuda") {
    const lib = facts.ortBinDir && join(facts.ortBinDir, "libonnxruntime_providers_cuda.so");
    if (!lib || !facts.fileExists(lib)) {
      missing.push(
        "onnxruntime's CUDA provider binaries (libonnxruntime_providers_cuda.so): install them with " +
          "`npm install onnxruntime-node --onnxruntime-node-install=cuda12` (downloads from NuGet) or build Dockerfile.gpu",
      );
    }
    if (!facts.hasNvidiaDriver) missing.push("an NVIDIA driver (/proc/driver/nvidia/version not found)");
    if (!facts.hasLibrary("libcudart.so.12"))
      missing.push("the CUDA 12 runtime (libcudart.so.12) and cuDNN 9 on the library path");
  }
  if (device === "webgpu") {
    if (!facts.hasLibrary("libvulkan.so.1")) {
      missing.push(
        "the Vulkan loader (libvulkan.so.1): `apt-get install libvulkan1` (Dawn drives the GPU through Vulkan)",
      );
    }
    if (!facts.hasGpuDevice)
      missing.push("a GPU device node (/dev/nvidia0 or /dev/dri/renderD*): run with the GPU passed through");
  }
  return { device, ready: missing.length === 0, missing };
}

/** The providers to try, in order: `auto` prefers CUDA, then WebGPU, and always ends with the CPU. */
export function candidateDevices(choice: DeviceChoice, facts: MachineFacts): Device[] {
  if (choice !== "auto") return [choice];
  const gpus = (["cuda", "webgpu"] as const).filter((d) => probeDevice(d, facts).ready);
  return [...gpus, "cpu"];
}

/** Start-up error for an explicitly chosen device that could not be used. */
export function describeFailure(device: Device, facts: MachineFacts, cause?: unknown) {
  const probe = probeDevice(device, facts);
  const reason = cause instanceof Error ? ` (onnxruntime: ${cause.message.split("\n")[0]})` : "";
  const missing = probe.missing.length ? `; missing: ${probe.missing.join("; ")}` : "";
  return unsupportedModel(
    `--device ${device} could not be initialised${reason}${missing}. Use --device cpu or --device auto.`,
    "device",
  );
}

/** onnxruntime session options per provider. */
export function executionProviders(device: Device): string[] {
  return device === "cpu" ? ["cpu"] : [device, "cpu"];
}
