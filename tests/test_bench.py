"""The benchmarks run end to end on the CPU and refuse what they cannot run before allocating."""
import json

import pytest
import torch

from mistral_ext import MistralConfig, bench, bench_attention


def test_bench_measures_ours_and_both_peers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--prompt-len", "11", "--new-tokens", "8", "--batch", "3",
                "--batch-new-tokens", "4", "--repeats", "1", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert [run["name"] for run in figures["runs"]] == ["ours", "transformers-eager", "transformers-sdpa"]
    for run in figures["runs"]:
        assert run["prefill_ms"] > 0 and run["decode_ms_per_token"] > 0 and run["batch_decode_tokens_per_s"] > 0
    # SmolLM2-135M: 134.5M parameters (tied embeddings) in fp32
    assert 0.53e9 < figures["weight_gb"] * 1e9 < 0.545e9
    assert figures["decode_floor_ms_per_token"] == pytest.approx(
        figures["weight_gb"] / figures["copy_bandwidth_gb_s"] * 1e3)
    printed = capsys.readouterr().out
    assert "ours vs transformers-eager: decode" in printed and "ours vs transformers-sdpa: decode" in printed


@pytest.mark.parametrize("argument, value", [("--new-tokens", "0"), ("--batch", "-2"), ("--repeats", "0"),
                                             ("--prompt-len", "0"), ("--batch-new-tokens", "0")])
def test_bench_rejects_counts_below_one(argument, value):
    with pytest.raises(ValueError, match=f"{argument} must be at least 1, got {value}"):
        bench.main(["--device", "cpu", "--no-peers", argument, value])


def test_bench_refuses_caches_that_do_not_fit_before_allocating():
    with pytest.raises(MemoryError, match=r"caches of the model \(0\.13B parameters\) at batch 100000000 and "
                                          r"19 tokens need .* GiB of float32 on cpu"):
        bench.main(["--device", "cpu", "--no-peers", "--batch", "100000000", "--prompt-len", "16",
                    "--new-tokens", "3"])


def test_check_fits_counts_mistral_7b_weights():
    """Mistral-7B-v0.1 has 7.24B parameters; at a batch no memory holds, the check names them."""
    with pytest.raises(MemoryError, match=r"weights and caches of the model \(7\.24B parameters\)"):
        bench.check_fits(MistralConfig(), torch.bfloat16, torch.device("cpu"), 10**6, 4096)


def test_bench_attention_cpu_comparison():
    rows = bench_attention.cpu_rows(repeats=2)
    assert [row.workload for row in rows] == ["prefill S=512", "decode 1024 keys", "decode 1024 keys, K/V cold"]
    for row in rows:
        assert row.ours > 0 and row.peer_time > 0 and row.ours_rate > 0 and row.peer_rate > 0


def test_bench_prints_a_dash_for_what_noise_left_untimed(capsys):
    """A generate() run no longer than its prefill has no decode time: "-", never a negative or
    infinite rate, and the ratios that need it are "-" too."""
    assert bench.decode_seconds(2.5, 2.0) == pytest.approx(0.5)
    assert bench.decode_seconds(1.9, 2.0) is None and bench.decode_seconds(2.0, 2.0) is None
    results = {"decode_floor_ms_per_token": 10.0, "device": "cpu", "dtype": "float32", "model": "m",
               "weight_gb": 1.0, "copy_bandwidth_gb_s": 100.0, "prompt_len": 8, "new_tokens": 2, "batch": 2}
    ours = bench.RunFigures("ours", 5.0, 20.0, None)
    peer = bench.RunFigures("peer", 10.0, None, 40.0)
    bench.print_table(results, [ours], [peer])
    printed = capsys.readouterr().out
    assert "ours vs peer: decode - faster, prefill 2.00x, batched decode -" in printed
    ours_row = next(line for line in printed.splitlines() if line.startswith("ours "))
    assert ours_row.split()[1:] == ["5.00", "20.000", "50.0", "50.0%", "-", "-"]
    assert "give more --new-tokens" in printed
