"""candidates.txt, the repository's side of issue 16: every round's candidates are scored from it as they are."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "candidates.txt"


def entries() -> list[tuple[str, str]]:
    rows = [line.split(None, 1) for line in LIST.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [(r[0], r[1] if len(r) > 1 else "") for r in rows]


pytestmark = pytest.mark.skipif(not LIST.is_file(), reason="no candidates this round")


def test_at_most_8_candidates_of_at_most_100_mb_each_with_a_recipe():
    rows = entries()
    assert 1 <= len(rows) <= 8
    assert len({p for p, _ in rows}) == len(rows)
    total = 0
    for path, recipe in rows:
        d = ROOT / path
        assert d.is_dir() and (d / "config.json").is_file() and (d / "model.safetensors").is_file(), path
        assert len(recipe.split()) >= 3, f"{path}: a one-line recipe, please"
        total += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert total <= 100 * 1000 ** 2


@pytest.mark.parametrize("path", [p for p, _ in entries()] if LIST.is_file() else [])
def test_each_candidate_loads_and_predicts(path):
    import numpy as np

    from pneumoscan.predict import Predictor

    p = Predictor(ROOT / path, backend="torch")
    s = p.prep_cfg.size
    probs = p.probabilities(np.zeros((1, 3, s, s), np.float32))
    assert probs.shape == (1, 3) and np.isclose(probs.sum(), 1, atol=1e-4)
