"""Publishing to the Hugging Face Hub: model cards, the self-contained custom pipeline, uploads, and the
conversion of the authors' released checkpoint.

- :mod:`.bundle`: generate the one-file ``pipeline.py`` from the package sources;
- :mod:`.build`: ``mask2dit hub build``, a Hub-ready folder (components or LoRA, card, pipeline.py);
- :mod:`.push`: ``mask2dit hub push`` with ``huggingface_hub``;
- :mod:`.convert`: ``mask2dit convert-official``;
- :mod:`.cards`: card templates (``hub_cards/``) and their placeholders.
"""
