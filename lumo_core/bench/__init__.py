"""`lumo bench tokenize|train|scale`: benchmarks that print their figures as one JSON line."""
