"""Ray adapters: the Train driver inside a Tune trainable, evaluation tasks, storage."""
