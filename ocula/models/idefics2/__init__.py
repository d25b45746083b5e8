"""Idefics2: a variable-resolution SigLIP tower, a perceiver resampler and a Mistral decoder."""
