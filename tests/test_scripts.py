"""The scripts in scripts/ that are not run elsewhere, on the embedded SmolLM2 model (CPU)."""
import importlib.util
import json
import os
import subprocess
import sys
import types

import gguf
from torch.autograd import DeviceType

from mistral_ext.loading import default_model_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_profile_step_time_added_by_each_kernel():
    """A kernel adds how much later it ends than every kernel ending before it: overlapped work
    adds only what sticks out, a gap counts for the kernel after it, host events do not count."""
    spec = importlib.util.spec_from_file_location("profile_step", os.path.join(ROOT, "scripts", "profile_step.py"))
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)

    def event(name, start, end, device_type=DeviceType.CUDA):
        return types.SimpleNamespace(name=name, device_type=device_type,
                                     time_range=types.SimpleNamespace(start=start, end=end))

    events = [event("gemv", 3.0, 10.0), event("attention", 1.0, 12.5), event("combine", 16.0, 18.0),
              event("gemv", 11.0, 21.0), event("host op", 0.0, 30.0, DeviceType.CPU)]
    assert profile_step.added_times(events) == {"attention": (1, 2.5), "gemv": (2, 9.0 + 3.0),
                                                "combine": (1, 5.5)}


def test_profile_step_counts_one_decode_step(tmp_path):
    """scripts/profile_step.py reports per decode step what generate() of 2 + steps tokens ran beyond
    generate() of 2: per layer the fused q|k|v, o, gate|up and down projections, one RoPE + cache
    write and one attention, then the LM head; the layer count read from the GGUF file by `gguf`."""
    reader = gguf.GGUFReader(default_model_path())
    layers = int(reader.fields["llama.block_count"].contents())
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "profile_step.py"), "--device", "cpu",
                           "--prompt-len", "23", "--steps", "3", "--top", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    prefill, decode = figures["profiles"]["prefill"], figures["profiles"]["decode, eager"]
    calls = {name: row["calls"] for name, row in decode["kernels"].items()}
    assert calls["mistral_ext::linear"] == 4 * layers + 1
    assert calls["mistral_ext::attention"] == layers
    assert calls["mistral_ext::rotary_embedding_cache_write_"] == layers
    assert decode["families_ms"]["projections, ours (GEMV)"] > 0.5 * decode["device_ms"]
    assert prefill["kernels"]["mistral_ext::attention"]["calls"] == layers
    assert "decode step, eager (per step, 3 steps)" in done.stdout
