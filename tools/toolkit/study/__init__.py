"""tools/study.py's parts: the matrices (data), compiling and sampling the rows, the report."""
