"""herd-tiny: the small Llama 4 herd trains itself (data generators, build, evaluation)."""
