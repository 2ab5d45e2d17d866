"""The generation wing: ``mask2dit generate`` / ``extend`` (:mod:`.cli`), beside ``training/``, ``hub/`` and
``evaluation/``.

- :mod:`.outputs`: the output folder (scene mp4s, contact sheet, prompts, exact latents, the run's settings);
- :mod:`.options`: checking the options, before loading the model and against it;
- :mod:`.loading`: model sources, dtypes, schedulers, a fine-tune's transformer, LoRA, memory and parallel options;
- :mod:`.scenes`: generating the scenes with a loaded pipeline.
"""

from .outputs import (
    CONTACT_SHEET_FILE,
    LATENTS_FILE,
    PROMPTS_FILE,
    SETTINGS_FILE,
    WHOLE_VIDEO_FILE,
    OutputFolder,
    SavedLatents,
    load_latents,
    read_output_folder,
    read_prompts,
    save_latents,
    save_outputs,
    scene_file,
)

__all__ = [
    "CONTACT_SHEET_FILE",
    "LATENTS_FILE",
    "PROMPTS_FILE",
    "SETTINGS_FILE",
    "WHOLE_VIDEO_FILE",
    "OutputFolder",
    "SavedLatents",
    "load_latents",
    "read_output_folder",
    "read_prompts",
    "save_latents",
    "save_outputs",
    "scene_file",
]
