"""Entry point for ``DiffusionPipeline.from_pretrained(..., custom_pipeline=<this folder>, trust_remote_code=True)``.

diffusers imports this file and takes the one `DiffusionPipeline` subclass defined outside diffusers that it
finds here; the pipeline itself lives in the installed package.
"""

from diffusers_mask2dit.pipeline import Mask2DiTPipeline

__all__ = ["Mask2DiTPipeline"]
