"""Training: the toy backbone's pretraining, and (the design) Diffusion-DPO of the user adapter."""
