"""Sub-commands ``mask2dit hub build|push|bundle`` and ``mask2dit convert-official``."""

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
        )
    except (BuildError, ValueError) as error:
        return fail("hub build", error)
    print(result.summary())
    return 0


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
    build.add_argument("--verify", choices=VERIFY_MODES, default="load",
                       help="Authors' release only: how to verify the conversion (default: load).")
    build.add_argument("--link", action="store_true", help="Hard-link weight files instead of copying when possible.")
    build.add_argument("--overwrite", action="store_true", help="Replace --out if it holds an earlier build.")
    build.set_defaults(func=_build)

    _add_push_parser(hub_sub)

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
