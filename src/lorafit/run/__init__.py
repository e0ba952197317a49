"""The run: its directory (RunDir), its record (Summary), the run store, and the one subprocess runner."""
