#!/usr/bin/env python
"""Fine-tune CogVideoX into Mask²DiT with LoRA (or in full), in the style of diffusers' training examples.

    accelerate launch --config_file examples/accelerate_configs/ddp.yaml examples/train_mask2dit_lora.py \
        --pretrained_model_name_or_path /models/CogVideoX-5b --stage sft --data_file data/sft.json \
        --output_dir mask2dit-lora --max_train_steps 10000

Every option can also come from ``--config run.yaml`` (flags win). The options, data formats and the
two-stage recipe are described in ``docs/training.md``; this script is a thin front end to
``diffusers_mask2dit.training``, the same code as ``mask2dit train``.
"""

import argparse
import sys

from accelerate import PartialState

from diffusers_mask2dit.training import CollectiveTimeoutError, NonFiniteLossError, train
from diffusers_mask2dit.training.config import add_config_arguments, config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Mask²DiT LoRA / full fine-tuning of CogVideoX.")
    add_config_arguments(parser, defaults={"finetune": "lora"})
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        config = config_from_args(parser.parse_args(argv))
    except ValueError as error:
        parser.error(str(error))
    try:
        result = train(config)
    except ValueError as error:  # a bad model, data file, output folder or checkpoint: before any training
        parser.error(str(error))
    except (NonFiniteLossError, CollectiveTimeoutError) as error:
        print(error, file=sys.stderr)
        return 1
    if PartialState().is_main_process:
        print(f"Trained weights: {result.weights_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
