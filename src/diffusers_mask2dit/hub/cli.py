"""Sub-commands ``mask2dit hub build|push|space|bundle`` and ``mask2dit convert-official``."""

from __future__ import annotations

import argparse
import sys

from ..cli_utils import fail


def _build(args: argparse.Namespace) -> int:
    from .build import BuildError, build_hub_folder

    try:
        result = build_hub_folder(
            args.model,
            args.out,
            kind=args.kind,
            repo_id=args.repo_id,
            base=args.base,
            base_model=args.base_model,
            card=args.card,
            license=args.license,
            license_name=args.license_name,
            license_link=args.license_link,
            title=args.title,
            training_config=args.training_config,
            mask_variant=args.mask_variant,
            overwrite=args.overwrite,
            link=args.link,
            verify=args.verify,
            about=args.about,
        )
    except (BuildError, ValueError) as error:
        return fail("hub build", error)
    print(result.summary())
    if args.space:
        # The Space loads the model from --repo-id when one was given, else carries the built folder.
        return _write_space(str(result.out), args.space, args.repo_id, None, {}, args.overwrite, "hub build")
    return 0


def _write_space(model, out, model_repo_id, title, overrides, overwrite, command, bundle=None, hardware=None) -> int:
    from .space import SpaceError, build_space

    try:
        result = build_space(model, out, model_repo_id=model_repo_id, bundle_model=bundle, title=title,
                             hardware=hardware, overrides=overrides, overwrite=overwrite)
    except (SpaceError, ValueError) as error:
        return fail(command, error)
    print(result.summary())
    return 0


def _space(args: argparse.Namespace) -> int:
    overrides = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "max_scenes": args.max_scenes}
    return _write_space(args.model, args.out, args.model_repo_id, args.title, overrides, args.overwrite, "hub space",
                        bundle=True if args.bundle_model else None, hardware=args.hardware)


def _push(args: argparse.Namespace) -> int:
    from .push import PushError, plan_push, push_folder

    try:
        plan = plan_push(args.folder, args.repo, revision=args.revision, private=args.private,
                         commit_message=args.commit_message)
    except PushError as error:
        return fail("hub push", error)
    print(plan.describe())
    if args.dry_run:
        print("Dry run: nothing was uploaded.")
        return 0
    try:
        info = push_folder(plan)
    except Exception as error:  # network / auth errors from huggingface_hub; their text holds no token
        return fail("hub push", RuntimeError(f"upload failed: {type(error).__name__}: {error}"), code=1)
    url = getattr(info, "commit_url", None) or getattr(info, "repo_url", None) or ""
    print(f"Uploaded to {plan.repo_id}" + (f": {url}" if url else "."))
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from .bundle import BundleError, bundle_pipeline

    try:
        bundle = bundle_pipeline()
    except BundleError as error:
        return fail("hub bundle", error, code=1)
    if args.out == "-":
        sys.stdout.write(bundle.source)
    else:
        bundle.write(args.out)
        print(f"Wrote {args.out}: {', '.join(bundle.modules)} from diffusers-mask2dit {bundle.version}.")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import ConversionError, convert_official

    try:
        report = convert_official(args.src, args.out, verify=args.verify, overwrite=args.overwrite, link=args.link)
    except ConversionError as error:
        return fail("convert-official", error)
    print(report.summary())
    print(f"Report: {report.output}/mask2dit_conversion.json")
    return 0


def _add_push_parser(hub_sub: argparse._SubParsersAction) -> None:
    push = hub_sub.add_parser(
        "push",
        help="Upload a built folder with huggingface_hub (token from `hf auth login`; never printed).",
    )
    push.add_argument("--folder", required=True, help="Folder written by `mask2dit hub build`.")
    push.add_argument(
        "--repo-id", "--repo", dest="repo", required=True,
        help="Hub model repo id, owner/name (created if missing); --repo is the same option (older name)",
    )
    push.add_argument("--revision", help="Branch to upload to (created from main if missing).")
    push.add_argument("--private", action="store_true", help="Create the repo as private (an existing repo keeps its visibility).")
    push.add_argument("--commit-message", help="Commit message.")
    push.add_argument("--dry-run", action="store_true", help="List what would be uploaded and stop (no network).")
    push.set_defaults(func=_push)


def _register_space(hub_sub: argparse._SubParsersAction) -> None:
    space = hub_sub.add_parser(
        "space",
        help="Write a Hugging Face Space folder (Gradio app.py, requirements.txt, README front matter) for a model.",
        description="The app runs without this package: it loads the model's bundled pipeline.py as a diffusers "
        "custom pipeline. Run it locally with `python app.py` (127.0.0.1:7860).",
    )
    space.add_argument("--model", required=True, help="A folder built by `mask2dit hub build`, or a Hub model id.")
    space.add_argument("--out", required=True, help="Space folder to write (new or empty).")
    space.add_argument("--model-repo-id", help="Hub id of the model: the Space loads it from there and lists it "
                       "under `models:` (default for a local folder: bundle it into the Space).")
    space.add_argument("--bundle-model", action="store_true", help="Copy the model folder into the Space (model/).")
    space.add_argument("--title", help="Title of the Space and the page.")
    space.add_argument("--hardware", help="suggested_hardware (default: cpu-basic for small models, else zero-a10g).")
    space.add_argument("--steps", type=int, help="Default denoising steps (default: the model folder's, else 50).")
    space.add_argument("--guidance", type=float, help="Default guidance scale (default: the model folder's, else 6.0).")
    space.add_argument("--max-scenes", type=int, help="Most scenes a user may ask for (default: 6).")
    space.add_argument("--overwrite", action="store_true", help="Replace --out if it holds an earlier Space.")
    space.set_defaults(func=_space)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    from .build import CARD_CHOICES, KINDS
    from .convert import VERIFY_MODES

    hub = subparsers.add_parser("hub", help="Build and upload Hugging Face Hub folders (card, custom pipeline).")
    hub_sub = hub.add_subparsers(dest="hub_command", metavar="HUB_COMMAND")
    hub.set_defaults(func=lambda args: (hub.print_help(), 2)[1])

    build = hub_sub.add_parser(
        "build",
        help="Write a Hub-ready folder: model_index.json + components (or LoRA weights), README.md card, pipeline.py.",
        description="Build a Hub folder from a diffusers pipeline folder, the authors' release, a fine-tuned "
        "transformer (with --base) or a LoRA folder. The bundled pipeline.py needs only torch, diffusers and "
        "transformers.",
    )
    build.add_argument("--model", required=True, help="Input folder (pipeline, authors' release, transformer or LoRA).")
    build.add_argument("--out", required=True, help="Output folder (new or empty; --overwrite replaces an earlier build).")
    build.add_argument("--repo-id", help="Target Hub repo (owner/name), used in the card's snippets.")
    build.add_argument("--kind", choices=KINDS, default="auto", help="What --model holds (default: detected).")
    build.add_argument("--base", help="For a transformer folder: the diffusers folder giving the other components.")
    build.add_argument("--base-model", help="Hub id of the model that was fine-tuned (fine-tune / LoRA cards).")
    build.add_argument("--card", default="auto", help=f"{', '.join(CARD_CHOICES)} or a path to a .md template.")
    build.add_argument("--license", help="Licence of the weights: an SPDX-style id, 'other', or 'cogvideox'.")
    build.add_argument("--license-name", help="With --license other: the licence's short name.")
    build.add_argument("--license-link", help="With --license other: URL of the licence text.")
    build.add_argument("--title", help="Card title (default: the repo name).")
    build.add_argument("--training-config", help="Training options file to summarise in the card "
                       "(default: training_config.json/.yaml beside the weights).")
    build.add_argument("--mask-variant", help="LoRA only: the scene mask it was trained with (v1, v2, v3, full); "
                       "default: from the training config, else v2 marked as assumed in the card.")
    build.add_argument("--about", help="With --card scratch: a Markdown file on what the model is and how it measured "
                       "(e.g. its results table), put into the card.")
    build.add_argument("--space", help="Also write a Gradio Space folder for the built model here (see `hub space`).")
    build.add_argument("--verify", choices=VERIFY_MODES, default="load",
                       help="Authors' release only: how to verify the conversion (default: load).")
    build.add_argument("--link", action="store_true", help="Hard-link weight files instead of copying when possible.")
    build.add_argument("--overwrite", action="store_true", help="Replace --out if it holds an earlier build.")
    build.set_defaults(func=_build)

    _add_push_parser(hub_sub)

    _register_space(hub_sub)

    bundle = hub_sub.add_parser("bundle", help="Write only the self-contained pipeline.py.")
    bundle.add_argument("--out", default="-", help="Output file (default: standard output).")
    bundle.set_defaults(func=_bundle)

    convert = subparsers.add_parser(
        "convert-official",
        help="Turn the authors' released checkpoint (qth/Mask2DiT layout) into a standard diffusers folder.",
        description="Writes model_index.json with stock classes, the transformer config under the stock class with "
        "attn_mask_variant, all weights as safetensors; then checks every tensor against the source.",
    )
    convert.add_argument("--src", required=True, help="Folder with transformer/ vae/ text_encoder/ tokenizer/ scheduler/.")
    convert.add_argument("--out", required=True, help="Output folder (new or empty).")
    convert.add_argument("--verify", choices=VERIFY_MODES, default="load",
                         help="load: compare the source with the output files and the loaded models (default); "
                         "files: with the files only; none: skip.")
    convert.add_argument("--link", action="store_true", help="Hard-link unchanged files instead of copying.")
    convert.add_argument("--overwrite", action="store_true", help="Replace --out if it is an earlier conversion.")
    convert.set_defaults(func=_convert)
