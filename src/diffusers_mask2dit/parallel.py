"""Multi-GPU inference that keeps the scene mask: Ulysses context parallelism and CFG parallelism.

Both run on torch.distributed (NCCL on GPUs, gloo on CPU) through diffusers' own parallel API:

- **Ulysses context parallelism** (``ContextParallelConfig(ulysses_degree=d)``,
  ``transformer.enable_parallelism(config=...)``). Between attention layers each of the ``d`` ranks holds
  a ``1/d`` slice of the text tokens and a ``1/d`` slice of the video tokens; the transformer's
  :data:`SCENE_CP_PLAN` (its ``_cp_plan``) makes diffusers' hooks split them before the first block and
  gather the video tokens after ``proj_out``. Around scene attention one all-to-all over the heads gives
  each rank *every* token for ``H/d`` of the heads (:meth:`SequenceShard.gather_sequence`), so the Mask²DiT
  mask runs unchanged on the whole ``[text_1..text_n ; video_1..video_n]`` sequence, and a second
  all-to-all hands the result back (:meth:`SequenceShard.scatter_sequence`). The collectives are
  torch.distributed's functional all-to-all over the group of the mesh diffusers builds.
- **CFG parallelism** (:func:`apply_cfg_parallel`): the unconditional and conditional halves of the
  guidance batch run on two ranks and are gathered after the transformer.

What keeps it exact:

- Text and video lengths that do not divide by ``d`` are padded at the end of each region
  (:meth:`SequenceShard.pad`); padding tokens are removed before attention (nobody attends to them, they
  attend to nobody), get zeros back from it, and are cut off after the gather (:meth:`SequenceShard.unpad_video`).
- Per-scene modulation (scene-aware norms, per-scene timesteps) is told which scene each *local* token
  belongs to: the rank's `PerSceneEmbedding` carries its own :class:`ShardSegments`.
- RoPE is split by the same plan as the video tokens, so each local token is rotated by its own position.
- Heads that do not divide by ``d`` (CogVideoX-2b has 30) are split unevenly (:func:`split_heads`).

Neither parallelism changes the pipeline: it calls the transformer as always, and :func:`enable_parallel_inference`
sets everything up for a pipeline (mesh, both parallelisms, progress bars on rank 0 only).

diffusers on CPU: ``ModelMixin.enable_parallelism`` picks the device as ``rank % torch.accelerator.device_count()``,
a ``ZeroDivisionError`` on a machine without an accelerator (diffusers 0.42). The transformer's
``_resolve_parallel_config`` goes through :func:`resolve_parallel_config`, which builds the same mesh on CPU in
that case, so ``enable_parallelism`` itself (its checks, ``_cp_plan`` hooks) runs on CPU with gloo.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .layout import SceneLayout

try:  # diffusers' parallel API (0.42 tested); older diffusers: single-process inference only
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.models._modeling_parallel import (
        ContextParallelConfig,
        ContextParallelInput,
        ContextParallelOutput,
        ParallelConfig,
    )
except ImportError:  # pragma: no cover - depends on the installed diffusers
    HookRegistry = ContextParallelConfig = ContextParallelInput = ContextParallelOutput = ParallelConfig = None
    ModelHook = object

# How diffusers' context-parallel hooks split and gather the transformer's sequence (its `_cp_plan`). The
# transformer pads text and video to multiples of the degree before the first block and cuts the padding
# off after the gather (`SequenceShard`), so diffusers' equal split applies.
SCENE_CP_PLAN = None if ContextParallelInput is None else {
    # The token states enter the first block whole and leave every block as the rank's slice.
    "transformer_blocks.0": {
        "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
        "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
    },
    # Every block is handed the whole RoPE (cos, sin), each (video_tokens, head_dim): split like the video tokens.
    "transformer_blocks.*": {
        "image_rotary_emb": (
            ContextParallelInput(split_dim=0, expected_dims=2),
            ContextParallelInput(split_dim=0, expected_dims=2),
        ),
    },
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}

CFG_HOOK_NAME = "mask2dit_cfg_parallel"
MESH_DIM_NAMES = ("cfg", "ring", "ulysses")
DEFAULT_COLLECTIVE_TIMEOUT = 1800  # seconds, as the trainer's `collective_timeout`


class CollectiveTimeoutError(RuntimeError):
    """A process waited longer than ``collective_timeout`` for the others in a collective (one hung or died)."""


# --------------------------------------------------------------------------------------------------
# Collectives: torch.distributed's functional ones, with failures turned into a clear error
# --------------------------------------------------------------------------------------------------


def _wait(tensor: torch.Tensor) -> torch.Tensor:
    wait = getattr(tensor, "wait", None)
    return wait() if callable(wait) else tensor


def _collective(what: str, group: Any, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run one collective (and wait for it); a failure (a peer died, or the timeout passed) becomes a
    `CollectiveTimeoutError` that says which rank waited for what."""
    try:
        return _wait(run())
    except RuntimeError as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise CollectiveTimeoutError(
            f"Rank {dist.get_rank()} stopped in the {what} over {dist.get_world_size(group)} processes: another "
            f"process died or did not answer within the collective timeout (`collective_timeout`, the "
            f"process group's timeout) ({first}). Stop every process of the run."
        ) from error


def all_to_all(
    x: torch.Tensor, output_split_sizes: Optional[List[int]], input_split_sizes: Optional[List[int]], group: Any, what: str
) -> torch.Tensor:
    """torch.distributed's all-to-all along dim 0 (differentiable); equal splits when the sizes are None."""
    import torch.distributed._functional_collectives as funcol

    return _collective(
        what, group, lambda: funcol.all_to_all_single_autograd(x.contiguous(), output_split_sizes, input_split_sizes, group)
    )


def all_gather(x: torch.Tensor, dim: int, group: Any, what: str) -> torch.Tensor:
    """torch.distributed's all-gather of equal pieces along ``dim``, in rank order."""
    import torch.distributed._functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single", None) if dim == 0 else None  # newer name, dim 0 only
    gather = gather or funcol.all_gather_tensor
    return _collective(what, group, lambda: gather(x.contiguous(), dim, group))


def check_same_inputs(tensor: torch.Tensor, group: Any, name: str) -> None:
    """Every rank of ``group`` must hold the same ``tensor`` (say the initial latents): parallel ranks that
    start from different noise would each compute a slice of a different video. One all-reduce of two numbers."""
    fingerprint = tensor.detach().sum(dtype=torch.float64).reshape(1)
    both = torch.cat([fingerprint, -fingerprint])
    both = _collective(f"check that `{name}` agree", group, lambda: _all_reduce_max(both, group))
    if bool(torch.isfinite(both).all()) and both[0] != -both[1]:  # (NaN latents are not this check's business)
        raise ValueError(
            f"`{name}` differ between the parallel processes. Give every process the same inputs: pass a "
            "`generator` seeded with the same seed on every rank (or the same `latents`)."
        )


def _all_reduce_max(x: torch.Tensor, group: Any) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol

    return funcol.all_reduce(x, "max", group)


# --------------------------------------------------------------------------------------------------
# Ulysses: one rank's slice of the scene sequence
# --------------------------------------------------------------------------------------------------


def split_heads(num_heads: int, degree: int) -> List[int]:
    """Heads per rank: as equal as possible, the first ``num_heads % degree`` ranks one more (30 over 4: 8, 8, 7, 7)."""
    if degree > num_heads:
        raise ValueError(f"`ulysses_degree` ({degree}) cannot exceed the number of attention heads ({num_heads}).")
    return [num_heads // degree + (1 if rank < num_heads % degree else 0) for rank in range(degree)]


def padded_length(length: int, degree: int) -> int:
    """``length`` rounded up to a multiple of ``degree``."""
    return length + (-length) % degree


def _local_lengths(lengths: Sequence[int], degree: int, rank: int) -> Tuple[int, ...]:
    """Tokens of each segment of a region (``lengths`` one after the other) in ``rank``'s equal slice of the
    padded region; the padding at the end counts as part of the last segment."""
    total = padded_length(sum(lengths), degree)
    begin, end = rank * total // degree, (rank + 1) * total // degree
    counts, start = [], 0
    for length in lengths:
        counts.append(max(0, min(end, start + length) - max(begin, start)))
        start += length
    counts[-1] += max(0, end - max(begin, start))  # padding tokens in this slice
    return tuple(counts)


@dataclass(frozen=True)
class ShardSegments:
    """Tokens of each scene in one rank's slice of the sequence: what per-scene modulation needs to know which
    scene a local token belongs to (a `PerSceneEmbedding`'s ``layout`` under context parallelism). Counts may be
    0 (a scene outside the slice); padding tokens count in the last scene (their outputs are cut off)."""

    text_lengths: Tuple[int, ...]
    video_lengths: Tuple[int, ...]


@dataclass(frozen=True, eq=False)
class SequenceShard:
    """One rank's slice of the scene sequence under Ulysses context parallelism of degree ``degree``.

    Text (``layout.text_total`` tokens) and video (``layout.video_total``) are each padded to a multiple of
    ``degree`` and split into equal slices: rank ``r`` holds text tokens ``[r*Tl, (r+1)*Tl)`` and video tokens
    ``[r*Vl, (r+1)*Vl)`` of the padded regions, ``Tl = text_padded / degree``, ``Vl = video_padded / degree``.
    The transformer passes it to the attention processors as ``attention_kwargs["scene_shard"]``.
    """

    layout: SceneLayout
    degree: int
    rank: int
    group: Any

    @classmethod
    def for_group(cls, layout: SceneLayout, group: Any) -> "SequenceShard":
        return cls(layout, dist.get_world_size(group), dist.get_rank(group), group)

    @property
    def text_padded(self) -> int:
        return padded_length(self.layout.text_total, self.degree)

    @property
    def video_padded(self) -> int:
        return padded_length(self.layout.video_total, self.degree)

    @property
    def local_text(self) -> int:
        return self.text_padded // self.degree

    @property
    def local_video(self) -> int:
        return self.video_padded // self.degree

    @property
    def segments(self) -> ShardSegments:
        return ShardSegments(
            _local_lengths(self.layout.text_lengths, self.degree, self.rank),
            _local_lengths(self.layout.video_lengths, self.degree, self.rank),
        )

    # ----------------------------------------------------------------------------------------------
    # Before the first block and after the gather

    def pad(self, encoder_hidden_states: torch.Tensor, hidden_states: torch.Tensor, image_rotary_emb):
        """Text ``(B, Lt, C)``, video ``(B, Lv, C)`` and RoPE ``(Lv, D)`` each padded with zeros to the padded lengths."""
        text = _pad_tokens(encoder_hidden_states, self.text_padded, dim=1)
        video = _pad_tokens(hidden_states, self.video_padded, dim=1)
        if image_rotary_emb is not None:
            image_rotary_emb = tuple(_pad_tokens(part, self.video_padded, dim=0) for part in image_rotary_emb)
        return text, video, image_rotary_emb

    def unpad_video(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, video_padded, ...)`` gathered from all ranks -> ``(B, Lv, ...)``."""
        return hidden_states[:, : self.layout.video_total]

    # ----------------------------------------------------------------------------------------------
    # Around attention

    def check_local_tokens(self, text_tokens: int, video_tokens: int) -> None:
        if (text_tokens, video_tokens) != (self.local_text, self.local_video):
            raise ValueError(
                f"Under context parallelism each rank's attention expects {self.local_text} text and {self.local_video} "
                f"video tokens, got {text_tokens} and {video_tokens}: the sequence was not split by the transformer's "
                "`_cp_plan` (enable it with `transformer.enable_parallelism(config=ContextParallelConfig(...))`)."
            )

    def _real_tokens(self, rank: int) -> List[Tuple[int, int, int]]:
        """``(position in the rank's slice, position in the real sequence, count)`` of each run of real (not
        padding) tokens that ``rank`` holds: one run of text, one of video (either may be empty)."""
        text_start, video_start = rank * self.local_text, rank * self.local_video
        runs = [
            (0, text_start, min(self.local_text, self.layout.text_total - text_start)),
            (self.local_text, self.layout.text_total + video_start, min(self.local_video, self.layout.video_total - video_start)),
        ]
        return [run for run in runs if run[2] > 0]

    def gather_sequence(self, query, key, value) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, H, Tl + Vl, D)`` each (local tokens, all heads) -> ``(B, h, L, D)`` each: every real token of
        ``layout`` in order, for this rank's ``h`` heads. One all-to-all for the three."""
        batch, heads, tokens, dim = query.shape
        splits = split_heads(heads, self.degree)
        mine = splits[self.rank]
        even = len(set(splits)) == 1
        # (H, 3, B, Tl + Vl, D): the heads to send first, in one copy.
        qkv = torch.stack([x.transpose(0, 1) for x in (query, key, value)], dim=1)
        received = all_to_all(
            qkv, None if even else [mine] * self.degree, None if even else splits, self.group,
            "Ulysses all-to-all before scene attention",
        ).view(self.degree, mine, 3, batch, tokens, dim)  # from each source rank: its tokens, this rank's heads
        joint = query.new_empty(3, batch, mine, self.layout.total, dim)
        for source in range(self.degree):
            piece = received[source].permute(1, 2, 0, 3, 4)  # (3, B, h, Tl + Vl, D)
            for local, start, count in self._real_tokens(source):
                joint[:, :, :, start : start + count] = piece[:, :, :, local : local + count]
        return joint.unbind(0)

    def scatter_sequence(self, hidden_states: torch.Tensor, num_heads: int) -> torch.Tensor:
        """Inverse of :meth:`gather_sequence`: ``(B, h, L, D)`` -> ``(B, num_heads, Tl + Vl, D)`` (padding rows
        are zeros)."""
        batch, mine, _, dim = hidden_states.shape
        tokens = self.local_text + self.local_video
        send = hidden_states.new_zeros(self.degree, mine, batch, tokens, dim)  # to each rank: its tokens, my heads
        for destination in range(self.degree):
            for local, start, count in self._real_tokens(destination):
                send[destination, :, :, local : local + count] = hidden_states[:, :, start : start + count].transpose(0, 1)
        splits = split_heads(num_heads, self.degree)
        even = len(set(splits)) == 1
        received = all_to_all(
            send.view(self.degree * mine, batch, tokens, dim), None if even else splits,
            None if even else [mine] * self.degree, self.group, "Ulysses all-to-all after scene attention",
        )
        return received.permute(1, 0, 2, 3)  # (B, H, Tl + Vl, D)


def _pad_tokens(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """``x`` with zeros appended along ``dim`` up to ``length``."""
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (0, missing))


# --------------------------------------------------------------------------------------------------
# The transformer's side: config checks, and the shard of one forward call
# --------------------------------------------------------------------------------------------------


def _context_parallel_config(parallel_config: Optional[ParallelConfig]) -> Optional[ContextParallelConfig]:
    return None if parallel_config is None else parallel_config.context_parallel_config


def sequence_shard(parallel_config: Optional[ParallelConfig], layout: SceneLayout) -> Optional[SequenceShard]:
    """This rank's `SequenceShard` of ``layout`` when context parallelism is on (``transformer._parallel_config``),
    else None. The group is the one diffusers' hooks split the sequence over."""
    cp_config = _context_parallel_config(parallel_config)
    if cp_config is None:
        return None
    return SequenceShard.for_group(layout, cp_config._flattened_mesh.get_group())


def check_parallel_config(config: Any, num_heads: int) -> ParallelConfig:
    """``config`` as a `ParallelConfig` if scene attention can run under it, else a ValueError saying why."""
    if isinstance(config, ContextParallelConfig):
        config = ParallelConfig(context_parallel_config=config)
    if not isinstance(config, ParallelConfig) or config.context_parallel_config is None:
        raise ValueError(
            "`config` must be a ContextParallelConfig (or a ParallelConfig holding one) for Mask²DiT: scene attention "
            f"supports Ulysses context parallelism only; got {type(config).__name__}."
        )
    cp_config = config.context_parallel_config
    if cp_config.ring_degree > 1:
        raise ValueError(
            f"`ring_degree` must be 1 for Mask²DiT scene attention (got {cp_config.ring_degree}): ring attention is not "
            "implemented for the scene mask. Use `ulysses_degree` instead."
        )
    split_heads(num_heads, cp_config.ulysses_degree)  # raises if the degree exceeds the head count
    return config


def resolve_parallel_config(model: Any, config: Any, resolve: Callable[[Any], ParallelConfig]) -> ParallelConfig:
    """What the transformer's ``_resolve_parallel_config`` does: check ``config`` (`check_parallel_config`), then let
    diffusers (``resolve``) build the mesh and record the config, except without an accelerator, where diffusers'
    ``rank % torch.accelerator.device_count()`` divides by zero: there the same mesh is built on CPU (gloo)."""
    config = check_parallel_config(config, model.config.num_attention_heads)
    if torch.accelerator.device_count() > 0:
        return resolve(config)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed must be available and initialized before applying a `parallel_config`.")
    from torch.distributed.device_mesh import init_device_mesh

    cp_config = config.context_parallel_config
    mesh = cp_config.mesh or init_device_mesh("cpu", cp_config.mesh_shape, mesh_dim_names=cp_config.mesh_dim_names)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = config
    return config


# --------------------------------------------------------------------------------------------------
# CFG parallelism: the guidance batch split over two ranks
# --------------------------------------------------------------------------------------------------

# Transformer inputs with a batch dimension first (when their first size is the batch size).
_BATCHED_INPUTS = ("hidden_states", "encoder_hidden_states", "timestep", "timestep_cond", "ofs")


class CFGParallelHook(ModelHook):
    """Runs each rank's share of the batch through the transformer and gathers the outputs in batch order.

    The pipeline's guidance batch is ``[unconditional ; conditional]``, so with two ranks each runs one half. A
    batch that does not divide by the group size (no guidance) runs whole on every rank.
    """

    def __init__(self, group: Any):
        super().__init__()
        self.group = group
        self._signature = None

    def initialize_hook(self, module):
        from diffusers.utils.torch_utils import unwrap_module

        self._signature = inspect.signature(unwrap_module(module).__class__.forward)
        return module

    def new_forward(self, module, *args, **kwargs):
        bound = self._signature.bind(module, *args, **kwargs)
        batch = bound.arguments["hidden_states"].shape[0]
        degree, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if batch % degree:
            return self.fn_ref.original_forward(*args, **kwargs)
        check_same_inputs(bound.arguments["hidden_states"], self.group, "hidden_states")
        for name in _BATCHED_INPUTS:
            value = bound.arguments.get(name)
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                bound.arguments[name] = value.chunk(degree, dim=0)[rank]
        output = self.fn_ref.original_forward(*bound.args[1:], **bound.kwargs)
        what = "CFG-parallel gather of the transformer output"
        if isinstance(output, tuple):
            return (all_gather(output[0], 0, self.group, what), *output[1:])
        output.sample = all_gather(output.sample, 0, self.group, what)
        return output


def apply_cfg_parallel(transformer: torch.nn.Module, group: Any) -> None:
    """Split the transformer's batch over ``group`` (a torch.distributed process group, usually of size 2)."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(CFGParallelHook(group), CFG_HOOK_NAME)


# --------------------------------------------------------------------------------------------------
# Setting up a run: processes, mesh, pipeline
# --------------------------------------------------------------------------------------------------


def is_main_process() -> bool:
    """True on rank 0 of a distributed run (or of a ``torchrun`` launch not started yet), and in a single-process
    run: the process that writes outputs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def end_parallel() -> None:
    """End torch.distributed if it was started (`init_parallel`); nothing otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting the same variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init_parallel(device_type: str = "cuda", collective_timeout: int = DEFAULT_COLLECTIVE_TIMEOUT) -> torch.device:
    """Start torch.distributed for a ``torchrun`` launch and return this process's device.

    NCCL with one GPU per process (``cuda:LOCAL_RANK``) when ``device_type`` is ``"cuda"``, gloo on CPU otherwise.
    ``collective_timeout`` (seconds) bounds every collective: a process that dies or hangs stops the others
    with a `CollectiveTimeoutError` instead of a hang. Does nothing but return the device if already started.
    """
    if not launched_by_torchrun() and not dist.is_initialized():
        raise ValueError(
            "Parallel inference needs one process per device, started by `torchrun --nproc-per-node N ...` "
            "(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set)."
        )
    if not isinstance(collective_timeout, int) or isinstance(collective_timeout, bool) or collective_timeout < 1:
        raise ValueError(f"`collective_timeout` must be a whole number of seconds >= 1; got {collective_timeout!r}.")
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=collective_timeout),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return device


def parallel_mesh(ulysses_degree: int, cfg_degree: int, device_type: str):
    """A ``("cfg", "ring", "ulysses")`` device mesh of shape ``(cfg_degree, 1, ulysses_degree)`` over all processes:
    each CFG half has its own Ulysses group, and diffusers takes the ``ring``/``ulysses`` dims for context parallelism."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (cfg_degree, 1, ulysses_degree), mesh_dim_names=MESH_DIM_NAMES)


def _check_degrees(ulysses_degree: Any, cfg_parallel: Any, world_size: int) -> int:
    if not isinstance(ulysses_degree, int) or isinstance(ulysses_degree, bool) or ulysses_degree < 1:
        raise ValueError(f"`ulysses_degree` must be a whole number >= 1; got {ulysses_degree!r}.")
    if not isinstance(cfg_parallel, bool):
        raise ValueError(f"`cfg_parallel` must be True or False; got {cfg_parallel!r}.")
    cfg_degree = 2 if cfg_parallel else 1
    if ulysses_degree * cfg_degree != world_size:
        raise ValueError(
            f"`ulysses_degree` ({ulysses_degree}) x CFG degree ({cfg_degree}, `cfg_parallel={cfg_parallel}`) must equal "
            f"the number of processes ({world_size})."
        )
    return cfg_degree


def parallelize_transformer(transformer: torch.nn.Module, ulysses_degree: int = 1, cfg_parallel: bool = False):
    """Spread a `Mask2DiTTransformer3DModel` over all processes: ``ulysses_degree`` processes share each sequence
    (diffusers' ``enable_parallelism`` with ``ContextParallelConfig(ulysses_degree=...)``), and with
    ``cfg_parallel`` the guidance batch is split over two such groups. Returns the ``("cfg", "ring", "ulysses")``
    device mesh. `enable_parallel_inference` does this for a pipeline."""
    if ContextParallelConfig is None:
        raise ValueError("Parallel inference needs diffusers' parallel API (ContextParallelConfig): upgrade diffusers.")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("torch.distributed is not started: launch with `torchrun` and call `init_parallel()` first.")
    cfg_degree = _check_degrees(ulysses_degree, cfg_parallel, dist.get_world_size())
    if getattr(transformer, "_cp_plan", None) is not SCENE_CP_PLAN:
        raise ValueError(f"The transformer must be a Mask2DiTTransformer3DModel, got {type(transformer).__name__}.")
    mesh = parallel_mesh(ulysses_degree, cfg_degree, transformer.device.type)
    if ulysses_degree > 1:
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses_degree, mesh=mesh))
    if cfg_degree > 1:
        apply_cfg_parallel(transformer, mesh["cfg"].get_group())
    return mesh


def enable_parallel_inference(pipe: Any, ulysses_degree: int = 1, cfg_parallel: bool = False):
    """Spread a pipeline's transformer over the processes of a ``torchrun`` launch, keeping the scene mask.

    Every process runs the same pipeline call with the same inputs (seed the ``generator`` alike on every rank);
    the transformer's work is split, and every process gets the whole result. Progress bars show on rank 0 only;
    write outputs on rank 0 only (`is_main_process`).

    Args:
        pipe: a `Mask2DiTPipeline` (any pipeline whose ``transformer`` is a `Mask2DiTTransformer3DModel`), already
            on this process's device.
        ulysses_degree: processes that share one sequence (Ulysses context parallelism; diffusers'
            ``ContextParallelConfig(ulysses_degree=...)``); at most the number of attention heads.
        cfg_parallel: run the unconditional and conditional passes of classifier-free guidance on two processes.

    ``ulysses_degree * (2 if cfg_parallel else 1)`` must be the number of processes (e.g. 8 GPUs: 4 x CFG).

    Returns:
        The ``("cfg", "ring", "ulysses")`` device mesh.
    """
    mesh = parallelize_transformer(getattr(pipe, "transformer", None), ulysses_degree, cfg_parallel)
    if not is_main_process():
        pipe.set_progress_bar_config(**{**getattr(pipe, "_progress_bar_config", {}), "disable": True})
    return mesh
