import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { candidateDevices, describeFailure, type MachineFacts, probeDevice } from "../../src/model/device.ts";

function facts(overrides: Partial<MachineFacts> & { files?: string[]; libs?: string[] } = {}): MachineFacts {
  const files = new Set(overrides.files ?? []);
  const libs = new Set(overrides.libs ?? []);
  return {
    ortBinDir: "/ort/bin",
    fileExists: (p) => files.has(p),
    hasLibrary: (n) => libs.has(n),
    hasNvidiaDriver: false,
    hasGpuDevice: false,
    ...overrides,
  };
}

const CUDA_READY = facts({
  files: ["/ort/bin/libonnxruntime_providers_cuda.so"],
  libs: ["libcudart.so.12", "libvulkan.so.1"],
  hasNvidiaDriver: true,
  hasGpuDevice: true,
});

describe("device selection", () => {
  test("cpu is always ready and auto ends with it", () => {
    assert.deepEqual(probeDevice("cpu", facts()).missing, []);
    assert.deepEqual(candidateDevices("auto", facts()), ["cpu"]);
  });

  test("auto prefers cuda, then webgpu, when their pieces are present", () => {
    assert.deepEqual(candidateDevices("auto", CUDA_READY), ["cuda", "webgpu", "cpu"]);
    const webgpuOnly = facts({ libs: ["libvulkan.so.1"], hasGpuDevice: true });
    assert.deepEqual(candidateDevices("auto", webgpuOnly), ["webgpu", "cpu"]);
  });

  test("an explicit device is tried alone, even when a piece is missing (the error then names it)", () => {
    assert.deepEqual(candidateDevices("cuda", facts()), ["cuda"]);
  });

  const cases: { device: "cuda" | "webgpu"; machine: MachineFacts; mentions: RegExp[] }[] = [
    {
      device: "cuda",
      machine: facts(),
      mentions: [
        /libonnxruntime_providers_cuda\.so/,
        /--onnxruntime-node-install=cuda12/,
        /NVIDIA driver/,
        /libcudart\.so\.12/,
      ],
    },
    {
      device: "cuda",
      machine: facts({ ...CUDA_READY, hasNvidiaDriver: false }),
      mentions: [/NVIDIA driver/],
    },
    {
      device: "webgpu",
      machine: facts(),
      mentions: [/libvulkan\.so\.1/, /apt-get install libvulkan1/, /GPU device node/],
    },
    { device: "webgpu", machine: facts({ libs: ["libvulkan.so.1"] }), mentions: [/GPU device node/] },
  ];
  for (const c of cases) {
    test(`the ${c.device} start-up error names what is missing: ${c.mentions.map(String).join(", ")}`, () => {
      const error = describeFailure(
        c.device,
        c.machine,
        new Error("WebGpuContext::Initialize failed\nstack"),
      );
      assert.equal(error.type, "unsupported_model");
      assert.equal(error.param, "device");
      assert.match(error.message, new RegExp(`--device ${c.device} could not be initialised`));
      assert.match(error.message, /onnxruntime: WebGpuContext::Initialize failed\)/);
      for (const m of c.mentions) assert.match(error.message, m);
      assert.doesNotMatch(error.message, /stack/, "only the first line of onnxruntime's message");
    });
  }

  test("a ready device lists nothing missing", () => {
    assert.deepEqual(probeDevice("cuda", CUDA_READY).missing, []);
    assert.deepEqual(probeDevice("webgpu", CUDA_READY).missing, []);
  });
});
