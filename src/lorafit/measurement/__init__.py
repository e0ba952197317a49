"""Pure measurement: the step meter, host memory, energy, FLOPs, and the memory estimate.
Nothing here knows about run directories."""
