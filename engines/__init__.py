"""Engine runtimes: the compute side of the project.

The reference engine is a PyTorch Llama-family decoder that runs any contiguous layer
range of a model over a paged, layer-granular KV cache. Nothing here schedules requests:
the orchestrator decides what runs; an engine only executes a typed step.
"""
