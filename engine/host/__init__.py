"""Facts of the host the engine adapts to: CPU flags and dtype, cores shared between workers, huge pages."""
