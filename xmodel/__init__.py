"""xmodel: the Xmodel-2.5 architecture (muP), its checkpoints, and the training recipe."""
