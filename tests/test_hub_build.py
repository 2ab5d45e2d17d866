"""``mask2dit hub build``: Hub folders from pipelines, the authors' release, fine-tuned transformers and LoRAs.

The key test runs the built folder in a subprocess where diffusers_mask2dit cannot be imported at all, loads
it with ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)`` and
generates 2 scenes, which must match the installed package's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_mask2dit.hub import cards
from diffusers_mask2dit.hub.build import BuildError, build_hub_folder, detect_kind
from diffusers_mask2dit.hub.testing import save_fake_official_layout, save_tiny_lora
from diffusers_mask2dit.tiny import save_tiny_cogvideox
from test_hub_bundle import BUNDLED_MODULES  # the package modules the one-file Hub pipeline bundles, in order

PROMPTS = ["A cat walks slowly along the beach at sunset.", "The cat sleeps on a wooden fence."]
CALL = dict(num_frames=9, height=64, width=64, num_inference_steps=2, guidance_scale=6.0, output_type="np")


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory) -> Path:
    """A folder saved by Mask2DiTPipeline.save_pretrained (mask v3), as a user's full fine-tune would be."""
    from diffusers_mask2dit import Mask2DiTPipeline
    from diffusers_mask2dit.tiny import build_tiny_components

    pipe = Mask2DiTPipeline(**build_tiny_components("5b"))
    pipe.transformer.register_to_config(attn_mask_variant="v3")
    path = tmp_path_factory.mktemp("saved") / "finetuned"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return Path(save_tiny_cogvideox(tmp_path_factory.mktemp("plain") / "cogvideox"))


def _front_matter(folder: Path) -> dict:
    return cards.front_matter((folder / "README.md").read_text())


def test_build_from_a_saved_pipeline(saved_pipeline, tmp_path):
    out = tmp_path / "hub"
    result = build_hub_folder(saved_pipeline, out, repo_id="me/mask2dit-ft", base_model="THUDM/CogVideoX-5b")
    assert result.kind == "pipeline" and result.card == "finetune"
    assert result.bundled_modules == BUNDLED_MODULES
    assert {"README.md", "pipeline.py", "model_index.json", "transformer/config.json"} <= set(result.files)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "CogVideoXPipeline"
    assert index["transformer"] == ["diffusers", "CogVideoXTransformer3DModel"]
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "CogVideoXTransformer3DModel" and config["attn_mask_variant"] == "v3"
    # Weights are copied as they are.
    for path in saved_pipeline.rglob("*.safetensors"):
        assert (out / path.relative_to(saved_pipeline)).read_bytes() == path.read_bytes()
    card = (out / "README.md").read_text()
    data = _front_matter(out)
    assert data["base_model"] == "THUDM/CogVideoX-5b" and data["base_model_relation"] == "finetune"
    assert data["license"] == "other" and data["license_name"] == "cogvideox-license"
    assert "lora" not in data["tags"]
    assert 'from_pretrained(\n    "me/mask2dit-ft",\n    custom_pipeline="me/mask2dit-ft",\n    trust_remote_code=True' in card
    assert "Scene mask: `v3`" in card and "{{" not in card and str(tmp_path) not in card


def test_build_never_publishes_the_folders_models_were_loaded_from(saved_pipeline, tmp_path):
    """diffusers saves `_name_or_path` (the local folder a component was loaded from) in every config."""
    from diffusers_mask2dit import Mask2DiTPipeline

    resaved = tmp_path / "resaved"
    Mask2DiTPipeline.from_pretrained(saved_pipeline).save_pretrained(resaved)
    assert str(saved_pipeline) in (resaved / "transformer" / "config.json").read_text()
    out = tmp_path / "hub"
    build_hub_folder(resaved, out, repo_id="me/mask2dit-ft", base_model="THUDM/CogVideoX-5b")
    configs = [out / "model_index.json"] + sorted(out.glob("*/config.json"))
    assert len(configs) >= 4
    for path in configs:
        text = path.read_text()
        assert "_name_or_path" not in text and str(saved_pipeline) not in text, path


HIDDEN_SCRIPT = textwrap.dedent(
    '''
    import importlib.abc, os, sys

    class _Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "diffusers_mask2dit" or name.startswith("diffusers_mask2dit."):
                raise ImportError(f"{name} is hidden in this test")

    sys.meta_path.insert(0, _Hide())
    sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "diffusers_mask2dit"))]
    try:
        import diffusers_mask2dit  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("diffusers_mask2dit is still importable")

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    folder, out = sys.argv[1], sys.argv[2]
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    assert type(pipe).__name__ == "Mask2DiTPipeline", type(pipe)
    assert type(pipe).__module__.startswith("diffusers_modules."), type(pipe).__module__
    assert type(pipe.transformer).__name__ == "Mask2DiTTransformer3DModel"
    result = pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(0), **CALL)
    assert not any(m == "diffusers_mask2dit" or m.startswith("diffusers_mask2dit.") for m in sys.modules)
    np.save(out, result.frames)
    print("scenes", [s.shape for s in result.scene_frames[0]], "mask", pipe.transformer.config.attn_mask_variant)
    '''
)


def test_built_folder_runs_without_the_package(saved_pipeline, tmp_path):
    """The Hub folder works with diffusers + transformers + torch only, and matches the package's output."""
    from diffusers_mask2dit import Mask2DiTPipeline

    out = tmp_path / "hub"
    build_hub_folder(saved_pipeline, out, repo_id="me/mask2dit-ft", base_model="THUDM/CogVideoX-5b")
    script = tmp_path / "hidden.py"
    script.write_text(f"PROMPTS = {PROMPTS!r}\nCALL = {CALL!r}\n" + HIDDEN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-I", str(script), str(out), str(tmp_path / "frames.npy")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "scenes [(9, 64, 64, 3), (9, 64, 64, 3)] mask v3" in proc.stdout
    hidden = np.load(tmp_path / "frames.npy")
    assert hidden.shape == (1, 18, 64, 64, 3)

    pipe = Mask2DiTPipeline.from_pretrained(out)
    expected = pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(0), **CALL).frames
    np.testing.assert_allclose(hidden, expected, atol=1e-5)


def test_build_from_the_authors_release(tmp_path):
    release = save_fake_official_layout(tmp_path / "release", attn_msk_version=2)
    out = tmp_path / "hub"
    result = build_hub_folder(release, out, repo_id="me/Mask2DiT-diffusers", verify="files")
    assert result.kind == "official" and result.card == "mask2dit"
    assert result.conversion["components"]["transformer"]["tensors"] == 64
    assert (out / "mask2dit_conversion.json").is_file() and not list(out.rglob("*.bin"))
    data = _front_matter(out)
    assert data["base_model"] == "THUDM/CogVideoX-5b"
    assert data["license_link"] == "https://huggingface.co/THUDM/CogVideoX-5b/blob/main/LICENSE"
    card = (out / "README.md").read_text()
    assert '"me/Mask2DiT-diffusers",\n    custom_pipeline="me/Mask2DiT-diffusers"' in card
    # A converted folder built again keeps the release card.
    again = build_hub_folder(out, tmp_path / "hub2", repo_id="me/Mask2DiT-diffusers")
    assert again.kind == "pipeline" and again.card == "mask2dit" and (tmp_path / "hub2" / "mask2dit_conversion.json").is_file()


def test_build_lora(tmp_path):
    lora = save_tiny_lora(tmp_path / "lora")
    (lora / "training_config.json").write_text(json.dumps(
        {"pretrained_model_name_or_path": str(tmp_path / "secret-local-path"), "finetune": "lora", "lora_rank": 4,
         "mask_variant": "v3", "max_train_steps": 10}
    ))
    out = tmp_path / "hub"
    result = build_hub_folder(lora, out, repo_id="me/style-lora", base_model="THUDM/CogVideoX-2b")
    assert result.kind == "lora" and result.card == "lora"
    assert sorted(result.files) == ["README.md", "pipeline.py", "pytorch_lora_weights.safetensors"]
    data = _front_matter(out)
    assert data["base_model_relation"] == "adapter" and "lora" in data["tags"] and data["license"] == "apache-2.0"
    card = (out / "README.md").read_text()
    assert "pipe.load_lora_weights(\"me/style-lora\"" in card
    assert '"scene_mask": "v3"' in card and "`lora_rank`: 4" in card
    assert "secret-local-path" not in card and str(tmp_path) not in card

    # Without a recorded mask, the card says the default is assumed.
    (lora / "training_config.json").unlink()
    build_hub_folder(lora, tmp_path / "hub2", repo_id="me/style-lora", base_model="THUDM/CogVideoX-5b")
    assert "(assumed: the package default" in (tmp_path / "hub2" / "README.md").read_text()


def test_build_finetuned_transformer_with_base(plain, tmp_path):
    from diffusers_mask2dit import Mask2DiTPipeline, Mask2DiTTransformer3DModel
    from diffusers_mask2dit.tiny import build_tiny_components

    transformer = Mask2DiTTransformer3DModel.from_cogvideox(build_tiny_components("5b", seed=5)["transformer"], "v1")
    # The trainer's output_dir for a full fine-tune: transformer/, its own README, checkpoints and logs.
    transformer.save_pretrained(tmp_path / "trained" / "transformer")
    (tmp_path / "trained" / "README.md").write_text("trainer card")
    (tmp_path / "trained" / "checkpoint-10").mkdir()
    (tmp_path / "trained" / "checkpoint-10" / "optimizer.bin").write_bytes(b"junk")
    assert detect_kind(tmp_path / "trained") == "transformer"
    with pytest.raises(BuildError, match="--base"):
        build_hub_folder(tmp_path / "trained", tmp_path / "x", base_model="THUDM/CogVideoX-5b")
    out = tmp_path / "hub"
    build_hub_folder(tmp_path / "trained", out, base=plain, base_model="THUDM/CogVideoX-5b", repo_id="me/ft")
    assert not (out / "checkpoint-10").exists() and "trainer card" not in (out / "README.md").read_text()
    pipe = Mask2DiTPipeline.from_pretrained(out)
    assert pipe.transformer.config.attn_mask_variant == "v1"
    for name, tensor in transformer.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[name], tensor), name

    # A transformer that does not fit the base's text encoder is refused.
    config = json.loads((tmp_path / "trained" / "transformer" / "config.json").read_text())
    config["text_embed_dim"] = 48
    (tmp_path / "trained" / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BuildError, match="text_embed_dim"):
        build_hub_folder(tmp_path / "trained", tmp_path / "bad", base=plain, base_model="THUDM/CogVideoX-5b")


def test_build_errors_and_overwrite(plain, tmp_path, capsys):
    from diffusers_mask2dit.cli import main

    lora = save_tiny_lora(tmp_path / "lora")
    with pytest.raises(BuildError, match="--base-model"):
        build_hub_folder(lora, tmp_path / "a")
    with pytest.raises(BuildError, match="licence of the base model"):
        build_hub_folder(lora, tmp_path / "a", base_model="someone/other-model")
    with pytest.raises(BuildError, match="not a local path"):
        build_hub_folder(lora, tmp_path / "a", base_model=str(plain))
    assert not (tmp_path / "a").exists()  # nothing written when the arguments are wrong
    build_hub_folder(lora, tmp_path / "a", base_model="someone/other-model", license="mit")
    assert _front_matter(tmp_path / "a")["license"] == "mit"
    with pytest.raises(BuildError, match="not empty"):
        build_hub_folder(lora, tmp_path / "a", base_model="THUDM/CogVideoX-5b")
    build_hub_folder(lora, tmp_path / "a", base_model="THUDM/CogVideoX-5b", overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(BuildError, match="refuses to delete"):
        build_hub_folder(lora, mine, base_model="THUDM/CogVideoX-5b", overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"
    with pytest.raises(BuildError, match="Cannot tell"):
        build_hub_folder(mine, tmp_path / "b")
    with pytest.raises(BuildError, match="--mask-variant is for LoRA"):
        build_hub_folder(plain, tmp_path / "b", base_model="THUDM/CogVideoX-5b", mask_variant="v1")

    # The CLI reports errors on stderr with a non-zero status, and the summary on success.
    assert main(["hub", "build", "--model", str(lora), "--out", str(tmp_path / "c")]) == 2
    assert "--base-model" in capsys.readouterr().err
    assert main(["hub", "build", "--model", str(lora), "--out", str(tmp_path / "c"), "--base-model",
                 "THUDM/CogVideoX-5b", "--repo-id", "me/lora", "--mask-variant", "v2"]) == 0
    printed = capsys.readouterr().out
    assert "Built a Hub folder for me/lora" in printed and "mask2dit hub push --folder" in printed


def test_card_templates_render_strictly():
    with pytest.raises(cards.CardError, match="No value"):
        cards.render("a {{x}} b", {})
    with pytest.raises(cards.CardError, match="section"):
        cards.render("{{#lora}}x{{/lora}}", {})
    assert cards.render("{{#lora}}\n- lora\n{{/lora}}\nend {{x}}", {"x": 1}, {"lora": False}) == "end 1"
    assert cards.render("{{#lora}}\n- lora\n{{/lora}}\nend", {}, {"lora": True}) == "- lora\nend"
    with pytest.raises(cards.CardError, match="license_name"):
        cards.front_matter("---\nlibrary_name: diffusers\npipeline_tag: text-to-video\nbase_model: a/b\nlicense: other\n"
                           "tags:\n- x\n---\n")
    for name in ("mask2dit", "lora"):
        template = cards.find_card(name).read_text()
        assert "{{repo_id}}" in template and "trust_remote_code=True" in template


def test_stock_cogvideox_folder_gets_a_card_that_says_what_it_is(plain, tmp_path):
    result = build_hub_folder(plain, tmp_path / "hub", repo_id="me/cogvideox-mask2dit", base_model="THUDM/CogVideoX-5b")
    assert result.card == "stock"
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "CogVideoX weights of [THUDM/CogVideoX-5b]" in card and "not trained" in card and "unmodified" in card
    assert any("--card finetune" in note for note in result.notes)
    assert "fine-tuned in full" not in card and "(assumed: the package default" in card
    assert "base_model_relation" not in card  # the same weights: no adapter / finetune relation
    # Asking for the fine-tune card explicitly still works.
    again = build_hub_folder(plain, tmp_path / "hub2", repo_id="me/x", base_model="THUDM/CogVideoX-5b", card="finetune")
    assert again.card == "finetune" and "fine-tuned in full" in (tmp_path / "hub2" / "README.md").read_text()


@pytest.mark.parametrize("repo_id", ["no-owner", "me/", "me/bad name", "a/b/c", "../x"])
def test_build_validates_repo_id_as_push_does(plain, tmp_path, repo_id, capsys):
    from diffusers_mask2dit.cli import main
    from diffusers_mask2dit.hub.push import PushError, plan_push

    with pytest.raises(BuildError, match="--repo-id must be a Hub id"):
        build_hub_folder(plain, tmp_path / "hub", repo_id=repo_id, base_model="THUDM/CogVideoX-5b")
    assert not (tmp_path / "hub").exists()
    with pytest.raises(PushError, match="`--repo-id` must be a Hub id"):
        plan_push(plain, repo_id)
    assert main(["hub", "build", "--model", str(plain), "--out", str(tmp_path / "hub"), "--repo-id", repo_id]) == 2
    assert "--repo-id must be a Hub id" in capsys.readouterr().err


def test_trainer_card_and_hub_card_come_from_one_writer(tmp_path):
    """The trainer's README and `hub build`'s card are the same template: same training table, same sections."""
    from diffusers_mask2dit.hub.cards import model_card

    training = {"stage": "sft", "cond_prob": 0.5, "num_scenes": 3, "lora_rank": 8, "lora_alpha": 8.0, "mask_variant": "v3"}
    local = model_card("lora", base_model=str(tmp_path), kind="lora", mask_variant="v3", training=training,
                       weights_path=str(tmp_path / "run"))
    hub = model_card("lora", repo_id="me/lora", base_model="THUDM/CogVideoX-5b", kind="lora", mask_variant="v3",
                     training=training)
    for text in (local, hub):
        assert "| LoRA rank / alpha | 8 / 8.0 |" in text and "`lora_rank`: 8" in text and "{{" not in text
    assert f'pipe.load_lora_weights("{tmp_path / "run"}")' in local and "mask2dit hub build --model" in local
    assert "base_model:" not in local and "trust_remote_code" not in local  # a local base is not a Hub id
    assert 'pipe.load_lora_weights("me/lora"' in hub and str(tmp_path) not in hub
    with pytest.raises(cards.CardError, match="weights_path"):
        model_card("lora", base_model="THUDM/CogVideoX-5b", kind="lora")
