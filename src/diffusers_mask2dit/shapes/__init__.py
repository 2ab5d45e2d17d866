"""The Shapes world (issue 11): a small world with known truth, its exact pixel scorer, and a tiny Mask²DiT trained
on it with this package's own trainer.

- :mod:`.world`: colours, shapes, motions, the prompt grammar, exact rendering and dataset writers;
- :mod:`.score`: per-scene background / colour / shape / direction read from decoded pixels, prompt accuracy,
  identity consistency, and `ShapesEncoder` for :mod:`diffusers_mask2dit.evaluation`;
- :mod:`.model`: the diffusers folder (CogVideoX-5b layout at toy size) and the shipped weights;
- :mod:`.vae`: training the world's `AutoencoderKLCogVideoX`.
"""
