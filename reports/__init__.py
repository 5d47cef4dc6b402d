"""moesim.reports: report documents and figures (matplotlib is imported lazily)."""
