"""The bottom layer: errors, options (config), device choice, the host allocator, library noise."""
