"""The Shapes DiTCtrl comparison script: conditions, cache, table and README section (shipped model, 1 step)."""

import json

import pytest

from diffusers_mask2dit.shapes import ditctrl_comparison as comparison
from diffusers_mask2dit.shapes import model as shapes_model


@pytest.fixture
def quick_sampling(monkeypatch):
    kwargs = shapes_model.generation_kwargs
    monkeypatch.setattr(shapes_model, "generation_kwargs", lambda **o: kwargs(**{"num_inference_steps": 1, **o}))


def test_comparison_makes_its_rows_once_and_writes_the_table(tmp_path, quick_sampling, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{comparison.README_START}\nold\n{comparison.README_END}\nrest\n")
    summary = comparison.run_comparison(None, str(tmp_path), ["mask2dit", "ditctrl-mask2dit"], num_samples=1,
                                        batch_size=1, readme=str(readme))
    assert list(summary) == ["mask2dit", "ditctrl-mask2dit"]
    for stats in summary.values():
        assert stats["prompt_accuracy"]["n"] == 1 and 0 <= stats["prompt_accuracy"]["mean"] <= 100
        assert stats["cscv"]["mean"] >= 0 and stats["seconds_per_video"] > 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert "| ditctrl-mask2dit | shipped |" in text
    assert json.loads((tmp_path / "ditctrl.json").read_text())["ditctrl"] == comparison.DITCTRL_SETTINGS

    def fail(*args):
        raise AssertionError("a cached condition was made again")

    monkeypatch.setattr(comparison, "RUNNERS", {name: fail for name in comparison.CONDITIONS})
    again = comparison.run_comparison(None, str(tmp_path), ["mask2dit"], num_samples=1, batch_size=1)
    assert set(again) == {"mask2dit", "ditctrl-mask2dit"}  # every condition made for these weights is in the table


def test_stock_conditions_need_the_stock_model(tmp_path):
    with pytest.raises(ValueError, match="--stock"):
        comparison.run_comparison(None, str(tmp_path), ["ditctrl"], num_samples=1)
