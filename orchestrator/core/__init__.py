"""The single-instance serving core: requests, the scheduler and its KV page book-keeping,
swap space, the executor of a split's stages and the engine loop (schedule -> execute ->
update). Pure CPU except the executor and the swap space; nothing here knows of MPI, the
cluster, policies or the HTTP ingress."""
