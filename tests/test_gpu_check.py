"""tests/benchmarks/gpu_check.py on CPU: its GPU branch with CUDA and Ray stood in for, its DP part for real."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedlora import simulation
from fedlora.results import RoundRecord
from tests.benchmarks import gpu_check

GIB = 2**30


def fake_simulate(seen: list) -> object:
    """Stands for fedlora.simulation.simulate: every round of 2 s, all sampled clients trained."""

    def simulate(config, run_dir, on_round=None, **_: object) -> dict:
        seen.append(config)
        for server_round in range(config.federation.rounds + 1):
            clients = list(range(config.federation.clients_per_round)) if server_round else []
            on_round(RoundRecord(round=server_round, accuracy=0.5, loss=1.0, seconds=2.0, clients=clients))
        return {}

    return simulate


def test_the_gpu_run_shares_the_gpu_evaluates_on_it_and_reads_its_memory_each_round(monkeypatch, capsys) -> None:
    used = itertools.count(GIB, GIB // 8)  # the device fills a little more at every reading
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * GIB - next(used), 80 * GIB))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: GIB // 2)
    resets: list[object] = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    configs: list = []
    monkeypatch.setattr(simulation, "simulate", fake_simulate(configs))
    dp_calls: list = []
    canned = {"B": {"ratio": 1.1, "paired_ratio": 1.1}, "AB": {"ratio": 1.6, "paired_ratio": 1.5}}
    monkeypatch.setattr(gpu_check, "dp_ratios", lambda *args: dp_calls.append(args) or {"default hooks": canned})

    figures = gpu_check.main(rounds=3)

    (config,) = configs
    federation = config.federation
    assert (federation.num_clients, federation.clients_per_round, federation.rounds) == (50, 10, 3)
    assert (federation.client_gpus, federation.server_device, config.model.name) == (0.1, "cuda", "minilm")
    assert dp_calls == [(("default", "roberta-large-shape"), "cuda", 10, 3)]
    row = figures["federation"]
    assert row["clients_per_s"] == pytest.approx(10 / 2.0)  # rounds 2 and 3: 20 clients in 4 s
    assert len(row["device_peak_bytes"]) == 3 and all(GIB <= b < 80 * GIB for b in row["device_peak_bytes"])
    assert row["server_peak_bytes"] == [GIB // 2] * 3 and len(resets) == 3
    out = capsys.readouterr().out
    assert "gpu_check on Fake GPU" in out and "5.00 clients/s after round 1" in out
    assert "dp step default hooks: DP / no DP B only 1.10, A+B 1.60 (target <= 1.25: met)" in out


def test_without_cuda_the_gpu_run_says_so_and_points_to_the_cpu_smoke(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="sees no CUDA device.*--cpu-smoke"):
        gpu_check.main()


def test_a_missing_package_is_named_with_its_pip_line(monkeypatch) -> None:
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None if name == "opacus" else real(name))
    with pytest.raises(SystemExit, match="gpu_check needs opacus: pip install opacus"):
        gpu_check.main(cpu_smoke=True)


def test_the_dp_part_times_hooks_and_ghost_clipping_for_real() -> None:
    figures = gpu_check.dp_ratios(("tiny",), "cpu", 1, 0)
    assert set(figures) == {"tiny hooks", "tiny ghost"}
    for rows in figures.values():
        assert set(rows) == {"B", "AB"} and all(row["ratio"] > 0 for row in rows.values())
