"""A small class-conditional pixel-space DiT trained on real MNIST digits, its classifier, and data.

The reference model exists so that BlockDance can be measured on a *trained* Diffusion
Transformer (features with real spatio-temporal structure) without downloading weights.
See README.md in this folder for the model card.
"""
