"""Mask²DiT web demo: a Gradio app for multi-scene video generation (one prompt per scene, extend by one scene).

This file is the ``app.py`` of the Space folders that ``mask2dit hub space`` writes, copied verbatim. It must run
WITHOUT diffusers-mask2dit installed: it needs gradio, torch, diffusers, transformers, imageio(-ffmpeg) and Pillow,
and loads the model folder's bundled one-file pipeline (``pipeline.py``) with ``custom_pipeline=<model>,
trust_remote_code=True``. Its settings come from ``space.json`` beside it (see :data:`DEFAULT_CONFIG`);
``MASK2DIT_MODEL`` overrides the model (a Hub id or a local folder). ``mask2dit demo --web`` runs the same app
on a pipeline the package loaded itself.

Run locally: ``python app.py`` (binds 127.0.0.1:7860; gradio's ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``
choose another address, as a Space does).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

CONFIG_FILE = "space.json"
MASK_VARIANTS = ("v2", "v1", "v3", "full")
DEFAULT_CONFIG: Dict[str, Any] = {
    "model": None,  # Hub id or local folder with model_index.json and the bundled pipeline.py
    "title": "Mask²DiT: multi-scene video",
    "description": "",
    "num_inference_steps": 50,  # the model's own defaults, written by `mask2dit hub space`
    "guidance_scale": 6.0,
    "height": None,  # None: the transformer's sample size
    "width": None,
    "num_frames": None,  # per scene
    "max_sequence_length": None,  # None: the tokenizer's limit, at most 226
    "mask_variant": "v2",
    "fps": 8,
    "max_scenes": 6,
    "scenes_per_window": 3,  # scenes made together; more are added by scene extension (generate_long)
    "vocabulary": None,  # closed-vocabulary models: {"template": "a {colour} ...", "slots": {"colour": [...], ...}}
    "examples": [],
    "dtype": "auto",  # auto: bfloat16 on CUDA, float32 on CPU
    "gpu_duration": 120,  # seconds a ZeroGPU call may hold the GPU
    "output_ttl_s": 3600,  # job folders older than this are deleted (None: kept)
}


# --------------------------------------------------------------------------------------------------
# Settings and input checks
# --------------------------------------------------------------------------------------------------


def load_config(folder: os.PathLike | str) -> Dict[str, Any]:
    """:data:`DEFAULT_CONFIG` updated with ``<folder>/space.json`` and ``MASK2DIT_MODEL``; a local model path is
    taken relative to ``folder``."""
    config = dict(DEFAULT_CONFIG)
    path = Path(folder) / CONFIG_FILE
    if path.is_file():
        loaded = json.loads(path.read_text(encoding="utf-8"))
        unknown = sorted(set(loaded) - set(DEFAULT_CONFIG))
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; accepted: {sorted(DEFAULT_CONFIG)}.")
        config.update(loaded)
    config["model"] = os.environ.get("MASK2DIT_MODEL") or config["model"]
    if not config["model"]:
        raise ValueError(f"No model: set `model` in {path} or the MASK2DIT_MODEL environment variable.")
    local = Path(folder) / config["model"]
    if not os.path.isabs(config["model"]) and local.is_dir():
        config["model"] = str(local.resolve())
    return config


def vocabulary_problem(prompt: str, vocabulary: Dict[str, Any]) -> Optional[str]:
    """Why ``prompt`` does not fit a closed-vocabulary model's template, or None when it does."""
    slots = vocabulary["slots"]
    words = prompt.lower().split()
    known = {word for choices in slots.values() for word in choices}
    unknown = [word for word in words if word not in known]
    accepted = "; ".join(f"{slot}: {', '.join(choices)}" for slot, choices in slots.items() if len(choices) > 1)
    if unknown:
        return f"uses words outside the model's vocabulary: {', '.join(unknown)}. Accepted words: {accepted}."
    if len(words) != len(slots) or any(word not in choices for word, choices in zip(words, slots.values())):
        return f"is not of the form '{vocabulary['template']}' ({accepted})."
    return None


def check_prompts(prompts: Sequence[Optional[str]], config: Dict[str, Any]) -> List[str]:
    """The scene prompts, stripped; a ValueError with a readable message for an empty prompt, too many scenes or
    (closed-vocabulary models) a word the model does not know."""
    if not prompts:
        raise ValueError("Give at least one scene prompt.")
    if len(prompts) > config["max_scenes"]:
        raise ValueError(f"{len(prompts)} scenes: this demo makes 1 to {config['max_scenes']} scenes at a time.")
    cleaned = []
    for index, prompt in enumerate(prompts, start=1):
        prompt = " ".join((prompt or "").split())
        if not prompt:
            raise ValueError(f"Scene {index}'s prompt is empty: describe the scene or remove its row.")
        if config.get("vocabulary"):
            problem = vocabulary_problem(prompt, config["vocabulary"])
            if problem:
                raise ValueError(f"Scene {index}'s prompt {prompt!r} {problem}")
            prompt = prompt.lower()
        cleaned.append(prompt)
    return cleaned


def resolve_seed(seed: Optional[float]) -> int:
    """``seed`` as an int; -1 (or empty) draws a random one."""
    if seed is None or int(seed) < 0:
        return secrets.randbelow(2**31)
    return int(seed)


# --------------------------------------------------------------------------------------------------
# Files: videos, contact sheet, clean-up
# --------------------------------------------------------------------------------------------------


def write_mp4(frames: np.ndarray, path: Path, fps: int) -> str:
    """``frames`` uint8 ``(F, H, W, 3)`` as H.264 mp4 (yuv420p, playable in browsers)."""
    import imageio

    with imageio.get_writer(str(path), fps=fps, codec="libx264", quality=8, pixelformat="yuv420p",
                            macro_block_size=1, ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)
    return str(path)


def contact_sheet(scenes: Sequence[np.ndarray], labels: Sequence[str], columns: int = 5) -> "Any":
    """A PIL image: one row per scene, ``columns`` frames spread over the scene, its label above the row. Small
    frames are enlarged (nearest neighbour) to at least 96 pixels high so the sheet stays readable."""
    from PIL import Image, ImageDraw

    height, width = scenes[0].shape[1:3]
    scale = max(1, -(-96 // height))
    cell_h, cell_w, label_h, pad, head = height * scale, width * scale, 16, 4, 28  # head: room for the page's label
    sheet = Image.new("RGB", (pad + columns * (cell_w + pad), head + len(scenes) * (label_h + cell_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (frames, label) in enumerate(zip(scenes, labels)):
        top = head + row * (label_h + cell_h + pad)
        draw.text((pad, top + 2), label, fill="black")
        picks = np.linspace(0, len(frames) - 1, num=min(columns, len(frames))).round().astype(int)
        for column, index in enumerate(picks):
            cell = Image.fromarray(frames[index]).resize((cell_w, cell_h), Image.NEAREST)
            sheet.paste(cell, (pad + column * (cell_w + pad), top + label_h))
    return sheet


def prune_outputs(root: Path, max_age_s: float) -> int:
    """Delete job folders under ``root`` older than ``max_age_s``; returns how many."""
    removed = 0
    now = time.time()
    for job in root.glob("job-*"):
        if job.is_dir() and now - job.stat().st_mtime > max_age_s:
            shutil.rmtree(job, ignore_errors=True)
            removed += 1
    return removed


@dataclass
class Film:
    """A finished generation, kept per browser session so that it can be extended."""

    prompts: List[str]
    latents: Any  # (1, F_latent, C, h, w) tensor on the CPU, all scenes one after the other
    latent_frames: List[int]
    pixel_frames: List[int]
    scenes: List[np.ndarray]  # uint8 (F, H, W, 3) per scene
    scene_files: List[str] = field(default_factory=list)
    video_file: str = ""
    sheet_file: str = ""
    seed: int = 0


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def load_pipeline(model: str, dtype: str = "auto"):
    """The model's bundled Mask²DiT pipeline (``pipeline.py``) through diffusers' custom pipelines, on CUDA when
    there is one."""
    import torch
    from diffusers import DiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32,
                   "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    pipe = DiffusionPipeline.from_pretrained(model, custom_pipeline=model, trust_remote_code=True, torch_dtype=torch_dtype)
    return pipe.to(device)


class SceneMaker:
    """Runs the pipeline for the app and writes each job's files under ``output_root/job-<id>/``."""

    def __init__(self, pipe, config: Dict[str, Any], output_root: Optional[os.PathLike | str] = None):
        self.pipe = pipe
        self.config = config
        self.output_root = Path(output_root or os.path.join(tempfile.gettempdir(), "mask2dit-space"))
        self.output_root.mkdir(parents=True, exist_ok=True)

    def _options(self, mask: str, steps: float, guidance: float) -> Dict[str, Any]:
        if mask not in MASK_VARIANTS:
            raise ValueError(f"Mask variant {mask!r}: choose one of {', '.join(MASK_VARIANTS)}.")
        if steps is None or int(steps) < 1:
            raise ValueError(f"Steps must be at least 1, got {steps}.")
        config, tokenizer = self.config, getattr(self.pipe, "tokenizer", None)
        max_length = config["max_sequence_length"] or min(226, getattr(tokenizer, "model_max_length", 226))
        options = dict(num_inference_steps=int(steps), guidance_scale=float(guidance), output_type="latent",
                       attention_kwargs={"scene_mask": mask}, max_sequence_length=max_length)
        options.update({key: config[key] for key in ("height", "width", "num_frames") if config[key]})
        return options

    def _generator(self, seed: int):
        import torch

        return torch.Generator("cpu").manual_seed(seed)

    def _decode(self, scene_latents: Sequence[Any]) -> List[np.ndarray]:
        import torch

        latents = torch.cat(list(scene_latents), dim=0)[None]
        _, scenes = self.pipe.decode_scenes(latents, [s.shape[0] for s in scene_latents], output_type="np")
        return [(np.clip(scene, 0, 1) * 255).round().astype(np.uint8) for scene in scenes[0]]

    def generate(self, prompts: Sequence[str], mask: str, seed: int, steps: float, guidance: float) -> Film:
        """All scenes of one film: one pass for up to ``scenes_per_window`` prompts, then scene extension."""
        import torch

        prompts = check_prompts(prompts, self.config)
        options = self._options(mask, steps, guidance)
        window = self.config["scenes_per_window"]
        if len(prompts) <= window:
            output = self.pipe(prompt=list(prompts), generator=self._generator(seed), **options)
        else:
            output = self.pipe.generate_long(list(prompts), scenes_per_window=window, generator=self._generator(seed),
                                             **options)
        scene_latents = [s.float().cpu() for s in output.scene_frames[0]]
        scenes = self._decode(scene_latents)
        film = Film(prompts=list(prompts), latents=torch.cat(scene_latents, dim=0)[None],
                    latent_frames=[s.shape[0] for s in scene_latents], pixel_frames=[len(s) for s in scenes],
                    scenes=scenes, seed=seed)
        return self.write(film)

    def extend(self, film: Film, prompt: str, mask: str, seed: int, steps: float, guidance: float) -> Film:
        """``film`` and one more scene, made by scene extension from the last scenes' exact latents; the earlier
        scenes' frames and files are kept as they are."""
        import torch

        if len(film.prompts) >= self.config["max_scenes"]:
            raise ValueError(f"The film has {len(film.prompts)} scenes, the most this demo makes.")
        new_prompt = check_prompts([prompt], self.config)[0]
        context = min(len(film.prompts), self.config["scenes_per_window"] - 1)
        context_frames = sum(film.latent_frames[-context:])
        options = self._options(mask, steps, guidance)
        options.pop("height", None), options.pop("width", None)  # the context's size
        output = self.pipe.extend(
            prompt=[new_prompt], context_prompts=film.prompts[-context:],
            context_latents=film.latents[:, film.latents.shape[1] - context_frames:].to(self.pipe.dtype),
            context_num_frames=film.pixel_frames[-context:], num_new_scenes=1, generator=self._generator(seed),
            **options,
        )
        new_latents = output.scene_frames[0][-1].float().cpu()
        new_scene = self._decode([new_latents])[0]
        longer = Film(prompts=film.prompts + [new_prompt], latents=torch.cat([film.latents, new_latents[None]], dim=1),
                      latent_frames=film.latent_frames + [new_latents.shape[0]],
                      pixel_frames=film.pixel_frames + [len(new_scene)], scenes=film.scenes + [new_scene],
                      scene_files=list(film.scene_files), seed=seed)
        return self.write(longer)

    def write(self, film: Film) -> Film:
        """Write the film's files into a new job folder: scenes already written are copied byte for byte."""
        if self.config["output_ttl_s"] is not None:
            prune_outputs(self.output_root, self.config["output_ttl_s"])
        job = self.output_root / f"job-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        job.mkdir()
        fps = self.config["fps"]
        files = []
        for index, frames in enumerate(film.scenes):
            target = job / f"scene_{index + 1:02d}.mp4"
            if index < len(film.scene_files):
                shutil.copyfile(film.scene_files[index], target)
            else:
                write_mp4(frames, target, fps)
            files.append(str(target))
        film.scene_files = files
        film.video_file = write_mp4(np.concatenate(film.scenes), job / "video.mp4", fps)
        labels = [f"{i + 1}: {p}" for i, p in enumerate(film.prompts)]
        film.sheet_file = str(job / "contact_sheet.png")
        contact_sheet(film.scenes, labels).save(film.sheet_file)
        (job / "prompts.txt").write_text("\n".join(film.prompts) + "\n", encoding="utf-8")
        return film


def gpu_decorator(duration: int) -> Callable[[Callable], Callable]:
    """``spaces.GPU(duration=...)`` on ZeroGPU Spaces (the ``spaces`` package is present), else no change."""
    try:
        import spaces
    except ImportError:
        return lambda function: function
    return spaces.GPU(duration=duration)


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------


def film_outputs(film: Film) -> tuple:
    """What the page shows for ``film``: whole video, scene gallery, contact sheet, downloads, note, state."""
    gallery = [(path, f"Scene {index + 1}: {prompt}") for index, (path, prompt) in enumerate(zip(film.scene_files, film.prompts))]
    scenes = len(film.prompts)
    note = f"Seed {film.seed} · {scenes} scene{'s' * (scenes != 1)} · {sum(film.pixel_frames)} frames"
    return film.video_file, gallery, film.sheet_file, [film.video_file, *film.scene_files, film.sheet_file], note, film


def _readable(run: Callable[[], Film]) -> tuple:
    """Run a job; bad input becomes ``gr.Error`` (a message in the page), never a stack trace."""
    import gradio as gr

    try:
        return film_outputs(run())
    except ValueError as error:
        raise gr.Error(" ".join(str(error).split()), print_exception=False) from None
    except Exception as error:  # noqa: BLE001 - anything else: one readable line, the traceback in the log
        raise gr.Error(f"Generation failed: {type(error).__name__}: {' '.join(str(error).split())[:300]}") from error


def _scene_rows(gr, config: Dict[str, Any]) -> list:
    examples = list(config.get("examples") or [])
    rows = []
    for index in range(config["max_scenes"]):
        value = examples[index] if index < min(3, len(examples)) else ""
        rows.append(gr.Textbox(value=value, label=f"Scene {index + 1}", visible=index < 3, max_lines=2,
                               elem_id=f"scene-prompt-{index + 1}"))
    return rows


def _prompt_builder(gr, vocabulary: Dict[str, Any], count, rows: list) -> None:
    """Drop-downs for the template's slots; the button puts the prompt into the first empty scene (or a new row)."""
    slots = vocabulary["slots"]
    with gr.Accordion("Prompt builder", open=True):
        with gr.Row():
            pickers = [gr.Dropdown(list(choices), value=choices[0], label=slot)
                       for slot, choices in slots.items() if len(choices) > 1]
        use = gr.Button("Use as a scene prompt", size="sm", elem_id="use-built-prompt")

    def fill(count_value, *values):
        words, picked = [], iter(values[len(rows):])
        for choices in slots.values():
            words.append(choices[0] if len(choices) == 1 else next(picked))
        prompt, texts, shown = " ".join(words), list(values[: len(rows)]), int(count_value)
        empty = [i for i in range(shown) if not (texts[i] or "").strip()]
        target = empty[0] if empty else min(shown, len(rows) - 1)
        texts[target] = prompt
        shown = max(shown, target + 1)
        return [shown] + [gr.update(value=texts[i], visible=i < shown) for i in range(len(rows))]

    use.click(fill, [count, *rows, *pickers], [count, *rows], api_name=False)


def _row_buttons(gr, count, rows: list) -> None:
    with gr.Row():
        add = gr.Button("Add scene", size="sm", elem_id="add-scene")
        remove = gr.Button("Remove last scene", size="sm", elem_id="remove-scene")

    def show(shown):
        return [shown] + [gr.update(visible=i < shown) for i in range(len(rows))]

    add.click(lambda n: show(min(int(n) + 1, len(rows))), count, [count, *rows], api_name=False)
    remove.click(lambda n: show(max(int(n) - 1, 1)), count, [count, *rows], api_name=False)


def _settings(gr, config: Dict[str, Any]) -> list:
    with gr.Accordion("Settings", open=False):
        mask = gr.Radio(list(MASK_VARIANTS), value=config["mask_variant"], label="Scene mask")
        seed = gr.Number(value=-1, precision=0, label="Seed (-1: random; the seed used is shown with the result)")
        steps = gr.Slider(1, 100, value=config["num_inference_steps"], step=1, label="Denoising steps")
        guidance = gr.Slider(0, 12, value=config["guidance_scale"], step=0.5, label="Guidance scale (<= 1: off)")
    return [mask, seed, steps, guidance]


def _outputs(gr) -> list:
    video = gr.Video(label="Whole film", elem_id="film-video", autoplay=True, loop=True, height=360)
    sheet = gr.Image(label="Contact sheet", type="filepath", elem_id="contact-sheet")
    gallery = gr.Gallery(label="Scenes", columns=3, height=240, elem_id="scene-videos")
    files = gr.File(label="Download (mp4, contact sheet)", file_count="multiple", elem_id="downloads")
    note = gr.Textbox(label="Result", interactive=False, elem_id="result-note")
    return [video, gallery, sheet, files, note]


def build_demo(maker: SceneMaker):
    """The Gradio page for ``maker``: scene rows (add / remove), settings, generate, extend by one scene."""
    import gradio as gr

    config = maker.config
    gpu = gpu_decorator(config["gpu_duration"])

    @gpu
    def generate(progress=gr.Progress(track_tqdm=True), *values):
        count, mask, seed, steps, guidance, *rows = values
        prompts = list(rows[: int(count)]) + [""] * max(0, int(count) - len(rows))  # too many: check_prompts says so
        return _readable(lambda: maker.generate(prompts, mask, resolve_seed(seed), steps, guidance))

    @gpu
    def extend(film, prompt, mask, seed, steps, guidance, progress=gr.Progress(track_tqdm=True)):
        if film is None:
            raise gr.Error("Generate a film first: extension continues the last result.", print_exception=False)
        return _readable(lambda: maker.extend(film, prompt, mask, resolve_seed(seed), steps, guidance))

    ttl = config["output_ttl_s"]
    with gr.Blocks(title=config["title"], delete_cache=(600, ttl) if ttl is not None else None) as demo:
        gr.Markdown(f"# {config['title']}\n\n{config['description']}")
        film = gr.State(None)
        with gr.Row():
            with gr.Column():
                count = gr.Number(value=3, visible=False, precision=0)
                rows = _scene_rows(gr, config)
                _row_buttons(gr, count, rows)
                if config.get("vocabulary"):
                    _prompt_builder(gr, config["vocabulary"], count, rows)
                settings = _settings(gr, config)
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                examples = list(config.get("examples") or [])
                next_prompt = gr.Textbox(label="Next scene", elem_id="extend-prompt",
                                         value=examples[3] if len(examples) > 3 else "")
                more = gr.Button("Extend by one scene", elem_id="extend")
            with gr.Column():
                outputs = _outputs(gr)
        run.click(generate, [count, *settings, *rows], [*outputs, film], api_name="generate")
        more.click(extend, [film, next_prompt, *settings], [*outputs, film], api_name="extend")
    demo.mask2dit_output_root = str(maker.output_root)  # launch() lets gradio serve the job files from there
    return demo


def launch(demo, server_name: Optional[str] = None, server_port: Optional[int] = None, **kwargs):
    """Queue (one job at a time, others wait their turn) and serve ``demo``. The address is ``server_name`` /
    ``server_port``, else gradio's ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``, else 127.0.0.1:7860."""
    server_name = server_name or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    server_port = int(server_port or os.environ.get("GRADIO_SERVER_PORT") or 7860)
    demo.queue(default_concurrency_limit=1, max_size=64)
    kwargs.setdefault("allowed_paths", [getattr(demo, "mask2dit_output_root", tempfile.gettempdir())])
    return demo.launch(server_name=server_name, server_port=server_port, **kwargs)


def main() -> None:
    config = load_config(Path(__file__).resolve().parent)
    maker = SceneMaker(load_pipeline(config["model"], config["dtype"]), config)
    launch(build_demo(maker))


if __name__ == "__main__":
    main()
