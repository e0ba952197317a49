"""Reports: one page module shared by the compare and sweep reports, one function per chart."""
