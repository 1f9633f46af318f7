"""Scale-out of inference over torch.distributed, applied from outside the model: tensor-parallel
shards and their collectives (`tensor`), the step plans rank 0 broadcasts and the other ranks
follow (`steps`). Training's parallelism lives in herd.train.parallel. See docs/distributed.md."""
