"""Tasks: what the model is asked to do, above the model (prompts and the decoding recipe of each):
captioning with structure priors, verification prompts."""
