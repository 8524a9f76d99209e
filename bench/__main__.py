"""`python -m bench`: run every benchmark and print its figures."""

import sys

from bench import book_apply, ingest_pipeline

if __name__ == "__main__":
    ingest_argv = sys.argv[1:]  # flags such as --updates go to the ingest benchmark
    ingest_pipeline.parse_args(ingest_argv)  # a bad flag (or --help) stops here, before any benchmark runs
    book_apply.main()
    print()
    ingest_pipeline.main(ingest_argv)
