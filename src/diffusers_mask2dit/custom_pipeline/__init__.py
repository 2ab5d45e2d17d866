"""The folder to pass as ``custom_pipeline`` to ``DiffusionPipeline.from_pretrained``.

    from diffusers import DiffusionPipeline
    from diffusers_mask2dit.custom_pipeline import FOLDER

    pipe = DiffusionPipeline.from_pretrained("THUDM/CogVideoX-5b", custom_pipeline=FOLDER, trust_remote_code=True)
"""

import os

FOLDER = os.path.dirname(os.path.abspath(__file__))
