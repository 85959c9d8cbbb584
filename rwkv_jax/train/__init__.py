"""Training: config sections and their checks, the optimizer and loss, the one program builder shared by
the trainer and compile-only planning, the training loop, resume checks, sharding and multi-host setup."""
