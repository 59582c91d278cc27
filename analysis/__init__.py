"""analysis: run records -> pandas DataFrames -> matplotlib figures and reports."""
