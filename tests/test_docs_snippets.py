"""Every ```python snippet of README.md, the Hub cards and docs/publishing.md runs against tiny local models.

The convention (also in docs/publishing.md), applied by :func:`localise`:

- Hub ids become local folders of tiny random models:
  ``qth/Mask2DiT`` -> a tiny fake of the authors' release layout (no model_index.json);
  ``THUDM/CogVideoX-5b`` -> a tiny CogVideoX folder;
  ``your-name/<name>`` -> a folder built by ``mask2dit hub build``: the LoRA one when <name> contains
  "lora", else the one built from the fake release.
- Sizes: ``height=480`` -> 64, ``width=720`` -> 64, ``num_frames=49`` -> 9, ``num_inference_steps=50`` -> 2.
- Device and dtype: ``"cuda"`` -> ``"cpu"``, ``torch.bfloat16`` / ``torch.float16`` -> ``torch.float32``,
  ``enable_model_cpu_offload()`` -> ``enable_model_cpu_offload(device="cpu")``, ``vae.enable_tiling()`` with
  tiles as large as the tiny frames (the tiny VAE's default tiles are smaller than its frames).
- After rewriting, a snippet may not keep a larger size or step count, nor load an id that is not mapped.
- All snippets of one document run in order in one namespace (later ones use ``pipe``, ``scenes``...),
  in a temporary working directory.
- A snippet is left out only by marking its fence ```` ```python no-test: <reason> ````; the test then
  reports it as skipped with that reason. Nothing is skipped silently.

Cards are tested as they ship: the README.md of folders built by ``hub build`` (placeholders filled).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
CARDS_DIR = ROOT / "hub_cards"

SIZE_LIMITS = {"height": 128, "width": 128, "num_frames": 17, "num_inference_steps": 4}
REWRITES: List[Tuple[str, str]] = [
    (r"\bheight=480\b", "height=64"),
    (r"\bwidth=720\b", "width=64"),
    (r"\bnum_frames=49\b", "num_frames=9"),
    (r"\bnum_inference_steps=50\b", "num_inference_steps=2"),
    (r"([\"'])cuda([\"'])", r"\1cpu\2"),
    (r"\btorch\.(bfloat16|float16)\b", "torch.float32"),
    (r"\.enable_model_cpu_offload\(\)", '.enable_model_cpu_offload(device="cpu")'),
    (r"\.enable_tiling\(\)", ".enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64)"),
]
_FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)
_LOAD_CALL = re.compile(
    r"(?:from_pretrained|from_official|load_lora_weights)\(\s*([\"'])([^\"']+)\1|custom_pipeline\s*=\s*([\"'])([^\"']+)\3"
)


# --------------------------------------------------------------------------------------------------
# Snippet extraction and rewriting
# --------------------------------------------------------------------------------------------------


def extract_snippets(text: str) -> List[Tuple[str, str]]:
    """``(info, code)`` of every ```python fence; ``info`` is what follows ``python`` on the fence line."""
    return [(match.group(1).strip(), match.group(2)) for match in _FENCE.finditer(text)]


def localise(code: str, ids: Dict[str, Path]) -> str:
    """Apply the convention above; raise AssertionError when the snippet would stay big or load an unknown id."""

    def hub_id(match: "re.Match[str]") -> str:
        quote, name = match.group(1), match.group(2)
        if name in ids:
            return f"{quote}{ids[name]}{quote}"
        if name.startswith("your-name/"):
            key = "your-name/*lora*" if "lora" in name.split("/", 1)[1].lower() else "your-name/*"
            return f"{quote}{ids[key]}{quote}"
        return match.group(0)

    code = re.sub(r"([\"'])([A-Za-z0-9][\w.-]*/[\w.-]+)\1", hub_id, code)
    for pattern, replacement in REWRITES:
        code = re.sub(pattern, replacement, code)
    for name, limit in SIZE_LIMITS.items():
        for value in re.findall(rf"\b{name}=(\d+)", code):
            assert int(value) <= limit, (
                f"`{name}={value}` is not in the snippet convention (use the documented values, e.g. height=480, "
                f"width=720, num_frames=49, num_inference_steps=50)"
            )
    for match in _LOAD_CALL.finditer(code):
        target = match.group(2) or match.group(4)
        assert Path(target).exists(), (
            f"The snippet loads {target!r}, which is not one of the mapped ids {sorted(ids)} (see this file's doc)."
        )
    return code


def test_localise_convention(tmp_path):
    ids = {"qth/Mask2DiT": tmp_path, "THUDM/CogVideoX-5b": tmp_path, "your-name/*": tmp_path / "a", "your-name/*lora*": tmp_path / "b"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    code = localise(
        'p = X.from_pretrained("your-name/my-model", custom_pipeline="your-name/my-model", torch_dtype=torch.bfloat16)\n'
        'p.load_lora_weights("your-name/style-lora")\np.to("cuda")\np(height=480, width=720, num_frames=49, '
        "num_inference_steps=50)\np.enable_model_cpu_offload()\n",
        ids,
    )
    assert str(tmp_path / "a") in code and str(tmp_path / "b") in code and "cuda" not in code
    assert "height=64, width=64, num_frames=9, num_inference_steps=2" in code and "torch.float32" in code
    assert 'enable_model_cpu_offload(device="cpu")' in code
    with pytest.raises(AssertionError, match="height=512"):
        localise("p(height=512)", ids)
    with pytest.raises(AssertionError, match="not one of the mapped ids"):
        localise('X.from_pretrained("someone/else")', ids)
    assert extract_snippets("a\n```python no-test: needs a GPU\nx = 1\n```\n```bash\nls\n```\n") == [
        ("no-test: needs a GPU", "x = 1\n")
    ]


# --------------------------------------------------------------------------------------------------
# Tiny models and built Hub folders
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_models(tmp_path_factory):
    """The tiny folders the ids map to, and the READMEs of the built Hub folders."""
    import torch

    from diffusers_mask2dit.hub.build import build_hub_folder
    from diffusers_mask2dit.hub.testing import save_fake_official_layout, save_tiny_lora
    from diffusers_mask2dit.tiny import save_tiny_cogvideox

    root = tmp_path_factory.mktemp("docs-models")
    official = save_fake_official_layout(root / "qth-Mask2DiT", transformer_dtype=torch.float32, shard=False)
    plain = Path(save_tiny_cogvideox(root / "CogVideoX-5b"))
    lora = save_tiny_lora(root / "trained-lora")
    built = {
        "mask2dit": build_hub_folder(official, root / "hub-mask2dit", repo_id="your-name/mask2dit-cogvideox-5b", verify="files"),
        "lora": build_hub_folder(lora, root / "hub-lora", repo_id="your-name/mask2dit-lora", base_model="THUDM/CogVideoX-5b"),
        "finetune": build_hub_folder(plain, root / "hub-finetune", repo_id="your-name/mask2dit-finetune", base_model="THUDM/CogVideoX-5b"),
        "scratch": build_hub_folder(plain, root / "hub-scratch", repo_id="your-name/mask2dit-scratch", card="scratch",
                                    license="apache-2.0"),
    }
    ids = {
        "qth/Mask2DiT": official,
        "THUDM/CogVideoX-5b": plain,
        "your-name/*": built["mask2dit"].out,
        "your-name/*lora*": built["lora"].out,
    }
    return ids, built


# Which document each test runs: cards as built (rendered), the others as they are in the repository.
DOCUMENTS = {
    "hub_cards/mask2dit-cogvideox-5b.md": ("built", "mask2dit"),
    "hub_cards/lora-template.md[lora]": ("built", "lora"),
    "hub_cards/lora-template.md[full]": ("built", "finetune"),
    "hub_cards/scratch-template.md": ("built", "scratch"),
    "docs/publishing.md": ("file", "docs/publishing.md"),
    "README.md": ("file", "README.md"),
}


def test_every_card_is_covered():
    covered = {name.split("[")[0] for name in DOCUMENTS}
    cards = {f"hub_cards/{path.name}" for path in CARDS_DIR.glob("*.md")}
    assert cards <= covered, f"cards without a snippet test: {sorted(cards - covered)}"


@pytest.mark.parametrize("document", sorted(DOCUMENTS))
def test_snippets_run(document, hub_models, tmp_path, monkeypatch):
    import diffusers.utils.dynamic_modules_utils as dynamic_modules

    ids, built = hub_models
    source, ref = DOCUMENTS[document]
    if source == "built":
        text = (built[ref].out / "README.md").read_text(encoding="utf-8")
    else:
        path = ROOT / ref
        if not path.is_file():
            pytest.skip(f"{ref} does not exist yet (its snippets will run once it does)")
        text = path.read_text(encoding="utf-8")
    snippets = extract_snippets(text)
    if not snippets:
        pytest.skip(f"{document} has no python snippets")

    # Custom pipelines are copied into a per-test modules cache, not the user's shared one.
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    namespace: Dict[str, object] = {"__name__": "__snippet__"}
    skipped = []
    for index, (info, code) in enumerate(snippets):
        if info.startswith("no-test"):
            skipped.append(f"snippet {index + 1}: {info}")
            continue
        assert not info, f"{document} snippet {index + 1}: unknown fence info {info!r} (only `no-test: <reason>`)"
        local = localise(code, ids)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                exec(compile(local, f"{document} snippet {index + 1}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{document} snippet {index + 1} failed:\n{local}") from error
        # Snippets use the current argument names (`dtype=`, not the deprecated `torch_dtype=`).
        deprecated = [str(w.message) for w in caught if "torch_dtype" in str(w.message)]
        assert not deprecated, f"{document} snippet {index + 1}: {deprecated[0]}"
    written = sorted(p.name for p in tmp_path.glob("*.mp4"))
    if "export_to_video" in text:
        assert written, f"{document}: the snippets call export_to_video but wrote no .mp4"
    if skipped:
        pytest.skip(f"{document}: ran {len(snippets) - len(skipped)} snippets; marked no-test: {skipped}")
