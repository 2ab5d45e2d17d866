"""``mask2dit convert-official``: the authors' released checkpoint -> a standard diffusers folder.

The release (Hub ``qth/Mask2DiT``, see METHOD.md) has the component folders ``transformer/ vae/
text_encoder/ tokenizer/ scheduler/`` but may lack ``model_index.json``, and its transformer config may name
the authors' own class and carry their ``attn_msk_version`` key. The converted folder:

- has a ``model_index.json`` naming stock diffusers / transformers classes (``CogVideoXPipeline``,
  ``CogVideoXTransformer3DModel``, ...), so ``CogVideoXPipeline``, ``Mask2DiTPipeline``, the trainer and
  ``DiffusionPipeline(custom_pipeline=...)`` all load it;
- has the transformer config under the stock class name, with the mask variant kept as
  ``attn_mask_variant`` (the key `Mask2DiTPipeline` and `Mask2DiTTransformer3DModel` read);
- holds every weight as safetensors: safetensors files are copied byte for byte, pickled ``.bin`` files
  are rewritten as safetensors with the same tensors (names, dtypes, values);
- is verified: every tensor of the source is compared with the output files, and by default also with the
  models loaded from the output folder by diffusers / transformers. The result is written to
  ``mask2dit_conversion.json`` and returned.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..layout import DEFAULT_MASK_VARIANT, check_mask_variant
from ..paths import UnsafePathError, check_inside, confined, files_under
from ..pickles import refusal_reason

logger = logging.getLogger(__name__)

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_COMPONENTS = ("transformer", "vae", "text_encoder")
REPORT_NAME = "mask2dit_conversion.json"
VERIFY_MODES = ("load", "files", "none")
_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")

# Weight file stems: diffusers models and transformers models.
_STEMS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_BIN_STEMS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "pytorch_model"}

STOCK_PIPELINE_CLASS = "CogVideoXPipeline"
STOCK_TRANSFORMER = ("diffusers", "CogVideoXTransformer3DModel")
STOCK_VAE = ("diffusers", "AutoencoderKLCogVideoX")
DEFAULT_SCHEDULER = "CogVideoXDDIMScheduler"
DEFAULT_TEXT_ENCODER = "T5EncoderModel"
DEFAULT_TOKENIZER = "T5Tokenizer"


class ConversionError(ValueError):
    """The source folder is not a layout this converter understands, or the verification failed."""


# --------------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------------


@dataclass
class WeightFiles:
    """The weight files of one model folder: format, shard files and (for sharded ones) the index path."""

    folder: Path
    fmt: str  # "safetensors" or "bin"
    files: List[Path]
    index: Optional[Path] = None


def find_weight_files(folder: Path, component: str) -> WeightFiles:
    """Locate a model's weights: ``<stem>.safetensors``, a sharded safetensors index, or the ``.bin`` forms."""
    st_stem, bin_stem = _STEMS[component], _BIN_STEMS[component]
    candidates = [
        ("safetensors", f"{st_stem}.safetensors", f"{st_stem}.safetensors.index.json"),
        ("bin", f"{bin_stem}.bin", f"{bin_stem}.bin.index.json"),
    ]
    for fmt, single, index in candidates:
        if (folder / single).is_file():
            return WeightFiles(folder, fmt, [_inside(folder / single, folder)])
        if (folder / index).is_file():
            files = _shard_files(_inside(folder / index, folder))
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ConversionError(f"{folder / index} lists shard files that are missing: {missing}.")
            return WeightFiles(folder, fmt, files, folder / index)
    # Any other single safetensors / bin file (e.g. an unusual file name) is accepted when it is alone.
    for fmt in ("safetensors", "bin"):
        found = sorted(p for p in folder.glob(f"*.{fmt}") if p.is_file())
        if len(found) == 1:
            return WeightFiles(folder, fmt, [_inside(found[0], folder)])
    raise ConversionError(
        f"No weights found in {folder}: expected {st_stem}.safetensors, a sharded "
        f"{st_stem}.safetensors.index.json, or the .bin equivalents."
    )


def _inside(path: Path, folder: Path) -> Path:
    """``path`` when it (following links) is inside ``folder``; a ConversionError naming it otherwise."""
    try:
        check_inside(path, folder, "Weight file")
    except UnsafePathError as error:
        raise ConversionError(str(error)) from None
    return path


def _shard_files(index: Path) -> List[Path]:
    """The shard files a ``*.index.json`` names, each confined to the index's folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConversionError(f"{index} is not a shard index with a `weight_map`: {error}") from None
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index}: `weight_map` must map tensor names to shard file names.")
    files = set()
    for tensor, name in weight_map.items():
        try:
            files.add(confined(index.parent, name, f"{index.name}: the `weight_map` entry of {tensor!r}"))
        except UnsafePathError as error:
            raise ConversionError(str(error)) from None
    return sorted(files)


def _load_bin(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint, read with torch's weights-only loader (no code runs)."""
    import pickle

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) pickles cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{path}: refused: the pickle holds objects other than tensors, which convert-official never loads "
            f"({refusal_reason(error)}) Ask the publisher for safetensors weights."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise ConversionError(f"{path}: cannot be read as a PyTorch checkpoint (damaged or not a checkpoint): {str(error).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise ConversionError(f"{path} does not hold a state dict (got {type(state).__name__}).")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def iter_tensors(weights: WeightFiles) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` of every tensor in the files, one shard in memory at a time."""
    for path in weights.files:
        if weights.fmt == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        else:
            yield from _load_bin(path).items()


def _safetensors_lookup(weights: WeightFiles) -> Callable[[str], Optional[torch.Tensor]]:
    """A function name -> tensor over safetensors files (opened lazily, kept open)."""
    from safetensors import safe_open

    handles = [safe_open(str(path), framework="pt") for path in weights.files]
    where: Dict[str, Any] = {}
    for handle in handles:
        for name in handle.keys():
            where[name] = handle

    def get(name: str) -> Optional[torch.Tensor]:
        handle = where.get(name)
        return None if handle is None else handle.get_tensor(name)

    get.keys = lambda: list(where)  # type: ignore[attr-defined]
    return get


def _bin_to_safetensors(weights: WeightFiles, out_dir: Path, component: str) -> List[str]:
    """Rewrite pickled shards as safetensors (same names, dtypes and values). Returns the files written."""
    from safetensors.torch import save_file

    st_stem, bin_stem = _STEMS[component], _BIN_STEMS[component]
    written: List[str] = []
    weight_map: Dict[str, str] = {}
    total_size = 0
    for path in weights.files:
        state = _load_bin(path)
        # safetensors refuses tensors that share memory (tied weights): give each its own contiguous copy.
        seen_storage = set()
        tensors = {}
        for name, tensor in state.items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
            if key is not None and key in seen_storage:
                tensor = tensor.clone()
            elif key is not None:
                seen_storage.add(key)
            tensors[name] = tensor.contiguous()
        if weights.index is None:
            target = f"{st_stem}.safetensors"
        else:
            target = path.name.replace(bin_stem, st_stem, 1)
            target = target[: -len(".bin")] + ".safetensors"
        save_file(tensors, str(out_dir / target), metadata={"format": "pt"})
        written.append(target)
        for name, tensor in tensors.items():
            weight_map[name] = target
            total_size += tensor.numel() * tensor.element_size()
        del state, tensors
    if weights.index is not None:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        name = f"{st_stem}.safetensors.index.json"
        (out_dir / name).write_text(json.dumps(index, indent=2) + "\n")
        written.append(name)
    return written


# --------------------------------------------------------------------------------------------------
# Configs and model_index.json
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"Cannot read {path}: {error}") from None


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def normalise_transformer_config(config: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The transformer config under the stock class name with ``attn_mask_variant`` as the one mask key.

    Returns ``(new_config, notes)``; notes record the source class name and where the variant came from.
    """
    config = dict(config)
    notes: Dict[str, Any] = {"source_class_name": config.get("_class_name")}
    authors = config.pop("attn_msk_version", None)
    ours = config.get("attn_mask_variant")
    if authors is not None:
        variant = check_mask_variant(authors, "attn_msk_version")
        if ours is not None and check_mask_variant(ours, "attn_mask_variant") != variant:
            raise ConversionError(
                f"The transformer config has attn_msk_version={authors!r} and attn_mask_variant={ours!r}, which disagree."
            )
        notes["mask_variant_from"] = f"attn_msk_version={authors!r}"
    elif ours is not None:
        variant = check_mask_variant(ours, "attn_mask_variant")
        notes["mask_variant_from"] = f"attn_mask_variant={ours!r}"
    else:
        variant = DEFAULT_MASK_VARIANT
        notes["mask_variant_from"] = f"not in the source config; the package default {DEFAULT_MASK_VARIANT!r}"
    config["_class_name"] = STOCK_TRANSFORMER[1]
    config["attn_mask_variant"] = variant
    notes["attn_mask_variant"] = variant
    return config, notes


def _diffusers_class_exists(name: Any) -> bool:
    import diffusers

    return isinstance(name, str) and isinstance(getattr(diffusers, name, None), type)


def _transformers_class_exists(name: Any) -> bool:
    import transformers

    if not isinstance(name, str):
        return False
    try:
        return isinstance(getattr(transformers, name), type)
    except (AttributeError, ImportError):
        return False


def component_classes(folder: Path) -> Dict[str, Tuple[str, str]]:
    """``model_index.json`` entries (library, class) for the five CogVideoX components found in ``folder``."""
    classes: Dict[str, Tuple[str, str]] = {"transformer": STOCK_TRANSFORMER}
    vae_class = _read_json(folder / "vae" / "config.json").get("_class_name")
    classes["vae"] = ("diffusers", vae_class if _diffusers_class_exists(vae_class) else STOCK_VAE[1])
    text_config = _read_json(folder / "text_encoder" / "config.json")
    architectures = text_config.get("architectures") or [DEFAULT_TEXT_ENCODER]
    text_class = architectures[0] if _transformers_class_exists(architectures[0]) else DEFAULT_TEXT_ENCODER
    classes["text_encoder"] = ("transformers", text_class)
    tokenizer_config = folder / "tokenizer" / "tokenizer_config.json"
    tokenizer_class = _read_json(tokenizer_config).get("tokenizer_class") if tokenizer_config.is_file() else None
    classes["tokenizer"] = (
        "transformers",
        tokenizer_class if _transformers_class_exists(tokenizer_class) else DEFAULT_TOKENIZER,
    )
    scheduler_class = _read_json(folder / "scheduler" / "scheduler_config.json").get("_class_name")
    classes["scheduler"] = ("diffusers", scheduler_class if _diffusers_class_exists(scheduler_class) else DEFAULT_SCHEDULER)
    return classes


def stock_model_index(classes: Dict[str, Tuple[str, str]], diffusers_version: Optional[str] = None) -> Dict[str, Any]:
    import diffusers

    index: Dict[str, Any] = {"_class_name": STOCK_PIPELINE_CLASS, "_diffusers_version": diffusers_version or diffusers.__version__}
    for name in sorted(classes):
        index[name] = list(classes[name])
    return index


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


def _dominant_float_dtype(weights: WeightFiles) -> Optional[torch.dtype]:
    counts: Dict[torch.dtype, int] = {}
    for _, tensor in iter_tensors(weights):
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.get) if counts else None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal values; a wider dtype on one side is accepted when the cast is exact both ways."""
    if a.shape != b.shape:
        return False
    if a.dtype == b.dtype:
        return torch.equal(a, b)
    return torch.equal(a.to(b.dtype), b) and torch.equal(b.to(a.dtype), a)


def verify_files(source: WeightFiles, output: WeightFiles) -> Dict[str, Any]:
    """Compare every tensor of ``source`` with the one of the same name in ``output`` (names, dtypes, values)."""
    lookup = _safetensors_lookup(output)
    out_names = set(lookup.keys())  # type: ignore[attr-defined]
    count = params = nbytes = 0
    dtypes: Dict[str, int] = {}
    seen = set()
    for name, tensor in iter_tensors(source):
        other = lookup(name)
        if other is None:
            raise ConversionError(f"Tensor `{name}` of {source.folder} is missing from the converted files.")
        if other.dtype != tensor.dtype or not torch.equal(other, tensor):
            raise ConversionError(f"Tensor `{name}` differs between {source.folder} and the converted files.")
        seen.add(name)
        count += 1
        params += tensor.numel()
        nbytes += tensor.numel() * tensor.element_size()
        dtypes[str(tensor.dtype).replace("torch.", "")] = dtypes.get(str(tensor.dtype).replace("torch.", ""), 0) + tensor.numel()
    extra = sorted(out_names - seen)
    if extra:
        raise ConversionError(f"The converted files of {output.folder} hold tensors not in the source: {extra[:5]}...")
    return {"tensors": count, "parameters": params, "bytes": nbytes, "dtypes": dtypes}


def _load_component(out_dir: Path, component: str, library_class: Tuple[str, str], dtype: Optional[torch.dtype]):
    import diffusers
    import transformers

    library, class_name = library_class
    if component == "transformer":
        from ..transformer import Mask2DiTTransformer3DModel

        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        return Mask2DiTTransformer3DModel.from_pretrained(str(out_dir), subfolder="transformer", **kwargs)
    if library == "diffusers":
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        return getattr(diffusers, class_name).from_pretrained(str(out_dir), subfolder=component, **kwargs)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return getattr(transformers, class_name).from_pretrained(str(out_dir / component), **kwargs)


def verify_loaded(source: WeightFiles, model: torch.nn.Module) -> Dict[str, Any]:
    """Compare every source tensor with the parameter / buffer of the same name of the loaded ``model``."""
    state = model.state_dict()
    compared = set()
    for name, tensor in iter_tensors(source):
        loaded = state.get(name)
        if loaded is None:
            raise ConversionError(f"The model loaded from the converted folder has no tensor `{name}`.")
        if not _same(loaded.detach().cpu(), tensor):
            raise ConversionError(f"Tensor `{name}` of the loaded model differs from the source checkpoint.")
        compared.add(name)
    # Names the source does not hold must be aliases of compared tensors (tied weights), never fresh ones.
    pointers = {state[name].data_ptr() for name in compared if state[name].numel()}
    fresh = [n for n in state if n not in compared and state[n].numel() and state[n].data_ptr() not in pointers]
    if fresh:
        raise ConversionError(
            f"The model loaded from the converted folder has tensors the source does not provide: {fresh[:5]}."
        )
    return {"loaded_class": type(model).__name__, "loaded_tensors_compared": len(compared), "tied_aliases": len(state) - len(compared)}


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    source: str
    output: str
    verify: str
    components: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    transformer_config: Dict[str, Any] = field(default_factory=dict)
    had_model_index: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {
            "source": self.source,
            "output": self.output,
            "verify": self.verify,
            "had_model_index": self.had_model_index,
            "transformer_config": self.transformer_config,
            "components": self.components,
        }

    def summary(self) -> str:
        """What was converted, for the terminal (it names the local folders; the written report does not)."""
        lines = [f"Converted {self.source} -> {self.output}"]
        for name in COMPONENTS:
            info = self.components.get(name, {})
            if "tensors" in info:
                dtypes = ", ".join(f"{k}" for k in info.get("dtypes", {}))
                how = {"load": "files and loaded model", "files": "files"}.get(self.verify, "not verified")
                check = "identical to the source" if self.verify != "none" else "NOT verified"
                lines.append(
                    f"  {name}: {info['tensors']} tensors, {info['parameters']:,} parameters ({dtypes}), "
                    f"{info['action']}; {check} ({how})"
                )
            else:
                lines.append(f"  {name}: {info.get('action', 'copied')}")
        lines.append(
            f"  transformer config: {self.transformer_config.get('source_class_name')!r} -> "
            f"{STOCK_TRANSFORMER[1]!r}, attn_mask_variant={self.transformer_config.get('attn_mask_variant')!r} "
            f"({self.transformer_config.get('mask_variant_from')})"
        )
        return "\n".join(lines)


def publishable_report(report: Dict[str, Any]) -> Dict[str, Any]:
    """``report`` without local paths: the source and output folders (and any other absolute path in it) are
    reduced to their folder names, so that the report can be published with the weights."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, list):
            return [clean(item) for item in value]
        if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~") or _WINDOWS_PATH.match(value)):
            return PureWindowsPath(value).name if "\\" in value else Path(value).name
        return value

    return clean(report)


def _copy_file(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _check_source(src: Path) -> None:
    if not src.is_dir():
        raise ConversionError(f"`--src` {src} is not a folder.")
    missing = [name for name in COMPONENTS if not (src / name).is_dir()]
    if missing:
        raise ConversionError(
            f"{src} is missing the component folder(s) {missing}; the authors' layout has {list(COMPONENTS)}."
        )
    for name, config in (("transformer", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                         ("scheduler", "scheduler_config.json")):
        if not (src / name / config).is_file():
            raise ConversionError(f"{src / name} has no {config}.")


def check_output_dir(out: Path, overwrite: bool, marker: Optional[str] = None) -> None:
    """Refuse an existing non-empty ``out`` unless ``overwrite`` and it holds ``marker`` (a file an earlier
    run of this tool wrote), so that no unrelated folder is ever replaced."""
    if out.exists() and not out.is_dir():
        raise ConversionError(f"The output folder {out} is a file.")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConversionError(f"The output folder {out} exists and is not empty; pass --overwrite to replace it.")
        if marker is not None and not (out / marker).exists():
            raise ConversionError(
                f"--overwrite refuses to delete {out}: it does not look like an earlier output of this command "
                f"(no {marker}). Remove it yourself or choose another folder."
            )


def _convert_component(src: Path, name: str, out_dir: Path, link: bool) -> Tuple[Dict[str, Any], Optional[WeightFiles]]:
    """Copy one component folder (weights as safetensors); returns its report entry and its source weights."""
    src_dir = src / name
    out_dir.mkdir()
    weights = find_weight_files(src_dir, name) if name in WEIGHT_COMPONENTS else None
    weight_paths = set(weights.files) | ({weights.index} if weights.index else set()) if weights is not None else set()
    try:
        files = files_under(src_dir, f"{name}/ file", root=src)
    except UnsafePathError as error:
        raise ConversionError(str(error)) from None
    for path in files:
        if path in weight_paths:
            continue
        if weights is not None and path.suffix in (".bin", ".safetensors", ".pt", ".pth", ".ckpt"):
            continue  # other weight files (e.g. another format of the same weights) are not carried over
        target = out_dir / path.relative_to(src_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_file(path, target, link)
    if weights is None:
        return {"action": "copied"}, None
    if weights.fmt == "safetensors":
        for path in weights.files + ([weights.index] if weights.index else []):
            _copy_file(path, out_dir / path.name, link)
        return {"action": "safetensors copied unchanged"}, weights
    _bin_to_safetensors(weights, out_dir, name)
    return {"action": f"{len(weights.files)} .bin file(s) rewritten as safetensors"}, weights


def _verify_conversion(out: Path, sources: Dict[str, WeightFiles], classes: Dict[str, Tuple[str, str]],
                       report: ConversionReport) -> None:
    """Compare every source tensor with the written files and (``verify="load"``) with the loaded models."""
    for name, weights in sources.items():
        out_weights = find_weight_files(out / name, name)
        report.components[name].update(verify_files(weights, out_weights))
        if report.verify == "load":
            model = _load_component(out, name, classes[name], _dominant_float_dtype(weights))
            report.components[name].update(verify_loaded(weights, model))
            expected = report.transformer_config["attn_mask_variant"]
            if name == "transformer" and model.config.attn_mask_variant != expected:
                raise ConversionError(
                    f"The converted transformer loads with mask {model.config.attn_mask_variant!r}, expected {expected!r}."
                )
            del model
    if report.verify == "load":
        import diffusers
        import transformers

        getattr(transformers, classes["tokenizer"][1]).from_pretrained(str(out / "tokenizer"))
        getattr(diffusers, classes["scheduler"][1]).from_pretrained(str(out), subfolder="scheduler")
        report.components["tokenizer"]["loaded_class"] = classes["tokenizer"][1]
        report.components["scheduler"]["loaded_class"] = classes["scheduler"][1]


def _convert_into(src: Path, staging: Path, report: ConversionReport, link: bool) -> None:
    """Write the whole converted folder into ``staging`` (verified as ``report.verify`` says)."""
    sources: Dict[str, WeightFiles] = {}
    for name in COMPONENTS:
        report.components[name], weights = _convert_component(src, name, staging / name, link)
        if weights is not None:
            sources[name] = weights

    # Transformer config: stock class name, one mask-variant key.
    config_path = staging / "transformer" / "config.json"
    config, report.transformer_config = normalise_transformer_config(_read_json(config_path))
    config_path.unlink()  # with --link it is the source's own file: never write through the link
    _write_json(config_path, config)

    classes = component_classes(staging)
    old_index = _read_json(src / "model_index.json") if report.had_model_index else {}
    _write_json(staging / "model_index.json", stock_model_index(classes, old_index.get("_diffusers_version")))
    if report.verify != "none":
        _verify_conversion(staging, sources, classes, report)
    _write_json(staging / REPORT_NAME, publishable_report(report.to_dict()))


def _swap_in(staging: Path, out: Path) -> None:
    """Put the complete ``staging`` folder at ``out``, replacing what was there only now."""
    if out.exists():
        retired = out.parent / f".old-{out.name}-{os.getpid()}"
        os.rename(out, retired)
        os.rename(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, out)


# The staging folder beside ``out``: ``.mask2dit-convert-<out name>-<pid>-<8 hex>``, holding a marker file with the
# host name, so that a later run can tell its own killed conversions from anything else in that folder.
STAGING_PREFIX = ".mask2dit-convert-"
STAGING_MARKER = ".mask2dit-convert-staging"


def _new_staging(out: Path) -> Path:
    staging = out.parent / f"{STAGING_PREFIX}{out.name}-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    (staging / STAGING_MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "output": out.name}))
    return staging


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_staging(out: Path) -> List[Path]:
    """Remove the staging folders that killed runs of this command for ``out`` left beside it: the name and marker
    say so, the host is this one and the process that made it is gone. Anything else is left alone."""
    pattern = re.compile(rf"^{re.escape(STAGING_PREFIX + out.name)}-(\d+)-[0-9a-f]{{8}}$")
    removed = []
    for entry in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        found = pattern.match(entry.name)
        if not found or entry.is_symlink() or not (entry / STAGING_MARKER).is_file():
            continue
        try:
            marker = json.loads((entry / STAGING_MARKER).read_text())
        except (OSError, ValueError):
            continue
        if marker.get("host") != socket.gethostname() or marker.get("pid") != int(found.group(1)) or _process_alive(int(found.group(1))):
            continue  # another machine's, or a conversion still running
        shutil.rmtree(entry, ignore_errors=True)
        logger.warning(f"Removed {entry}, the unfinished output of an earlier convert-official that was killed.")
        removed.append(entry)
    return removed


def convert_official(
    src: os.PathLike | str,
    out: os.PathLike | str,
    verify: str = "load",
    overwrite: bool = False,
    link: bool = False,
) -> ConversionReport:
    """Convert the authors' released layout in ``src`` into a standard diffusers folder ``out``.

    The folder is written and verified under a temporary name beside ``out`` and renamed to ``out`` only
    when complete: a failure (a refused pickle, a file that escapes ``src``, a tensor that differs) leaves
    ``out`` as it was; the unfinished folder of a killed run is removed by the next run for the same ``out``
    (see `remove_stale_staging`). Files are read only from inside ``src``: a link out of it is refused, naming it.

    Args:
        src: folder with ``transformer/ vae/ text_encoder/ tokenizer/ scheduler/`` (e.g. a download of
            ``qth/Mask2DiT``); a ``model_index.json`` may or may not be there.
        out: the new folder (must not exist or be empty, unless ``overwrite`` and it is an earlier output).
        verify: ``"load"`` (default): compare every source tensor with the output files and with the models
            loaded from ``out``; ``"files"``: only with the output files; ``"none"``: skip.
        link: hard-link unchanged files instead of copying them (same file system only; falls back to copy).

    Returns:
        The :class:`ConversionReport`, also written (without local paths) to ``out/mask2dit_conversion.json``.

    Raises:
        ConversionError: unknown layout, a missing or refused file, or a tensor that differs after conversion.
    """
    src, out = Path(src).resolve(), Path(out).resolve()
    if verify not in VERIFY_MODES:
        raise ConversionError(f"`verify` must be one of {list(VERIFY_MODES)}, got {verify!r}.")
    _check_source(src)
    if out == src or src in out.parents:
        raise ConversionError(f"The output folder {out} must not be the source folder or inside it.")
    check_output_dir(out, overwrite, marker=REPORT_NAME)
    report = ConversionReport(source=str(src), output=str(out), verify=verify,
                              had_model_index=(src / "model_index.json").is_file())
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = _new_staging(out)
    try:
        _convert_into(src, staging, report, link)
        (staging / STAGING_MARKER).unlink()
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
