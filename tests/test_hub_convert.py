"""``mask2dit convert-official`` on tiny fakes of the authors' released layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusers_mask2dit.hub.convert import (
    ConversionError,
    REPORT_NAME,
    convert_official,
    find_weight_files,
    iter_tensors,
    verify_files,
)
from diffusers_mask2dit.hub.testing import FAKE_AUTHORS_CLASS, save_fake_official_layout


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    """bf16 transformer in 4 pickled shards, attn_msk_version=3, no model_index.json."""
    return save_fake_official_layout(tmp_path_factory.mktemp("release") / "qth-Mask2DiT", attn_msk_version=3)


def _tensors(folder: Path, component: str):
    return dict(iter_tensors(find_weight_files(folder / component, component)))


def test_fake_layout_is_the_authors_shape(official):
    assert not (official / "model_index.json").exists()
    config = json.loads((official / "transformer" / "config.json").read_text())
    assert config["_class_name"] == FAKE_AUTHORS_CLASS and config["attn_msk_version"] == 3
    assert sorted(p.suffix for p in (official / "transformer").glob("*.bin")) == [".bin"] * 4


def test_convert_official(official, tmp_path, capsys):
    from diffusers import CogVideoXPipeline

    from diffusers_mask2dit import Mask2DiTPipeline, Mask2DiTTransformer3DModel
    from diffusers_mask2dit.cli import main

    out = tmp_path / "converted"
    assert main(["convert-official", "--src", str(official), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "transformer: 64 tensors" in printed and "identical to the source (files and loaded model)" in printed

    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "CogVideoXPipeline"
    assert index["transformer"] == ["diffusers", "CogVideoXTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLCogVideoX"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer"][0] == "transformers" and index["scheduler"] == ["diffusers", "CogVideoXDDIMScheduler"]
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "CogVideoXTransformer3DModel"
    assert config["attn_mask_variant"] == "v3" and "attn_msk_version" not in config
    # Every weight is safetensors now; no pickles are carried over.
    assert not list(out.rglob("*.bin"))
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()

    # Every tensor unchanged: names, dtypes, values.
    for component in ("transformer", "vae", "text_encoder"):
        before, after = _tensors(official, component), _tensors(out, component)
        assert before.keys() == after.keys()
        for name, tensor in before.items():
            assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), (component, name)
    assert _tensors(out, "transformer")["proj_out.weight"].dtype == torch.bfloat16
    # Unchanged safetensors are byte-identical copies.
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        official / "vae" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()

    report = json.loads((out / REPORT_NAME).read_text())
    assert report["verify"] == "load" and report["had_model_index"] is False
    assert report["transformer_config"]["source_class_name"] == FAKE_AUTHORS_CLASS
    assert report["components"]["transformer"]["tensors"] == 64
    assert report["components"]["transformer"]["loaded_class"] == "Mask2DiTTransformer3DModel"

    # All our loaders take the folder, and keep the variant.
    assert Mask2DiTTransformer3DModel.from_pretrained(out, subfolder="transformer").config.attn_mask_variant == "v3"
    pipe = Mask2DiTPipeline.from_pretrained(out, torch_dtype=torch.float32)
    assert pipe.transformer.config.attn_mask_variant == "v3"
    plain = CogVideoXPipeline.from_pretrained(out)
    assert type(plain.transformer).__name__ == "CogVideoXTransformer3DModel"


def test_convert_safetensors_release_without_mask_key(tmp_path):
    src = save_fake_official_layout(tmp_path / "src", attn_msk_version=None, transformer_format="safetensors", shard=False)
    source_config = (src / "transformer" / "config.json").read_text()
    report = convert_official(src, tmp_path / "out", verify="files", link=True)
    assert (src / "transformer" / "config.json").read_text() == source_config  # the source is never modified
    assert report.transformer_config["attn_mask_variant"] == "v2"
    assert "not in the source config" in report.transformer_config["mask_variant_from"]
    assert report.components["transformer"]["action"] == "safetensors copied unchanged"
    assert (tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        src / "transformer" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_verification_catches_a_changed_tensor(official, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    convert_official(official, out, verify="none")
    shard = sorted((out / "transformer").glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="differs"):
        verify_files(find_weight_files(official / "transformer", "transformer"), find_weight_files(out / "transformer", "transformer"))


def test_convert_errors(official, tmp_path):
    incomplete = tmp_path / "incomplete"
    (incomplete / "transformer").mkdir(parents=True)
    with pytest.raises(ConversionError, match="missing the component folder"):
        convert_official(incomplete, tmp_path / "o1")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert_official(official, busy)
    with pytest.raises(ConversionError, match="refuses to delete"):
        convert_official(official, busy, overwrite=True)
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ConversionError, match="inside"):
        convert_official(official, official / "out")
    with pytest.raises(ConversionError, match="verify"):
        convert_official(official, tmp_path / "o2", verify="maybe")
