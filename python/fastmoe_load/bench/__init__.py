"""The speed comparison: fastmoe_load against pure-Python loading on a generated checkpoint."""
