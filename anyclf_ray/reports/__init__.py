"""Reports: stages that read the rows and write figures only (the diversity report)."""
