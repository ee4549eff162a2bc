"""Backbones (toy, Stable Diffusion family, Stable Cascade) behind one interface, and the user adapter."""
