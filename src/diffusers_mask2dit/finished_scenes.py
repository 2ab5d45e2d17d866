"""Each scene of a video written to disk as soon as it is final, so that a run which stops later (a hung or dead
process of parallel inference, a kill, a crash) keeps every scene it finished.

`FinishedSceneWriter` is a ``callback_on_step_end`` for `Mask2DiTPipeline` (``__call__``, ``extend`` and
``generate_long``): at the last denoising step of each window it decodes that window's new scenes and writes, on
the main process, ``scene_XX.mp4`` and ``scene_XX.latents.safetensors`` (``latents (F_latent, C, h, w)``), each
atomically (temporary file, then rename). The latents are the ones the pipeline returns, bit for bit.

The generation commands use it for parallel inference. A run that completes writes the whole output folder as a
one-process run does and then removes the per-scene latents files (`remove_scene_latents`): ``latents.safetensors``
holds them all, bit for bit, so the folder is the same as without faults. A stopped run leaves them beside the
scene videos.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
from typing import Any, Dict, Iterator, List, Sequence

import torch

from .layout import drop_leading_frames, patch_aligned_frames
from .parallel import is_main_process
from .video_io import write_atomically, write_video

SCENE_VIDEO_NAME = "scene_{:02d}.mp4"  # as the generation CLI names its scene files (from 0)
SCENE_LATENTS_NAME = "scene_{:02d}.latents.safetensors"
_SCENE_LATENTS_PATTERN = re.compile(r"scene_\d+\.latents\.safetensors")


class RunStopped(RuntimeError):
    """The process was told to stop (SIGTERM) while generating: torchrun does so to every process of a run when one
    of them fails."""


SIGTERM_MESSAGE = ("Stopped by SIGTERM: torchrun stops every process of a run when one of them fails (its report "
                   "names that one).")


def new_scenes_per_window(num_scenes: int, scenes_per_window: int) -> List[int]:
    """The scenes each window of `Mask2DiTPipeline.generate_long` makes: the first ``scenes_per_window`` together,
    then one at a time (``[num_scenes]`` for one window, as ``__call__``)."""
    first = min(scenes_per_window, num_scenes)
    return [first] + [1] * (num_scenes - first)


class FinishedSceneWriter:
    """Writes each window's new scenes into ``folder`` when its last denoising step is done.

    Args:
        folder: the output folder (made when the first scene is written).
        scene_latent_frames: latent frames of every scene the call makes, in order.
        windows: new scenes per window (`new_scenes_per_window`; ``[n]`` for ``__call__`` and ``extend``).
        first_scene: index of the first new scene in the video (``extend``: the number of context scenes before it).
        fps: frame rate of the mp4 files.
    """

    tensor_inputs = ["latents"]

    def __init__(self, folder: str, scene_latent_frames: Sequence[int], windows: Sequence[int], first_scene: int = 0,
                 fps: int = 8) -> None:
        if sum(windows) != len(scene_latent_frames):
            raise ValueError(f"`windows` {list(windows)} make {sum(windows)} scenes but `scene_latent_frames` has {len(scene_latent_frames)}.")
        self.folder, self.fps = folder, fps
        self.scene_latent_frames, self.windows = list(scene_latent_frames), list(windows)
        self.first_scene = first_scene
        self.written: List[str] = []  # paths this process wrote, in order
        self.finished: List[str] = []  # mp4 files of the scenes finished so far (the main process writes them)
        self._window = 0
        self._done = 0  # new scenes finished so far
        self._writing = self._stop_requested = False

    @contextlib.contextmanager
    def stop_on_sigterm(self) -> Iterator[None]:
        """Within it, SIGTERM raises `RunStopped` (once the scene files being written are complete) instead of ending
        the process silently, so that the command can name the scenes on disk; only in the main thread."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._writing:  # the scene files first: the stop comes right after them (`__call__`)
            self._stop_requested = True
        else:
            raise RunStopped(SIGTERM_MESSAGE)

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if step != pipe.num_timesteps - 1 or self._window >= len(self.windows):
            return {}
        count = self.windows[self._window]
        frames = self.scene_latent_frames[self._done : self._done + count]
        first = self.first_scene + self._done
        self._window, self._done = self._window + 1, self._done + count
        if is_main_process():  # the callback's latents carry CogVideoX 1.5's filler frames in front of each scene
            padded = patch_aligned_frames(frames, getattr(pipe.transformer.config, "patch_size_t", None))
            latents = drop_leading_frames(callback_kwargs["latents"][:1, : sum(padded)], frames, padded)
            self._writing = True
            try:
                self.write_scenes(pipe, latents, frames, first)
            finally:
                self._writing = False
        self.finished.extend(os.path.join(self.folder, SCENE_VIDEO_NAME.format(first + k)) for k in range(count))
        if self._stop_requested:
            raise RunStopped(SIGTERM_MESSAGE)
        return {}

    def write_scenes(self, pipe: Any, latents: torch.Tensor, frames: Sequence[int], first: int) -> List[str]:
        """Decode ``latents (1, sum(frames), C, h, w)`` scene by scene and write scenes ``first, first + 1, ...``."""
        from safetensors.torch import save_file

        _, scenes = pipe.decode_scenes(latents, list(frames), output_type="np")
        paths = []
        for offset, (pixels, scene_latents) in enumerate(zip(scenes[0], torch.split(latents[0], list(frames)))):
            index = first + offset
            tensors = {"latents": scene_latents.detach().to("cpu").contiguous()}
            latents_path = os.path.join(self.folder, SCENE_LATENTS_NAME.format(index))
            paths.append(write_atomically(latents_path, lambda tmp, tensors=tensors: save_file(tensors, tmp)))
            paths.append(write_video(pixels, os.path.join(self.folder, SCENE_VIDEO_NAME.format(index)), fps=self.fps))
        self.written.extend(paths)
        return paths


def remove_scene_latents(folder: str) -> List[str]:
    """Remove the ``scene_XX.latents.safetensors`` files of ``folder`` once its ``latents.safetensors`` holds every
    scene (a completed run, or a later run into the folder of a stopped one); returns the removed paths."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if _SCENE_LATENTS_PATTERN.fullmatch(name):
            os.remove(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
    return removed


def report_stopped_run(command: str, error: BaseException, writer: Any = None) -> int:
    """Print the one-line stop message of a generation that a hung or dead process (`CollectiveTimeoutError`,
    `RunStopped`) or another failure ended after it started, naming the scenes already on disk; no traceback. Returns exit status 1."""
    finished = writer.finished if writer is not None else []
    kept = (f" {len(finished)} finished scene(s) are on disk: {', '.join(finished)}." if finished
            else " No scene was finished.")
    print(f"mask2dit {command}: error: {' '.join(str(error).split())}{kept}", file=sys.stderr)
    return 1
