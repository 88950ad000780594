"""Building engine stores: convert a model into engines for several pipeline splits."""
