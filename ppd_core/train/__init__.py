"""Training: the toy backbone's pretraining, and (DESIGN.md section 6) Diffusion-DPO of the user adapter."""
